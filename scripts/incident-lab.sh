#!/usr/bin/env bash
# The main job: replays the incident on this machine, as root, and shows
# EgressGuard ending it — two kubelet nodes behind one shaped site uplink, a
# real control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler; kubelet, containerd and runc on the nodes; all built from Go
# modules), the chart installed with Helm (the operator's pods and an agent pod
# per node, from images built here), node-exporter, Prometheus with the
# chart's alert rule, and Alertmanager routed to the operator's authenticated
# receiver. One node floods TCP 80/443; the lab prints a live progress line,
# then a table of measured rates, the detection and enforcement latencies,
# `kubectl get eg`, `kubectl get egq` and `node-shaper show`, and writes
# report.md, chart.png and the logs to the output folder.
#
#   bash scripts/incident-lab.sh [--out DIR]   # default: ./incident-lab-<time>
#   bash scripts/incident-lab.sh --clean       # remove an interrupted run's leftovers
#
# First run on a fresh machine: installing packages, the Go builds (about 10
# minutes on 2 cores) and the release builds, dynamic and static for the images
# (about 8 minutes); later runs finish in under 2 minutes.
# Exit 0 only if every expectation held; otherwise it names the one that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "$(id -u)" != 0 ]]; then
  echo "error: run as root (the lab creates network namespaces)" >&2
  exit 2
fi
scripts/install-deps.sh
echo "building (release)..." >&2
cargo build --release -q -p node-shaper -p egressguard-operator -p egressguard-e2e --bins
exec target/release/incident-lab "$@"
