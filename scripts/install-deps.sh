#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian 12 machine (as root):
# iproute2 (ip, tc), iperf3, hping3 (the SYN-flood tests), strace (fixture capture), curl, openssl (the test
# control plane's certificates), cargo's fmt/clippy, Prometheus, Alertmanager
# and node-exporter (the quarantine tests and the incident lab start their own;
# the packages' services are not started),
# lua5.1 and lua-cjson (the chart's Argo CD health checks, tests/tests/argocd.rs),
# the Go modules of the test control plane and kubelet (built by
# scripts/dev-cluster.sh build), the real Helm CLI v4 and the kstatus
# helper (built from tests/tools by scripts/build-tools.sh), and the nodes'
# containerd, runc (with libseccomp-dev), CNI plugins and image tools
# (tests/node, scripts/build-node.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
need=()
for pair in ip:iproute2 tc:iproute2 iperf3:iperf3 hping3:hping3 strace:strace curl:curl openssl:openssl \
  prometheus:prometheus prometheus-alertmanager:prometheus-alertmanager \
  prometheus-node-exporter:prometheus-node-exporter lua5.1:lua5.1; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
# libseccomp-dev and pkg-config: runc for the test nodes is built with cgo and
# seccomp (scripts/build-node.sh); gcc for cgo.
for pair in /usr/include/seccomp.h:libseccomp-dev /usr/bin/pkg-config:pkg-config /usr/bin/gcc:gcc; do
  [[ -e "${pair%%:*}" ]] || need+=("${pair##*:}")
done
# lua-cjson: the JSON module the Argo CD health check tests load in lua5.1
# (tests/argocd/run.lua).
compgen -G '/usr/lib/*/lua/5.1/cjson.so' >/dev/null || need+=(lua-cjson)
# The incident lab's chart (PNG) labels its axes with DejaVu Sans.
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || need+=(fonts-dejavu-core)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # iperf3's package asks whether to start a daemon; answer no.
  echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
  # The Prometheus packages would start system services; the tests start
  # their own copies on their own ports, so keep the services down.
  policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [[ -n "$policy" ]] && rm -f "$policy"
fi
# kubectl drives the end-to-end tests (preinstalled on these machines).
command -v kubectl >/dev/null 2>&1 || echo "warning: kubectl not found; the end-to-end tests need it" >&2
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
# The control plane the end-to-end tests run against: Go modules through the
# module proxy, compiled once into a cache (about 5 minutes cold on 2 cores).
command -v go >/dev/null 2>&1 || {
  echo "error: go not found; the test control plane is built from Go modules (Go 1.26+)" >&2
  exit 1
}
"$root/scripts/dev-cluster.sh" build >/dev/null
# The real Helm CLI (v4.3.2) for the chart tests and for installing the chart
# into the test control plane, and kstatus: Go modules too, cached the same way.
"$root/scripts/build-tools.sh" >/dev/null
# What a kubelet node runs besides the kubelet (built above with the control
# plane): containerd, runc, CNI plugins, the pause program and egimage.
"$root/scripts/build-node.sh" >/dev/null
