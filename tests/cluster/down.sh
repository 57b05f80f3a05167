#!/usr/bin/env bash
# Stops exactly the processes up.sh started (by PID file), newest first; the real
# node (node-up.sh), if one is up, before them.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pids="$here/../../target/cluster/pids"
quiet=false; [[ ${1:-} == --quiet ]] && quiet=true
if $quiet; then "$here/node-down.sh" --quiet; else "$here/node-down.sh" --if-up; fi
stopped=()
for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  file="$pids/$name.pid"
  [[ -f $file ]] || continue
  pid=$(cat "$file")
  # Only signal the PID if it still runs the program we started (PIDs get reused).
  if kill -0 "$pid" 2>/dev/null && grep -qa "$name" "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid"
    # Gone, or a zombie: this machine's init reaps orphans only every ~2 s.
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    stopped+=("$name")
  fi
  rm -f "$file"
done
$quiet || echo "Stopped: ${stopped[*]:-nothing was running}"
