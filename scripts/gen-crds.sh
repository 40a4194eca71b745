#!/usr/bin/env bash
# Regenerates crds/*.yaml from the Rust types (a test fails when they are stale).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p egressguard-operator -- crd > /tmp/egressguard-crds.$$.yaml
python3 - /tmp/egressguard-crds.$$.yaml <<'PY'
import sys
docs = open(sys.argv[1]).read().split("---\n")
names = ["crds/egressguard.io_egressguards.yaml", "crds/egressguard.io_nodeshapings.yaml", "crds/egressguard.io_quarantines.yaml", "crds/egressguard.io_cidrgroups.yaml"]
for name, doc in zip(names, docs):
    open(name, "w").write(doc)
    # The Helm chart renders the same files (templates/crds.yaml).
    open("charts/egressguard/files/" + name, "w").write(doc)
PY
rm -f /tmp/egressguard-crds.$$.yaml
echo "regenerated: crds/*.yaml and charts/egressguard/files/crds/*.yaml"
