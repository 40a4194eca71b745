"""Lints and renders charts/egressguard with real Helm (helm-python-sdk, Helm v4's Go SDK).

Usage: render.py CHART VALUES_JSON  -> prints {"lint": ..., "manifests": {path: yaml}} as JSON.
"""
import json
import sys

try:
    import helm_python
except ImportError:
    sys.exit("helm-python-sdk is missing: pip install helm-python-sdk (scripts/install-deps.sh does)")

chart_path, values = sys.argv[1], json.loads(sys.argv[2])
lint = helm_python.lint(chart_path, values, strict=True)
chart = helm_python.Chart.load(chart_path)
manifests = chart.render(values, name="eg", namespace="egressguard-system", is_install=True)
print(json.dumps({"lint": lint, "manifests": manifests}))
