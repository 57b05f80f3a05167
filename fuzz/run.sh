#!/usr/bin/env bash
# fuzz/run.sh SECONDS [TARGET...]: builds the cargo-fuzz targets once, then runs each
# for SECONDS (all three when none is named) and prints executions, executions per
# second and new corpus entries. Fails on the first crash, timeout or out-of-memory;
# libFuzzer leaves the input in fuzz/artifacts/TARGET/ and the log in fuzz/logs/.
#
# Environment: CARGO_FUZZ (the cargo-fuzz binary; default: cargo-fuzz on PATH),
# FUZZ_SANITIZER (address, the default, or none: about twice the executions per
# second, without the checks on tract's unsafe code), FUZZ_PROFILE (release, the
# default, or dev: unoptimised with debug assertions, so integer overflows panic;
# builds in ~3 minutes instead of ~20 but runs tract ~10x slower), FUZZ_TARGET_DIR
# (the build directory; default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
((${#targets[@]})) || targets=(inference_request agent_protocol onnx_compressor)
cargo_fuzz=${CARGO_FUZZ:-cargo-fuzz}
sanitizer=${FUZZ_SANITIZER:-address}
profile=${FUZZ_PROFILE:-release}
case $profile in
  release) build_flags=(--sanitizer "$sanitizer") ;;
  dev) build_flags=(--sanitizer "$sanitizer" --dev) ;;
  *) echo "FUZZ_PROFILE must be release or dev, not $profile" >&2; exit 2 ;;
esac
target_dir=${FUZZ_TARGET_DIR:-target}

# cargo-fuzz needs unstable rustc flags: the nightly toolchain when rustup has one,
# else the stable one with RUSTC_BOOTSTRAP=1 (the same flags, no download needed).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  export RUSTUP_TOOLCHAIN=nightly
else
  export RUSTUP_TOOLCHAIN=stable RUSTC_BOOTSTRAP=1
  echo "No nightly toolchain: building with stable and RUSTC_BOOTSTRAP=1" >&2
fi

# Longest one input may take before libFuzzer calls it a hang, and longest input.
declare -A timeout=([inference_request]=10 [agent_protocol]=10 [onnx_compressor]=30)
declare -A max_len=([inference_request]=8192 [agent_protocol]=8192 [onnx_compressor]=65536)
# JSON keywords and field names; protobuf has none worth listing.
declare -A dict=([inference_request]=dict/inference_request.dict [agent_protocol]=dict/agent_protocol.dict)

mkdir -p logs "$target_dir"
touch "$target_dir" # most recently used: .ci/run keeps the two newest build directories
started=$SECONDS
if ! "$cargo_fuzz" fuzz build "${build_flags[@]}" --target-dir "$target_dir" >logs/build.log 2>&1; then
  tail -n 60 logs/build.log >&2
  echo "fuzz build failed; the log is in fuzz/logs/build.log" >&2
  exit 1
fi
echo "fuzz build ($RUSTUP_TOOLCHAIN, $profile profile, sanitizer $sanitizer): $((SECONDS - started)) s"

summary=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "== $target: ${seconds} s"
  log=logs/$target.log
  # New inputs go to corpus/TARGET (not committed); seeds/TARGET is read only.
  set +e
  "$cargo_fuzz" fuzz run "${build_flags[@]}" --target-dir "$target_dir" "$target" \
    "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout="${timeout[$target]}" -max_len="${max_len[$target]}" \
    -rss_limit_mb=2048 ${dict[$target]:+-dict=${dict[$target]}} -print_final_stats=1 \
    >"$log" 2>&1
  status=$?
  set -e
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  summary+=("$(printf '%-18s %8s runs %7s exec/s %5s new units %6s MB peak RSS  exit %s' \
    "$target" "$(stat number_of_executed_units)" "$(stat average_exec_per_sec)" \
    "$(stat new_units_added)" "$(stat peak_rss_mb)" "$status")")
  if ((status != 0)); then
    tail -n 60 "$log" >&2
    echo "fuzz target $target failed (exit $status); the input is in fuzz/artifacts/$target/, the log in fuzz/$log" >&2
    printf '%s\n' "${summary[@]}"
    exit 1
  fi
done
printf '%s\n' "${summary[@]}"
echo "fuzz: $((SECONDS - started)) s in all"
