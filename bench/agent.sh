#!/usr/bin/env bash
# `make bench`: shoal-agent over HTTP vs tract in-process vs Python KServe/onnxruntime,
# same model (magika), same load generator, same concurrency, batch 1, on 127.0.0.1.
# Prints a Markdown table and writes it to target/bench/agent.md. Never fails on
# timing; stops every server it starts.
#
# Inputs (env): SHOAL_TEST_MAGIKA_ONNX (model), BENCH_PYTHON (a Python with kserve
# and onnxruntime; the KServe rows are skipped, with the reason, when it is missing),
# BENCH_CONCURRENCY (default "1 2 8"), BENCH_SECONDS (10), BENCH_WARMUP_SECONDS (2),
# BENCH_KSERVE_INTRA_OP_THREADS (0 = onnxruntime's default), AGENT_BIN, LOADGEN_BIN,
# SMALL_AGENT_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${SHOAL_TEST_MAGIKA_ONNX:?set SHOAL_TEST_MAGIKA_ONNX (make test-models)}
AGENT_BIN=${AGENT_BIN:-${CARGO_TARGET_DIR:-target}/release/shoal-agent}
LOADGEN_BIN=${LOADGEN_BIN:-${CARGO_TARGET_DIR:-target}/release/examples/loadgen}
SMALL_AGENT_BIN=${SMALL_AGENT_BIN:-${CARGO_TARGET_DIR:-target}/release-small/shoal-agent}
CONCURRENCY=${BENCH_CONCURRENCY:-1 2 8}
SECONDS_EACH=${BENCH_SECONDS:-10}
WARMUP=${BENCH_WARMUP_SECONDS:-2}
KSERVE_THREADS=${BENCH_KSERVE_INTRA_OP_THREADS:-0}
OUT=target/bench
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
FACTS=$OUT/facts.json
: >"$RESULTS"
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo null; }

# wait_ready URL PID SECONDS
wait_ready() {
  local deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    kill -0 "$2" 2>/dev/null || return 1
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.2
  done
  return 1
}

# run SYSTEM TARGET-MODE TARGET: one loadgen run per concurrency, tagged by system
run() {
  local system=$1 mode=$2 target=$3 c line
  for c in $CONCURRENCY; do
    echo "  $system, $c concurrent clients, ${WARMUP}s warm-up + ${SECONDS_EACH}s" >&2
    if line=$("$LOADGEN_BIN" "$mode" "$target" "$c" "$SECONDS_EACH" "$WARMUP"); then
      echo "{\"system\":\"$system\",${line#\{}" >>"$RESULTS"
    else
      echo "{\"system\":\"$system\",\"concurrency\":$c,\"failed\":true}" >>"$RESULTS"
    fi
  done
}

facts=()
fact() { facts+=("\"$1\":$2"); }

echo "bench: tract in-process (the floor)" >&2
run tract tract "$MODEL"

echo "bench: shoal-agent over HTTP" >&2
port=$(free_port)
"$AGENT_BIN" --model "magika=$MODEL" --listen "127.0.0.1:$port" >"$OUT/agent.log" 2>&1 &
agent=$!
PIDS+=("$agent")
if wait_ready "http://127.0.0.1:$port/v2/models/magika/ready" "$agent" 60; then
  sleep 1
  fact agent_rss_ready_kib "$(rss_kib "$agent")"
  run shoal-agent http "http://127.0.0.1:$port/v2/models/magika/infer"
  sleep 1
  fact agent_rss_after_kib "$(rss_kib "$agent")"
  fact agent_workers "$(nproc)"
else
  echo "shoal-agent did not become ready; see $OUT/agent.log" >&2
  fact agent_error "\"did not become ready, see $OUT/agent.log\""
fi
kill "$agent" 2>/dev/null || true
wait "$agent" 2>/dev/null || true

echo "bench: Python KServe ModelServer + onnxruntime" >&2
if [[ -z ${BENCH_PYTHON:-} || ! -x ${BENCH_PYTHON:-} ]]; then
  reason="no Python with kserve at '${BENCH_PYTHON:-}' (see $OUT/kserve-install.log)"
  echo "  skipped: $reason" >&2
  fact kserve_error "\"$reason\""
else
  port=$(free_port)
  "$BENCH_PYTHON" bench/kserve_onnx_server.py --model_name magika --model_path "$MODEL" \
    --http_port "$port" --intra_op_threads "$KSERVE_THREADS" >"$OUT/kserve.log" 2>&1 &
  kserve=$!
  PIDS+=("$kserve")
  if wait_ready "http://127.0.0.1:$port/v2/models/magika/ready" "$kserve" 120; then
    sleep 1
    fact kserve_rss_ready_kib "$(rss_kib "$kserve")"
    run kserve http "http://127.0.0.1:$port/v2/models/magika/infer"
    fact kserve_rss_after_kib "$(rss_kib "$kserve")"
    versions=$("$BENCH_PYTHON" -c 'from importlib.metadata import version as v; print("kserve " + v("kserve") + ", onnxruntime " + v("onnxruntime"))' 2>/dev/null || echo '?')
    fact kserve_version "\"$versions\""
  else
    reason="KServe server did not become ready: $(tail -n 3 "$OUT/kserve.log" | tr -d '"\\' | tr '\n' ' ')"
    echo "  $reason" >&2
    fact kserve_error "\"$reason\""
  fi
  kill "$kserve" 2>/dev/null || true
  wait "$kserve" 2>/dev/null || true
fi
fact kserve_intra_op_threads "$KSERVE_THREADS"

# Binary sizes: the release binary as built, a stripped copy, and the size profile.
fact release_bytes "$(stat -c %s "$AGENT_BIN")"
cp "$AGENT_BIN" "$OUT/shoal-agent.stripped"
strip "$OUT/shoal-agent.stripped"
fact release_stripped_bytes "$(stat -c %s "$OUT/shoal-agent.stripped")"
rm -f "$OUT/shoal-agent.stripped"
if [[ -x $SMALL_AGENT_BIN ]]; then
  fact release_small_bytes "$(stat -c %s "$SMALL_AGENT_BIN")"
fi
fact cores "$(nproc)"
fact seconds "$SECONDS_EACH"
fact warmup_seconds "$WARMUP"

(
  IFS=,
  echo "{${facts[*]}}"
) >"$FACTS"
python3 bench/table.py "$RESULTS" "$FACTS" | tee "$OUT/agent.md"
echo "(written to $OUT/agent.md)" >&2
