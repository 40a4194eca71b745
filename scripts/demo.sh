#!/usr/bin/env bash
# The main job, for real, on this machine: a two-namespace lab where "host"
# floods TCP 443 (the incident), node-shaper applies examples/lab-guard.yaml,
# and iperf3 measures before and after. Cleans up after itself. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release -q -p node-shaper
bin="$PWD/target/release/node-shaper"
id="$$"; host="egdemo-host-$id"; net="egdemo-net-$id"
export EGRESSGUARD_STATE_DIR="$(mktemp -d)"
cleanup() {
  for ns in "$host" "$net"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$EGRESSGUARD_STATE_DIR"
}
trap cleanup EXIT
ip netns add "$host"; ip netns add "$net"
ip -n "$host" link add name eg0 type veth peer name egpeer netns "$net"
for ns in "$host" "$net"; do ip -n "$ns" link set lo up; done
ip -n "$host" link set eg0 up; ip -n "$net" link set egpeer up
ip -n "$host" addr add 10.211.0.1/24 dev eg0
ip -n "$net" addr add 10.211.0.2/24 dev egpeer   # "random internet host"
ip -n "$net" addr add 10.211.0.3/24 dev egpeer   # business partner (whitelisted)
for a in 10.211.0.2:443 10.211.0.3:443 10.211.0.2:5201; do
  (ip netns exec "$net" iperf3 -s -B "${a%%:*}" -p "${a##*:}" >/dev/null 2>&1 &)
done
sleep 0.5

mbit() { python3 -c 'import json,sys; d=json.load(sys.stdin); e=d["end"]; print("%.2f" % (e["sum_received"]["bits_per_second"]/1e6))'; }
run() { ip netns exec "$host" iperf3 -J -c "$1" -p "$2" -t "$3" -O 1 ${4:-} | mbit; }
measure() {
  # The flood (4 flows to 443) runs while the other two are measured one after the other.
  ip netns exec "$host" iperf3 -J -c 10.211.0.2 -p 443 -t 11 -O 1 -P 4 > "$EGRESSGUARD_STATE_DIR/flood.json" &
  local fpid=$!
  sleep 1.5
  local w; w=$(run 10.211.0.3 443 4)
  local d; d=$(run 10.211.0.2 5201 4)
  wait "$fpid"
  local f; f=$(mbit < "$EGRESSGUARD_STATE_DIR/flood.json")
  printf '  %-40s %10s Mbit/s\n' "flood: 4 flows to 10.211.0.2:443" "$f" "whitelisted 10.211.0.3:443" "$w" "ordinary 10.211.0.2:5201" "$d"
}

echo "== before: no shaping (veth line rate, iperf3 goodput)"
measure
echo
echo "== node-shaper plan (what will be programmed, as tc commands)"
"$bin" plan -f examples/lab-guard.yaml --interface eg0 | awk 'NR<=14'; echo "  ..."
echo
echo "== node-shaper apply"
ip netns exec "$host" "$bin" apply -f examples/lab-guard.yaml --interface eg0 | awk 'NR<=6 || /leaf qdisc|DEGRADED/'
ip netns exec "$host" "$bin" apply -f examples/lab-guard.yaml --interface eg0 | awk 'NR==1 {print "  again: " $0}' 
echo
echo "== after: uplink 20Mbit, TCP 80/443 throttled to 1Mbit, 10.211.0.3 whitelisted (goodput; wire rate is ~4.5% higher)"
measure
echo
ip netns exec "$host" "$bin" show --interface eg0
echo
echo "== why is 10.211.0.2:443 slow? and 10.211.0.3:443?"
ip netns exec "$host" "$bin" explain --interface eg0 10.211.0.2 --port 443
ip netns exec "$host" "$bin" explain --interface eg0 10.211.0.3 --port 443
echo
echo "== node-shaper reset"
ip netns exec "$host" "$bin" reset --interface eg0
