#!/usr/bin/env bash
# The end-to-end scenario on a REAL cluster (kind), where one can run (Docker
# and kind are not available on the development machines; there, the same
# scenario runs in tests/tests/operator.rs against a real control plane built
# by scripts/dev-cluster.sh).
#
# It creates its own kind cluster (named egressguard-e2e-<pid>), points kubectl
# and helm at that cluster's kubeconfig only, and deletes it at the end unless
# --keep is given: it never touches the cluster your KUBECONFIG names.
#
# Needs: docker, kind, helm, kubectl.
# Usage: scripts/e2e-kind.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
keep="${1:-}"
for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool not found" >&2; exit 1; }
done
cluster="egressguard-e2e-$$"
work="$(mktemp -d)"
export KUBECONFIG="$work/kubeconfig"
cleanup() {
  if [[ "$keep" == --keep ]]; then
    echo "kept kind cluster $cluster (KUBECONFIG=$KUBECONFIG); delete with: kind delete cluster --name $cluster" >&2
  else
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || echo "e2e-kind: could not delete kind cluster $cluster" >&2
    rm -rf "$work"
  fi
}
trap cleanup EXIT
kind create cluster --name "$cluster" --kubeconfig "$KUBECONFIG" --config - <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    labels: {site: a}
  - role: worker
    labels: {site: b}
KIND
docker build -q -f operator/Dockerfile -t egressguard-operator:e2e .
docker build -q -f node-shaper/Dockerfile -t node-shaper:e2e .
# A failed load would leave pods in ErrImageNeverPull: stop here, loudly.
kind load docker-image egressguard-operator:e2e node-shaper:e2e --name "$cluster"
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
