"""The knsq Helm chart through the real Helm engine (helm-python-sdk), every rendered object
validated strictly against a current Kubernetes (kubernetes-validate), and the NSQClusters
against the CRD's own schema."""

from __future__ import annotations

import os
import pathlib
import subprocess

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from render import CHART, CRD, NAMESPACE, PLAIN, ROOT, objects, plain_manifests, render

KUBERNETES = "1.37.0"


def by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


def nsqcluster_schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


NON_DEFAULT = {
    "operator": {
        "replicas": 2,
        "image": {"repository": "registry.example/knsq-operator", "tag": "9.9.9", "pullPolicy": "Always"},
        "watchNamespace": "messaging",
        "brokerImage": "registry.example/knsq-broker:9.9.9",
        "leaderElection": {"enabled": False},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "messaging", "effect": "NoSchedule"}],
        "podLabels": {"team": "platform"},
    },
    "serviceAccount": {"create": False, "name": "existing-sa"},
    "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}},
    "cluster": {
        "enabled": True,
        "name": "events",
        "spec": {"broker": {"replicas": 5, "settings": {"memQueueSize": 50000}}, "lookupd": {"replicas": 3}},
    },
}


def test_lint_has_no_errors():
    for values in ({}, NON_DEFAULT):
        report = helm.lint(str(CHART), values, strict=True)
        errors = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and errors == [], report


def test_default_rendering():
    objs = by_kind(objects(render()))
    assert sorted(objs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    deployment = objs["Deployment"][0]
    assert deployment["metadata"]["namespace"] == NAMESPACE
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "knsq/knsq-operator:0.1.0"
    assert container["args"] == [
        "--http-address=0.0.0.0:8080",
        "--broker-image=knsq/knsq-broker:0.1.0",
        "--lookupd-image=knsq/knsq-lookupd:0.1.0",
        "--leader-elect=true",
        "--lease-name=knsq",
    ]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["serviceAccountName"] == objs["ServiceAccount"][0]["metadata"]["name"] == "knsq"
    service = objs["Service"][0]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_non_default_rendering():
    objs = by_kind(objects(render(NON_DEFAULT)))
    assert "ServiceAccount" not in objs and "Role" not in objs and "RoleBinding" not in objs
    deployment = objs["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "existing-sa"
    assert objs["ClusterRoleBinding"][0]["subjects"][0]["name"] == "existing-sa"
    assert container["image"] == "registry.example/knsq-operator:9.9.9"
    assert "--namespace=messaging" in container["args"]
    assert "--leader-elect=false" in container["args"]
    assert "--broker-image=registry.example/knsq-broker:9.9.9" in container["args"]
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    monitor = objs["ServiceMonitor"][0]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    cluster = objs["NSQCluster"][0]
    assert cluster["metadata"]["name"] == "events"
    assert cluster["spec"]["broker"]["replicas"] == 5
    jsonschema.validate(cluster, nsqcluster_schema())


def test_every_object_validates_strictly():
    for values in ({}, NON_DEFAULT):
        for obj in objects(render(values)):
            if obj["kind"] in ("NSQCluster", "ServiceMonitor"):
                continue  # custom resources: no schema in kubernetes-validate; NSQCluster is checked against the CRD
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    kubernetes_validate.validate(crd(), KUBERNETES, strict=True)
    chart_crd = yaml.safe_load((CHART / "crds" / "nsqclusters.knsq.io.yaml").read_text())
    assert chart_crd == crd()


def test_strict_validation_catches_mistakes():
    deployment = by_kind(objects(render()))["Deployment"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_cluster_role_is_the_rules_file():
    rules = yaml.safe_load((CHART / "files" / "clusterrole-rules.yaml").read_text())
    role = by_kind(objects(render()))["ClusterRole"][0]
    assert role["rules"] == rules
    granted = {(group, resource) for r in rules for group in r["apiGroups"] for resource in r["resources"]}
    for needed in [("knsq.io", "nsqclusters"), ("knsq.io", "nsqclusters/status"), ("apps", "statefulsets"), ("", "services"),
                   ("", "configmaps"), ("policy", "poddisruptionbudgets"), ("events.k8s.io", "events")]:
        assert needed in granted
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules), "no wildcards"
    assert not any(("", "secrets") == (g, res) for g, res in granted), "the operator reads no Secrets"
    lease = by_kind(objects(render()))["Role"][0]
    assert lease["rules"] == yaml.safe_load((CHART / "files" / "leader-election-rules.yaml").read_text())


def test_values_schema_rejects_bad_values():
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        chart.validate_schema(NON_DEFAULT)
        for bad in ({"operator": {"replicas": -1}}, {"operator": {"image": {"pullPolicy": "Sometimes"}}},
                    {"cluster": {"name": "Not_A_Name"}}, {"unknownKey": 1}):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_notes_tell_what_to_do_next():
    notes = next(text for path, text in render().items() if path.endswith("NOTES.txt"))
    assert "kubectl get nsqc events -w" in notes
    assert "knsq-broker" not in notes
    assert "NAME-broker.<namespace>.svc:4150" in notes
    with_cluster = next(text for path, text in render(NON_DEFAULT).items() if path.endswith("NOTES.txt"))
    assert "get nsqcluster events -w" in with_cluster
    assert "watches NSQClusters in namespace messaging" in with_cluster


def test_examples_match_the_crd_schema():
    schema = nsqcluster_schema()
    examples = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    bad = {"apiVersion": "knsq.io/v1alpha1", "kind": "NSQCluster", "metadata": {"name": "x"},
           "spec": {"broker": {"replicas": -1}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_plain_manifests_are_the_chart_defaults():
    assert PLAIN.read_text() == plain_manifests(), "deploy/knsq-operator.yaml drifted: run python operator/tests/chart/render.py"


def operator_binary() -> pathlib.Path:
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "knsq-operator"


def test_deployment_flags_exist_in_the_binary():
    binary = operator_binary()
    if not binary.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} was not built")
        pytest.skip(f"{binary} is not built (cargo build -p operator)")
    usage = subprocess.run([binary, "--help"], check=True, capture_output=True, text=True).stdout
    for values in ({}, NON_DEFAULT):
        container = by_kind(objects(render(values)))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
        for arg in container["args"]:
            flag = arg.split("=", 1)[0]
            assert f"{flag} <" in usage, f"{flag} is not a knsq-operator flag"
    crd_out = subprocess.run([binary, "crd"], check=True, capture_output=True, text=True).stdout
    assert crd_out == CRD.read_text()
