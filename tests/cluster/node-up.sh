#!/usr/bin/env bash
# A real node beside the kwok nodes: kubelet, containerd + runc and CNI (bridge
# shoal0, 10.244.0.0/24), kube-proxy (iptables), CoreDNS for cluster.local and a
# forwarder to the API server, all on this host and on addresses of the bridge
# (10.244.0.1) or 127.0.0.1 only. Starts the control plane (up.sh) when it is not up.
# Node shoal-node-0, label shoal.dev/node=real. Images: every *.tar in
# target/images/ (or $SHOAL_NODE_IMAGES) is imported into its containerd at start,
# like k3s's air-gap images folder. Stopped, and everything it created removed, by
# node-down.sh. A second run while it is up returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/node-common.sh"
images_dir=${SHOAL_NODE_IMAGES:-$repo/target/images}

t0=$SECONDS
step() { printf '[%3ds] %s\n' $((SECONDS - t0)) "$*"; }
fail() { # component message
  local log="$logs/$1.log"
  echo "node-up: $2" >&2
  if [[ -s $log ]]; then
    echo "--- last lines of $log ---" >&2
    tail -25 "$log" >&2
    echo "--- full log: $log ---" >&2
  fi
  exit 1
}
wait_for() { # component what seconds command...
  local component=$1 what=$2 seconds=$3; shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    alive "$component" || fail "$component" "$component exited while waiting for $what"
    ((SECONDS < deadline)) || fail "$component" "timed out after ${seconds}s waiting for $what"
    sleep 0.5
  done
}
start() { # name command...   (its own session, so the process group is its own)
  local name=$1; shift
  setsid "$@" >"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$pids/$name.pid"
}
node_ready() {
  [[ $(kubectl get node "$node_name" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

all=(containerd coredns socat kubelet kube-proxy)
running=0
for name in "${all[@]}"; do alive "$name" && running=$((running + 1)); done
if ((running == ${#all[@]})) && node_ready; then
  echo "Node $node_name is already up (kubectl get node $node_name; stop it: make node-down)"
  exit 0
fi
# Half up (a crash, an interrupted run): start from a clean host, with the host
# settings put back before they are recorded again.
if ((running > 0)) || [[ -d $pids && -n $(ls -A "$pids" 2>/dev/null) ]] || [[ -f $node_dir/sysctls ]] \
  || ip link show "$bridge" &>/dev/null; then
  step "cleaning up what a previous node-up left"
  "$here/node-down.sh" --quiet
fi

# --- the binaries (build.sh: kubelet, kube-proxy, CoreDNS), the control plane (up.sh) ---
if [[ ! -x $bin/kubelet || ! -x $bin/kube-proxy || ! -x $bin/coredns ]]; then
  step "building the binaries (build.sh)"
  "$here/build.sh"
fi
if ! kubectl get --raw /readyz &>/dev/null; then
  step "starting the control plane (up.sh)"
  "$here/up.sh" | sed 's/^/    /'
fi
apiserver_pid=$(cat "$cluster/pids/kube-apiserver.pid" 2>/dev/null || true)
if [[ -n $apiserver_pid ]] && ! grep -qa -- --kubelet-client-certificate "/proc/$apiserver_pid/cmdline" 2>/dev/null; then
  echo "node-up: the running kube-apiserver was started by an older up.sh (no Node authorizer," >&2
  echo "no kubelet client certificate): restart it with 'make cluster-down' then 'make node-up'" >&2
  exit 1
fi
for tool in containerd containerd-shim-runc-v2 runc iptables conntrack socat; do
  command -v "$tool" >/dev/null || { echo "node-up: $tool is missing: run 'make node-deps'" >&2; exit 1; }
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/portmap ]] \
  || { echo "node-up: the CNI plugins are missing in /usr/lib/cni: run 'make node-deps'" >&2; exit 1; }
"$here/pki.sh"
mkdir -p "$logs" "$pids" "$conf/cni" "$run" "$containerd_root" "$containerd_state" "$kubelet_root" \
  "$ipam_dir" "$pod_logs"
[[ $run == /run/shoal-node ]] && echo "$repo" >"$run/owner"

# --- host settings: recorded first, put back by node-down ---
: >"$node_dir/sysctls"
for key in "${sysctls[@]}"; do
  [[ -f /proc/sys/$key ]] && echo "$key=$(cat "/proc/sys/$key")" >>"$node_dir/sysctls"
done
# Host directories the kubelet (links to pod logs), libcni (its result cache) and the
# shims (their sockets, containerd 1.6 puts them in /run/containerd/s) create when
# missing: node-down removes those that were not there, once empty.
: >"$node_dir/created-dirs"
for dir in /var/log/containers /var/lib/cni/results /var/lib/cni /run/containerd/s /run/containerd; do
  [[ -e $dir ]] || echo "$dir" >>"$node_dir/created-dirs"
done

# --- network: the bridge, forwarding and a guard ---
step "network: bridge $bridge $node_ip/24, pod CIDR $pod_cidr"
ip link add "$bridge" type bridge
echo "$bridge" >"$node_dir/bridge"
# No IPv6 on the bridge: pods reach the host on 10.244.0.1 only.
echo 1 >"/proc/sys/net/ipv6/conf/$bridge/disable_ipv6" 2>/dev/null || true
ip addr add "$node_ip/24" dev "$bridge"
ip link set "$bridge" up
# Services' ClusterIPs are routed to the bridge (with the source address 10.244.0.1),
# not to the default route: host -> ClusterIP is DNATed by kube-proxy to a pod.
ip route add "$service_cidr" dev "$bridge" src "$node_ip"
# Pod -> Service -> pod is routed through the host (the ClusterIP is not on the bridge).
echo 1 >/proc/sys/net/ipv4/ip_forward
# The guard, in the mangle table that kube-proxy leaves alone (its filter-table jumps
# come first and ACCEPT some packets): nothing the node creates leaves the machine.
# Packets from pods, or DNATed to a Service's endpoint, go out on the bridge or lo
# only (an endpoint outside the pod CIDR, e.g. a kwok pod's fake IP, would otherwise
# be routed to the default route), and pods reach the host only on the ports the node
# serves them: DNS and the API forwarder.
iptables -t mangle -N "$guard_chain-OUT"
iptables -t mangle -A "$guard_chain-OUT" -o "$bridge" -j RETURN
iptables -t mangle -A "$guard_chain-OUT" -o lo -j RETURN
iptables -t mangle -A "$guard_chain-OUT" -s "$pod_cidr" -j DROP
iptables -t mangle -A "$guard_chain-OUT" -m conntrack --ctstate DNAT -j DROP
iptables -t mangle -I POSTROUTING -m comment --comment "shoal node guard" -j "$guard_chain-OUT"
iptables -t mangle -N "$guard_chain-IN"
iptables -t mangle -A "$guard_chain-IN" -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
iptables -t mangle -A "$guard_chain-IN" -d "$node_ip" -p udp --dport 53 -j RETURN
iptables -t mangle -A "$guard_chain-IN" -d "$node_ip" -p tcp -m multiport --dports "53,$api_port,$host_ports" -j RETURN
iptables -t mangle -A "$guard_chain-IN" -d "$node_ip" -p icmp -j RETURN
iptables -t mangle -A "$guard_chain-IN" -j DROP
iptables -t mangle -I INPUT -i "$bridge" -m comment --comment "shoal node guard" -j "$guard_chain-IN"
# Pod -> Service -> pod on the same bridge: the endpoint answers the pod directly on
# the bridge, and only br_netfilter (bridged packets through iptables) un-DNATs that
# reply. Without it, kube-proxy masquerades all Service traffic, so the reply
# comes back through the host.
masquerade_all=false
if [[ $(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null) != 1 ]]; then
  masquerade_all=true
  step "  br_netfilter is not on (/proc/sys/net/bridge/bridge-nf-call-iptables): kube-proxy masquerades all Service traffic"
fi

# CNI: the bridge plugin on our bridge, host-local IPAM with its state under ours.
cat >"$conf/cni/10-shoal-node.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "$cni_network",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$ipam_dir",
        "ranges": [[{"subnet": "$pod_cidr", "gateway": "$node_ip"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
# No loopback entry: containerd's CRI brings up each pod's lo itself (with the
# loopback plugin from bin_dir), and a loopback plugin inside this chain would run on
# eth0's result.

# --- cgroups (v1): the kubelet's cgroup root, ours to remove ---
for controller in /sys/fs/cgroup/*/; do
  [[ -f $controller/cgroup.procs ]] || continue
  mkdir -p "$controller/shoal-node"
  if [[ -f $controller/cpuset.cpus ]]; then
    cat "$controller/cpuset.cpus" >"$controller/shoal-node/cpuset.cpus"
    cat "$controller/cpuset.mems" >"$controller/shoal-node/cpuset.mems"
  fi
done

# --- containerd: our own instance (config, root, state, socket), CRI for the kubelet ---
step "containerd (socket $containerd_sock)"
cat >"$conf/containerd.toml" <<TOML
version = 2
root = "$containerd_root"
state = "$containerd_state"
# Only what the kubelet needs: overlayfs, runc (shim v2) and CRI. (The legacy v1
# runtime, io.containerd.runtime.v1.linux, stays: containerd 1.6's tasks service, and
# so CRI, does not load without it; it starts nothing.)
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.native", "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "$containerd_sock"
[ttrpc]
  address = "$containerd_sock.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # exec/attach/port-forward streams, proxied by the kubelet: loopback only.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  # This machine's root lacks CAP_SYS_RESOURCE (no negative oom_score_adj: runc fails
  # with "can't get final child's PID from pipe" on the pause container's -998):
  # containerd caps every container's oom_score_adj at its own (0), as when rootless.
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$run/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$conf/cni"
    max_conf_num = 1
  # No registry mirrors or credentials: nothing is pulled (there is no network);
  # images are imported from tars.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
TOML
start containerd containerd --config "$conf/containerd.toml"
wait_for containerd "containerd's socket" 30 ctr version

# --- images: every tar in the images folder ---
shopt -s nullglob
tars=("$images_dir"/*.tar)
shopt -u nullglob
if ((${#tars[@]} == 0)); then
  step "images: no *.tar in $images_dir (make images builds them)"
fi
# make images writes <name>-<arch>.tar for amd64 and arm64 under one reference: only
# this node's architecture is imported (ctr refuses the other, and importing it would
# move the reference to an image this node cannot run), as a k3s images folder holds
# only its node's architecture.
case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
for tar in "${tars[@]}"; do
  case $(basename "$tar" .tar) in
    *-amd64 | *-arm64) [[ $(basename "$tar" .tar) == *-$arch ]] || { step "images: skipped $(basename "$tar") (not $arch)"; continue; } ;;
  esac
  out=$(ctr images import "$tar" 2>&1) \
    || { echo "$out" >&2; fail containerd "ctr images import $tar failed"; }
  names=$(sed -n 's/^unpacking \(.*\) (sha256:.*/\1/p' <<<"$out" | tr '\n' ' ')
  step "images: imported $(basename "$tar"): ${names:-$out}"
done
if ! ctr images ls -q | grep -xF "$pause_image" >/dev/null; then
  step "warning: no $pause_image image (target/images/pause-amd64.tar from 'make images'): pods cannot start"
fi

# --- cluster DNS: CoreDNS on 10.244.0.1:53, cluster.local only ---
step "CoreDNS on $node_ip:53 (cluster.local; other names are refused, nothing is forwarded)"
: >"$conf/resolv.conf"   # the pods' resolv.conf base: no host nameserver leaks in
cat >"$conf/Corefile" <<COREFILE
# Only these zones have a server block: a query for any other name gets REFUSED,
# and nothing is forwarded upstream.
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $node_ip
    errors
    ready 127.0.0.1:$dns_ready_port
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $admin_kubeconfig shoal-local
        pods insecure
        ttl 5
    }
    cache 5
    loadbalance
}
COREFILE
start coredns "$bin/coredns" -conf "$conf/Corefile" -dns.port 53

# --- pods -> API server: a forwarder on the bridge, the kubernetes Service's endpoints ---
step "API forwarder $node_ip:$api_port -> 127.0.0.1:$api_port; kubernetes Service endpoints"
start socat socat "TCP-LISTEN:$api_port,bind=$node_ip,reuseaddr,fork" "TCP:127.0.0.1:$api_port"
# up.sh runs the API server with --endpoint-reconciler-type none: nobody else writes
# these. skip-mirror keeps the EndpointSlice mirroring controller from adding a copy.
kubectl apply -f - >/dev/null 2>"$logs/endpoints.log" <<YAML || fail endpoints "writing the kubernetes Service's endpoints failed"
apiVersion: v1
kind: Endpoints
metadata:
  name: kubernetes
  namespace: default
  labels: {endpointslice.kubernetes.io/skip-mirror: "true"}
subsets:
- addresses: [{ip: $node_ip}]
  ports: [{name: https, port: $api_port, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes}
addressType: IPv4
endpoints:
- addresses: [$node_ip]
  conditions: {ready: true}
ports: [{name: https, port: $api_port, protocol: TCP}]
YAML

# --- kubelet ---
node_kubeconfig() { # file cert-name
  cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: shoal-local
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$pki/ca.crt"}
users:
- name: node
  user: {client-certificate: "$pki/$2.crt", client-key: "$pki/$2.key"}
contexts:
- name: shoal-local
  context: {cluster: shoal-local, user: node}
current-context: shoal-local
KUBECONFIG
}
node_kubeconfig "$conf/kubelet.kubeconfig" "kubelet-$node_name"
node_kubeconfig "$conf/kube-proxy.kubeconfig" kube-proxy
cat >"$conf/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$pki/kubelet-$node_name-serving.crt"
tlsPrivateKeyFile: "$pki/kubelet-$node_name-serving.key"
rotateCertificates: false
serverTLSBootstrap: false
containerRuntimeEndpoint: "unix://$containerd_sock"
cgroupDriver: cgroupfs
# Our own cgroup root (made above in every v1 hierarchy), removed by node-down.
cgroupRoot: /shoal-node
# This machine has cgroup v1 (the kubelet 1.34 still supports it when told so).
failCgroupV1: false
failSwapOn: false
clusterDNS: [$node_ip]
clusterDomain: cluster.local
resolvConf: "$conf/resolv.conf"
podLogsDir: "$pod_logs"
volumePluginDir: "$run/volume-plugins"
staticPodPath: ""
# A busy or full shared disk must not evict the test pods, and image garbage
# collection must never remove an image (nothing can be pulled back).
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%, imagefs.inodesFree: 1%}
mergeDefaultEvictionSettings: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
nodeStatusUpdateFrequency: 10s
shutdownGracePeriod: 0s
# No negative oom_score_adj without CAP_SYS_RESOURCE (see containerd's config).
oomScoreAdj: 0
YAML
step "kubelet $node_name (InternalIP $node_ip, labels $node_labels, root $kubelet_root)"
start kubelet "$bin/kubelet" --config "$conf/kubelet.yaml" --kubeconfig "$conf/kubelet.kubeconfig" \
  --root-dir "$kubelet_root" --cert-dir "$kubelet_root/pki" --hostname-override "$node_name" \
  --node-ip "$node_ip" --node-labels "$node_labels" --v 1

# --- kube-proxy ---
cat >"$conf/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$conf/kube-proxy.kubeconfig"}
hostnameOverride: $node_name
bindAddress: $node_ip
healthzBindAddress: 127.0.0.1:$proxy_healthz_port
metricsBindAddress: 127.0.0.1:$proxy_metrics_port
mode: iptables
oomScoreAdj: 0
clusterCIDR: $pod_cidr
detectLocalMode: ClusterCIDR
# NodePorts answer on 127.0.0.1 only, never on a real interface.
nodePortAddresses: [127.0.0.1/32]
iptables:
  masqueradeAll: $masquerade_all
  localhostNodePorts: true
  syncPeriod: 30s
  minSyncPeriod: 1s
# 0 everywhere: kube-proxy leaves the conntrack sysctls as they are (no writes
# that fail where /proc/sys is read-only, as in a container).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
YAML
step "kube-proxy (iptables; NodePorts on 127.0.0.1 only)"
start kube-proxy "$bin/kube-proxy" --config "$conf/kube-proxy.yaml" --v 1

wait_for coredns "CoreDNS ready (its kubernetes plugin synced)" 60 \
  curl -fsS "http://127.0.0.1:$dns_ready_port/ready"
wait_for socat "the API forwarder on $node_ip:$api_port" 20 \
  curl -sk -o /dev/null "https://$node_ip:$api_port/readyz"
wait_for kubelet "the kubelet's healthz" 60 curl -fsS "http://127.0.0.1:$kubelet_healthz_port/healthz"
step "waiting for Node $node_name to be Ready"
wait_for kubelet "Node $node_name Ready" 120 node_ready
wait_for kube-proxy "kube-proxy's healthz" 60 curl -fsS "http://127.0.0.1:$proxy_healthz_port/healthz"
step "node $node_name is Ready"
cat <<DONE
Real node $node_name is up beside the kwok nodes (node-up took $((SECONDS - t0))s):
  kubectl get node $node_name -o wide      (label $node_labels; pods need imagePullPolicy: Never or IfNotPresent)
  images:  ctr --address $containerd_sock -n k8s.io images import FILE.tar   (or put it in $images_dir and rerun after make node-down)
  pods $pod_cidr on bridge $bridge; DNS and the API server for pods at $node_ip
Logs: $logs   Stop it: make node-down
DONE
