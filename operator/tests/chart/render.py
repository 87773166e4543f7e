"""Render the knsq chart with the real Helm engine (helm-python-sdk), and write what is generated
from it: deploy/'s plain manifests from its defaults, and the `cluster.spec` part of
values.schema.json from the CRD's schema.

    python operator/tests/chart/render.py   # regenerate deploy/knsq-operator.yaml and the schema
"""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "knsq"
CRD = ROOT / "deploy" / "crds" / "nsqclusters.knsq.io.yaml"
PLAIN = ROOT / "deploy" / "knsq-operator.yaml"
VALUES_SCHEMA = CHART / "values.schema.json"
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
                 "ConfigMap", "Service", "Deployment", "Job", "NSQCluster", "ServiceMonitor", "PrometheusRule"]


def is_hook(obj: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


def objects(rendered: dict[str, str], hooks: bool = False) -> list[dict[str, Any]]:
    """Every Kubernetes object of a rendering (NOTES excluded), in Helm's install order; the
    hooks only when asked for."""
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc and (hooks or not is_hook(doc)))
    return sorted(out, key=lambda o: INSTALL_ORDER.index(o["kind"]))


def plain_manifests() -> str:
    """deploy/knsq-operator.yaml: the operator's namespace and the chart's default objects."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    # Hooks run around `helm upgrade`; kubectl has no such moment.
    docs = [namespace, *objects(render())]
    return HEADER + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


def json_schema(node: Any) -> Any:
    """A CRD's structural OpenAPI schema as JSON Schema for `helm install`: int-or-string and
    nullable spelt out, CEL rules (which only the API server runs) dropped, and objects closed
    to unknown keys, so a misspelt field is an error instead of being pruned silently."""
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "properties", "items", "additionalProperties")}
    if "properties" in node:
        out["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = json_schema(node[key])
        elif key in node:
            out[key] = node[key]
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    # OpenAPI 3.0's boolean exclusive bounds are draft-07's numbers.
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True and limit in node:
            out[bound] = out.pop(limit)
        elif node.get(bound) is False:
            out.pop(bound)
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    return out


def values_schema() -> str:
    """values.schema.json with `cluster.spec` the NSQCluster spec's schema from the CRD."""
    schema = json.loads(VALUES_SCHEMA.read_text())
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    generated = json_schema(copy.deepcopy(spec))
    generated["description"] = "The NSQCluster's spec, checked against the CRD's schema (generated from it)."
    # Generated, so on one line: the hand-written rest stays readable.
    schema["properties"]["cluster"]["properties"]["spec"] = "GENERATED"
    text = json.dumps(schema, indent=2) + "\n"
    return text.replace('"GENERATED"', json.dumps(generated, separators=(",", ":")))


if __name__ == "__main__":
    # The schema first: rendering checks values against it.
    VALUES_SCHEMA.write_text(values_schema())
    print(f"wrote {VALUES_SCHEMA.relative_to(ROOT)}")
    PLAIN.write_text(plain_manifests())
    print(f"wrote {PLAIN.relative_to(ROOT)}")
