#!/usr/bin/env bash
# The end-to-end scenario on a REAL cluster (kind or k3d), where one can run.
# It cannot run on the development machines of this project (no kube-apiserver
# or kind is installable there); tests/tests/operator.rs runs the same scenario
# against the stand-in instead.
#
# Needs: docker, kind (or an existing cluster in KUBECONFIG), helm, kubectl.
# Usage: scripts/e2e-kind.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=egressguard-e2e
if [[ -z "${KUBECONFIG:-}" ]] || ! kubectl cluster-info >/dev/null 2>&1; then
  kind create cluster --name "$cluster" --config - <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    labels: {site: a}
  - role: worker
    labels: {site: b}
KIND
  trap '[[ "${1:-}" == --keep ]] || kind delete cluster --name '"$cluster" EXIT
fi
docker build -q -f operator/Dockerfile -t egressguard-operator:e2e .
docker build -q -f node-shaper/Dockerfile -t node-shaper:e2e .
kind load docker-image egressguard-operator:e2e node-shaper:e2e --name "$cluster" 2>/dev/null || true
helm upgrade --install eg charts/egressguard -n egressguard-system --create-namespace --wait \
  --set operator.image.repository=egressguard-operator --set operator.image.tag=e2e \
  --set nodeShaper.image.repository=node-shaper --set nodeShaper.image.tag=e2e \
  --set operator.image.pullPolicy=Never --set nodeShaper.image.pullPolicy=Never

wait_for() { local what="$1"; shift; for _ in $(seq 60); do if "$@" >/dev/null 2>&1; then return 0; fi; sleep 2; done; echo "timed out: $what" >&2; exit 1; }
worker_a=$(kubectl get nodes -l site=a -o jsonpath='{.items[0].metadata.name}')
worker_b=$(kubectl get nodes -l site=b -o jsonpath='{.items[0].metadata.name}')
shaped() { docker exec "$1" tc qdisc show dev eth0 | grep -q 'htb e9: root'; }

cat <<'EOF2' | kubectl apply -f -
apiVersion: egressguard.io/v1alpha1
kind: EgressGuard
metadata: {name: e2e}
spec:
  nodeSelector: {matchLabels: {site: a}}
  uplink: {rate: 200Mbit}
  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 443}]}
EOF2
wait_for "site=a node shaped" shaped "$worker_a"
wait_for "guard Ready" sh -c "kubectl get eg e2e -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
if shaped "$worker_b"; then echo "site=b node shaped but not selected" >&2; exit 1; fi
kubectl get eg e2e
kubectl label node "$worker_a" site=b --overwrite
wait_for "shaping removed after label change" sh -c "! docker exec $worker_a tc qdisc show dev eth0 | grep -q 'htb e9: root'"
kubectl label node "$worker_a" site=a --overwrite
wait_for "shaped again" shaped "$worker_a"
kubectl delete eg e2e --wait=true --timeout=120s
if shaped "$worker_a"; then echo "guard deleted but shaping left on $worker_a" >&2; exit 1; fi
echo "e2e on a real cluster: passed"
