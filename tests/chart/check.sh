#!/usr/bin/env bash
# Checks of charts/shoal against the local control plane (make chart-check, part of
# make test; the control plane must be up):
#   1. the chart's CRDs equal crds/ (run `make crds` and copy on drift);
#   2. helm lint --strict, with defaults and with every optional feature on;
#   3. values.schema.json rejects a misspelt value with a readable message;
#   4. helm template (defaults, all features) applied with kubectl --dry-run=server;
#   5. the PrometheusRule passes promtool check rules and its unit test;
#   6. least privilege: the chart is installed, shoal-operator runs as a local process
#      authenticated as the chart's ServiceAccount (a TokenRequest token), and the
#      Model -> EdgePool -> ModelRollout flow works; kubectl auth can-i shows what
#      the ServiceAccount may not do; helm upgrade and uninstall;
#   7. every metric the dashboard and the alerts query is one the operator exports.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
export KUBECONFIG=${KUBECONFIG:-$repo/target/cluster/kubeconfig}
export PATH="${SHOAL_CACHE:-$HOME/.cache/shoal}/bin/current:$PATH"
chart=charts/shoal
work=$(mktemp -d)
release_ns=shoal-chart-$RANDOM
flow_ns=shoal-chart-flow-$RANDOM
watch_ns=shoal-chart-watch-$RANDOM
operator_pid=""
cleanup() {
  [[ -n $operator_pid ]] && kill "$operator_pid" 2>/dev/null || true
  helm uninstall shoal -n "$release_ns" >/dev/null 2>&1 || true
  kubectl delete namespace "$release_ns" "$flow_ns" "$watch_ns" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  kubectl delete -f "$chart/ci/monitoring-crds.yaml" --ignore-not-found >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

step "1. the chart's CRDs equal crds/"
diff -u crds/shoal.dev.yaml "$chart/crds/shoal.dev.yaml" \
  || fail "charts/shoal/crds/ drifted from crds/: run 'make crds' (it copies them)"

step "2. helm lint --strict"
helm lint --strict "$chart"
helm lint --strict "$chart" -f "$chart/ci/all-features-values.yaml"

step "3. the values schema rejects typos"
if out=$(helm template shoal "$chart" --set replica=2 2>&1); then
  fail "a misspelt value (replica) was accepted"
fi
grep -q "replica" <<<"$out" || fail "the schema error does not name the bad key: $out"
echo "rejected as expected: $(grep -m1 -i "replica" <<<"$out")"

step "4. helm template | kubectl apply --dry-run=server"
kubectl apply --server-side --force-conflicts -f crds/shoal.dev.yaml >/dev/null
kubectl apply --server-side -f "$chart/ci/monitoring-crds.yaml" >/dev/null
kubectl wait --for condition=Established --timeout 60s -f "$chart/ci/monitoring-crds.yaml" >/dev/null
kubectl create namespace "$release_ns" >/dev/null
kubectl create namespace "$watch_ns" >/dev/null
helm template shoal "$chart" -n "$release_ns" >"$work/default.yaml"
kubectl apply --dry-run=server -n "$release_ns" -f "$work/default.yaml"
helm template shoal "$chart" -n "$release_ns" -f "$chart/ci/all-features-values.yaml" \
  --set watchNamespace="$watch_ns" >"$work/all.yaml"
# Objects of the watched namespace name it; the rest go to the current one.
kubectl apply --dry-run=server -f "$work/all.yaml"

step "5. promtool on the PrometheusRule"
helm template shoal "$chart" -f "$chart/ci/all-features-values.yaml" -s templates/prometheusrule.yaml \
  | python3 -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(sys.stdin)["spec"], open(sys.argv[1], "w"))' "$work/rules.yaml"
promtool check rules "$work/rules.yaml"
cp "$chart/ci/prometheus-rules-test.yaml" "$work/"
(cd "$work" && promtool test rules prometheus-rules-test.yaml)

step "6. least privilege: the operator as the chart's ServiceAccount"
# caKey grants the ConfigMap writes that hand a private CA to the agents.
helm install shoal "$chart" -n "$release_ns" --set agentApi.tls.enabled=false \
  --set agentApi.tls.caKey=ca.crt --wait=false >/dev/null
sa=$(kubectl -n "$release_ns" get serviceaccount -l app.kubernetes.io/instance=shoal -o jsonpath='{.items[0].metadata.name}')
lease=$(helm get values shoal -n "$release_ns" -a -o json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("fullnameOverride") or "")')
lease=${lease:-shoal-operator}
who="system:serviceaccount:$release_ns:$sa"
echo "ServiceAccount $who"
for check in "yes get configmaps -n $flow_ns" "yes create tokenreviews.authentication.k8s.io" \
  "yes patch daemonsets.apps -n $flow_ns" "yes create events.events.k8s.io -n $flow_ns" \
  "yes create services -n $flow_ns" "yes patch services -n $flow_ns" "no delete services -n $flow_ns" \
  "yes list nodes" "no list secrets -A" "no get secrets -n $release_ns" "no delete nodes" \
  "no create deployments.apps -n $flow_ns" "no delete models.shoal.dev -n $flow_ns" \
  "no list configmaps -A" "no create pods -n $flow_ns" "yes watch pods -n $flow_ns" "no get pods -n $flow_ns" "yes get /openid/v1/jwks" "no update leases.coordination.k8s.io -n $flow_ns"; do
  read -r want verb resource rest <<<"$check"
  # shellcheck disable=SC2086
  got=$(kubectl auth can-i "$verb" "$resource" $rest --as "$who" 2>/dev/null || true)
  [[ $got == "$want" ]] || fail "can-i $verb $resource $rest: expected $want, got $got"
  printf '  %-3s %s %s %s\n' "$got" "$verb" "$resource" "$rest"
done

# A kubeconfig holding only a TokenRequest token of that ServiceAccount.
token=$(kubectl -n "$release_ns" create token "$sa" --duration 15m)
server=$(kubectl config view --raw --flatten --minify -o jsonpath='{.clusters[0].cluster.server}')
kubectl config view --raw --flatten --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$work/ca.crt"
KUBECONFIG="$work/sa.kubeconfig" kubectl config set-cluster local --server "$server" \
  --certificate-authority "$work/ca.crt" --embed-certs >/dev/null
KUBECONFIG="$work/sa.kubeconfig" kubectl config set-credentials operator --token "$token" >/dev/null
KUBECONFIG="$work/sa.kubeconfig" kubectl config set-context operator --cluster local --user operator >/dev/null
KUBECONFIG="$work/sa.kubeconfig" kubectl config use-context operator >/dev/null

kubectl create namespace "$flow_ns" >/dev/null
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
agent_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KUBECONFIG="$work/sa.kubeconfig" POD_NAMESPACE="$release_ns" "${SHOAL_OPERATOR_BIN:-target/debug/shoal-operator}" run \
  --namespace "$flow_ns" --artifact-dir "$work/artifacts" \
  --metrics-addr "127.0.0.1:$metrics_port" --agent-api-addr "127.0.0.1:$agent_port" \
  --agent-api-url "http://127.0.0.1:$agent_port" --agent-api-ca "$work/ca.crt" \
  --leader-elect --leader-election-lease "$lease" --leader-election-identity chart-check \
  >"$work/operator.log" 2>&1 &
operator_pid=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null && break; sleep 0.5; done
curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null || { cat "$work/operator.log"; fail "the operator did not become ready"; }

model=${SHOAL_TEST_PPOCR_CLS_ONNX:-$HOME/.cache/shoal/models/rapidocr-onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx}
kubectl -n "$flow_ns" create configmap classifier --from-file=model.onnx="$model" >/dev/null
kubectl apply -n "$flow_ns" -f - >/dev/null <<YAML
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: classifier}
spec:
  version: "1.0"
  source: {configMap: {name: classifier, key: model.onnx}}
  compression: {mode: fp16, validation: {samples: 4, maxAbsError: 0.01}}
---
apiVersion: shoal.dev/v1alpha1
kind: EdgePool
metadata: {name: chart-check}
spec:
  nodeSelector: {matchLabels: {shoal.dev/chart-check: "$flow_ns"}}
---
apiVersion: shoal.dev/v1alpha1
kind: ModelRollout
metadata: {name: classifier}
spec: {model: classifier, version: "1.0", pools: [chart-check]}
YAML
wait_for() { # description command...
  local what=$1; shift
  for _ in $(seq 120); do "$@" >/dev/null 2>&1 && { echo "  ok: $what"; return 0; }; sleep 0.5; done
  cat "$work/operator.log"; fail "$what"
}
wait_for "the Model is Ready (fetched from a ConfigMap, fp16-compressed)" \
  kubectl -n "$flow_ns" wait --for condition=Ready --timeout 1s model/classifier
wait_for "the EdgePool's DaemonSet, agent ServiceAccount and CA ConfigMap exist" \
  kubectl -n "$flow_ns" get daemonset/shoal-agent-chart-check serviceaccount/shoal-agent-chart-check \
  configmap/shoal-agent-chart-check-ca
wait_for "the ModelRollout has a plan in status" \
  bash -c "[[ -n \$(kubectl -n $flow_ns get modelrollout classifier -o jsonpath='{.status.canaryVersion}') ]]"
wait_for "the rollout's Event was recorded" \
  bash -c "kubectl -n $flow_ns get events --field-selector involvedObject.name=classifier -o name | grep -q ."
wait_for "the operator holds the Lease in the release namespace" \
  bash -c "[[ \$(kubectl -n $release_ns get lease $lease -o jsonpath='{.spec.holderIdentity}') == chart-check ]]"
if grep -iE "forbidden|cannot (list|watch|get|create|patch)" "$work/operator.log"; then
  fail "the operator hit a permission error as the chart's ServiceAccount (above)"
fi
echo "  ok: no permission error in the operator's log"

step "7. every metric in the dashboard and the alerts is exported"
# Families without a series print nothing on /metrics: `shoal-operator metrics` prints
# every family the binary registers, each with an example series.
"${SHOAL_OPERATOR_BIN:-target/debug/shoal-operator}" metrics >"$work/metrics.txt"
curl -sf "http://127.0.0.1:$metrics_port/metrics" >>"$work/metrics.txt"
python3 - "$chart/dashboards/shoal.json" "$work/rules.yaml" "$work/metrics.txt" <<'PY'
import json, re, sys, yaml
dashboard, rules, metrics = sys.argv[1:4]
exprs = []
def walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            (exprs.append(value) if key == "expr" else walk(value))
    elif isinstance(node, list):
        for value in node:
            walk(value)
walk(json.load(open(dashboard)))
for group in yaml.safe_load(open(rules))["groups"]:
    exprs += [rule["expr"] for rule in group["rules"]]
queried = {name for expr in exprs for name in re.findall(r"\bshoal_[a-z0-9_]+", expr)}
exported = set()
for line in open(metrics):
    match = re.match(r"# TYPE (\S+) (\S+)", line)
    if match:
        name, kind = match.groups()
        exported.add(name)
        if kind == "counter":
            exported.add(name + "_total")
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
missing = sorted(queried - exported)
print(f"  {len(queried)} metric names queried, all exported" if not missing else "")
if missing:
    sys.exit(f"FAIL: queried but not exported by shoal-operator: {missing}")
PY
kill "$operator_pid"; operator_pid=""

step "helm upgrade and uninstall"
helm upgrade shoal "$chart" -n "$release_ns" --set agentApi.tls.enabled=false \
  --set agentApi.tls.caKey=ca.crt --set maxConcurrentCompressions=2 --wait=false >/dev/null
kubectl -n "$release_ns" get deployment -l app.kubernetes.io/instance=shoal -o jsonpath='{.items[0].spec.template.spec.containers[0].args}' \
  | grep -q -- "--max-concurrent-compressions=2\|--max-concurrent-compressions\",\"2" \
  || fail "helm upgrade did not change the Deployment"
echo "  ok: upgraded"
helm uninstall shoal -n "$release_ns" >/dev/null
echo "  ok: uninstalled"
echo
echo "chart checks passed"
