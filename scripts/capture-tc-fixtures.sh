#!/usr/bin/env bash
# Captures the netlink requests iproute2's `tc` sends for the commands node-shaper
# mirrors, as hex fixtures for node-shaper/tests/conformance.rs.
#
# Run once (as root, needs iproute2 and strace); the fixtures are committed.
# Everything happens in a throwaway network namespace, removed on exit. The
# kernel may refuse some commands (this one has no sch_sfq): the bytes tc sent
# are what we compare, not the kernel's answer.
set -euo pipefail
out="$(cd "$(dirname "$0")/.." && pwd)/node-shaper/tests/fixtures/tc"
ns="egcap-$$"
tmp="$(mktemp -d)"
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link add name cap0 type veth peer name cap1
ip -n "$ns" link set cap0 up
mkdir -p "$out"

cap() {
  local name="$1"; shift
  ip netns exec "$ns" strace -f -qq -e trace=sendmsg,sendto -e write=all -o "$tmp/$name.strace" tc "$@" >/dev/null 2>&1 || true
  python3 - "$tmp/$name.strace" "$out/$name.hex" "$*" <<'PY'
import re, sys
src, dst, cmd = sys.argv[1], sys.argv[2], sys.argv[3]
data = bytearray(); msgs = []
for line in open(src):
    m = re.match(r'\s*\d*\s*\|\s*[0-9a-f]{5}\s+((?:[0-9a-f]{2}\s+)+)', line)
    if m:
        data += bytes.fromhex(''.join(m.group(1).split()))
    elif data:
        msgs.append(bytes(data)); data = bytearray()
if data: msgs.append(bytes(data))
tc = [m for m in msgs if len(m) >= 16 and 36 <= int.from_bytes(m[4:6], 'little') <= 46]
if not tc:
    sys.exit(f"no tc request captured for: {cmd}")
with open(dst, 'w') as f:
    f.write(f"# tc {cmd}\n")
    b = tc[0]
    for i in range(0, len(b), 16):
        f.write(' '.join(f'{x:02x}' for x in b[i:i+16]) + '\n')
PY
  echo "captured $name: tc $*"
}

cap qdisc_htb_root      qdisc add dev cap0 root handle e9: htb default 20 r2q 10
cap class_htb_throttled class replace dev cap0 parent e9:1 classid e9:10 htb rate 1mbit ceil 1mbit burst 1k cburst 1k quantum 1514 prio 2
cap class_htb_uplink    class replace dev cap0 parent e9: classid e9:1 htb rate 20mbit ceil 20mbit burst 15k cburst 15k quantum 200000 prio 0
cap class_htb_rate64    class replace dev cap0 parent e9:1 classid e9:20 htb rate 40gbit ceil 40gbit burst 5000000b cburst 5000000b quantum 200000 prio 1
cap qdisc_sfq_leaf      qdisc replace dev cap0 parent e9:10 handle 10: sfq perturb 10
cap qdisc_pfifo_leaf    qdisc replace dev cap0 parent e9:10 handle 110: pfifo
cap filter_table_v4     filter add dev cap0 parent e9: prio 14 protocol ip handle 104: u32 divisor 256
cap filter_link_v4_hash filter add dev cap0 parent e9: prio 14 protocol ip handle ::1 u32 link 104: hashkey mask 0x000000ff at 16 match u32 0 0
cap filter_v4_host      filter add dev cap0 parent e9: prio 14 protocol ip handle 104:a:1 u32 classid e9:30 ht 104:a: match ip dst 203.0.113.10/32
cap filter_v4_net24     filter add dev cap0 parent e9: prio 13 protocol ip handle 103:64:1 u32 classid e9:30 ht 103:64: match ip dst 198.51.100.0/24
cap filter_link_v6_hash filter add dev cap0 parent e9: prio 23 protocol ipv6 handle ::1 u32 link 113: hashkey mask 0x00ff0000 at 28 match u32 0 0
cap filter_v6_net48     filter add dev cap0 parent e9: prio 23 protocol ipv6 handle 113:1:1 u32 classid e9:30 ht 113:1: match ip6 dst 2001:db8:1::/48
cap filter_v6_host      filter add dev cap0 parent e9: prio 25 protocol ipv6 handle 115:42:1 u32 classid e9:30 ht 115:42: match ip6 dst 2001:db8::42/128
cap filter_link_v4_tcp  filter add dev cap0 parent e9: prio 40 protocol ip handle ::1 u32 link 200: offset at 0 mask 0x0f00 shift 6 eat match ip protocol 6 0xff match u16 0 0x1fff at 6
cap filter_link_v4_udp  filter add dev cap0 parent e9: prio 40 protocol ip handle ::2 u32 link 201: offset at 0 mask 0x0f00 shift 6 eat match ip protocol 17 0xff match u16 0 0x1fff at 6
cap filter_link_v6_tcp  filter add dev cap0 parent e9: prio 41 protocol ipv6 handle ::1 u32 link 210: offset plus 40 eat match ip6 protocol 6 0xff
cap filter_port_443     filter add dev cap0 parent e9: prio 40 protocol ip handle 200:0:2 u32 classid e9:10 ht 200:0: match u16 443 0xffff at 2
cap filter_port_block   filter add dev cap0 parent e9: prio 40 protocol ip handle 201:0:1 u32 classid e9:10 ht 201:0: match u16 8000 0xffe0 at 2
cap filter_change_node  filter replace dev cap0 parent e9: prio 40 protocol ip handle 200:0:2 u32 classid e9:30 match u16 443 0xffff at 2
cap filter_del_node     filter del dev cap0 parent e9: prio 14 protocol ip handle 104:a:1 u32
cap filter_del_table    filter del dev cap0 parent e9: prio 14 protocol ip handle 104: u32
cap filter_del_prio     filter del dev cap0 parent e9: prio 14 protocol ip
cap class_del           class del dev cap0 classid e9:10
cap qdisc_del_root      qdisc del dev cap0 root handle e9:
echo "fixtures written to $out"
