#!/usr/bin/env bash
# Checks the OCI archives `make images` wrote to target/images/ (run by
# `make images-check`, which passes the variables below):
#   - skopeo reads each archive (inspect --config, copy to a dir): user,
#     entrypoint, command, env, ports, labels, architecture;
#   - the layer's files: binary static and of the right arch, 0755, /etc/passwd
#     with nonroot 65532, /tmp 1777, the CA bundle, the operator's artifact dir
#     owned by 65532;
#   - the amd64 agent, and the arm64 one under qemu-aarch64-static, serve the
#     real magika model in standalone mode on 127.0.0.1 and answer an inference;
#   - a throwaway containerd (own root, state and socket in a temp dir) imports
#     each archive with `ctr -n k8s.io images import` under its reference.
# Prints the sizes at the end. Fails with a message naming what is wrong.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${IMAGE_DIR:=target/images}" "${IMAGE_REPO:=ghcr.io/shoal-dev}" "${PAUSE_VERSION:=3.10.1}"
: "${IMAGE_TOOL:?IMAGE_TOOL (the shoal-oci-image binary) must be set; run make images-check}"
: "${VERSION:?VERSION must be set; run make images-check}"
: "${IMAGE_REVISION:=$(git rev-parse HEAD)}"
: "${SHOAL_TEST_MAGIKA_ONNX:?SHOAL_TEST_MAGIKA_ONNX must name the magika model; run make images-check}"

fail() { echo "images-check: FAIL: $*" >&2; exit 1; }
for tool in skopeo file curl python3 tar qemu-aarch64-static containerd ctr; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (make deps installs it)"
done
[[ -s $SHOAL_TEST_MAGIKA_ONNX ]] || fail "no model at $SHOAL_TEST_MAGIKA_ONNX (make test-models fetches it)"

work=$(mktemp -d /tmp/shoal-images-check.XXXXXX)
agent_pid=
containerd_pid=
cleanup() {
  [[ -n $agent_pid ]] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  [[ -n $containerd_pid ]] && kill "$containerd_pid" 2>/dev/null && wait "$containerd_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# check_config ARCHIVE ARCH USER ENTRYPOINT CMD ENV PORTS TITLE: the image config
# as skopeo reads it. CMD, ENV and PORTS are JSON (null when absent); TITLE empty
# for an image without labels.
check_config() {
  local archive=$1
  skopeo inspect --config "oci-archive:$archive" >"$work/config.json" \
    || fail "skopeo cannot read the config of $archive"
  python3 - "$work/config.json" "$@" <<'PY' || fail "$archive: wrong image config (above)"
import json, sys
path, archive, arch, user, entrypoint, cmd, env, ports, title, version, revision = sys.argv[1:]
config = json.load(open(path))
run = config.get("config", {})
problems = []
def expect(what, got, want):
    if got != want:
        problems.append(f"{what} is {got!r}, expected {want!r}")
expect("architecture", config.get("architecture"), arch)
expect("os", config.get("os"), "linux")
expect("User", run.get("User"), user)
expect("Entrypoint", run.get("Entrypoint"), [entrypoint])
expect("Cmd", run.get("Cmd"), json.loads(cmd))
for variable in json.loads(env):
    if variable not in run.get("Env", []):
        problems.append(f"Env {run.get('Env')} lacks {variable}")
expect("ExposedPorts", sorted(run.get("ExposedPorts") or {}), json.loads(ports))
if title:
    labels = run.get("Labels") or {}
    prefix = "org.opencontainers.image."
    expect("title label", labels.get(prefix + "title"), title)
    expect("version label", labels.get(prefix + "version"), version)
    expect("revision label", labels.get(prefix + "revision"), revision)
    expect("source label", labels.get(prefix + "source"), "https://github.com/shoal-dev/shoal")
    expect("licenses label", labels.get(prefix + "licenses"), "Apache-2.0")
    for label in ("description", "created"):
        if not labels.get(prefix + label):
            problems.append(f"label {prefix}{label} is missing")
for problem in problems:
    print(f"images-check: {archive}: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
}

# unpack ARCHIVE DIR: skopeo copies the archive to a dir layout; its one layer is
# unpacked into DIR/rootfs and listed (tar -tv, numeric owners) in DIR/listing.
unpack() {
  local archive=$1 dir=$2
  mkdir -p "$dir/rootfs"
  skopeo copy --quiet "oci-archive:$archive" "dir:$dir/image" || fail "skopeo cannot copy $archive"
  local layers
  layers=$(python3 -c 'import json,sys; print(" ".join(l["digest"].split(":")[1] for l in json.load(open(sys.argv[1]))["layers"]))' "$dir/image/manifest.json")
  [[ $(wc -w <<<"$layers") == 1 ]] || fail "$archive has $(wc -w <<<"$layers") layers, expected 1"
  tar -xzf "$dir/image/$layers" -C "$dir/rootfs" || fail "the layer of $archive is not a gzip tar"
  tar -tvzf "$dir/image/$layers" --numeric-owner >"$dir/listing"
}

# expect_entry DIR PATH PERMS OWNER: the listing has PATH with these ls-style
# permissions and uid/gid.
expect_entry() {
  local dir=$1 path=$2 perms=$3 owner=$4
  awk -v path="$path" -v perms="$perms" -v owner="$owner" \
    '{ sub(/\/$/, "", $6) } $6 == path && $1 == perms && $2 == owner { found = 1 } END { exit !found }' \
    "$dir/listing" || fail "$dir: the layer lacks $path as $perms $owner; it has: $(grep -F "$path" "$dir/listing" || echo nothing)"
}

# check_binary FILE ARCH: a static ELF of that arch.
check_binary() {
  local binary=$1 arch=$2 description
  description=$(file -b "$binary")
  case $arch in amd64) machine="x86-64" ;; arm64) machine="ARM aarch64" ;; esac
  [[ $description == *"$machine"* ]] || fail "$binary is not an $arch binary: $description"
  [[ $description == *"statically linked"* || $description == *"static-pie linked"* ]] \
    || fail "$binary is not statically linked: $description"
}

# check_base DIR: the distroless-like files.
check_base() {
  local dir=$1
  grep -qx 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' "$dir/rootfs/etc/passwd" \
    || fail "$dir: /etc/passwd has no nonroot user 65532"
  grep -qx 'nonroot:x:65532:' "$dir/rootfs/etc/group" || fail "$dir: /etc/group has no nonroot group 65532"
  grep -q 'BEGIN CERTIFICATE' "$dir/rootfs/etc/ssl/certs/ca-certificates.crt" \
    || fail "$dir: no CA bundle at /etc/ssl/certs/ca-certificates.crt"
  expect_entry "$dir" tmp drwxrwxrwt 0/0
}

# serve_and_infer BINARY [RUNNER]: the agent serves magika on a free loopback
# port and answers one inference with 200 and a [1, 214] output.
serve_and_infer() {
  local binary=$1 runner=${2:-} port log=$work/agent.log
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo "Starting ${runner:+$runner }$binary on 127.0.0.1:$port with magika"
  # Under qemu one inference of magika takes tens of seconds: the check is that the
  # image serves, not how fast an emulated CPU does, so the request may take 5 min.
  $runner "$binary" --model "magika=$SHOAL_TEST_MAGIKA_ONNX" --listen "127.0.0.1:$port" --workers 1 \
    ${runner:+--request-timeout-seconds 300} >"$log" 2>&1 &
  agent_pid=$!
  local deadline=$((SECONDS + 300))
  until curl -fsS "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1; do
    kill -0 "$agent_pid" 2>/dev/null || { cat "$log" >&2; fail "$binary exited before it was ready"; }
    ((SECONDS < deadline)) || { cat "$log" >&2; fail "$binary not ready after 300 s"; }
    sleep 1
  done
  python3 -c 'import json; print(json.dumps({"inputs": [{"name": "bytes", "datatype": "INT32", "shape": [1, 2048], "data": [(i * 7) % 257 for i in range(2048)]}]}))' \
    >"$work/request.json"
  local status
  status=$(curl -sS -o "$work/response.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    --data-binary @"$work/request.json" "http://127.0.0.1:$port/v2/models/magika/infer") \
    || fail "$binary: the inference request failed"
  [[ $status == 200 ]] || fail "$binary answered the inference with HTTP $status: $(head -c 500 "$work/response.json")"
  python3 - "$work/response.json" <<'PY' || fail "$binary: the inference answer has no [1, 214] FP32 output"
import json, sys
outputs = json.load(open(sys.argv[1]))["outputs"]
output = outputs[0]
assert output["name"] == "target_label" and output["shape"] == [1, 214], output
assert output["datatype"] == "FP32" and len(output["data"]) == 214, output["datatype"]
PY
  echo "  HTTP 200, output target_label [1, 214]"
  kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
  agent_pid=
}

for arch in amd64 arm64; do
  runner=
  [[ $arch == arm64 ]] && runner=qemu-aarch64-static
  for name in shoal-agent shoal-operator; do
    archive=$IMAGE_DIR/$name-$arch.tar
    [[ -f $archive ]] || fail "$archive is missing (make images writes it)"
    echo "Checking $archive"
    if [[ $name == shoal-agent ]]; then
      check_config "$archive" "$arch" 65532:65532 /usr/local/bin/shoal-agent null \
        '["SHOAL_AGENT_LISTEN=0.0.0.0:8000"]' '["8000/tcp"]' shoal-agent "$VERSION" "$IMAGE_REVISION"
    else
      check_config "$archive" "$arch" 65532:65532 /usr/local/bin/shoal-operator '["run"]' \
        '["SHOAL_METRICS_ADDR=0.0.0.0:8080", "SHOAL_AGENT_API_ADDR=0.0.0.0:8443"]' '["8080/tcp", "8443/tcp"]' \
        shoal-operator "$VERSION" "$IMAGE_REVISION"
    fi
    dir=$work/$name-$arch
    unpack "$archive" "$dir"
    check_base "$dir"
    binary=$dir/rootfs/usr/local/bin/$name
    check_binary "$binary" "$arch"
    expect_entry "$dir" "usr/local/bin/$name" -rwxr-xr-x 0/0
    $runner "$binary" --version >/dev/null || fail "$binary --version failed${runner:+ under $runner}"
    if [[ $name == shoal-operator ]]; then
      expect_entry "$dir" var/lib/shoal/artifacts drwxr-xr-x 65532/65532
    else
      serve_and_infer "$binary" $runner
    fi
  done
done

pause=$IMAGE_DIR/pause-amd64.tar
[[ -f $pause ]] || fail "$pause is missing (make images writes it)"
echo "Checking $pause"
check_config "$pause" amd64 65535:65535 /pause null '[]' '[]' "" "" ""
unpack "$pause" "$work/pause"
check_binary "$work/pause/rootfs/pause" amd64
"$work/pause/rootfs/pause" -v | grep -qF "v$PAUSE_VERSION" || fail "/pause -v does not print v$PAUSE_VERSION"

# A throwaway containerd: no CRI plugin, the native snapshotter (no mounts), and
# everything under $work; it is stopped and removed on exit.
echo "Importing the archives into a throwaway containerd"
mkdir -p "$work/containerd"
cat >"$work/containerd/config.toml" <<EOF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd/containerd.sock"
[ttrpc]
  address = "$work/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
EOF
containerd --config "$work/containerd/config.toml" >"$work/containerd/log" 2>&1 &
containerd_pid=$!
ctr=(ctr --address "$work/containerd/containerd.sock" -n k8s.io)
deadline=$((SECONDS + 30))
until "${ctr[@]}" version >/dev/null 2>&1; do
  kill -0 "$containerd_pid" 2>/dev/null || { cat "$work/containerd/log" >&2; fail "containerd exited"; }
  ((SECONDS < deadline)) || { cat "$work/containerd/log" >&2; fail "containerd did not answer within 30 s"; }
  sleep 0.5
done
for archive in "$IMAGE_DIR"/shoal-{agent,operator}-{amd64,arm64}.tar "$pause"; do
  arch=${archive##*-}; arch=${arch%.tar}
  "${ctr[@]}" images import --platform "linux/$arch" --snapshotter native "$archive" >"$work/import.log" 2>&1 \
    || { cat "$work/import.log" >&2; fail "ctr images import $archive failed"; }
  # The name now points at this archive's manifest.
  reference=$(tar -xOf "$archive" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["annotations"]["io.containerd.image.name"])')
  digest=$(tar -xOf "$archive" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["digest"])')
  got=$("${ctr[@]}" images ls | awk -v ref="$reference" '$1 == ref { print $3 }')
  [[ $got == "$digest" ]] || fail "after importing $archive containerd has $reference at ${got:-nothing}, expected $digest"
  echo "  $reference ($arch) imported as $digest"
done
"${ctr[@]}" images ls -q >"$work/images.txt"
for reference in "$IMAGE_REPO/shoal-agent:$VERSION" "$IMAGE_REPO/shoal-operator:$VERSION" "localhost/shoal/pause:$PAUSE_VERSION"; do
  grep -qxF "$reference" "$work/images.txt" \
    || fail "containerd did not name an imported image $reference; it has: $(tr '\n' ' ' <"$work/images.txt")"
done
echo "containerd imported: $(tr '\n' ' ' <"$work/images.txt")"

echo
"$IMAGE_TOOL" inspect "$IMAGE_DIR"/shoal-{agent,operator}-{amd64,arm64}.tar "$pause"
echo "images-check: all images OK"
