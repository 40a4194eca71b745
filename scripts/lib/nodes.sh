# Kubelet nodes for scripts/dev-cluster.sh (sourced by it; uses its dir, spawn,
# wait_until, die, log). Each node is a network namespace whose uplink is eth0,
# a veth to a bridge in the namespace the script runs in (the machine's own, or
# a test's), with its own containerd (and runc, CNI bridge, pause image) and its
# own kubelet, both started with `nsenter --net` so hostNetwork pods live in the
# node's namespace and never see the machine's interfaces.
#
# Addresses: one private /24 for the nodes (the bridge is .1, where the API
# server and the image registry listen; node K is .(10+K)) and a /24 of pod
# addresses per node, all chosen to overlap no route of the namespace the
# script runs in.

node_bin=""   # containerd, runc, CNI plugins, pause, egimage (scripts/build-node.sh)

# Chooses and records the network (DIR/network), or reads it back.
net_load() {
  if [[ -f "$dir/network" ]]; then
    # shellcheck disable=SC1091
    source "$dir/network"
    return
  fi
  local p x
  # EG_NODES_PREFIX: fixed names (the incident lab's eglab-n1, ...), else from DIR.
  p="${EG_NODES_PREFIX:-eg$(printf %s "$dir" | sha256sum | cut -c1-6)}"
  [[ $p =~ ^[a-z][a-z0-9]{1,9}$ ]] || die "EG_NODES_PREFIX '$p': 2 to 10 lowercase letters and digits (interface names are short)"
  # The third octet: from the prefix's hash, then the next one free of every route here.
  x=$((16#$(printf %s "$p" | sha256sum | cut -c1-2) % 200 + 20))
  x="$(python3 - "$x" "$1" <<'EOF'
import ipaddress, subprocess, sys
x, nodes = int(sys.argv[1]), int(sys.argv[2])
routes = []
for line in subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                           text=True).stdout.splitlines():
    dst = line.split()[0] if line.split() else ""
    if dst in ("default", "broadcast", "local", "unreachable", "multicast") or dst == "":
        dst = line.split()[1] if dst in ("broadcast", "local") and len(line.split()) > 1 else ""
    try:
        net = ipaddress.ip_network(dst, strict=False)
    except ValueError:
        continue
    if net.prefixlen > 0:
        routes.append(net)
for _ in range(250):
    ours = [ipaddress.ip_network(f"10.231.{x}.0/24")] + [
        ipaddress.ip_network(f"10.{231 + k}.{x}.0/24") for k in range(1, nodes + 1)]
    if not any(o.overlaps(r) for o in ours for r in routes):
        print(x)
        sys.exit(0)
    x = x % 250 + 1
sys.exit("no free 10.231.x.0/24 here")
EOF
)" || die "no free address range for the nodes' network"
  cat >"$dir/network" <<EOF
prefix=$p
bridge=$p
octet=$x
gateway=10.231.$x.1
subnet=10.231.$x.0/24
rundir=/run/egressguard/$p
EOF
  # shellcheck disable=SC1091
  source "$dir/network"
}

node_ip() { echo "10.231.$octet.$((10 + $1))"; }
pod_cidr() { echo "10.$((231 + $1)).$octet.0/24"; }
node_ns() { echo "$prefix-n$1"; }
node_index() { # NAME -> K
  [[ $1 =~ ^eg-node-([0-9]+)$ && -d "$dir/nodes/$1" ]] || die "no node $1 in $dir (nodes: $(ls "$dir/nodes" 2>/dev/null | tr '\n' ' '))"
  echo "${BASH_REMATCH[1]}"
}

# The bridge, before the control plane (which listens on its address).
net_up() {
  # The nodes' cgroup layout (cgroupfs, a root per node in every v1 hierarchy)
  # is written for cgroup v1, what this project's machines have.
  [[ "$(stat -fc %T /sys/fs/cgroup)" == tmpfs && -d /sys/fs/cgroup/memory ]] ||
    die "--nodes needs cgroup v1 (/sys/fs/cgroup a tmpfs of v1 hierarchies); this machine has $(stat -fc %T /sys/fs/cgroup)"
  # The prefix is global (namespaces, cgroups, $rundir): claim it, or refuse
  # while another DIR holds it.
  mkdir -p "$(dirname "$rundir")"
  mkdir "$rundir" 2>/dev/null ||
    die "prefix $prefix is in use by $(cat "$rundir/dir" 2>/dev/null || echo 'another cluster'); stop that one first (dev-cluster.sh down DIR)"
  echo "$dir" >"$rundir/dir"
  ip link add "$bridge" type bridge || die "could not create bridge $bridge"
  ip addr add "$gateway/24" dev "$bridge"
  ip link set "$bridge" up
}

# cgroup v1: every hierarchy gets the node's cgroup root (the kubelet's
# cgroupRoot), so `down` finds and removes every pod's cgroup.
node_cgroups() { # K
  local c
  for c in /sys/fs/cgroup/*/; do
    [[ $c == */unified/ ]] && continue
    mkdir -p "$c$prefix-n$1"
    if [[ -f ${c}cpuset.cpus ]]; then
      cat "${c}cpuset.cpus" >"$c$prefix-n$1/cpuset.cpus"
      cat "${c}cpuset.mems" >"$c$prefix-n$1/cpuset.mems"
    fi
  done
}

node_pki() { # NAME IP
  local p="$dir/nodes/$1/pki"
  mkdir -p "$p"
  {
    # The kubelet's client identity: NodeRestriction and the Node authorizer key on it.
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:nodes/CN=system:node:$1" \
      -keyout "$p/kubelet-client.key" -out "$p/kubelet-client.csr"
    openssl x509 -req -in "$p/kubelet-client.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" \
      -CAcreateserial -days 30 -extfile <(printf "extendedKeyUsage=clientAuth") -out "$p/kubelet-client.crt"
    # Its serving certificate (logs, exec), which the API server verifies.
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$1" -keyout "$p/kubelet.key" -out "$p/kubelet.csr"
    openssl x509 -req -in "$p/kubelet.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" -CAcreateserial \
      -days 30 -extfile <(printf "subjectAltName=DNS:%s,IP:%s\nextendedKeyUsage=serverAuth" "$1" "$2") \
      -out "$p/kubelet.crt"
  } >/dev/null 2>&1 || die "openssl failed to create $1's certificates"
}

node_config() { # K NAME IP
  local k=$1 name=$2 ip=$3 n="$dir/nodes/$2" run="$rundir/n$1"
  mkdir -p "$n/cni" "$n/certs.d/$registry" "$n/cni-state" "$n/pod-logs" "$run"
  cat >"$n/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dev
  cluster: {server: "$server", certificate-authority: "$dir/pki/ca.crt"}
users:
- name: $name
  user: {client-certificate: "$n/pki/kubelet-client.crt", client-key: "$n/pki/kubelet-client.key"}
contexts:
- name: dev
  context: {cluster: dev, user: $name}
current-context: dev
EOF
  # containerd 2.x, config version 3: everything of its own under DIR and
  # $rundir (state holds the pods' network namespaces), the project's pause
  # image pinned (the kubelet's image GC never removes it), CNI from here, the
  # test registry over plain HTTP (hosts.toml), no NRI socket (shared path).
  cat >"$n/containerd.toml" <<EOF
version = 3
root = "$n/containerd"
state = "$run/state"
disabled_plugins = ["io.containerd.nri.v1.nri"]
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins.'io.containerd.internal.v1.opt']
  path = "$n/opt"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$registry/egressguard/pause:1"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "$n/certs.d"
[plugins.'io.containerd.cri.v1.runtime']
  netns_mounts_under_state_dir = true
  # Lowering an oom_score_adj needs CAP_SYS_RESOURCE, which this VM's root
  # lacks: keep every container at or above containerd's own.
  restrict_oom_score_adj = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "$node_bin/runc"
      Root = "$run/runc"
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$node_bin/cni"]
    conf_dir = "$n/cni"
    use_internal_loopback = true
EOF
  cat >"$n/certs.d/$registry/hosts.toml" <<EOF
server = "http://$registry"
[host."http://$registry"]
  capabilities = ["pull", "resolve"]
EOF
  # Pods on a bridge of the node's own; no masquerade: pod addresses are
  # routed (every node and the bridge's namespace have routes to them).
  cat >"$n/cni/10-eg.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "eg",
  "plugins": [{
    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$n/cni-state",
             "ranges": [[{"subnet": "$(pod_cidr "$k")"}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
EOF
  cat >"$n/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 and no systemd (PID 1): cgroupfs, and v1 allowed.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$prefix-n$k
containerRuntimeEndpoint: unix://$run/containerd.sock
failSwapOn: false
address: $ip
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
tlsCertFile: $n/pki/kubelet.crt
tlsPrivateKeyFile: $n/pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $dir/pki/ca.crt}
authorization: {mode: Webhook}
podLogsDir: $n/pod-logs
# A shared test machine: evict only when it is really short.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
clusterDomain: cluster.local
# Faster than the defaults, for tests that restart pods and nodes.
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
EOF
}

node_start() { # K
  local k=$1 name="eg-node-$1" n="$dir/nodes/eg-node-$1" run="$rundir/n$1" ns
  ns="$(node_ns "$k")"
  # A containerd that was SIGKILLed leaves its socket: the wait below must see a new one.
  rm -f "$run/containerd.sock"
  PATH="$node_bin:$PATH" spawn_node "$name" containerd \
    nsenter --net="/run/netns/$ns" -- "$node_bin/containerd" --config "$n/containerd.toml"
  wait_until "$name's containerd" 30 test -S "$run/containerd.sock"
  spawn_node "$name" kubelet nsenter --net="/run/netns/$ns" -- "$cp_bin/kubelet" \
    --config "$n/kubelet.yaml" --kubeconfig "$n/kubeconfig" --root-dir "$n/kubelet" \
    --hostname-override "$name" --node-ip "$(node_ip "$k")" --v 1
}

# Like spawn, but the pid goes to the node's own list (a restart replaces it).
spawn_node() { # NODE NAME CMD...
  local node=$1 name=$2
  shift 2
  setsid "$@" >>"$dir/nodes/$node/$name.log" 2>&1 </dev/null &
  echo "$! nodes/$node/$name" >>"$dir/nodes/$node/pids"
  echo "$! nodes/$node/$name" >>"$dir/pids"
}

node_up() { # K
  local k=$1 name="eg-node-$1" ip ns
  ip="$(node_ip "$k")" ns="$(node_ns "$k")"
  mkdir -p "$dir/nodes/$name"
  ip netns add "$ns" || die "could not create network namespace $ns"
  ip link add "${prefix}n$k" type veth peer name eth0 netns "$ns"
  ip link set "${prefix}n$k" master "$bridge" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$gateway"
  nsenter --net="/run/netns/$ns" sysctl -qw net.ipv4.ip_forward=1
  ip route add "$(pod_cidr "$k")" via "$ip" dev "$bridge"
  node_cgroups "$k"
  node_pki "$name" "$ip"
  node_config "$k" "$name" "$ip"
  node_start "$k"
}

# Every node routes every other node's pods (one L2 segment: the bridge).
node_routes() { # N
  local a b
  for a in $(seq "$1"); do
    for b in $(seq "$1"); do
      ((a == b)) || ip -n "$(node_ns "$a")" route add "$(pod_cidr "$b")" via "$(node_ip "$b")"
    done
  done
}

nodes_up() { # N
  local n=$1 k start=$SECONDS
  node_bin="$("$root/scripts/build-node.sh")"
  # The image registry on the bridge, then the images the nodes run.
  local reg_port
  reg_port="$(free_ports 1)" || die "could not pick a port for the registry"
  registry="$gateway:$reg_port"
  spawn registry "$node_bin/egimage" serve --addr "$registry" --log "$dir/registry-requests.log"
  wait_until "the image registry" 15 curl -sf "http://$registry/v2/"
  "$root/scripts/build-images.sh" --push "$registry" >"$dir/images" ||
    die "building or pushing the images failed (see above)"
  echo "registry=$registry" >>"$dir/network"
  mkdir -p "$dir/nodes"
  for k in $(seq "$n"); do node_up "$k"; done
  node_routes "$n"
  wait_until "$n nodes Ready" 120 nodes_ready "$n"
  log "$n nodes Ready $((SECONDS - start)) s after the control plane"
}

nodes_ready() { # N
  [[ "$(kubectl --kubeconfig "$dir/kubeconfig" get nodes -o \
    jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    grep -c '^True$')" == "$1" ]]
}

# Stops a node's kubelet and containerd (SIGTERM, then SIGKILL after 10 s);
# its pods (their shims) keep running, as on a real node whose services restart.
node_stop() { # NAME
  local name=$1
  [[ -f "$dir/nodes/$name/pids" ]] || return 0
  stop_listed "$dir/nodes/$name/pids" 100
  : >"$dir/nodes/$name/pids"
  # Out of the cluster's list too: `up`'s waits treat a listed dead pid as a failure.
  grep -vF " nodes/$name/" "$dir/pids" >"$dir/pids.new" || true
  mv "$dir/pids.new" "$dir/pids"
}

# Everything the nodes left: shims and pod processes (by cgroup), mounts under
# DIR and $rundir, cgroups, namespaces, the bridge, log links.
nodes_down() {
  [[ -f "$dir/network" ]] || return 0
  net_load 0
  # Only what this DIR claimed: an `up` refused for a prefix in use owns nothing.
  [[ "$(cat "$rundir/dir" 2>/dev/null)" == "$dir" ]] || return 0
  local n name k pid m
  for n in "$dir"/nodes/eg-node-*; do
    [[ -d $n ]] && node_stop "$(basename "$n")"
  done
  # The shims' sockets live in /run/containerd/s (not configurable); each
  # task's bootstrap.json names its own.
  { cat "$rundir"/n*/state/io.containerd.runtime.v2.task/k8s.io/*/bootstrap.json 2>/dev/null || true; } |
    { grep -o 'unix:///run/containerd/s/[0-9a-f]*' || true; } | sed 's|^unix://||' | sort -u |
    while read -r m; do rm -f "$m"; done
  # libcni's result cache is shared (/var/lib/cni/results): this DIR's sandboxes only.
  for n in "$dir"/nodes/eg-node-*/containerd/io.containerd.grpc.v1.cri/sandboxes/*; do
    [[ -d $n ]] && rm -f /var/lib/cni/results/eg-"$(basename "$n")"-*
  done
  # Shims name their containerd's socket, which lives under $rundir.
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $rundir/" || true); do kill -9 "$pid" 2>/dev/null || true; done
  for _ in 1 2 3; do
    for c in /sys/fs/cgroup/*/"$prefix"-n*; do
      [[ -d $c ]] || continue
      find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    done
    sleep 0.2
  done
  # Mounts (container root filesystems, pod volumes, network namespaces),
  # deepest first.
  awk -v a="$dir/" -v b="$rundir/" 'index($5, a) == 1 || index($5, b) == 1 { print $5 }' \
    /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  # A process still exiting keeps its cgroup a moment: try for a few seconds.
  for _ in $(seq 20); do
    for c in /sys/fs/cgroup/*/"$prefix"-n*; do
      [[ -d $c ]] && { find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true; }
    done
    compgen -G "/sys/fs/cgroup/*/$prefix-n*" >/dev/null || break
    sleep 0.2
  done
  for c in /sys/fs/cgroup/*/"$prefix"-n*; do
    [[ -d $c ]] && log "warning: could not remove cgroup $c"
  done
  # The veths first: a namespace can outlive its deletion (the kernel frees
  # it when its last reference goes) and keep its end of the pair meanwhile.
  for k in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${prefix}n[0-9]+$" || true); do
    ip link del "$k" 2>/dev/null || true
  done
  for k in $(ip netns list | awk '{print $1}' | grep -E "^$prefix-n[0-9]+$" || true); do
    ip netns del "$k" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  find /var/log/containers -maxdepth 1 -type l -lname "$dir/*" -delete 2>/dev/null || true
  rm -rf "$rundir"
}
