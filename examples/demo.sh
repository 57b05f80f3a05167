#!/usr/bin/env bash
# `make demo`: the whole path on one machine. Starts the local control plane,
# installs the CRDs, starts the operator, simulates three edge nodes with kwok,
# applies the example product recommender (trained on MovieLens-100k by
# examples/recommender/) with int8 compression behind an accuracy gate, and an
# EdgePool, waits until both are Ready, then rolls the model out to real
# shoal-agent processes (one per store node, each with its own pod-bound token)
# and asks them for recommendations.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export KUBECONFIG="$repo/target/cluster/kubeconfig"
export PATH="${SHOAL_CACHE:-$HOME/.cache/shoal}/bin/current:$PATH"
demo="$repo/target/demo"
recommender=${SHOAL_RECOMMENDER_DIR:?run the demo with make demo (it trains the example model)}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1/8 Local control plane (kube-apiserver, etcd, controller-manager, scheduler, kwok)"
tests/cluster/up.sh

step "2/8 Shoal's CRDs"
kubectl apply --server-side --force-conflicts --field-manager shoal-demo -f crds/shoal.dev.yaml
kubectl wait --for condition=Established --timeout 60s -f crds/shoal.dev.yaml

step "3/8 Three simulated edge nodes (kwok): two stores and a warehouse"
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

step "4/8 shoal-operator (logs: target/demo/operator.log)"
mkdir -p "$demo"
stop_pid() { if [[ -f $1 ]]; then kill "$(cat "$1")" 2>/dev/null || true; rm -f "$1"; fi; }
stop_pid "$demo/operator.pid"; stop_pid "$demo/model-server.pid"
for pid_file in "$demo"/agent-*.pid; do stop_pid "$pid_file"; done
kubectl create namespace shoal-demo --dry-run=client -o yaml | kubectl apply -f -
setsid target/debug/shoal-operator run --namespace shoal-demo --artifact-dir "$demo/artifacts" \
  --metrics-addr 127.0.0.1:18080 --agent-api-addr 127.0.0.1:18443 --agent-api-url http://127.0.0.1:18443 \
  >"$demo/operator.log" 2>&1 </dev/null &
echo $! >"$demo/operator.pid"
# The model's HTTP source: a plain file server on loopback, as an object store would be.
setsid python3 -m http.server --bind 127.0.0.1 --directory "$recommender" 18081 \
  >"$demo/model-server.log" 2>&1 </dev/null &
echo $! >"$demo/model-server.pid"
for _ in $(seq 60); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.5; done
curl -sf http://127.0.0.1:18080/readyz >/dev/null || { tail -20 "$demo/operator.log"; exit 1; }
echo "operator ready: http://127.0.0.1:18080/metrics"

step "5/8 The product recommender (int8, gated on 64 real validation inputs) and an EdgePool"
# The validation inputs: one Open Inference Protocol request body per line.
kubectl -n shoal-demo create configmap recommender-validation \
  --from-file=validation.jsonl="$recommender/validation.jsonl" --dry-run=client -o yaml | kubectl apply -f -
# The quickstart Model with the sha256 of the model this machine trained.
sha=$(sha256sum "$recommender/recommender.onnx" | cut -d' ' -f1)
sed "s/sha256: .*/sha256: $sha/" examples/quickstart/model.yaml | kubectl apply -f -
kubectl apply -f examples/quickstart/edge-pool.yaml

step "6/8 Waiting for the Model and the EdgePool to be Ready"
deadline=$((SECONDS + 180))
until kubectl -n shoal-demo wait --for condition=Ready --timeout 2s model/product-recommender edgepool/stores >/dev/null 2>&1; do
  if ((SECONDS > deadline)); then
    kubectl -n shoal-demo get models,edgepools -o yaml | tail -40
    echo "timed out; operator log: $demo/operator.log" >&2
    exit 1
  fi
  printf '\r  model: %-11s  pool: %s nodes, %s agents ready   ' \
    "$(kubectl -n shoal-demo get model product-recommender -o jsonpath='{.status.phase}')" \
    "$(kubectl -n shoal-demo get edgepool stores -o jsonpath='{.status.nodes}')" \
    "$(kubectl -n shoal-demo get edgepool stores -o jsonpath='{.status.agentsReady}')"
done
echo
kubectl -n shoal-demo get models,edgepools
echo
kubectl -n shoal-demo get model product-recommender -o jsonpath='{range .status.versions[*]}version {.version}: {.compression} artifact {.artifactDigest}{"\n"}  from source {.sourceDigest}{"\n"}  {.sourceBytes} -> {.artifactBytes} bytes ({.compressionRatio}x); validation: {.validation}{"\n"}  inputs {.inputs}, outputs {.outputs}{"\n"}{end}'
step "7/8 Roll the model out to real agents on the two store nodes"
kubectl apply -f examples/quickstart/rollout.yaml
port=19001
for node in store-berlin store-lyon; do
  # Each agent proves who it is with a token bound to its node's agent pod,
  # exactly what the DaemonSet's projected token volume gives a real pod.
  pod=$(kubectl -n shoal-demo get pods -l shoal.dev/pool=stores --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
  mkdir -p "$demo/agents/$node"
  kubectl -n shoal-demo create token shoal-agent-stores --audience shoal --duration 1h \
    --bound-object-kind Pod --bound-object-name "$pod" >"$demo/agents/$node/token"
  setsid target/debug/shoal-agent --control-plane http://127.0.0.1:18443 --node "$node" \
    --cache-dir "$demo/agents/$node/cache" --token-file "$demo/agents/$node/token" \
    --listen "127.0.0.1:$port" --report-seconds 5 >"$demo/agent-$node.log" 2>&1 </dev/null &
  echo $! >"$demo/agent-$node.pid"
  echo "agent for $node: http://127.0.0.1:$port (log: target/demo/agent-$node.log)"
  port=$((port + 1))
done
deadline=$((SECONDS + 120))
for port in 19001 19002; do
  until curl -sf "http://127.0.0.1:$port/v2/models/product-recommender/ready" >/dev/null; do
    if ((SECONDS > deadline)); then echo "agent on $port did not load the model; see target/demo/agent-*.log" >&2; exit 1; fi
    printf '.'; sleep 1
  done
done
echo " both agents serve product-recommender 1.0 (int8)"

step "8/8 An inference request (Open Inference Protocol v2) and the fleet view"
# Scores of all 1682 MovieLens items for user 42 (0-based); the top 5 are its recommendations.
curl -s -H 'Content-Type: application/json' \
  --data '{"id":"demo-1","inputs":[{"name":"user_id","datatype":"INT64","shape":[1],"data":[42]}]}' \
  http://127.0.0.1:19001/v2/models/product-recommender/infer \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); d=r["outputs"][0]["data"]; top=sorted(range(len(d)), key=d.__getitem__, reverse=True)[:5]; print("model %s version %s scored %d items; top 5 for user 42 (MovieLens item ids): %s" % (r["model_name"], r["model_version"], len(d), [i + 1 for i in top]))'
# Agents report every 5 s; the pool's status aggregates the reports.
for _ in $(seq 30); do
  [[ -n $(kubectl -n shoal-demo get edgepool stores -o jsonpath='{.status.versions}') ]] && break
  sleep 1
done
kubectl -n shoal-demo get edgepool stores -o jsonpath='{range .status.versions[*]}{.agents} agents serve {.model} {.version}{"\n"}{end}'

cat <<DONE

Shoal is running. Poke at it:
  export KUBECONFIG=$KUBECONFIG PATH=$(dirname "$(command -v kubectl)"):\$PATH
  kubectl -n shoal-demo get models,edgepools,daemonsets,pods -o wide
  kubectl explain model.spec.compression
  kubectl -n shoal-demo get model product-recommender -o yaml          # lineage and gate figures
  curl -s http://127.0.0.1:18080/metrics | grep -E 'shoal_(operator|fleet)'
  curl -s http://127.0.0.1:19001/v2/models/product-recommender       # model metadata from an agent
  curl -s http://127.0.0.1:19001/metrics | grep shoal_agent
Stop everything: make demo-down
DONE
