#!/usr/bin/env bash
# `make demo`: the whole path on one machine. Starts the local control plane,
# installs the CRDs, starts the operator, simulates three edge nodes with kwok,
# applies the example product recommender (trained on MovieLens-100k by
# examples/recommender/) with int8 compression behind an accuracy gate, and an
# EdgePool, starts a real shoal-agent for each store node (each with its own
# pod-bound token), rolls version 1.0 out, sends traffic, rolls 2.0 out step by
# step with a live view, then rolls out a deliberately broken 3.0 that the
# canary analysis catches and rolls back. Where the machine allows it (root, amd64,
# SHOAL_DEMO_REAL_NODE not 0), one more store is a real node: a kubelet with
# containerd (tests/cluster/node-up.sh) that runs the agent as a pod from its image,
# reached through the pool's Service; elsewhere the demo says why it skips it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export KUBECONFIG="$repo/target/cluster/kubeconfig"
export PATH="${SHOAL_CACHE:-$HOME/.cache/shoal}/bin/current:$PATH"
demo="$repo/target/demo"
recommender=${SHOAL_RECOMMENDER_DIR:?run the demo with make demo (it trains the example model)}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
# The workspace's binaries (CARGO_TARGET_DIR when set, as `make` passes it).
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
# `kubectl shoal` is $bin/kubectl-shoal, found on PATH like any kubectl plugin.
export PATH="$bin:$PATH"
stores=(store-berlin store-lyon store-milan store-porto)

# The real node needs root (network namespaces, a bridge, iptables, containerd) and
# an amd64 host (the local node's pause image is built for amd64).
real_node_blocker=""
if [[ ${SHOAL_DEMO_REAL_NODE:-1} == 0 ]]; then real_node_blocker="SHOAL_DEMO_REAL_NODE=0"
elif (($(id -u) != 0)); then real_node_blocker="it needs root (bridge, iptables, containerd); run make demo as root"
elif [[ $(uname -m) != x86_64 ]]; then real_node_blocker="the local real node is built for amd64 hosts, this is $(uname -m)"
fi
# The agent API listens where the real node's pods reach the host: its bridge.
if [[ -z $real_node_blocker ]]; then agent_api=10.244.0.1:18443; else agent_api=127.0.0.1:18443; fi

step "1/10 Local control plane (kube-apiserver, etcd, controller-manager, scheduler, kwok)"
tests/cluster/up.sh
if [[ -z $real_node_blocker ]]; then
  echo "A real node too: kubelet + containerd + runc, the agent's image built here (a static"
  echo "musl release build: several minutes the first time) and imported as k3s imports air-gap images."
  make --no-print-directory node-deps node-images
  tests/cluster/node-up.sh
  # It is one more store: the stores pool selects it, the kubelet runs its agent pod.
  kubectl label node shoal-node-0 shoal.dev/site=store --overwrite
else
  echo "No real node in this demo: $real_node_blocker. Every agent runs as a process."
fi

step "2/10 Shoal's CRDs"
kubectl apply --server-side --force-conflicts --field-manager shoal-demo -f crds/shoal.dev.yaml
kubectl wait --for condition=Established --timeout 60s -f crds/shoal.dev.yaml

step "3/10 Five simulated edge nodes (kwok): four stores and a warehouse"
for node in "${stores[@]}" warehouse-rotterdam; do
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

step "4/10 shoal-operator (logs: target/demo/operator.log)"
mkdir -p "$demo"
examples/demo-stop.sh "$demo"
kubectl delete namespace shoal-demo --ignore-not-found --wait=true >/dev/null
kubectl create namespace shoal-demo
rm -rf "$demo/artifacts" "$demo/agents" "$demo/tls"
# The agent API serves HTTPS with a certificate of the demo's own CA: agents send it
# their tokens, and the operator refuses plain HTTP anywhere but on loopback. The
# operator hands the CA to the pool's agent pods (--agent-api-ca).
mkdir -p "$demo/tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=shoal-demo-ca \
  -keyout "$demo/tls/ca.key" -out "$demo/tls/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=shoal-agent-api \
  -keyout "$demo/tls/agent-api.key" -out "$demo/tls/agent-api.csr" 2>/dev/null
openssl x509 -req -in "$demo/tls/agent-api.csr" -CA "$demo/tls/ca.crt" -CAkey "$demo/tls/ca.key" \
  -CAcreateserial -days 30 -out "$demo/tls/agent-api.crt" 2>/dev/null \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1,IP:10.244.0.1\nextendedKeyUsage=serverAuth\n')
setsid "$bin/shoal-operator" run --namespace shoal-demo --artifact-dir "$demo/artifacts" \
  --metrics-addr 127.0.0.1:18080 --agent-api-addr "$agent_api" --agent-api-url "https://$agent_api" \
  --tls-cert "$demo/tls/agent-api.crt" --tls-key "$demo/tls/agent-api.key" --agent-api-ca "$demo/tls/ca.crt" \
  --agent-stale-after 30s --allow-source-network 127.0.0.1/32 >"$demo/operator.log" 2>&1 </dev/null &
echo $! >"$demo/operator.pid"
# The models' HTTP source: a plain file server on loopback, as an object store would be
# (the operator refuses loopback sources unless allowed: --allow-source-network above).
setsid python3 -m http.server --bind 127.0.0.1 --directory "$recommender" 18081 \
  >"$demo/model-server.log" 2>&1 </dev/null &
echo $! >"$demo/model-server.pid"
for _ in $(seq 60); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.5; done
curl -sf http://127.0.0.1:18080/readyz >/dev/null || { tail -20 "$demo/operator.log"; exit 1; }
echo "operator ready: http://127.0.0.1:18080/metrics"

step "5/10 The product recommender 1.0 (int8, gated on 64 real validation inputs) and an EdgePool"
# The validation inputs: one Open Inference Protocol request body per line.
kubectl -n shoal-demo create configmap recommender-validation \
  --from-file=validation.jsonl="$recommender/validation.jsonl" --dry-run=client -o yaml | kubectl apply -f -
# The quickstart Model with the sha256 of the model this machine trained.
sha() { sha256sum "$recommender/$1" | cut -d' ' -f1; }
sed "s/sha256: .*/sha256: $(sha recommender.onnx)/" examples/quickstart/model.yaml | kubectl apply -f -
kubectl apply -f examples/quickstart/edge-pool.yaml
deadline=$((SECONDS + 180))
until kubectl -n shoal-demo wait --for condition=Ready --timeout 2s model/product-recommender edgepool/stores >/dev/null 2>&1; do
  if ((SECONDS > deadline)); then
    kubectl -n shoal-demo get models,edgepools -o yaml | tail -40
    echo "timed out; operator log: $demo/operator.log" >&2
    exit 1
  fi
  printf '\r  model: %-11s  pool: %s nodes   ' \
    "$(kubectl -n shoal-demo get model product-recommender -o jsonpath='{.status.phase}')" \
    "$(kubectl -n shoal-demo get edgepool stores -o jsonpath='{.status.nodes}')"
done
echo
kubectl -n shoal-demo get model product-recommender -o jsonpath='{range .status.versions[*]}version {.version}: {.compression} artifact {.artifactDigest}{"\n"}  from source {.sourceDigest}{"\n"}  {.sourceBytes} -> {.artifactBytes} bytes ({.compressionRatio}x); validation: {.validation}{"\n"}{end}'

step "6/10 Real agents on the four store nodes, and the rollout of 1.0"
port=19001
agent_urls=()
for node in "${stores[@]}"; do
  # Each agent proves who it is with a token bound to its node's agent pod,
  # exactly what the DaemonSet's projected token volume gives a real pod.
  pod=""
  for _ in $(seq 60); do
    pod=$(kubectl -n shoal-demo get pods -l shoal.dev/pool=stores --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
    [[ -n $pod ]] && break
    sleep 0.5
  done
  [[ -n $pod ]] || { echo "no agent pod for $node" >&2; exit 1; }
  mkdir -p "$demo/agents/$node"
  kubectl -n shoal-demo create token shoal-agent-stores --audience shoal --duration 1h \
    --bound-object-kind Pod --bound-object-name "$pod" >"$demo/agents/$node/token"
  setsid "$bin/shoal-agent" --control-plane "https://$agent_api" --control-plane-ca "$demo/tls/ca.crt" --node "$node" \
    --cache-dir "$demo/agents/$node/cache" --token-file "$demo/agents/$node/token" \
    --listen "127.0.0.1:$port" --report-seconds 2 >"$demo/agent-$node.log" 2>&1 </dev/null &
  echo $! >"$demo/agent-$node.pid"
  agent_urls+=("http://127.0.0.1:$port")
  echo "agent for $node: http://127.0.0.1:$port (log: target/demo/agent-$node.log)"
  port=$((port + 1))
done
if [[ -z $real_node_blocker ]]; then
  # The kubelet runs this one from the image; clients on the node reach it through
  # the pool's Service (internalTrafficPolicy Local: the node's own agent).
  echo "waiting for the agent pod on the real node shoal-node-0"
  kubectl -n shoal-demo wait pod -l shoal.dev/pool=stores --field-selector spec.nodeName=shoal-node-0 \
    --for condition=Ready --timeout 180s \
    || { kubectl -n shoal-demo describe pods --selector shoal.dev/pool=stores | tail -30; exit 1; }
  service_ip=$(kubectl -n shoal-demo get service shoal-agent-stores -o jsonpath='{.spec.clusterIP}')
  agent_urls+=("http://$service_ip:8000")
  echo "agent pod on shoal-node-0: $(kubectl -n shoal-demo get pods -l shoal.dev/pool=stores \
    --field-selector spec.nodeName=shoal-node-0 -o jsonpath='{.items[0].metadata.name}'), through its Service: http://$service_ip:8000"
fi
kubectl apply -f examples/quickstart/rollout.yaml
wait_phase() { # phase timeout-seconds
  local deadline=$((SECONDS + $2))
  until [[ $(kubectl -n shoal-demo get modelrollout product-recommender -o jsonpath='{.status.phase}') == "$1" ]]; do
    if ((SECONDS > deadline)); then
      kubectl shoal status product-recommender -n shoal-demo || true
      echo "the rollout did not reach $1 in $2 s; see $demo/operator.log" >&2
      exit 1
    fi
    sleep 0.5
  done
}
wait_phase Succeeded 120
kubectl shoal status product-recommender -n shoal-demo

step "7/10 Traffic: 40 requests/s of random MovieLens users across the agents (log: target/demo/traffic.log)"
setsid python3 examples/traffic.py --rate 40 --duration 900 "${agent_urls[@]}" \
  >"$demo/traffic.log" 2>&1 </dev/null &
echo $! >"$demo/traffic.pid"
curl -s -H 'Content-Type: application/json' \
  --data '{"id":"demo-1","inputs":[{"name":"user_id","datatype":"INT64","shape":[1],"data":[42]}]}' \
  "${agent_urls[0]}/v2/models/product-recommender/infer" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); d=r["outputs"][0]["data"]; top=sorted(range(len(d)), key=d.__getitem__, reverse=True)[:5]; print("model %s version %s scored %d items; top 5 for user 42 (MovieLens item ids): %s" % (r["model_name"], r["model_version"], len(d), [i + 1 for i in top]))'
sleep 6

step "8/10 Version 2.0 (retrained), rolled out step by step: 25%, pause, analysis, 50%, pause, analysis, 100%"
kubectl -n shoal-demo patch model product-recommender --type merge -p "{\"spec\":{\"version\":\"2.0\",\"source\":{\"http\":{\"url\":\"http://127.0.0.1:18081/recommender-v2.onnx\",\"sha256\":\"$(sha recommender-v2.onnx)\"}}}}"
kubectl -n shoal-demo wait --for jsonpath='{.status.latestVersion}'=2.0 --timeout 120s model/product-recommender
v2_started=$SECONDS
kubectl -n shoal-demo patch modelrollout product-recommender --type merge -p '{"spec":{"version":"2.0"}}'
kubectl shoal status product-recommender -n shoal-demo --watch --timeout 5m
wait_phase Succeeded 10
v2_seconds=$((SECONDS - v2_started))

step "9/10 Version 3.0, broken on purpose (most users fail), caught by the canary analysis"
# No compression for 3.0: the accuracy gate would already refuse it, and this demo
# is about what the rollout does with a version that passes static checks.
kubectl -n shoal-demo patch model product-recommender --type json -p "[{\"op\":\"remove\",\"path\":\"/spec/compression\"},{\"op\":\"replace\",\"path\":\"/spec/version\",\"value\":\"3.0\"},{\"op\":\"replace\",\"path\":\"/spec/source\",\"value\":{\"http\":{\"url\":\"http://127.0.0.1:18081/recommender-broken.onnx\",\"sha256\":\"$(sha recommender-broken.onnx)\"}}}]"
kubectl -n shoal-demo wait --for jsonpath='{.status.latestVersion}'=3.0 --timeout 120s model/product-recommender
v3_started=$SECONDS
kubectl -n shoal-demo patch modelrollout product-recommender --type merge -p '{"spec":{"version":"3.0"}}'
kubectl shoal status product-recommender -n shoal-demo --watch --timeout 5m
wait_phase RolledBack 10
# The rollout is RolledBack once it has told every agent; done is when every agent
# serves 2.0 alone again.
for url in "${agent_urls[@]}"; do
  until [[ $(curl -s "$url/v2/models/product-recommender" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("versions"))') == "['2.0']" ]]; do
    if ((SECONDS - v3_started > 120)); then echo "$url still serves 3.0" >&2; exit 1; fi
    sleep 0.2
  done
done
v3_seconds=$((SECONDS - v3_started))

step "10/10 What happened"
kubectl -n shoal-demo get models,edgepools,modelrollouts
echo
kubectl -n shoal-demo get events --field-selector involvedObject.kind=ModelRollout \
  --sort-by=.metadata.creationTimestamp -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message --no-headers 2>/dev/null \
  | tail -20 || true
echo
kubectl -n shoal-demo get edgepool stores -o jsonpath='{range .status.versions[*]}{.agents} agents serve {.model} {.version}{"\n"}{end}'
tail -3 "$demo/traffic.log"
cat <<DONE

Summary
  Agents: ${#agent_urls[@]} (${#stores[@]} processes beside kwok nodes$(if [[ -z $real_node_blocker ]]; then echo ", 1 pod on the real node shoal-node-0"; else echo "; no real node: $real_node_blocker"; fi)).
  1.0: int8-compressed ($(kubectl -n shoal-demo get model product-recommender -o jsonpath='{.status.versions[0].compressionRatio}')x smaller), gated, on every store agent at once (first rollout).
  2.0: 25% -> pause -> analysis -> 50% -> pause -> analysis -> 100% in ${v2_seconds}s, traffic flowing.
  3.0: broken; the canary's error rate failed the analysis and every agent served 2.0
       alone again ${v3_seconds}s after the rollout of 3.0 began.

Shoal is running (traffic stops by itself after 15 minutes). Poke at it:
  export KUBECONFIG=$KUBECONFIG PATH=$bin:$(dirname "$(command -v kubectl)"):\$PATH
  kubectl -n shoal-demo get models,edgepools,modelrollouts
  kubectl shoal get rollouts -n shoal-demo
  kubectl shoal status product-recommender -n shoal-demo
  kubectl -n shoal-demo get events --field-selector involvedObject.kind=ModelRollout
  curl -s http://127.0.0.1:19001/v2/models/product-recommender       # model metadata from an agent
  curl -s http://127.0.0.1:18080/metrics | grep -E 'shoal_(operator|fleet)'
Stop everything: make demo-down
DONE
