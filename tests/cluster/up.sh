#!/usr/bin/env bash
# Starts the local control plane on 127.0.0.1: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok, with certificates and
# service-account keys generated on first use. Writes target/cluster/kubeconfig
# and one PID file per process so down.sh stops exactly what this started.
# The API server is ready for a real kubelet too (node-up.sh): Node authorization
# and NodeRestriction for the node's credentials, a client certificate towards
# kubelets (kubectl logs/exec) and kubelets reached by their InternalIP (the default
# order tries the Hostname first, a DNS lookup of the node name on the host).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
"$here/build.sh"
bin=${SHOAL_CACHE:-$HOME/.cache/shoal}/bin/current
state="$repo/target/cluster"
pki="$state/pki" pids="$state/pids" logs="$state/logs"
kubeconfig="$state/kubeconfig"
api_port=${SHOAL_APISERVER_PORT:-16443}
etcd_port=${SHOAL_ETCD_PORT:-12379}
etcd_peer_port=${SHOAL_ETCD_PEER_PORT:-12380}
kcm_port=${SHOAL_KCM_PORT:-10257}
scheduler_port=${SHOAL_SCHEDULER_PORT:-10259}
kwok_port=${SHOAL_KWOK_PORT:-10247}

kubectl() { "$bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }

if [[ -f "$pids/kube-apiserver.pid" ]] && kill -0 "$(cat "$pids/kube-apiserver.pid")" 2>/dev/null \
  && kubectl get --raw /readyz >/dev/null 2>&1; then
  echo "Local control plane already running (KUBECONFIG=$kubeconfig)"
  exit 0
fi
"$here/down.sh" --quiet || true
mkdir -p "$pki" "$pids" "$logs"

# --- certificates and keys (kept across runs; a fresh cluster reuses them; a
# missing one, e.g. one added since pki/ was made, is generated) ---
"$here/pki.sh"

cat >"$kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: shoal-local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: shoal-admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: shoal-local
  context: {cluster: shoal-local, user: shoal-admin}
current-context: shoal-local
KUBECONFIG

start() { # name binary args...
  local name=$1; shift
  setsid "$@" >"$logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$pids/$name.pid"
}
wait_for() { # what seconds command...
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "timed out after ${seconds}s waiting for $what; its log is in $logs" >&2
      exit 1
    fi
    sleep 0.5
  done
}

echo "Starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok on 127.0.0.1"
rm -rf "$state/etcd"
start etcd "$bin/etcd" --name shoal-local --data-dir "$state/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "shoal-local=http://127.0.0.1:$etcd_peer_port" --unsafe-no-fsync --log-level warn
start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/service-account.pub" \
  --service-account-signing-key-file "$pki/service-account.key" \
  --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP \
  --endpoint-reconciler-type none --profiling=false
wait_for "kube-apiserver /readyz" 120 kubectl get --raw /readyz

for name in kube-controller-manager kube-scheduler; do
  port=$kcm_port; [[ $name == kube-scheduler ]] && port=$scheduler_port
  extra=()
  [[ $name == kube-controller-manager ]] && extra=(
    --service-account-private-key-file "$pki/service-account.key" --root-ca-file "$pki/ca.crt"
    --use-service-account-credentials=false)
  start "$name" "$bin/$name" --kubeconfig "$kubeconfig" \
    --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$port" "${extra[@]}"
done
start kwok "$bin/kwok" --kubeconfig "$kubeconfig" \
  --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --server-address "127.0.0.1:$kwok_port" --node-ip 10.0.0.1 --cidr 10.0.1.0/24

# The controller-manager creates each namespace's default ServiceAccount; pods need it.
wait_for "the default ServiceAccount (kube-controller-manager)" 120 kubectl -n default get serviceaccount default
version=$(kubectl version -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1)
cat <<DONE
Local control plane is up: kube-apiserver $version on https://127.0.0.1:$api_port
  export KUBECONFIG=$kubeconfig
  export PATH=$bin:\$PATH
  kubectl get --raw /readyz; kubectl get namespaces
Logs: $logs   Stop it: make cluster-down
DONE
