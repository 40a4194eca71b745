#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian 12 machine (as root):
# iproute2 (ip, tc), iperf3, strace (fixture capture), and cargo's fmt/clippy.
set -euo pipefail
need=()
for pair in ip:iproute2 tc:iproute2 iperf3:iperf3 strace:strace curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # iperf3's package asks whether to start a daemon; answer no.
  echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Real Helm v4 (its Go SDK) for the chart tests.
if ! python3 -c "import helm_python" >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore helm-python-sdk
fi
# kubectl drives the end-to-end tests (preinstalled on these machines).
command -v kubectl >/dev/null 2>&1 || echo "warning: kubectl not found; the end-to-end tests need it" >&2
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
