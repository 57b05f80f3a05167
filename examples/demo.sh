#!/usr/bin/env bash
# `make demo`: the whole path on one machine. Starts the local control plane,
# installs the CRDs, starts the operator, simulates three edge nodes with kwok,
# applies a real ONNX model and an EdgePool, and waits until both are Ready.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export KUBECONFIG="$repo/target/cluster/kubeconfig"
export PATH="${SHOAL_CACHE:-$HOME/.cache/shoal}/bin/current:$PATH"
demo="$repo/target/demo"
models=$(tests/models/fetch.sh)
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1/6 Local control plane (kube-apiserver, etcd, controller-manager, scheduler, kwok)"
tests/cluster/up.sh

step "2/6 Shoal's CRDs"
kubectl apply --server-side --force-conflicts --field-manager shoal-demo -f crds/shoal.dev.yaml
kubectl wait --for condition=Established --timeout 60s -f crds/shoal.dev.yaml

step "3/6 Three simulated edge nodes (kwok): two stores and a warehouse"
for node in store-berlin store-lyon warehouse-rotterdam; do
  site=store; [[ $node == warehouse-* ]] && site=warehouse
  kubectl apply --server-side --field-manager shoal-demo -f - <<NODE
apiVersion: v1
kind: Node
metadata:
  name: $node
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {type: kwok, shoal.dev/site: $site, kubernetes.io/hostname: $node}
spec:
  taints: [{key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}]
status:
  allocatable: {cpu: "4", memory: 8Gi, pods: "110"}
  capacity: {cpu: "4", memory: 8Gi, pods: "110"}
NODE
done

step "4/6 shoal-operator (logs: target/demo/operator.log)"
mkdir -p "$demo"
stop_pid() { if [[ -f $1 ]]; then kill "$(cat "$1")" 2>/dev/null || true; rm -f "$1"; fi; }
stop_pid "$demo/operator.pid"; stop_pid "$demo/model-server.pid"
kubectl create namespace shoal-demo --dry-run=client -o yaml | kubectl apply -f -
setsid target/debug/shoal-operator run --namespace shoal-demo --artifact-dir "$demo/artifacts" \
  --metrics-addr 127.0.0.1:18080 --agent-api-addr 127.0.0.1:18443 --agent-api-url http://127.0.0.1:18443 \
  >"$demo/operator.log" 2>&1 </dev/null &
echo $! >"$demo/operator.pid"
# The model's HTTP source: a plain file server on loopback, as an object store would be.
setsid python3 -m http.server --bind 127.0.0.1 --directory "$models/magika-1.0.3" 18081 \
  >"$demo/model-server.log" 2>&1 </dev/null &
echo $! >"$demo/model-server.pid"
for _ in $(seq 60); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.5; done
curl -sf http://127.0.0.1:18080/readyz >/dev/null || { tail -20 "$demo/operator.log"; exit 1; }
echo "operator ready: http://127.0.0.1:18080/metrics"

step "5/6 A real model (magika's file-type classifier) and an EdgePool"
kubectl apply -f examples/quickstart/model.yaml -f examples/quickstart/edge-pool.yaml

step "6/6 Waiting for the Model and the EdgePool to be Ready"
deadline=$((SECONDS + 180))
until kubectl -n shoal-demo wait --for condition=Ready --timeout 2s model/file-type-classifier edgepool/stores >/dev/null 2>&1; do
  if ((SECONDS > deadline)); then
    kubectl -n shoal-demo get models,edgepools -o yaml | tail -40
    echo "timed out; operator log: $demo/operator.log" >&2
    exit 1
  fi
  printf '\r  model: %-10s  pool: %s nodes, %s agents ready   ' \
    "$(kubectl -n shoal-demo get model file-type-classifier -o jsonpath='{.status.phase}')" \
    "$(kubectl -n shoal-demo get edgepool stores -o jsonpath='{.status.nodes}')" \
    "$(kubectl -n shoal-demo get edgepool stores -o jsonpath='{.status.agentsReady}')"
done
echo
kubectl -n shoal-demo get models,edgepools
echo
kubectl -n shoal-demo get model file-type-classifier -o jsonpath='{range .status.versions[*]}version {.version}: {.artifactDigest} ({.artifactBytes} bytes), inputs {.inputs}, outputs {.outputs}{"\n"}{end}'
cat <<DONE

Shoal is running. Poke at it:
  export KUBECONFIG=$KUBECONFIG PATH=$(dirname "$(command -v kubectl)"):\$PATH
  kubectl -n shoal-demo get models,edgepools,daemonsets,pods -o wide
  kubectl explain model.spec.source
  curl -s http://127.0.0.1:18080/metrics | grep shoal_operator
Stop everything: make demo-down
DONE
