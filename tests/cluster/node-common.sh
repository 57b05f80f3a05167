# Shared by node-up.sh, node-down.sh and node-check.sh (sourced): the names,
# addresses and paths of the real node. Everything the node creates on the host is
# named here, so node-down.sh removes exactly that.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${SHOAL_CACHE:-$HOME/.cache/shoal}/bin/current
cluster="$repo/target/cluster"
admin_kubeconfig="$cluster/kubeconfig"
pki="$cluster/pki"

node_name=shoal-node-0
node_labels=shoal.dev/node=real
bridge=shoal0
node_ip=10.244.0.1          # the bridge's address: the Node's InternalIP, DNS, API forwarder
pod_cidr=10.244.0.0/24
service_cidr=10.0.0.0/24    # up.sh's --service-cluster-ip-range
api_port=${SHOAL_APISERVER_PORT:-16443}   # up.sh's API server port (127.0.0.1 only)
dns_ready_port=${SHOAL_NODE_DNS_READY_PORT:-18181}   # CoreDNS's ready plugin, 127.0.0.1
# TCP ports on the bridge address that pods may reach besides DNS and the API server:
# the agent API of an operator run on the host (make demo's 18443).
host_ports=${SHOAL_NODE_HOST_PORTS:-18443}
kubelet_healthz_port=${SHOAL_KUBELET_HEALTHZ_PORT:-10248}
proxy_healthz_port=${SHOAL_PROXY_HEALTHZ_PORT:-10256}
proxy_metrics_port=${SHOAL_PROXY_METRICS_PORT:-10249}
cni_network=shoal-node      # the CNI network name (libcni caches results under it)
guard_chain=SHOAL-NODE      # our own iptables chains (mangle table)
pause_image=localhost/shoal/pause:3.10.1

node_dir="$repo/target/node"   # logs, PID files, configuration
logs="$node_dir/logs" pids="$node_dir/pids" conf="$node_dir/config"
# The runtime state holds unix sockets (containerd's, the kubelet's device-plugin and
# pod-resources sockets, ~40 characters below it): a socket path has at most 107
# characters, so a checkout deeper than ~60 characters keeps it in /run/shoal-node.
run="$node_dir/run"
((${#run} > 60)) && run=/run/shoal-node
containerd_root="$node_dir/containerd-root"   # images and snapshots (kept across node-down)
containerd_state="$run/containerd"
containerd_sock="$containerd_state/containerd.sock"
kubelet_root="$run/kubelet"
ipam_dir="$run/cni-ipam"
pod_logs="$node_dir/pod-logs"
# Host-wide settings the node changes (the CNI bridge plugin and the kubelet write
# some of them); node-up records their values first and node-down puts them back.
sysctls=(net/ipv4/ip_forward net/ipv4/conf/all/route_localnet vm/overcommit_memory vm/panic_on_oom
  kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes)

ctr() { command ctr --address "$containerd_sock" --namespace k8s.io "$@"; }
kubectl() { "$bin/kubectl" --kubeconfig "$admin_kubeconfig" "$@"; }
# A PID file's process, if it still runs the program that was started (PIDs get reused).
alive() { # name
  local file="$pids/$1.pid" pid
  [[ -f $file ]] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null && grep -qa -- "$1" "/proc/$pid/cmdline" 2>/dev/null
}
