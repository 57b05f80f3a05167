#!/usr/bin/env bash
# `make bench`, compression part: for magika, PP-OCR's text-direction classifier and
# the example recommender, each of fp32 (the original), fp16, int8 (per tensor) and
# int8 per channel: size, ratio, compression time and validation figures
# (`shoal-operator compress`), the standalone agent's load time and its latency
# (p50/p99, one closed-loop client), and for the recommender its offline quality
# (hit-rate@10, NDCG@10 via examples/recommender/evaluate.py). Prints Markdown
# tables and writes them to target/bench/compression.md. Never fails on timing;
# stops every process it starts; listens on 127.0.0.1 only.
#
# Inputs (env): SHOAL_TEST_MAGIKA_ONNX, SHOAL_TEST_PPOCR_CLS_ONNX (make test-models),
# SHOAL_RECOMMENDER_DIR (make example-model; the recommender rows are skipped when
# it is missing), SHOAL_PYTHON (a Python with onnxruntime, for the quality table),
# SHOAL_CACHE (its wheels/ holds the recbole wheel), OPERATOR_BIN, AGENT_BIN,
# BENCH_COMPRESSION_SECONDS (5), BENCH_COMPRESSION_WARMUP_SECONDS (1),
# BENCH_COMPRESSION_STARTS (3), BENCH_COMPRESSION_SYNTHETIC_SAMPLES (32),
# BENCH_COMPRESSION_DATASET_SAMPLES (64).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${SHOAL_CACHE:-$HOME/.cache/shoal}
MAGIKA=${SHOAL_TEST_MAGIKA_ONNX:-$CACHE/models/magika-1.0.3/model.onnx}
PPOCR=${SHOAL_TEST_PPOCR_CLS_ONNX:-$CACHE/models/rapidocr-onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx}
RECOMMENDER_DIR=${SHOAL_RECOMMENDER_DIR:-}
PYTHON=${SHOAL_PYTHON:-}
WHEELS=$CACHE/wheels
OPERATOR_BIN=${OPERATOR_BIN:-${CARGO_TARGET_DIR:-target}/release/shoal-operator}
AGENT_BIN=${AGENT_BIN:-${CARGO_TARGET_DIR:-target}/release/shoal-agent}
SECONDS_EACH=${BENCH_COMPRESSION_SECONDS:-5}
WARMUP=${BENCH_COMPRESSION_WARMUP_SECONDS:-1}
STARTS=${BENCH_COMPRESSION_STARTS:-3}
SYNTHETIC_SAMPLES=${BENCH_COMPRESSION_SYNTHETIC_SAMPLES:-32}
DATASET_SAMPLES=${BENCH_COMPRESSION_DATASET_SAMPLES:-64}
COMPRESS_TIMEOUT=900 # seconds, per compression (validation runs both models in tract)
QUALITY_TIMEOUT=900  # seconds, for all recommender variants together

OUT=target/bench
WORK=$OUT/compression
mkdir -p "$WORK"
RESULTS=$WORK/results.jsonl
QUALITY=$WORK/quality.jsonl
FACTS=$WORK/facts.json
: >"$RESULTS"
: >"$QUALITY"
HELPER=bench/compression_table.py
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# bounded TIMEOUT OUTFILE ERRFILE CMD...: runs CMD in the background (so the trap can
# stop it) under `timeout`, waits for it; returns its exit status.
bounded() {
  local limit=$1 out=$2 err=$3 pid rc=0
  shift 3
  timeout --kill-after=10 "$limit" "$@" >"$out" 2>"$err" &
  pid=$!
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  return "$rc"
}

# add_row KEY=VALUE | KEY@=JSON-FILE | KEY#=INTEGER ...: one results line, assembled by
# Python (no quoting games); empty values are left out.
add_row() {
  python3 - "$@" >>"$RESULTS" <<'EOF'
import json, sys
row = {}
for arg in sys.argv[1:]:
    key, _, value = arg.partition("=")
    if key.endswith("@"):  # KEY@=FILE: the file's JSON, if it parses
        try:
            row[key[:-1]] = json.load(open(value))
        except (OSError, ValueError):
            pass
    elif key.endswith("#"):  # KEY#=NUMBER
        row[key[:-1]] = int(value)
    elif value:
        row[key] = value
print(json.dumps(row))
EOF
}

facts=()
fact() { facts+=("\"$1\":$2"); }

# bench_model NAME KIND SOURCE [DATASET]
bench_model() {
  local name=$1 kind=$2 source=$3 dataset=${4:-} dir variant model rc err
  local -a sample_args
  dir=$WORK/$name
  mkdir -p "$dir"
  python3 "$HELPER" body "$kind" >"$dir/body.json"
  if [[ -n $dataset ]]; then
    sample_args=(--samples "$DATASET_SAMPLES" --dataset "$dataset")
  else
    sample_args=(--samples "$SYNTHETIC_SAMPLES")
  fi
  for variant in fp32 fp16 int8 int8-per-channel; do
    model=$dir/$variant.onnx
    err=""
    rm -f "$dir/$variant.report.json" "$dir/$variant.serve.json"
    if [[ $variant == fp32 ]]; then
      cp "$source" "$model"
    else
      rm -f "$model"
      local -a mode_args=(--mode "${variant%%-*}")
      [[ $variant == int8-per-channel ]] && mode_args+=(--per-channel)
      echo "  $name $variant: compressing" >&2
      rc=0
      bounded "$COMPRESS_TIMEOUT" "$dir/$variant.report.json" "$dir/$variant.compress.log" \
        "$OPERATOR_BIN" compress --input "$source" --output "$model" "${mode_args[@]}" \
        "${sample_args[@]}" || rc=$?
      if ((rc == 124 || rc == 137)); then
        err="timed out after ${COMPRESS_TIMEOUT}s"
      elif ((rc != 0)); then
        err="exit $rc: $(grep -v -E '^(validating|inspecting|rewriting)' "$dir/$variant.compress.log" | tail -n 2 | tr '\n' ' ')"
      fi
    fi
    if [[ -s $model ]]; then
      echo "  $name $variant: agent load time x$STARTS, ${WARMUP}s + ${SECONDS_EACH}s of requests" >&2
      rc=0
      bounded $((STARTS * 90 + SECONDS_EACH + WARMUP + 60)) "$dir/$variant.serve.json" \
        "$dir/$variant.serve.err" python3 "$HELPER" serve "$AGENT_BIN" "$name" "$model" \
        "$dir/body.json" --starts "$STARTS" --seconds "$SECONDS_EACH" --warmup "$WARMUP" \
        --ready-timeout 60 --log "$dir/$variant.agent.log" || rc=$?
      add_row model="$name" variant="$variant" bytes#="$(stat -c %s "$model")" \
        report@="$dir/$variant.report.json" serve@="$dir/$variant.serve.json" \
        serve_error="$( ((rc == 0)) || echo "probe exit $rc, see $dir/$variant.agent.log")" \
        compress_error="$err"
    else
      add_row model="$name" variant="$variant" report@="$dir/$variant.report.json" \
        compress_error="${err:-no output written}"
    fi
  done
}

for bin in "$OPERATOR_BIN" "$AGENT_BIN"; do
  [[ -x $bin ]] || { echo "missing $bin (cargo build --release)" >&2; exit 1; }
done

echo "bench: compression, magika" >&2
if [[ -s $MAGIKA ]]; then bench_model magika magika "$MAGIKA"; else echo "  skipped: no $MAGIKA" >&2; fi
echo "bench: compression, PP-OCR cls" >&2
if [[ -s $PPOCR ]]; then bench_model ppocr-cls ppocr-cls "$PPOCR"; else echo "  skipped: no $PPOCR" >&2; fi

echo "bench: compression, recommender" >&2
if [[ -n $RECOMMENDER_DIR && -s $RECOMMENDER_DIR/recommender.onnx && -s $RECOMMENDER_DIR/validation.jsonl ]]; then
  bench_model recommender recommender "$RECOMMENDER_DIR/recommender.onnx" "$RECOMMENDER_DIR/validation.jsonl"
  baseline=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get("popularity_baseline")))' \
    "$RECOMMENDER_DIR/quality.json" 2>/dev/null || echo null)
  fact popularity_baseline "$baseline"
  if [[ -z $PYTHON || ! -x $PYTHON ]]; then
    fact quality_error "\"no SHOAL_PYTHON with onnxruntime ('$PYTHON')\""
  elif ! compgen -G "$WHEELS/recbole-1.2.1-*.whl" >/dev/null; then
    fact quality_error "\"no recbole 1.2.1 wheel in $WHEELS (make example-model fetches it)\""
  else
    echo "  recommender: offline quality of every variant (onnxruntime)" >&2
    models=()
    for variant in fp32 fp16 int8 int8-per-channel; do
      [[ -s $WORK/recommender/$variant.onnx ]] && models+=("$WORK/recommender/$variant.onnx")
    done
    rc=0
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 \
      bounded "$QUALITY_TIMEOUT" "$WORK/quality.raw.jsonl" "$WORK/quality.log" \
      "$PYTHON" examples/recommender/evaluate.py --data-dir "$WHEELS" "${models[@]}" || rc=$?
    # Tag each line with its variant (the file name).
    python3 -c '
import json, os, sys
for line in open(sys.argv[1]):
    if line.strip():
        q = json.loads(line)
        q["variant"] = os.path.basename(q["model"]).removesuffix(".onnx")
        print(json.dumps(q))' "$WORK/quality.raw.jsonl" >"$QUALITY" || true
    ((rc == 0)) || fact quality_error "\"evaluate.py exit $rc, see $WORK/quality.log\""
  fi
else
  echo "  skipped: no recommender in '${RECOMMENDER_DIR}' (make example-model)" >&2
  fact quality_error "\"no recommender in '${RECOMMENDER_DIR}' (make example-model)\""
fi

fact cores "$(nproc)"
fact seconds "$SECONDS_EACH"
fact warmup_seconds "$WARMUP"
fact starts "$STARTS"
fact synthetic_samples "$SYNTHETIC_SAMPLES"
fact dataset_samples "$DATASET_SAMPLES"
(
  IFS=,
  echo "{${facts[*]}}"
) >"$FACTS"
python3 "$HELPER" table "$WORK" | tee "$OUT/compression.md"
echo "(written to $OUT/compression.md; models, reports and logs in $WORK/)" >&2
