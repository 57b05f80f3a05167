#!/usr/bin/env bash
# Proves the real node (node-up.sh) works end to end, with images made from local
# files (node-test-images.sh): a pod on shoal-node-0 serving HTTP, a ClusterIP
# Service in front of it, and checks that
#   (a) the host reaches the Service's ClusterIP,
#   (b) another pod reaches it by <svc>.<ns>.svc.cluster.local (CoreDNS, kube-proxy),
#   (c) a pod reaches https://kubernetes.default.svc (401 without a token, the API
#       discovery document with its service-account token),
#   (d) kubectl logs and kubectl exec work (API server -> kubelet),
#   and that a name outside cluster.local does not resolve (nothing goes upstream).
# Starts the node if it is not up; removes its namespace and the images it imported.
# Exits non-zero on the first failed check, with what it saw.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/node-common.sh"
t0=$SECONDS
step() { printf '[%3ds] %s\n' $((SECONDS - t0)) "$*"; }
ns=shoal-node-check-$$
imported=()
failed=false

fail() {
  failed=true
  echo "node-check FAILED: $*" >&2
  {
    echo "--- pods in $ns ---"; kubectl -n "$ns" get pods -o wide 2>&1
    echo "--- events in $ns ---"; kubectl -n "$ns" get events --sort-by=.lastTimestamp 2>&1 | tail -15
    echo "--- last lines of $logs/kubelet.log ---"; grep -E '^[EW]' "$logs/kubelet.log" | tail -10
  } >&2
  exit 1
}
cleanup() {
  kubectl delete namespace "$ns" --ignore-not-found --wait=true --timeout=90s >/dev/null 2>&1 || true
  for image in "${imported[@]}"; do ctr images rm "$image" >/dev/null 2>&1 || true; done
  $failed || step "cleaned up (namespace $ns, images ${imported[*]:-none})"
}

node_ready() {
  [[ $(kubectl get node "$node_name" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}
if ! node_ready || ! alive containerd; then
  step "the node is not up: node-up.sh"
  "$here/node-up.sh"
fi
trap cleanup EXIT

# --- images: the test image, and a stand-in pause image if the node has none ---
work="$node_dir/test-images"
rm -f "$work"/*.tar
"$here/node-test-images.sh" "$work" >/dev/null
have=$(ctr images ls -q)
for tar in "$work"/*.tar; do
  name=$(tar -xOf "$tar" manifest.json | sed -n 's/.*"RepoTags":\["\([^"]*\)".*/\1/p')
  # The test image is always imported (a stale one of that name is replaced) and
  # removed after; the stand-in pause image only when the node has none.
  if [[ $name != "$pause_image" ]] || ! grep -qxF "$name" <<<"$have"; then
    ctr images import "$tar" >/dev/null || fail "ctr images import $tar"
    imported+=("$name")
  fi
done
step "images imported: ${imported[*]:-none needed}"

# --- a server pod, its Service, a client pod ---
kubectl create namespace "$ns" >/dev/null
kubectl -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeSelector: {shoal.dev/node: real}
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: localhost/shoal/node-test:1
    imagePullPolicy: Never
    command: [/bin/sh, -c, 'mkdir -p /www && echo shoal-node-check-ok >/www/index.html && echo "serving on :8080" && exec httpd -f -p 8080 -h /www']
    ports: [{containerPort: 8080}]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeSelector: {shoal.dev/node: real}
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: localhost/shoal/node-test:1
    imagePullPolicy: Never
    command: [/bin/sleep, "3600"]
YAML
step "pods web and client, Service web in namespace $ns"
kubectl -n "$ns" wait --for=condition=Ready pod/web pod/client --timeout=90s >/dev/null \
  || fail "the pods did not become Ready in 90s"
node=$(kubectl -n "$ns" get pod web -o jsonpath='{.spec.nodeName}')
[[ $node == "$node_name" ]] || fail "pod web runs on '$node', not $node_name"
web_ip=$(kubectl -n "$ns" get pod web -o jsonpath='{.status.podIP}')
svc_ip=$(kubectl -n "$ns" get service web -o jsonpath='{.spec.clusterIP}')
step "pods Ready on $node_name (web at $web_ip, Service web at $svc_ip)"

# kube-proxy programs the Service once its EndpointSlice is there: retry briefly.
retry() { # seconds command...
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do ((SECONDS < deadline)) || return 1; sleep 1; done
}

# (a) the host -> the ClusterIP
out=""
host_get() { out=$(curl -fsS --max-time 3 "http://$svc_ip/" 2>&1) && [[ $out == shoal-node-check-ok ]]; }
retry 30 host_get || fail "(a) host -> http://$svc_ip/ (Service web): $out"
step "(a) host -> Service web http://$svc_ip/: $out"

# (b) pod -> the Service by its DNS name (busybox's wget resolves through libc and
# the pod's resolv.conf; its nslookup asks the pod's nameserver for the exact name).
fqdn="web.$ns.svc.cluster.local"
in_pod() { kubectl -n "$ns" exec client -- "$@" 2>&1; }
pod_get() { # url
  out=$(in_pod timeout 5 wget -qO- "$1") && [[ $out == shoal-node-check-ok ]]
}
retry 30 pod_get "http://$fqdn/" || fail "(b) pod client -> http://$fqdn/: $out"
resolved=$(in_pod nslookup "$fqdn") || fail "(b) nslookup $fqdn in a pod: $resolved"
grep -q "^Address: $svc_ip\$" <<<"$resolved" || fail "(b) $fqdn did not resolve to the ClusterIP $svc_ip: $resolved"
pod_get http://web/ || fail "(b) pod client -> http://web/ (resolv.conf's search list): $out"
step "(b) pod client -> http://$fqdn/ ($svc_ip): $out (and http://web/ through the search list)"
# ... and nothing outside cluster.local resolves (nothing goes upstream).
if outside=$(in_pod nslookup example.com); then
  fail "example.com resolved in a pod; the cluster DNS must not forward: $outside"
fi
step "    DNS: example.com does not resolve in a pod ($(grep -m1 -o "can't find.*" <<<"$outside"))"

# ... and a pod reaches the host only where the node serves pods (DNS, the API
# forwarder): the kubelet listens on $node_ip:10250, and node-up's guard drops that.
if guard=$(in_pod timeout 4 nc -w 3 "$node_ip" 10250 </dev/null); then
  fail "a pod connected to the kubelet on $node_ip:10250; node-up's guard (mangle $guard_chain-IN) is missing: $guard"
fi
step "    guard: a pod cannot connect to $node_ip:10250 (the kubelet)"

# (c) pod -> the API server through the kubernetes Service, by its DNS name
api_url=https://kubernetes.default.svc/api
anon=$(in_pod timeout 10 wget -qO- --no-check-certificate "$api_url" || true)
grep -q '401\|403' <<<"$anon" || fail "(c) anonymous $api_url: expected 401/403, got: $anon"
api=$(in_pod sh -c 'timeout 10 wget -qO- --no-check-certificate \
  --header "Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)" '"$api_url") \
  || fail "(c) $api_url with the pod's service-account token: $api"
grep -q '"kind": *"APIVersions"' <<<"$api" || fail "(c) expected the APIVersions document, got: $api"
step "(c) pod client -> $api_url: $(grep -o '40[13] [A-Za-z]*' <<<"$anon" | head -1) anonymous; APIVersions with its token"

# (d) kubectl logs (and exec, used above) through the kubelet
logs_out=$(kubectl -n "$ns" logs web 2>&1) || fail "(d) kubectl logs web: $logs_out"
grep -q 'serving on :8080' <<<"$logs_out" || fail "(d) kubectl logs web: expected 'serving on :8080', got: $logs_out"
step "(d) kubectl logs web: $logs_out"
echo "node-check: all checks passed on $node_name in $((SECONDS - t0))s"
