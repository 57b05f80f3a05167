#!/usr/bin/env bash
# Builds the example recommender: trains on MovieLens-100k with numpy and exports ONNX.
#   build.sh OUT_DIR PYTHON
# PYTHON is an interpreter with numpy, onnx and onnxruntime. Writes
# OUT_DIR/recommender.onnx, OUT_DIR/validation.jsonl and OUT_DIR/quality.json
# atomically (built in a temporary directory, then moved into place); does
# nothing if OUT_DIR/recommender.onnx already exists. The dataset comes from the
# recbole 1.2.1 wheel on PyPI, cached in ${SHOAL_CACHE:-$HOME/.cache/shoal}/wheels/.
set -euo pipefail
if (($# != 2)); then
  echo "usage: $0 OUT_DIR PYTHON" >&2
  exit 2
fi
out_dir=${1%/} python=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ -s $out_dir/recommender.onnx ]]; then
  exit 0
fi

wheels=${SHOAL_CACHE:-$HOME/.cache/shoal}/wheels
if ! compgen -G "$wheels/recbole-1.2.1-*.whl" >/dev/null; then
  echo "Fetching the recbole 1.2.1 wheel (MovieLens-100k) from PyPI" >&2
  mkdir -p "$wheels"
  tmp_wheels=$(mktemp -d "$wheels/.download.XXXXXX")
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$tmp_wheels" recbole==1.2.1 >&2
  mv "$tmp_wheels"/recbole-1.2.1-*.whl "$wheels"/
  rm -rf "$tmp_wheels"
fi

echo "Training the MovieLens-100k recommender into $out_dir" >&2
mkdir -p "$(dirname "$out_dir")"
tmp_out=$(mktemp -d "$out_dir.tmp.XXXXXX")
trap 'rm -rf "$tmp_out"' EXIT
# One BLAS thread: keeps training deterministic (byte-identical output) and off the other cores.
export PYTHONDONTWRITEBYTECODE=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"$python" "$here/train.py" --data-dir "$wheels" --out-dir "$tmp_out"
# Version 2 for rollout demos: the same training with another seed.
echo "Training version 2 (another seed)" >&2
"$python" "$here/train.py" --data-dir "$wheels" --out-dir "$tmp_out/v2" --seed 20261202
mv "$tmp_out/v2/recommender.onnx" "$tmp_out/recommender-v2.onnx"
mv "$tmp_out/v2/quality.json" "$tmp_out/quality-v2.json"
rm -rf "$tmp_out/v2"
# Version 3: deliberately broken, for the rollback demo.
"$python" "$here/break_model.py" "$tmp_out/recommender.onnx" "$tmp_out/recommender-broken.onnx"
chmod 755 "$tmp_out"
if [[ -d $out_dir ]]; then
  # OUT_DIR exists without a model (e.g. other files in it): move the files in one by one,
  # the model last so that its presence means the rest is there too.
  mv "$tmp_out/validation.jsonl" "$tmp_out/quality.json" "$tmp_out/quality-v2.json" \
    "$tmp_out/recommender-v2.onnx" "$tmp_out/recommender-broken.onnx" "$out_dir/"
  mv "$tmp_out/recommender.onnx" "$out_dir/"
else
  mv "$tmp_out" "$out_dir"
fi
