#!/usr/bin/env bash
# The project's test command: installs dependencies, then checks formatting,
# lints and runs every test (unit, conformance, datapath in network namespaces,
# end to end against a real control plane built from Go modules).
# Run as root on Debian 12 (the datapath tests create namespaces and veths).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests run the real binaries (node-shaper, egressguard-operator, and
# etcd/kube-apiserver/kube-controller-manager, which install-deps.sh built): build them first.
cargo build --workspace --bins
# The chart's images for the kubelet-node tests (tests/tests/nodes.rs): static
# release binaries in reproducible OCI images, pushed by each test cluster.
scripts/build-images.sh
cargo test --workspace --no-fail-fast
# The benchmark's short smoke mode (the full benchmark is too slow for CI):
# exercises every comparison and enforces the write-count and loss targets.
cargo bench -p node-shaper --bench lab -- --smoke
# The footprint benchmark's smoke mode (agent and operator against a real control plane).
cargo build --release --workspace --bins
cargo bench -p egressguard-e2e --bench footprint -- --smoke
