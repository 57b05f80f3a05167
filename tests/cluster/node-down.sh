#!/usr/bin/env bash
# Stops the real node node-up.sh started and removes what it created: the kubelet
# and kube-proxy, every container (their tasks killed first: containerd-shim
# processes outlive containerd), containerd, CoreDNS and the API forwarder (by PID
# file, as down.sh does), then kube-proxy's iptables rules, our guard chains, the
# pods' network namespaces, containerd's and the kubelet's mounts, the cgroups, the
# bridge and route, the host settings it changed, and the Node and kubernetes
# Service endpoints objects. Images stay in containerd's root for the next node-up.
# Safe to run when nothing is up; down.sh runs it first.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/node-common.sh"
# --quiet: print nothing; --if-up (down.sh): print only when something was up.
quiet=false if_up=false
[[ ${1:-} == --quiet ]] && quiet=true
[[ ${1:-} == --if-up ]] && if_up=true
t0=$SECONDS
stopped=()

stop() { # name [group]   (group: the whole process group, e.g. socat's forked children)
  local name=$1 group=${2:-} file="$pids/$1.pid" pid target
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if alive "$name"; then
    target=$pid
    [[ -n $group && $(ps -o pgid= -p "$pid" | tr -d ' ') == "$pid" ]] && target=-$pid
    kill -- "$target" 2>/dev/null
    # Gone, or a zombie: this machine's init reaps orphans only every ~2 s.
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || break
      sleep 0.1
    done
    kill -9 -- "$target" 2>/dev/null || true
    stopped+=("$name")
  fi
  rm -f "$file"
}

# The kubelet first: it would restart the containers removed below.
stop kubelet
stop kube-proxy

# Containers: kill every task, delete the tasks (their shims exit) and containers.
ids=()
if alive containerd; then
  mapfile -t ids < <(ctr containers ls -q 2>/dev/null)
  mapfile -t tasks < <(ctr tasks ls -q 2>/dev/null)
  for id in "${tasks[@]}"; do ctr tasks kill -s SIGKILL "$id" &>/dev/null; done
  for id in "${tasks[@]}"; do
    for _ in $(seq 50); do
      [[ $(ctr tasks ls 2>/dev/null | awk -v id="$id" '$1 == id {print $3}') == RUNNING ]] || break
      sleep 0.1
    done
    ctr tasks delete -f "$id" &>/dev/null
  done
  for id in "${ids[@]}"; do ctr containers delete "$id" &>/dev/null; done
  ((${#ids[@]})) && stopped+=("${#ids[@]} containers")
fi
stop containerd
# Whatever survived (containerd crashed, a task that would not die): our shims, found
# by our containerd's address on their command line, and every process in our
# cgroups (the containers' processes).
for proc in /proc/[0-9]*; do
  cmdline=$({ tr '\0' ' ' <"$proc/cmdline"; } 2>/dev/null) || continue
  if [[ $cmdline == containerd-shim* && $cmdline == *"-address $containerd_sock "* ]]; then
    kill -9 "${proc#/proc/}" 2>/dev/null && stopped+=("shim ${proc#/proc/}")
  fi
done
shopt -s globstar nullglob
for _ in 1 2 3; do
  left=$(cat /sys/fs/cgroup/*/shoal-node/**/cgroup.procs 2>/dev/null | sort -u)
  [[ -z $left ]] && break
  # shellcheck disable=SC2086
  kill -9 $left 2>/dev/null
  sleep 0.2
done
shopt -u globstar nullglob
# A shim removes its socket (containerd 1.6 puts them in /run/containerd/s, named by
# a hash of our address, the namespace and the id) when it exits cleanly; not when
# it was killed.
for id in "${ids[@]}"; do
  hash=$(printf '%s' "$containerd_sock/k8s.io/$id" | sha256sum | cut -d' ' -f1)
  rm -f "/run/containerd/s/$hash"
done

stop coredns
stop socat group

# Mounts under our directories (container root filesystems, the pods' network
# namespaces, /dev/shm, the kubelet's volumes), the deepest first.
unmount_ours() {
  local mounts
  mounts=$(awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    m=$(printf '%b' "${m//\\/\\0}")
    case $m in "$run"|"$run"/*|"$containerd_root"/*|"$node_dir"/*) echo "$m" ;; esac
  done | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-)
  [[ -z $mounts ]] && return 0
  while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done <<<"$mounts"
  stopped+=("$(wc -l <<<"$mounts") mounts")
}
unmount_ours

# cgroups (v1): our root in every hierarchy, leaves first.
for dir in /sys/fs/cgroup/*/shoal-node; do
  [[ -d $dir ]] && find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null
done

# kube-proxy's rules (and the kubelet's few chains), then ours.
if iptables-save 2>/dev/null | grep '^:KUBE-' >/dev/null || ip6tables-save 2>/dev/null | grep '^:KUBE-' >/dev/null; then
  "$bin/kube-proxy" --cleanup >"$logs/kube-proxy-cleanup.log" 2>&1 || true
  for cmd in iptables ip6tables; do
    for table in mangle nat filter; do
      for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        $cmd -t $table -S 2>/dev/null | grep -- "^-N $chain\$" >/dev/null || continue
        $cmd -t $table -S 2>/dev/null | grep -- "-j $chain\$" | sed 's/^-A/-D/' \
          | while read -r rule; do eval "$cmd -t $table $rule" 2>/dev/null; done
        $cmd -t $table -F $chain 2>/dev/null; $cmd -t $table -X $chain 2>/dev/null
      done
    done
  done
  stopped+=("kube-proxy's iptables rules")
fi
for hook in POSTROUTING:OUT INPUT:IN; do
  chain="$guard_chain-${hook#*:}"
  iptables -t mangle -S "${hook%:*}" 2>/dev/null | grep -- "-j $chain\$" | sed 's/^-A/-D/' \
    | while read -r rule; do eval "iptables -t mangle $rule"; done
  iptables -t mangle -F "$chain" 2>/dev/null && iptables -t mangle -X "$chain" 2>/dev/null
done
# hostPort chains of the portmap plugin, had a pod used one.
for chain in $(iptables -t nat -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^CNI-(HOSTPORT|DN-)/ {print $2}'); do
  iptables -t nat -S | grep -- "-j $chain\$" | sed 's/^-A/-D/' \
    | while read -r rule; do eval "iptables -t nat $rule" 2>/dev/null; done
done
for chain in $(iptables -t nat -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^CNI-(HOSTPORT|DN-)/ {print $2}'); do
  iptables -t nat -F "$chain" 2>/dev/null
done
for chain in $(iptables -t nat -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^CNI-(HOSTPORT|DN-)/ {print $2}'); do
  iptables -t nat -X "$chain" 2>/dev/null
done

if ip link show "$bridge" &>/dev/null; then
  ip route del "$service_cidr" dev "$bridge" 2>/dev/null
  ip link delete "$bridge" && stopped+=("bridge $bridge")
fi
rm -f "$node_dir/bridge"
# libcni's result cache for our network (containerd 1.6 keeps it in /var/lib/cni).
rm -f /var/lib/cni/results/"$cni_network"-* 2>/dev/null
# The kubelet's links to our pod logs.
for link in /var/log/containers/*.log; do
  [[ -L $link && $(readlink "$link") == "$pod_logs"/* ]] && rm -f "$link"
done
# The host directories node-up found missing (children listed first), if empty.
if [[ -f $node_dir/created-dirs ]]; then
  while read -r dir; do rmdir "$dir" 2>/dev/null; done <"$node_dir/created-dirs"
  rm -f "$node_dir/created-dirs"
fi

# Host settings back as they were before node-up.
if [[ -f $node_dir/sysctls ]]; then
  while IFS== read -r key value; do
    [[ -f /proc/sys/$key && $(cat "/proc/sys/$key") != "$value" ]] && echo "$value" >"/proc/sys/$key"
  done <"$node_dir/sysctls"
  rm -f "$node_dir/sysctls"
fi

# The API objects: the Node and its pods, the kubernetes Service's endpoints.
if [[ -f $admin_kubeconfig ]] && kubectl get --raw /readyz &>/dev/null; then
  if kubectl get node "$node_name" &>/dev/null; then
    kubectl delete pods --all-namespaces --field-selector "spec.nodeName=$node_name" \
      --force --grace-period 0 --wait=false &>/dev/null
    kubectl delete node "$node_name" --wait=false &>/dev/null && stopped+=("Node $node_name")
  fi
  kubectl -n default delete endpointslice kubernetes --ignore-not-found &>/dev/null
  kubectl -n default delete endpoints kubernetes --ignore-not-found &>/dev/null
fi

# The runtime state (sockets, the kubelet's root, containerd's state); the CRI
# plugin's per-pod directories in containerd's root. Images stay.
rm -rf "$run" "$containerd_root/io.containerd.grpc.v1.cri/sandboxes" \
  "$containerd_root/io.containerd.grpc.v1.cri/containers"
if ! $quiet && ! { $if_up && ((${#stopped[@]} == 0)); }; then
  echo "Node stopped in $((SECONDS - t0))s: ${stopped[*]:-nothing was running}"
fi
exit 0
