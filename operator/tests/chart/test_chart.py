"""The knsq Helm chart through the real Helm engine (helm-python-sdk), every rendered object
validated strictly against every Kubernetes version kubernetes-validate knows (1.25 onwards; the
1.20 API server of scripts/test-operator.sh covers the oldest), the NSQClusters against the CRD's
own schema, and the objects the operator makes of them (`knsq-operator render`) likewise."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from render import (CHART, CRD, NAMESPACE, PLAIN, ROOT, VALUES_SCHEMA, is_hook, json_schema, objects, plain_manifests,
                    render, values_schema)

KUBERNETES = "1.37.0"
# Every version kubernetes-validate has schemas for.
VERSIONS = [f"1.{minor}.0" for minor in range(25, 38)]


def by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


def nsqcluster_schema() -> dict:
    """The CRD's schema as JSON Schema (OpenAPI's boolean bounds, int-or-string, nullable)."""
    schema = json_schema(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema.pop("additionalProperties")  # apiVersion, kind and metadata are the API server's
    return schema


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
    assert "ServiceAccount" not in objs
    # watchNamespace: the operator's Role there, and no leader-election Role (it is off).
    assert [(r["metadata"]["namespace"], r["metadata"]["name"]) for r in objs["Role"]] == [("messaging", "knsq")]
    assert "ClusterRole" not in objs
    deployment = objs["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "existing-sa"
    assert objs["RoleBinding"][0]["subjects"][0]["name"] == "existing-sa"
    assert container["image"] == "registry.example/knsq-operator:9.9.9"
    assert "--namespace=messaging" in container["args"]
    assert "--leader-elect=false" in container["args"]
    assert "--broker-image=registry.example/knsq-broker:9.9.9" in container["args"]
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    monitor = objs["ServiceMonitor"][0]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "honorLabels": True, "interval": "15s"}]
    cluster = objs["NSQCluster"][0]
    assert cluster["metadata"]["name"] == "events"
    assert cluster["spec"]["broker"]["replicas"] == 5
    jsonschema.validate(cluster, nsqcluster_schema())


EVERYTHING = {**NON_DEFAULT, "prometheusRule": {"enabled": True}, "dashboards": {"enabled": True}}
CUSTOM = ("NSQCluster", "ServiceMonitor", "PrometheusRule")


def test_every_object_validates_strictly_on_every_version():
    for version in VERSIONS:
        for values in ({}, EVERYTHING):
            for obj in objects(render(values), hooks=True):
                if obj["kind"] in CUSTOM:
                    continue  # custom resources: no schema in kubernetes-validate; NSQCluster is checked against the CRD
                kubernetes_validate.validate(obj, version, strict=True)
        kubernetes_validate.validate(crd(), version, strict=True)
    chart_crd = yaml.safe_load((CHART / "crds" / "nsqclusters.knsq.io.yaml").read_text())
    assert chart_crd == crd()


def test_strict_validation_catches_mistakes():
    deployment = by_kind(objects(render()))["Deployment"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_cluster_role_is_the_rules_file():
    rules = yaml.safe_load((CHART / "files" / "operator-rules.yaml").read_text())
    role = by_kind(objects(render()))["ClusterRole"][0]
    assert role["rules"] == rules
    granted = {(group, resource) for r in rules for group in r["apiGroups"] for resource in r["resources"]}
    for needed in [("knsq.io", "nsqclusters"), ("knsq.io", "nsqclusters/status"), ("apps", "statefulsets"), ("", "services"),
                   ("", "configmaps"), ("policy", "poddisruptionbudgets"), ("events.k8s.io", "events"),
                   ("", "persistentvolumeclaims"), ("apps", "deployments"), ("networking.k8s.io", "ingresses"),
                   ("monitoring.coreos.com", "prometheusrules"), ("", "pods"), ("batch", "jobs")]:
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
    assert not any(is_hook(o) for o in yaml.safe_load_all(PLAIN.read_text()) if o)


def test_watch_namespace_installs_only_namespaced_roles():
    values = {"operator": {"watchNamespace": "messaging"}}
    objs = by_kind(objects(render(values)))
    assert "ClusterRole" not in objs and "ClusterRoleBinding" not in objs
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in objs["Role"]}
    operator_role = roles[("messaging", "knsq")]
    assert operator_role["rules"] == yaml.safe_load((CHART / "files" / "operator-rules.yaml").read_text())
    assert ("knsq-system", "knsq-leader-election") in roles
    binding = next(b for b in objs["RoleBinding"] if b["metadata"]["namespace"] == "messaging")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "knsq"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "knsq", "namespace": NAMESPACE}]
    container = objs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=messaging" in container["args"]
    # Every namespace: a ClusterRole with the same rules, no Role but the Lease's.
    objs = by_kind(objects(render()))
    assert [r["metadata"]["name"] for r in objs["Role"]] == ["knsq-leader-election"]
    assert objs["ClusterRole"][0]["rules"] == operator_role["rules"]


def test_crd_upgrade_hook_applies_the_crd_before_the_upgrade():
    hooks = [o for o in objects(render(), hooks=True) if is_hook(o)]
    assert sorted(o["kind"] for o in hooks) == ["ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
    for o in hooks:
        annotations = o["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-upgrade", "never on rollback: an older CRD would prune newer fields"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    weight = {o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for o in hooks}
    assert weight["ServiceAccount"] < weight["ClusterRoleBinding"] < weight["Job"]
    assert weight["ClusterRole"] < weight["ClusterRoleBinding"]
    job = next(o for o in hooks if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "knsq/knsq-operator:0.1.0"
    assert pod["containers"][0]["args"] == ["crd", "--apply"]
    assert pod["serviceAccountName"] == "knsq-crd-upgrade"
    role = next(o for o in hooks if o["kind"] == "ClusterRole")
    assert role["rules"] == yaml.safe_load((CHART / "files" / "crd-upgrade-rules.yaml").read_text())
    assert role["rules"] == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                              "resourceNames": ["nsqclusters.knsq.io"], "verbs": ["get", "patch"]}]
    assert not [o for o in objects(render({"crds": {"upgrade": False}}), hooks=True) if is_hook(o)]


def test_prometheus_rule_holds_the_generated_rules():
    rules_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    values = {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}
    rule = by_kind(objects(render(values)))["PrometheusRule"][0]
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"] == rules_file
    names = [r["alert"] for g in rules_file["groups"] for r in g["rules"]]
    assert "KnsqOperatorReconcileErrors" in names and "KnsqClusterNotReady" in names
    assert "PrometheusRule" not in by_kind(objects(render()))


def test_dashboard_config_map_for_the_grafana_sidecar():
    values = {"dashboards": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "knsq"}}}
    cm = by_kind(objects(render(values)))["ConfigMap"][0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "knsq"}
    dashboard = json.loads(cm["data"]["knsq.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboards" / "knsq.json").read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Cluster", "Topics", "Channels", "Brokers", "Lookupds"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "namespace", "nsqcluster", "topic", "channel", "broker"]
    assert "ConfigMap" not in by_kind(objects(render()))


def test_values_schema_is_generated_from_the_crd():
    assert VALUES_SCHEMA.read_text() == values_schema(), "values.schema.json drifted from the CRD: run python operator/tests/chart/render.py"


def test_cluster_spec_mistakes_fail_at_install_with_the_field_named():
    with helm.Chart.load(str(CHART)) as chart:
        good = {"cluster": {"enabled": True, "spec": {
            "broker": {"replicas": 3, "storage": {"size": "20Gi"}, "resources": {"limits": {"cpu": 1, "memory": "1Gi"}},
                       "env": [{"name": "X", "value": "1"}], "settings": {"e2eProcessingLatencyPercentiles": [0.99, 0.5]}},
            "admin": {"ingress": {"host": "nsq.example.com"}}}}}
        chart.validate_schema(good)
        for bad, said in [
            ({"broker": {"replicas": -1}}, "/cluster/spec/broker/replicas': minimum: got -1, want 0"),
            ({"broker": {"replica": 3}}, "additional properties 'replica' not allowed"),
            ({"broker": {"settings": {"msgTimeout": "soon"}}}, "/cluster/spec/broker/settings/msgTimeout"),
            ({"lookupd": {"replicas": 0}}, "/cluster/spec/lookupd/replicas"),
            ({"broker": {"settings": {"e2eProcessingLatencyPercentiles": [0]}}}, "e2eProcessingLatencyPercentiles"),
        ]:
            with pytest.raises(helm.HelmError) as failure:
                chart.validate_schema({"cluster": {"enabled": True, "spec": bad}})
            assert said in str(failure.value), str(failure.value)
    # And through a real rendering, as `helm install` does it.
    with pytest.raises(helm.HelmError, match="replicas"):
        render({"cluster": {"enabled": True, "spec": {"broker": {"replicas": -1}}}})


def operator_render(cluster: dict) -> list[dict]:
    """`knsq-operator render`: the objects the operator makes of the NSQCluster."""
    out = subprocess.run([operator_binary(), "render", "-"], input=yaml.safe_dump(cluster), check=True,
                         capture_output=True, text=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def require_operator_binary():
    if not operator_binary().exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{operator_binary()} was not built")
        pytest.skip(f"{operator_binary()} is not built (cargo build -p operator)")


def test_generated_objects_validate_on_every_version():
    require_operator_binary()
    examples = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    for path in examples:
        children = operator_render(yaml.safe_load(path.read_text()))
        assert {"StatefulSet", "Service", "ConfigMap"} <= {o["kind"] for o in children}, path
        for version in VERSIONS:
            for obj in children:
                if obj["kind"] not in CUSTOM:
                    kubernetes_validate.validate(obj, version, strict=True)


def selects(selector: dict, labels: dict) -> bool:
    exact = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In"
        exact = exact and labels.get(e["key"]) in e["values"]
    return exact


def test_every_pod_is_scraped_exactly_once():
    """The chart's ServiceMonitor (the operator) and the cluster's (brokers, lookupds), over
    every Service of the release and of the cluster: one scrape per pod that serves metrics."""
    require_operator_binary()
    values = {**NON_DEFAULT, "cluster": {"enabled": True, "name": "knsq",
                                         "spec": {"metrics": {"serviceMonitor": {"enabled": True}}, "admin": {}}}}
    chart = objects(render(values))
    cluster = next(o for o in chart if o["kind"] == "NSQCluster")
    cluster["metadata"]["namespace"] = NAMESPACE
    children = operator_render(cluster)
    everything = chart + children
    monitors = [o for o in everything if o["kind"] == "ServiceMonitor"]
    services = [o for o in everything if o["kind"] == "Service"]
    assert len(monitors) == 2
    pods = [(o["metadata"]["name"], o["spec"]["template"]["metadata"]["labels"])
            for o in everything if o["kind"] in ("Deployment", "StatefulSet")]
    scraped = {}
    for name, labels in pods:
        scraped[name] = [
            (m["metadata"]["name"], s["metadata"]["name"])
            for m in monitors for s in services
            if selects(m["spec"]["selector"], s["metadata"].get("labels", {}))
            and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
            and any(p["name"] == e["port"] for p in s["spec"]["ports"] for e in m["spec"]["endpoints"])
        ]
    assert scraped == {
        "knsq": [("knsq", "knsq-metrics")],
        "knsq-lookupd": [("knsq", "knsq-lookupd-headless")],
        "knsq-broker": [("knsq", "knsq-broker-headless")],
        "knsq-admin": [],
    }, scraped
    operator_monitor = next(m for m in monitors if m["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "Helm")
    assert operator_monitor["spec"]["endpoints"][0]["honorLabels"] is True


def operator_binary() -> pathlib.Path:
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "knsq-operator"


def test_deployment_flags_exist_in_the_binary():
    require_operator_binary()
    binary = operator_binary()
    usage = subprocess.run([binary, "--help"], check=True, capture_output=True, text=True).stdout
    for values in ({}, NON_DEFAULT):
        container = by_kind(objects(render(values)))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
        for arg in container["args"]:
            flag = arg.split("=", 1)[0]
            assert f"{flag} <" in usage, f"{flag} is not a knsq-operator flag"
    crd_out = subprocess.run([binary, "crd"], check=True, capture_output=True, text=True).stdout
    assert crd_out == CRD.read_text()
