"""Render the knsq chart with the real Helm engine (helm-python-sdk) and write deploy/'s plain
manifests from its defaults.

    python operator/tests/chart/render.py   # regenerate deploy/knsq-operator.yaml
"""

from __future__ import annotations

import pathlib
from typing import Any

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "knsq"
CRD = ROOT / "deploy" / "crds" / "nsqclusters.knsq.io.yaml"
PLAIN = ROOT / "deploy" / "knsq-operator.yaml"
RELEASE = "knsq"
NAMESPACE = "knsq-system"

HEADER = f"""# knsq-operator with the chart's default values, as plain manifests:
#   kubectl apply -f deploy/crds/ && kubectl apply -f deploy/knsq-operator.yaml
# Generated from charts/knsq by `python operator/tests/chart/render.py`; a test fails when it drifts.
"""


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text."""
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)


# Helm's install order for the kinds the chart renders.
INSTALL_ORDER = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                 "Service", "Deployment", "NSQCluster", "ServiceMonitor"]


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a rendering (NOTES excluded), in Helm's install order."""
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return sorted(out, key=lambda o: INSTALL_ORDER.index(o["kind"]))


def plain_manifests() -> str:
    """deploy/knsq-operator.yaml: the operator's namespace and the chart's default objects."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    docs = [namespace, *objects(render())]
    return HEADER + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


if __name__ == "__main__":
    PLAIN.write_text(plain_manifests())
    print(f"wrote {PLAIN.relative_to(ROOT)}")
