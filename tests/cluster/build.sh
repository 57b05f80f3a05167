#!/usr/bin/env bash
# Builds the local control plane from Go modules (no release downloads):
# one multicall `kube` binary (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kubelet, kube-proxy, etcd) plus kwok, helm and CoreDNS
# (the real node's cluster DNS, node-up.sh), into a cache directory outside the
# repo keyed by version. A second run finds them and returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
cache=${SHOAL_CACHE:-$HOME/.cache/shoal}
# The kube binary's components are in kube/main.go and kube/go.sum: a change there
# (a component added) is a new cache key too.
kube_key=$(cat "$here/kube/main.go" "$here/kube/go.sum" | sha256sum | cut -c1-8)
bin="$cache/bin/k8s-$KUBE_VERSION-$kube_key-kwok-$KWOK_VERSION-helm-$HELM_VERSION-coredns-$COREDNS_VERSION"
mkdir -p "$bin"

# A binary of the same version already built into another cache directory (one
# whose key differs only by another tool's version) is linked, not rebuilt: a new
# CoreDNS version must not cost a 15-minute kube build.
reuse() { # name glob-of-directories-that-hold-the-same-build
  local name=$1 dir; shift
  [[ -x "$bin/$name" ]] && return 0
  for dir in "$@"; do
    [[ -x "$dir/$name" && ! -L "$dir/$name" && "$dir" != "$bin" ]] || continue
    ln "$dir/$name" "$bin/$name" 2>/dev/null || cp "$dir/$name" "$bin/$name"
    echo "Reusing $name from $dir"
    return 0
  done
}

# Go prints nothing while it compiles; count the packages it reports with -v
# against the package graph so a person sees how far along a 10+ minute build is.
build_with_progress() { # label total_packages command...
  local label=$1 total=$2; shift 2
  local log; log=$(mktemp)
  local start=$SECONDS done=0
  "$@" >"$log" 2>&1 &
  local pid=$!
  # On a terminal the line redraws every 2 s; in a CI log, one line every 30 s.
  local tty=false every=30 last=-30 eol='\n'
  [[ -t 1 ]] && tty=true every=2 eol=''
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS - last >= every)); then
      last=$SECONDS
      done=$(grep -cvE '^(#|go: )' "$log" || true)
      $tty && printf '\r'
      printf "  %-6s %4d/%s packages compiled, %dm%02ds $eol" "$label" "$done" "$total" \
        $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60))
    fi
    sleep 1
  done
  if ! wait "$pid"; then
    printf '\n'; tail -40 "$log" >&2; rm -f "$log"
    echo "build of $label failed (full log above)" >&2
    return 1
  fi
  $tty && printf '\r'
  printf '  %-6s built in %dm%02ds%40s\n' "$label" $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) ''
  rm -f "$log"
}

reuse kube "$cache/bin/k8s-$KUBE_VERSION-$kube_key-"*
if [[ ! -x "$bin/kube" ]]; then
  echo "Building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy and etcd v$KUBE_VERSION"
  echo "from the k8s.io/kubernetes Go module (a cold build takes 15-25 minutes on 2 cores)"
  cd "$here/kube"
  go mod download
  total=$(go list -deps . | wc -l)
  v=k8s.io/component-base/version c=k8s.io/client-go/pkg/version
  minor=$(cut -d. -f2 <<<"$KUBE_VERSION")
  ldflags="-s -w -X $v.gitVersion=v$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
  ldflags="$ldflags -X $c.gitVersion=v$KUBE_VERSION -X $c.gitMajor=1 -X $c.gitMinor=$minor"
  build_with_progress kube "$total" go build -v -trimpath -ldflags "$ldflags" -o "$bin/kube.tmp" .
  mv "$bin/kube.tmp" "$bin/kube"
fi
for component in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy etcd; do
  ln -sf kube "$bin/$component"
done

install_tool() { # name module version
  local name=$1 module=$2 version=$3
  reuse "$name" "$cache/bin/"*"-$name-$version" "$cache/bin/"*"-$name-$version-"*
  [[ -x "$bin/$name" ]] && return 0
  echo "Building $name v$version with go install"
  local gobin; gobin=$(mktemp -d)
  build_with_progress "$name" "~" env GOBIN="$gobin" go install -v "$module@v$version"
  mv "$gobin/$name" "$bin/$name"
  rm -rf "$gobin"
}
install_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
install_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
# CoreDNS serves cluster.local to the pods of the real node (node-up.sh); its
# go.mod has no replace directives, so go install builds it as released.
install_tool coredns github.com/coredns/coredns "$COREDNS_VERSION"

# A stable path for the Makefile and scripts to find the binaries.
mkdir -p "$cache/bin"
ln -sfn "$bin" "$cache/bin/current"
echo "Control-plane binaries ready in $bin"
