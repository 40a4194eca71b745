#!/usr/bin/env bash
# A real Kubernetes cluster on this machine, for development and the tests:
# etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from
# their Go modules (tests/control-plane) and started as processes; with --nodes,
# real kubelet nodes too (containerd, runc, a CNI bridge; scripts/lib/nodes.sh).
#
#   scripts/dev-cluster.sh build                   build (or reuse) the binaries; prints their directory
#   scripts/dev-cluster.sh up [--nodes N] [DIR]    start; writes DIR/kubeconfig (cluster-admin)
#   scripts/dev-cluster.sh env  [DIR]              print `export KUBECONFIG=DIR/kubeconfig`
#   scripts/dev-cluster.sh exec DIR NODE -- CMD... run CMD in NODE's network namespace (as over ssh)
#   scripts/dev-cluster.sh node-stop  DIR NODE     stop NODE's kubelet and containerd (pods keep running)
#   scripts/dev-cluster.sh node-start DIR NODE     start them again
#   scripts/dev-cluster.sh down [DIR]              stop exactly what `up` started, remove DIR
#
# Without --nodes the API server listens on 127.0.0.1 and there is no kubelet:
# register Nodes yourself and run the binaries as processes. With --nodes N:
# nodes eg-node-1 ... eg-node-N, each a network namespace with eth0 on a bridge
# (a private 10.231.x.0/24 chosen to overlap no route here) whose address .1 the
# API server and an image registry (the chart's images, built by
# scripts/build-images.sh) listen on. The kubelet sets kernel tunables of the
# machine (vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1) and
# creates cgroups: this is for test machines.
#
# DIR defaults to target/dev-cluster. Knobs (environment):
#   EG_CP_CACHE      where built binaries are kept (default ~/.cache/egressguard/control-plane);
#                    a binary set is rebuilt only when tests/control-plane's module files change
#   EG_CP_BIND       kube-apiserver bind address (default 127.0.0.1; with --nodes the bridge's address)
#   EG_CP_ADVERTISE  address the API server advertises in the `kubernetes` EndpointSlice
#                    (default: the bind address; a loopback address is not published there)
#   EG_CP_SANS       extra IP SANs for the serving certificate, comma separated
#   EG_NODES_PREFIX  with --nodes: names of the nodes' namespaces (PREFIX-n1, ...), bridge and cgroups
#                    (default: eg + 6 hex digits of DIR's path)
#   EG_CP_CONTROLLERS kube-controller-manager --controllers (default *; the footprint bench drops
#                    node-lifecycle-controller: its Nodes have no kubelet to heartbeat)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
module="$root/tests/control-plane"
# Kubernetes and etcd versions: keep in sync with tests/control-plane/go.mod.
k8s_version=v1.37.2

die() { echo "dev-cluster: $*" >&2; exit 1; }
# The nodes' addresses (10.231.x.x, pods 10.232+) are never behind a proxy.
export NO_PROXY="${NO_PROXY:+$NO_PROXY,}10.224.0.0/11" no_proxy="${no_proxy:+$no_proxy,}10.224.0.0/11"
# shellcheck source=lib/nodes.sh
source "$root/scripts/lib/nodes.sh"
log() { echo "dev-cluster: $*" >&2; }

cache_key() {
  cat "$module/go.mod" "$module/go.sum" "$module/tools.go" "$module/etcd/main.go" | sha256sum | cut -c1-16
}

built() {
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    [[ -x "$1/$b" ]] || return 1
  done
}

# Builds etcd and the Kubernetes binaries unless this module
# version's binaries are already cached; prints the directory holding them.
build() {
  command -v go >/dev/null || die "go not found: install Go 1.26+ (scripts/install-deps.sh checks for it)"
  local cache="${EG_CP_CACHE:-$HOME/.cache/egressguard/control-plane}"
  local bin="$cache/$(cache_key)"
  if built "$bin"; then
    echo "$bin"
    return
  fi
  mkdir -p "$cache"
  local tmp
  tmp="$(mktemp -d "$cache/build.XXXXXX")"
  log "building etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubelet $k8s_version from Go modules"
  log "(the first build compiles ~3,000 packages: about 5 minutes on 2 cores, plus module downloads; later builds reuse Go's cache)"
  local start=$SECONDS ldflags="-s -w" minor
  minor="$(cut -d. -f2 <<<"$k8s_version")"
  # Without these, `kubectl version` reports the server as v0.0.0-master.
  for v in "gitVersion=$k8s_version" gitMajor=1 "gitMinor=$minor" gitTreeState=clean; do
    ldflags+=" -X k8s.io/component-base/version.$v"
  done
  # -v names each package as it compiles: turn that into a progress line.
  (cd "$module" && go build -v -trimpath -ldflags "$ldflags" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet ./etcd) 2>&1 |
    awk -v start="$start" '/^(#|go: |.*\.go:)/ { print > "/dev/stderr"; next }
         { n++; if (n % 250 == 0) printf "dev-cluster:   %d packages compiled\n", n > "/dev/stderr" }' ||
    { rm -rf "$tmp"; die "build failed (see above)"; }
  built "$tmp" ||
    { rm -rf "$tmp"; die "build failed (see above)"; }
  rm -rf "$bin"
  mv "$tmp" "$bin"
  log "built in $((SECONDS - start)) s: $bin"
  echo "$bin"
}

# N distinct free ports: every socket stays bound until all are chosen, so two
# calls cannot be handed the same just-released port (etcd's client and peer
# ports once collided that way: "bind: address already in use").
free_ports() {
  # Below the kernel's ephemeral range: a port the kernel hands out (bind to
  # 0) can be taken again, between our release and etcd's bind, as the local
  # port of any outgoing connection on the machine (CI saw etcd lose its port
  # that way); ports below the range are never handed out implicitly.
  python3 -c 'import random, socket, sys
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ss = []
for _ in range(1000):
    if len(ss) == int(sys.argv[1]):
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randint(10000, lo - 1) if lo > 11000 else 0))
        ss.append(s)
    except OSError:
        s.close()
else:
    sys.exit("dev-cluster: no free port on 127.0.0.1 (is the loopback interface up here?)")
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}

# Starts one process in its own session, logging to DIR/NAME.log, and records its pid.
spawn() {
  local name=$1; shift
  setsid "$@" >"$dir/$name.log" 2>&1 </dev/null &
  echo "$! $name" >>"$dir/pids"
}

alive() { kill -0 "$1" 2>/dev/null; }

# Stops the processes FILE lists ("PID NAME" lines, last started first) that
# this DIR started (the pid must still run a command naming DIR): SIGCONT and
# SIGTERM, then SIGKILL after TENTHS tenths of a second.
stop_listed() { # FILE TENTHS
  local pid what pids=()
  while read -r pid what; do
    if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir"; then
      kill -CONT "$pid" 2>/dev/null || true
      kill "$pid" 2>/dev/null && pids+=("$pid")
    fi
  done < <(tac "$1")
  for _ in $(seq "$2"); do
    local left=0
    for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

wait_until() { # WHAT SECONDS COMMAND...
  local what=$1 secs=$2 pid name; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    while read -r pid name; do
      alive "$pid" || die "$name exited while waiting for $what; its log: $dir/$name.log
$(tail -n 15 "$dir/$name.log")"
    done <"$dir/pids"
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what (logs in $dir)"
    sleep 0.2
  done
}

pki() {
  local p=$dir/pki sans="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  sans+=",DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.97.0.1,IP:$bind"
  [[ -n "${EG_CP_SANS:-}" ]] && sans+=",$(sed 's/\([^,]*\)/IP:\1/g' <<<"$EG_CP_SANS")"
  [[ -n "${EG_CP_ADVERTISE:-}" ]] && sans+=",IP:$EG_CP_ADVERTISE"
  mkdir -p "$p"
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=egressguard-dev-ca" \
      -keyout "$p/ca.key" -out "$p/ca.crt"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$p/apiserver.key" -out "$p/apiserver.csr"
    openssl x509 -req -in "$p/apiserver.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 30 \
      -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth" "$sans") -out "$p/apiserver.crt"
    # The admin: system:masters, authenticated by a client certificate.
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=egressguard-admin" \
      -keyout "$p/admin.key" -out "$p/admin.csr"
    openssl x509 -req -in "$p/admin.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 30 \
      -extfile <(printf "extendedKeyUsage=clientAuth") -out "$p/admin.crt"
    # The API server's identity towards the kubelets (logs, exec, port-forward).
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
      -keyout "$p/kubelet-client.key" -out "$p/kubelet-client.csr"
    openssl x509 -req -in "$p/kubelet-client.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 30 \
      -extfile <(printf "extendedKeyUsage=clientAuth") -out "$p/kubelet-client.crt"
    # Service-account token signing key (TokenRequest: `kubectl create token`).
    openssl genrsa -out "$p/sa.key" 2048
    openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub"
  } >/dev/null 2>&1 || die "openssl failed to create the certificates in $p"
}

kubeconfig() { # SERVER
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dev
  cluster: {server: "$1", certificate-authority: "$dir/pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$dir/pki/admin.crt", client-key: "$dir/pki/admin.key"}
contexts:
- name: dev
  context: {cluster: dev, user: admin, namespace: default}
current-context: dev
EOF
}

up() {
  if [[ -e "$dir/pids" ]]; then
    die "$dir holds a previous run's control plane ($(awk '{printf "%s=%s ", $2, $1}' "$dir/pids")).
Stop it and remove its files with: scripts/dev-cluster.sh down $dir"
  fi
  [[ -e "$dir" && -n "$(ls -A "$dir" 2>/dev/null)" ]] &&
    die "$dir exists and is not empty; remove it or pick another DIR"
  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl; scripts/install-deps.sh does)"
  local bin start=$SECONDS
  bin="$(build)"
  cp_bin="$bin"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  : >"$dir/pids"
  bind="${EG_CP_BIND:-127.0.0.1}"
  if ((nodes)); then
    net_load "$nodes"
    net_up
    bind="${EG_CP_BIND:-$gateway}"
  fi
  local advertise="${EG_CP_ADVERTISE:-$bind}"
  [[ $advertise == 0.0.0.0 ]] && advertise=127.0.0.1
  # The `kubernetes` EndpointSlice may not hold a loopback address: with one,
  # the API server publishes none (the operator then protects no API endpoint).
  local reconciler=lease
  [[ $advertise == 127.* ]] && reconciler=none
  pki
  local etcd_port peer_port api_port
  local ports
  ports="$(free_ports 3)" || die "could not pick ports"
  read -r etcd_port peer_port api_port <<<"$ports"
  # etcd: one member, no fsync (test data; much faster on a shared disk).
  spawn etcd "$bin/etcd" --name dev --data-dir "$dir/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "dev=http://127.0.0.1:$peer_port" --listen-metrics-urls "" --log-level warn
  wait_until "etcd" 30 curl -sf "http://127.0.0.1:$etcd_port/health"
  spawn kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$bind" --secure-port "$api_port" --advertise-address "$advertise" \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" \
    --service-cluster-ip-range 10.97.0.0/24 \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
    --kubelet-client-certificate "$dir/pki/kubelet-client.crt" --kubelet-client-key "$dir/pki/kubelet-client.key" \
    --kubelet-certificate-authority "$dir/pki/ca.crt" --kubelet-preferred-address-types InternalIP \
    --endpoint-reconciler-type "$reconciler" --allow-privileged=true --v 1
  local server="https://127.0.0.1:$api_port"
  [[ $bind == 0.0.0.0 || $bind == 127.* ]] || server="https://$bind:$api_port"
  kubeconfig "$server" >"$dir/kubeconfig"
  wait_until "kube-apiserver /readyz" 60 curl -sf --cacert "$dir/pki/ca.crt" \
    --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" "$server/readyz"
  # Garbage collection, namespace deletion, service accounts and their tokens.
  spawn kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/kubeconfig" --authentication-kubeconfig "$dir/kubeconfig" \
    --authorization-kubeconfig "$dir/kubeconfig" \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port 0 \
    --controllers "${EG_CP_CONTROLLERS:-*}" --v 1
  # Binds DaemonSet and Deployment pods to nodes.
  spawn kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$dir/kubeconfig" --authentication-kubeconfig "$dir/kubeconfig" \
    --authorization-kubeconfig "$dir/kubeconfig" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port 0 --v 1
  # The serviceaccount controller creating "default" shows the controller manager is working.
  wait_until "kube-controller-manager (default ServiceAccount)" 60 \
    kubectl --kubeconfig "$dir/kubeconfig" --cache-dir "$dir/kube-cache" -n default get serviceaccount default
  ((nodes)) && nodes_up "$nodes"
  {
    echo "server=$server"
    echo "etcd=http://127.0.0.1:$etcd_port"
  } >"$dir/endpoints"
  log "ready in $((SECONDS - start)) s: $server (logs and pids in $dir)"
  echo "export KUBECONFIG=$dir/kubeconfig"
}

down() {
  [[ -d "$dir" ]] || { log "nothing to stop: $dir does not exist"; return; }
  dir="$(cd "$dir" && pwd)"
  nodes_down
  [[ -f "$dir/pids" ]] && stop_listed "$dir/pids" 50
  rm -rf "$dir"
  log "stopped and removed $dir"
}

cmd="${1:-}"
shift || true
nodes=0
if [[ $cmd == up && ${1:-} == --nodes ]]; then
  [[ ${2:-} =~ ^[1-9][0-9]?$ && ${2:-} -le 20 ]] || die "--nodes wants a number of nodes from 1 to 20, got '${2:-}'"
  nodes=$2
  shift 2
fi
dir="${1:-$root/target/dev-cluster}"
node_dir() { # DIR NODE: checks both, loads the network
  [[ -f "$dir/network" ]] || die "no nodes in $dir (start them with: $0 up --nodes N $dir)"
  dir="$(cd "$dir" && pwd)"
  net_load 0
  node_index "$1" >/dev/null
}
case "$cmd" in
  build) build ;;
  up) up ;;
  exec)
    [[ -n ${2:-} && ${3:-} == -- && -n ${4:-} ]] || die "usage: $0 exec DIR NODE -- CMD..."
    node_dir "$2"
    ns="$(node_ns "$(node_index "$2")")"
    shift 3
    exec nsenter --net="/run/netns/$ns" -- "$@" ;;
  node-stop)
    node_dir "${2:?usage: $0 node-stop DIR NODE}"
    node_stop "$2" ;;
  node-start)
    node_dir "${2:?usage: $0 node-start DIR NODE}"
    node_bin="$("$root/scripts/build-node.sh")"
    cp_bin="$(build)"
    node_stop "$2"
    node_start "$(node_index "$2")" ;;
  down) down ;;
  env)
    [[ -f "$dir/kubeconfig" ]] || die "no control plane in $dir: scripts/dev-cluster.sh up $dir"
    echo "export KUBECONFIG=$(cd "$dir" && pwd)/kubeconfig" ;;
  *) die "usage: $0 build | up [--nodes N] [DIR] | env [DIR] | exec DIR NODE -- CMD... | node-stop DIR NODE | node-start DIR NODE | down [DIR]" ;;
esac
