#!/usr/bin/env bash
# Images for node-check.sh, made from local files only (nothing is pulled), as
# docker-archive tars that `ctr images import` names:
#   localhost/shoal/node-test:1   a static busybox (Debian's busybox-static): httpd,
#                                 nc, nslookup, wget with its own TLS (Debian's 1.35
#                                 wget crashes on -T: use `timeout`)
#   localhost/shoal/pause:3.10.1  a stand-in for the real pause image (`make images`
#                                 builds it into target/images/pause-amd64.tar); made
#                                 only when that file does not exist: the pause.c of
#                                 k8s.io/kubernetes compiled with musl-gcc -static
# Usage: node-test-images.sh OUT_DIR   (prints the tars it wrote)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: node-test-images.sh OUT_DIR}
source "$here/versions.env"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

image() { # name:tag tar rootfs-dir entrypoint...
  local ref=$1 tar=$2 rootfs=$3; shift 3
  local layout="$work/layout-$RANDOM"
  umoci init --layout "$layout"
  umoci new --image "$layout:img"
  umoci unpack --image "$layout:img" "$work/bundle"
  cp -a "$rootfs/." "$work/bundle/rootfs/"
  umoci repack --image "$layout:img" "$work/bundle"
  rm -rf "$work/bundle"
  local args=() arg
  for arg in "$@"; do args+=(--config.entrypoint "$arg"); done
  umoci config --image "$layout:img" --os linux --architecture amd64 "${args[@]}"
  # skopeo writes a docker-archive whose manifest names the image: ctr import
  # takes the name from it (an OCI layout names only a tag).
  rm -f "$tar"
  skopeo copy -q "oci:$layout:img" "docker-archive:$tar:$ref"
  echo "$tar"
}

bb=/bin/busybox
# ldd fails on a static binary; Debian's dynamic busybox package has the same path.
[[ -x $bb ]] && ! ldd "$bb" >/dev/null 2>&1 \
  || { echo "no static $bb: install Debian's busybox-static (make node-deps)" >&2; exit 1; }
mkdir -p "$work/test/bin" "$work/test/www" "$work/test/tmp" "$work/test/etc"
cp "$bb" "$work/test/bin/busybox"
for tool in sh httpd nc nslookup wget timeout cat echo sleep ls hostname env; do ln -s busybox "$work/test/bin/$tool"; done
echo 'root:x:0:0:root:/:/bin/sh' >"$work/test/etc/passwd"
image localhost/shoal/node-test:1 "$out/node-test.tar" "$work/test" /bin/busybox

images=${SHOAL_NODE_IMAGES:-$repo/target/images}
if [[ ! -f "$images/pause-amd64.tar" ]]; then
  src=$(go env GOMODCACHE)/k8s.io/kubernetes@v$KUBE_VERSION/build/pause/linux/pause.c
  [[ -f $src ]] || (cd "$here/kube" && go mod download k8s.io/kubernetes)
  mkdir -p "$work/pause"
  musl-gcc -Os -Wall -static -DVERSION=v3.10.1-shoal-standin -o "$work/pause/pause" "$src"
  image localhost/shoal/pause:3.10.1 "$out/pause-standin.tar" "$work/pause" /pause
fi
