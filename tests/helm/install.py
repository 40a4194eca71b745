"""Installs or uninstalls charts/egressguard into a cluster with real Helm (helm-python-sdk).

Usage (KUBECONFIG names the cluster):
  install.py install CHART RELEASE NAMESPACE VALUES_JSON   -> prints the release's manifest
  install.py uninstall RELEASE NAMESPACE
"""
import json
import os
import sys

try:
    import helm_python
except ImportError:
    sys.exit("helm-python-sdk is missing: run scripts/install-deps.sh (it installs it in a virtualenv)")

action = sys.argv[1]

try:
    if action == "install":
        chart, release, namespace, values = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
        config = helm_python.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=namespace)
        out = config.install(chart, release, values, namespace=namespace, create_namespace=True, timeout=120)
        print(out.get("manifest", "") if isinstance(out, dict) else out)
    elif action == "uninstall":
        release, namespace = sys.argv[2], sys.argv[3]
        config = helm_python.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=namespace)
        print(json.dumps(config.uninstall(release, timeout=120, wait="watcher")))
    else:
        sys.exit(f"unknown action {action!r}: install or uninstall")
except helm_python.HelmError as e:
    sys.exit(f"helm {action} failed: {e}")
