#!/usr/bin/env bash
# Fetches real third-party ONNX models from the PyPI packages that ship them
# (no model hub): pip downloads the wheel, we unzip the .onnx files into a cache
# outside the repo keyed by package version, and print the directory.
#   magika 1.0.3 (Apache-2.0, Google): a 3 MB file-type classifier CNN,
#   input int32 [N, 2048] -> output float [N, 214].
#   rapidocr-onnxruntime 1.4.4 (Apache-2.0; PaddleOCR's models, Apache-2.0): the
#   PP-OCR mobile v2.0 text-direction classifier, 585 KB, small enough for a ConfigMap.
set -euo pipefail
cache=${SHOAL_CACHE:-$HOME/.cache/shoal}/models
fetch_wheel_file() { # package version path-in-wheel destination
  local package=$1 version=$2 inner=$3 dest=$4
  [[ -s $dest ]] && return 0
  local tmp; tmp=$(mktemp -d)
  echo "Fetching $inner from the $package $version wheel on PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$package==$version" >&2
  mkdir -p "$(dirname "$dest")"
  python3 - "$tmp"/*.whl "$inner" "$dest.tmp" <<'PY'
import sys, zipfile
wheel, inner, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(dest, "wb") as out:
    out.write(z.read(inner))
PY
  mv "$dest.tmp" "$dest"
  rm -rf "$tmp"
}
fetch_wheel_file magika 1.0.3 magika/models/standard_v3_3/model.onnx "$cache/magika-1.0.3/model.onnx"
fetch_wheel_file rapidocr-onnxruntime 1.4.4 rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx \
  "$cache/rapidocr-onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx"
echo "$cache"
