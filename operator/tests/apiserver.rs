//! The operator against a real kube-apiserver (v1.20.2, with etcd, started on loopback by
//! `scripts/test-operator.sh`). The operator authenticates as its own user, bound only to the
//! chart's ClusterRole and leader-election Role, so a missing permission fails the test.
//!
//! Ignored in the plain `cargo nextest` run (which reports it as skipped); the script runs it
//! with `KNSQ_TEST_KUBECONFIG` naming a kubeconfig with an `admin` and an `operator` context. No kubelet or controller-manager runs, so the test plays
//! their part by patching StatefulSet status itself.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use operator::children::DefaultImages;
use operator::crd::{NSQCluster, NSQClusterSpec};
use operator::leader::LeaseConfig;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const NS: &str = "knsq-test";
const OPERATOR_NS: &str = "knsq-system";
const OPERATOR_USER: &str = "knsq-operator";
const WAIT: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

async fn client(kubeconfig: &Path, context: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let options = KubeConfigOptions {
        context: Some(context.to_owned()),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

fn chart_rules(file: &str) -> Vec<PolicyRule> {
    let text = std::fs::read_to_string(repo_root().join("charts/knsq/files").join(file))
        .expect("chart RBAC rules");
    serde_saphyr::from_str(&text).expect("rules parse")
}

/// Poll `check` until it yields a value or `WAIT` passes.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get<K: Clone + DeserializeOwned + std::fmt::Debug>(api: &Api<K>, name: &str) -> Option<K> {
    api.get_opt(name).await.expect("GET")
}

/// Create `object` unless it exists: the tests share one API server, one after the other.
async fn ensure<K>(api: &Api<K>, object: &K)
where
    K: kube::Resource + Clone + serde::Serialize + DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("creating {:?}: {e}", object.meta().name),
    }
}

/// The CRD, applied as the chart's upgrade hook does (on 1.20 without its CEL rules), once
/// established.
async fn install_crd(admin: &Client) {
    operator::crd::apply_definition(admin)
        .await
        .expect("apply the CRD");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    eventually("the CRD to be established", || async {
        let crd = get(&crds, "nsqclusters.knsq.io").await?;
        let conditions = crd.status?.conditions?;
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

fn user(name: &str) -> Subject {
    Subject {
        kind: "User".to_owned(),
        name: name.to_owned(),
        api_group: Some("rbac.authorization.k8s.io".to_owned()),
        namespace: None,
    }
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: "rbac.authorization.k8s.io".to_owned(),
        kind: kind.to_owned(),
        name: name.to_owned(),
    }
}

/// A Role with the rules of a chart file, bound to `user` in `namespace`.
async fn bind_role(admin: &Client, namespace: &str, name: &str, rules_file: &str, to: &str) {
    let role = Role {
        metadata: meta(name, Some(namespace)),
        rules: Some(chart_rules(rules_file)),
    };
    ensure(&Api::<Role>::namespaced(admin.clone(), namespace), &role).await;
    let binding = RoleBinding {
        metadata: meta(name, Some(namespace)),
        role_ref: role_ref("Role", name),
        subjects: Some(vec![user(to)]),
    };
    ensure(
        &Api::<RoleBinding>::namespaced(admin.clone(), namespace),
        &binding,
    )
    .await;
}

/// A ClusterRole with the rules of a chart file, bound to `user`.
async fn bind_cluster_role(admin: &Client, name: &str, rules_file: &str, to: &str) {
    let role = ClusterRole {
        metadata: meta(name, None),
        rules: Some(chart_rules(rules_file)),
        ..ClusterRole::default()
    };
    ensure(&Api::<ClusterRole>::all(admin.clone()), &role).await;
    let binding = ClusterRoleBinding {
        metadata: meta(name, None),
        role_ref: role_ref("ClusterRole", name),
        subjects: Some(vec![user(to)]),
    };
    ensure(&Api::<ClusterRoleBinding>::all(admin.clone()), &binding).await;
}

async fn namespace(admin: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    ensure(
        &namespaces,
        &Namespace {
            metadata: meta(name, None),
            ..Namespace::default()
        },
    )
    .await;
}

/// Install the CRD, the namespaces and the chart's RBAC for the operator's user: the
/// ClusterRole, as without `operator.watchNamespace`, and the leader-election Role.
async fn install(admin: &Client) {
    install_crd(admin).await;
    for ns in [NS, OPERATOR_NS] {
        namespace(admin, ns).await;
    }
    bind_cluster_role(admin, "knsq-operator", "operator-rules.yaml", OPERATOR_USER).await;
    bind_role(
        admin,
        OPERATOR_NS,
        "knsq-operator-leader-election",
        "leader-election-rules.yaml",
        OPERATOR_USER,
    )
    .await;
}

fn meta(
    name: &str,
    namespace: Option<&str>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    }
}

/// Play the StatefulSet controller and kubelet: report every replica of the current spec ready.
async fn mark_ready(statefulsets: &Api<StatefulSet>, name: &str) {
    let sts = get(statefulsets, name).await.expect("StatefulSet exists");
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = json!({"status": {
        "observedGeneration": sts.metadata.generation,
        "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas, "currentReplicas": replicas,
        "currentRevision": "rev", "updateRevision": "rev",
    }});
    statefulsets
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("patch StatefulSet status");
}

fn container(sts: &StatefulSet) -> k8s_openapi::api::core::v1::Container {
    sts.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers[0].clone())
        .expect("container")
}

fn condition(cluster: &NSQCluster, type_: &str) -> Option<(String, String)> {
    let c = cluster
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

/// The value of an unlabelled sample in Prometheus text output.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the operator");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: operator\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("read");
    reply
}

/// The storage class claims are expanded on: the default, so claims made without one (as the
/// StatefulSet controller makes them from a template without one) get it.
async fn expandable_storage_class(admin: &Client) {
    let class: StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "expandable", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "knsq.test/none", "allowVolumeExpansion": true,
    }))
    .expect("StorageClass");
    ensure(&Api::<StorageClass>::all(admin.clone()), &class).await;
}

/// Play the StatefulSet controller and a provisioner: a bound claim of `size` for broker pod
/// `ordinal`, labelled with the StatefulSet's selector as the controller labels them.
async fn bound_claim(admin: &Client, ns: &str, cluster: &str, ordinal: i32, size: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), ns);
    let name = format!("data-{cluster}-broker-{ordinal}");
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": {
            "app.kubernetes.io/name": "knsq", "app.kubernetes.io/instance": cluster,
            "app.kubernetes.io/component": "broker"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }))
    .expect("claim");
    ensure(&claims, &claim).await;
    set_capacity(&claims, &name, size).await;
}

/// Play the volume resizer: the claim's volume now has `size`.
async fn set_capacity(claims: &Api<PersistentVolumeClaim>, name: &str, size: &str) {
    let status = json!({"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": size}}});
    claims
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("claim status");
}

fn requested(claim: &PersistentVolumeClaim) -> Option<String> {
    operator::quantity::requested_storage(claim).map(|q| q.0.clone())
}

fn storage_status(cluster: &NSQCluster) -> Option<(String, Vec<String>)> {
    let storage = cluster.status.as_ref()?.storage.as_ref()?;
    Some((storage.size.clone(), storage.resizing.clone()))
}

/// Grow the brokers' volumes of `cluster` in `ns` from 10Gi to 20Gi (claims 0 and 1 exist), and
/// watch the operator ask the claims, report them resizing, then done; shrinking is refused.
async fn grow_volumes(admin: &Client, ns: &str, cluster: &str) {
    let clusters: Api<NSQCluster> = Api::namespaced(admin.clone(), ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), ns);
    for ordinal in [0, 1] {
        bound_claim(admin, ns, cluster, ordinal, "10Gi").await;
    }
    let grow = Patch::Merge(json!({"spec": {"broker": {"storage": {"size": "20Gi"}}}}));
    clusters
        .patch(cluster, &PatchParams::default(), &grow)
        .await
        .expect("grow the volumes");
    let names = [0, 1].map(|i| format!("data-{cluster}-broker-{i}"));
    for name in &names {
        eventually("the claim asked to grow", || async {
            let claim = get(&claims, name).await?;
            (requested(&claim)? == "20Gi").then_some(())
        })
        .await;
    }
    eventually("both claims reported resizing", || async {
        let c = get(&clusters, cluster).await?;
        (storage_status(&c)? == ("20Gi".to_owned(), names.to_vec())).then_some(())
    })
    .await;
    // The claim template cannot change; the operator records the size beside it.
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), ns);
    let broker = get(&statefulsets, &format!("{cluster}-broker"))
        .await
        .expect("broker StatefulSet");
    assert_eq!(
        broker
            .annotations()
            .get("knsq.io/storage-size")
            .map(String::as_str),
        Some("20Gi")
    );
    let template = broker
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .map(|t| t[0].clone())
        .expect("claim template");
    assert_eq!(requested(&template).as_deref(), Some("10Gi"));
    for name in &names {
        set_capacity(&claims, name, "20Gi").await;
    }
    eventually("the resize reported done", || async {
        let c = get(&clusters, cluster).await?;
        (storage_status(&c)? == ("20Gi".to_owned(), Vec::new())).then_some(())
    })
    .await;
    // Shrinking: no CEL rule can see it; the operator refuses it and touches no claim.
    let shrink = Patch::Merge(json!({"spec": {"broker": {"storage": {"size": "10Gi"}}}}));
    clusters
        .patch(cluster, &PatchParams::default(), &shrink)
        .await
        .expect("the API server takes it");
    let refused = eventually("the shrink refused", || async {
        let c = get(&clusters, cluster).await?;
        let degraded = c
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.reason == "InvalidSpec")?
            .message
            .clone();
        Some(degraded)
    })
    .await;
    assert!(
        refused.starts_with("spec.broker.storage.size: volumes only grow"),
        "{refused}"
    );
    clusters
        .patch(cluster, &PatchParams::default(), &grow)
        .await
        .expect("back to 20Gi");
    eventually("Degraded cleared", || async {
        let c = get(&clusters, cluster).await?;
        (condition(&c, "Degraded")?.0 == "False").then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: scripts/test-operator.sh starts them and runs this test"]
async fn operator_runs_a_cluster_on_a_real_api_server() {
    let kubeconfig = std::env::var_os("KNSQ_TEST_KUBECONFIG")
        .expect("KNSQ_TEST_KUBECONFIG names the test API server's kubeconfig (see scripts/test-operator.sh)");
    let kubeconfig = PathBuf::from(kubeconfig);
    let admin = client(&kubeconfig, "admin").await;
    install(&admin).await;

    // The operator, as its own user with only the chart's permissions.
    let leader = Replica::start(
        &kubeconfig,
        "operator",
        "operator-test-0",
        None,
        OPERATOR_NS,
    )
    .await;
    eventually("the first replica to lead", || async {
        let metrics = http_get(leader.http, "/metrics").await;
        (sample(&metrics, "knsq_operator_leader") == Some(1.0)).then_some(())
    })
    .await;
    // A second replica waits for the Lease instead of reconciling beside the leader.
    let standby = Replica::start(
        &kubeconfig,
        "operator",
        "operator-test-1",
        None,
        OPERATOR_NS,
    )
    .await;

    // Create a cluster.
    let clusters: Api<NSQCluster> = Api::namespaced(admin.clone(), NS);
    let mut spec = NSQClusterSpec::default();
    spec.broker.replicas = 2;
    spec.lookupd.replicas = 1;
    clusters
        .create(&PostParams::default(), &NSQCluster::new("events", spec))
        .await
        .expect("create NSQCluster");

    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NS);
    let broker = eventually("the broker StatefulSet", || {
        get(&statefulsets, "events-broker")
    })
    .await;
    let lookupd = eventually("the lookupd StatefulSet", || {
        get(&statefulsets, "events-lookupd")
    })
    .await;
    assert_eq!(broker.spec.as_ref().and_then(|s| s.replicas), Some(2));
    assert_eq!(lookupd.spec.as_ref().and_then(|s| s.replicas), Some(1));
    let owner = &broker.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("NSQCluster", "events", Some(true))
    );
    // The lookupd list reaches the brokers through the ConfigMap, outside their template.
    let env = container(&broker).env.expect("env");
    assert!(
        env.iter().any(|e| e.name == "KNSQ_LOOKUPD_GRPC_ADDRESSES"
            && e.value_from
                .as_ref()
                .and_then(|v| v.config_map_key_ref.as_ref())
                .is_some_and(|r| r.name == "events-config")),
        "{env:?}"
    );
    assert!(
        broker
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.as_ref())
            .is_some_and(|v| v.len() == 1)
    );

    let services: Api<Service> = Api::namespaced(admin.clone(), NS);
    for name in [
        "events-broker",
        "events-broker-headless",
        "events-lookupd",
        "events-lookupd-headless",
    ] {
        let svc = eventually(name, || get(&services, name)).await;
        for port in svc.spec.and_then(|s| s.ports).expect("ports") {
            assert_eq!(port.protocol.as_deref(), Some("TCP"));
            assert!(
                port.app_protocol.is_some(),
                "{name} port {:?} names its protocol",
                port.name
            );
        }
    }
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let config = eventually("the ConfigMap", || get(&configmaps, "events-config")).await;
    let data = config.data.expect("data");
    assert_eq!(data["BROKER_MEM_QUEUE_SIZE"], "10000");
    assert_eq!(
        data["KNSQ_LOOKUPD_GRPC_ADDRESSES"],
        "events-lookupd-0.events-lookupd-headless.knsq-test.svc:4160"
    );
    // 1.20 serves PodDisruptionBudgets only as policy/v1beta1: the operator must have noticed.
    let pdb_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    let pdbs: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &pdb_resource);
    for name in ["events-broker", "events-lookupd"] {
        let pdb = eventually(name, || async {
            pdbs.get_opt(name).await.expect("GET PDB")
        })
        .await;
        assert_eq!(pdb.data["spec"]["maxUnavailable"], 1);
    }

    // Status while nothing runs, then with every pod ready.
    let cluster = eventually("a first status", || async {
        let c = get(&clusters, "events").await?;
        (c.status.as_ref()?.observed_generation == Some(1)).then_some(c)
    })
    .await;
    assert_eq!(
        condition(&cluster, "Ready"),
        Some(("False".to_owned(), "ReplicasNotReady".to_owned()))
    );
    assert_eq!(
        cluster
            .status
            .as_ref()
            .and_then(|s| s.endpoints.as_ref())
            .map(|e| e.broker_tcp.as_str()),
        Some("events-broker.knsq-test.svc:4150")
    );
    mark_ready(&statefulsets, "events-lookupd").await;
    mark_ready(&statefulsets, "events-broker").await;
    let ready = eventually("Ready=True", || async {
        let c = get(&clusters, "events").await?;
        (condition(&c, "Ready")? == ("True".to_owned(), "AllReplicasReady".to_owned())).then_some(c)
    })
    .await;
    assert_eq!(
        ready.status.as_ref().map(|s| s.broker.ready_replicas),
        Some(2)
    );

    // Scale up the brokers.
    let patch = Patch::Merge(json!({"spec": {"broker": {"replicas": 4}}}));
    clusters
        .patch("events", &PatchParams::default(), &patch)
        .await
        .expect("scale");
    eventually("4 broker replicas", || async {
        let sts = get(&statefulsets, "events-broker").await?;
        (sts.spec?.replicas == Some(4)).then_some(())
    })
    .await;
    eventually("Ready=False while scaling", || async {
        let c = get(&clusters, "events").await?;
        (c.status.as_ref()?.observed_generation == Some(2) && condition(&c, "Ready")?.0 == "False")
            .then_some(())
    })
    .await;

    // Change the broker image.
    let patch = Patch::Merge(json!({"spec": {"broker": {"image": "knsq/knsq-broker:next"}}}));
    clusters
        .patch("events", &PatchParams::default(), &patch)
        .await
        .expect("image change");
    eventually("the new image", || async {
        let sts = get(&statefulsets, "events-broker").await?;
        (container(&sts).image.as_deref() == Some("knsq/knsq-broker:next")).then_some(())
    })
    .await;

    // Turning the lookupd PodDisruptionBudget off deletes it.
    let patch = Patch::Merge(json!({"spec": {"lookupd": {"pdb": {"enabled": false}}}}));
    clusters
        .patch("events", &PatchParams::default(), &patch)
        .await
        .expect("disable the PDB");
    eventually("the lookupd PDB to go", || async {
        pdbs.get_opt("events-lookupd")
            .await
            .expect("GET PDB")
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        pdbs.get_opt("events-broker")
            .await
            .expect("GET PDB")
            .is_some()
    );

    // Turning TLS on: the API server takes the pods' Secret volumes, HTTPS port and probes.
    let patch = Patch::Merge(json!({"spec": {
        "broker": {"tls": {"secretName": "events-tls", "required": "true", "clientAuthPolicy": "require", "minVersion": "tls1.3"}},
        "clusterTls": {"secretName": "events-cluster-tls"},
    }}));
    clusters
        .patch("events", &PatchParams::default(), &patch)
        .await
        .expect("turn TLS on");
    let broker = eventually("the brokers' TLS volumes", || async {
        let sts = get(&statefulsets, "events-broker").await?;
        let volumes = sts.spec.as_ref()?.template.spec.as_ref()?.volumes.clone()?;
        (volumes.len() == 2).then_some(sts)
    })
    .await;
    let c = container(&broker);
    assert!(
        c.ports
            .as_ref()
            .expect("ports")
            .iter()
            .any(|p| p.name.as_deref() == Some("https") && p.container_port == 4152)
    );
    assert!(c.readiness_probe.and_then(|p| p.tcp_socket).is_some());
    let lookupd = eventually("the lookupds' TLS volume", || async {
        let sts = get(&statefulsets, "events-lookupd").await?;
        sts.spec
            .as_ref()?
            .template
            .spec
            .as_ref()?
            .volumes
            .as_ref()?;
        Some(sts)
    })
    .await;
    assert!(
        container(&lookupd)
            .args
            .expect("args")
            .contains(&"--grpc-tls-client-ca-file=/etc/knsq/cluster-tls/ca.crt".to_owned())
    );
    let https = eventually("the broker Service's https port", || async {
        let svc = get(&services, "events-broker").await?;
        svc.spec?
            .ports?
            .into_iter()
            .find(|p| p.name.as_deref() == Some("https"))
    })
    .await;
    assert_eq!(
        (https.port, https.app_protocol.as_deref()),
        (4152, Some("https"))
    );

    // Node ids from the pod name's ordinal: no pod-index label, which 1.20 does not set.
    assert!(
        container(&broker)
            .args
            .expect("args")
            .contains(&"--node-id=$(POD_NAME)".to_owned())
    );

    // A spec only a CEL rule refuses: 1.20 runs no CEL and takes it; the operator refuses it,
    // naming the field, and applies nothing.
    let bad = Patch::Merge(
        json!({"spec": {"broker": {"settings": {"maxMsgSize": 2048, "maxBodySize": 1024}}}}),
    );
    clusters
        .patch("events", &PatchParams::default(), &bad)
        .await
        .expect("1.20 has no CEL to refuse it");
    let refused = eventually("Degraded/InvalidSpec", || async {
        let c = get(&clusters, "events").await?;
        let d = c
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")?
            .clone();
        (d.reason == "InvalidSpec").then_some(d.message)
    })
    .await;
    assert_eq!(
        refused,
        "spec.broker.settings.maxBodySize: maxBodySize must be at least maxMsgSize"
    );
    let config = get(&configmaps, "events-config").await.expect("ConfigMap");
    assert_eq!(
        config.data.expect("data")["BROKER_MAX_MSG_SIZE"],
        "1048576",
        "nothing applied"
    );
    let fixed = Patch::Merge(json!({"spec": {"broker": {"settings": {"maxMsgSize": 1024}}}}));
    clusters
        .patch("events", &PatchParams::default(), &fixed)
        .await
        .expect("fix it");
    eventually("the fixed spec applied", || async {
        let config = get(&configmaps, "events-config").await?;
        (config.data?["BROKER_MAX_MSG_SIZE"] == "1024").then_some(())
    })
    .await;

    // The brokers' volumes grow.
    expandable_storage_class(&admin).await;
    grow_volumes(&admin, NS, "events").await;

    // nsqadmin on, with an Ingress, then off.
    let with_admin =
        Patch::Merge(json!({"spec": {"admin": {"ingress": {"host": "nsq.example.com"}}}}));
    clusters
        .patch("events", &PatchParams::default(), &with_admin)
        .await
        .expect("nsqadmin on");
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let ingresses: Api<Ingress> = Api::namespaced(admin.clone(), NS);
    let nsqadmin = eventually("nsqadmin's Deployment", || {
        get(&deployments, "events-admin")
    })
    .await;
    let c = nsqadmin
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers[0].clone())
        .expect("container");
    assert_eq!(c.image.as_deref(), Some("nsqio/nsq:v1.3.0"));
    assert_eq!(
        c.args.expect("args")[1],
        "--lookupd-http-address=events-lookupd.knsq-test.svc:4161"
    );
    eventually("nsqadmin's Service", || get(&services, "events-admin")).await;
    eventually("nsqadmin's Ingress", || get(&ingresses, "events-admin")).await;
    eventually("nsqadmin in the status", || async {
        let c = get(&clusters, "events").await?;
        let status = c.status?;
        (status.admin.is_some()
            && status.endpoints?.admin_http.as_deref()
                == Some("http://events-admin.knsq-test.svc:4171"))
        .then_some(())
    })
    .await;
    let without_admin = Patch::Merge(json!({"spec": {"admin": null}}));
    clusters
        .patch("events", &PatchParams::default(), &without_admin)
        .await
        .expect("nsqadmin off");
    eventually("nsqadmin gone", || async {
        let gone = get(&deployments, "events-admin").await.is_none()
            && get(&services, "events-admin").await.is_none()
            && get(&ingresses, "events-admin").await.is_none();
        gone.then_some(())
    })
    .await;

    // What the operator recorded.
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in [
        "Created",
        "Scaled",
        "ImageChanged",
        "InvalidSpec",
        "VolumeResizing",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event in {reasons:?}"
        );
    }
    let lease = get(
        &Api::<Lease>::namespaced(admin.clone(), OPERATOR_NS),
        "knsq-operator",
    )
    .await
    .expect("Lease");
    assert_eq!(
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("operator-test-0"),
        "{lease:?}"
    );
    let metrics = http_get(leader.http, "/metrics").await;
    assert_eq!(
        sample(&metrics, "knsq_operator_leader"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "knsq_operator_reconciles_total") > Some(0.0),
        "{metrics}"
    );
    assert!(
        !metrics.contains("knsq_operator_reconcile_errors_total{"),
        "no reconcile failed: {metrics}"
    );
    assert!(
        http_get(leader.http, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let standby_metrics = http_get(standby.http, "/metrics").await;
    assert!(
        sample(&standby_metrics, "knsq_operator_leader") == Some(0.0),
        "{standby_metrics}"
    );
    assert!(
        sample(&standby_metrics, "knsq_operator_reconciles_total") == Some(0.0),
        "the standby reconciled: {standby_metrics}"
    );

    // The schema rejects invalid clusters.
    for (spec, field) in [
        (json!({"broker": {"replicas": -1}}), "spec.broker.replicas"),
        (json!({"lookupd": {"replicas": 0}}), "spec.lookupd.replicas"),
        (
            json!({"broker": {"settings": {"msgTimeout": "soon"}}}),
            "spec.broker.settings.msgTimeout",
        ),
        (
            json!({"broker": {"tls": {"secretName": ""}}}),
            "spec.broker.tls.secretName",
        ),
        (
            json!({"broker": {"settings": {"maxDeflateLevel": 10}}}),
            "spec.broker.settings.maxDeflateLevel",
        ),
        (
            json!({"broker": {"settings": {"maxAttempts": 65536}}}),
            "spec.broker.settings.maxAttempts",
        ),
    ] {
        let invalid: NSQCluster =
            serde_json::from_value(json!({"apiVersion": "knsq.io/v1alpha1", "kind": "NSQCluster", "metadata": {"name": "bad"}, "spec": spec}))
                .expect("object");
        let error = clusters
            .create(&PostParams::default(), &invalid)
            .await
            .expect_err("rejected");
        match error {
            kube::Error::Api(status) => {
                assert_eq!(
                    (status.code, status.reason.as_str()),
                    (422, "Invalid"),
                    "{status:?}"
                );
                assert!(status.message.contains(field), "{}", status.message);
            }
            other => panic!("expected a 422, got {other}"),
        }
    }

    // SIGTERM-equivalent: the leader stops cleanly and hands the Lease back; the standby takes
    // over at once instead of waiting for the Lease to expire.
    leader.stop().await;
    let lease_api = Api::<Lease>::namespaced(admin.clone(), OPERATOR_NS);
    let lease = eventually("the standby to take the Lease", || async {
        let lease = get(&lease_api, "knsq-operator").await?;
        let spec = lease.spec.clone()?;
        (spec.holder_identity.as_deref() == Some("operator-test-1")).then_some(spec)
    })
    .await;
    assert_eq!(lease.lease_transitions, Some(1));
    eventually("the standby to reconcile", || async {
        let metrics = http_get(standby.http, "/metrics").await;
        (sample(&metrics, "knsq_operator_leader") == Some(1.0)).then_some(())
    })
    .await;
    standby.stop().await;
}

/// `helm upgrade` to a newer chart: the CRD an older chart installed lacks a field, so the API
/// server prunes it from new specs; the pre-upgrade hook's `knsq-operator crd --apply`, as the
/// hook's ServiceAccount would run it (only the chart's hook rules bound), brings the CRD up to
/// date, and the field is kept.
#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: scripts/test-operator.sh starts them and runs this test"]
async fn crd_upgrade_hook_adds_the_new_fields() {
    let kubeconfig = std::env::var_os("KNSQ_TEST_KUBECONFIG")
        .expect("KNSQ_TEST_KUBECONFIG names the test API server's kubeconfig (see scripts/test-operator.sh)");
    let admin = client(Path::new(&kubeconfig), "admin").await;
    install_crd(&admin).await;
    let ns = "knsq-upgrade-test";
    namespace(&admin, ns).await;

    // The older chart's CRD: no spec.admin.
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let mut old = get(&crds, "nsqclusters.knsq.io").await.expect("CRD");
    let spec_schema = old.spec.versions[0]
        .schema
        .as_mut()
        .and_then(|s| s.open_api_v3_schema.as_mut())
        .and_then(|s| s.properties.as_mut())
        .and_then(|p| p.get_mut("spec"))
        .and_then(|s| s.properties.as_mut())
        .expect("spec properties");
    assert!(spec_schema.remove("admin").is_some());
    crds.replace("nsqclusters.knsq.io", &PostParams::default(), &old)
        .await
        .expect("install the older CRD");
    let clusters: Api<NSQCluster> = Api::namespaced(admin.clone(), ns);
    let with_admin: NSQCluster = serde_json::from_value(json!({
        "apiVersion": "knsq.io/v1alpha1", "kind": "NSQCluster",
        "metadata": {"name": "upgraded"}, "spec": {"admin": {"replicas": 2}},
    }))
    .expect("cluster");
    let pruned = eventually("the older schema in force", || async {
        let created = clusters
            .create(&PostParams::default(), &with_admin)
            .await
            .ok()?;
        if created.spec.admin.is_some() {
            clusters
                .delete("upgraded", &Default::default())
                .await
                .ok()?;
            return None;
        }
        Some(created)
    })
    .await;
    assert_eq!(pruned.spec.admin, None, "the older CRD prunes spec.admin");

    bind_cluster_role(
        &admin,
        "knsq-crd-upgrade",
        "crd-upgrade-rules.yaml",
        "knsq-crd-upgrade",
    )
    .await;
    // The hook's identity: a kubeconfig whose current context is the hook's user.
    let as_hook = std::env::temp_dir().join(format!(
        "knsq-crd-upgrade-{}.kubeconfig",
        std::process::id()
    ));
    let text = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
    std::fs::write(
        &as_hook,
        text.replace("current-context: admin", "current-context: crd-upgrade"),
    )
    .expect("write kubeconfig");
    let hook = std::process::Command::new(env!("CARGO_BIN_EXE_knsq-operator"))
        .args(["crd", "--apply"])
        .env("KUBECONFIG", &as_hook)
        .output()
        .expect("run knsq-operator crd --apply");
    let _ = std::fs::remove_file(&as_hook);
    let said =
        String::from_utf8_lossy(&hook.stdout).into_owned() + &String::from_utf8_lossy(&hook.stderr);
    assert!(hook.status.success(), "{said}");
    assert!(said.starts_with("applied the NSQCluster CRD"), "{said}");
    let current = get(&crds, "nsqclusters.knsq.io").await.expect("CRD");
    let managers: Vec<String> = current
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"knsq-crd".to_owned()), "{managers:?}");

    let patch = Patch::Merge(json!({"spec": {"admin": {"replicas": 2}}}));
    let kept = eventually("spec.admin kept", || async {
        let c = clusters
            .patch("upgraded", &PatchParams::default(), &patch)
            .await
            .ok()?;
        c.spec.admin
    })
    .await;
    assert_eq!(kept.replicas, 2);
    clusters
        .delete("upgraded", &Default::default())
        .await
        .expect("clean up");
}

/// `operator.watchNamespace`: the operator holds the chart's rules through a Role in the one
/// namespace it watches (and the Lease's Role), nothing cluster-wide, and still runs a cluster:
/// StatefulSets, claims to grow, nsqadmin, events and status.
#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: scripts/test-operator.sh starts them and runs this test"]
async fn operator_works_with_only_namespaced_roles() {
    let kubeconfig = std::env::var_os("KNSQ_TEST_KUBECONFIG")
        .expect("KNSQ_TEST_KUBECONFIG names the test API server's kubeconfig (see scripts/test-operator.sh)");
    let kubeconfig = PathBuf::from(kubeconfig);
    let admin = client(&kubeconfig, "admin").await;
    install_crd(&admin).await;
    let (watched, home) = ("knsq-watched", "knsq-ns-system");
    for ns in [watched, home] {
        namespace(&admin, ns).await;
    }
    bind_role(
        &admin,
        watched,
        "knsq-operator",
        "operator-rules.yaml",
        "knsq-operator-ns",
    )
    .await;
    bind_role(
        &admin,
        home,
        "knsq-operator-leader-election",
        "leader-election-rules.yaml",
        "knsq-operator-ns",
    )
    .await;

    // Nothing beyond the namespace: not the cluster-wide list, not another namespace.
    let own = client(&kubeconfig, "operator-ns").await;
    for api in [
        Api::<NSQCluster>::all(own.clone()),
        Api::<NSQCluster>::namespaced(own.clone(), NS),
    ] {
        match api.list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("expected 403, got {other:?}"),
        }
    }

    let replica = Replica::start(
        &kubeconfig,
        "operator-ns",
        "operator-ns-0",
        Some(watched),
        home,
    )
    .await;
    let clusters: Api<NSQCluster> = Api::namespaced(admin.clone(), watched);
    let spec: NSQClusterSpec = serde_json::from_value(json!({
        "broker": {"replicas": 2}, "lookupd": {"replicas": 1}, "admin": {},
    }))
    .expect("spec");
    clusters
        .create(&PostParams::default(), &NSQCluster::new("scoped", spec))
        .await
        .expect("create NSQCluster");
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), watched);
    for name in ["scoped-lookupd", "scoped-broker"] {
        eventually(name, || get(&statefulsets, name)).await;
        mark_ready(&statefulsets, name).await;
    }
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), watched);
    eventually("nsqadmin", || get(&deployments, "scoped-admin")).await;
    eventually("Ready=True", || async {
        let c = get(&clusters, "scoped").await?;
        (condition(&c, "Ready")?.0 == "True").then_some(())
    })
    .await;
    expandable_storage_class(&admin).await;
    grow_volumes(&admin, watched, "scoped").await;
    let metrics = http_get(replica.http, "/metrics").await;
    assert!(
        !metrics.contains("knsq_operator_reconcile_errors_total{"),
        "a permission was missing: {metrics}"
    );
    assert!(
        metrics.lines().any(|l| l
            == r#"knsq_operator_cluster_condition{condition="Ready",namespace="knsq-watched",nsqcluster="scoped"} 1"#),
        "{metrics}"
    );
    replica.stop().await;
}

/// One operator replica running in this process.
struct Replica {
    http: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), operator::Error>>,
}

impl Replica {
    /// A replica authenticated as the kubeconfig's `context`, watching `namespace` (every one
    /// when `None`), with its Lease in `lease_namespace`.
    async fn start(
        kubeconfig: &Path,
        context: &str,
        identity: &str,
        namespace: Option<&str>,
        lease_namespace: &str,
    ) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let settings = operator::Settings {
            namespace: namespace.map(str::to_owned),
            images: DefaultImages {
                broker: "knsq/knsq-broker:test".to_owned(),
                lookupd: "knsq/knsq-lookupd:test".to_owned(),
            },
            leader_election: Some(LeaseConfig {
                name: "knsq-operator".to_owned(),
                namespace: lease_namespace.to_owned(),
                identity: identity.to_owned(),
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(1),
            }),
        };
        let client = client(kubeconfig, context).await;
        let task = tokio::spawn(operator::run(client, settings, listener, shutdown.clone()));
        Replica {
            http,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("stopped in time")
            .expect("task")
            .expect("clean shutdown");
    }
}

/// The `knsq-operator` binary: it leads, serves its probes, and on SIGTERM finishes, releases
/// its Lease and exits 0. It watches only a namespace of its own, so it leaves the other test's
/// cluster alone.
#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: scripts/test-operator.sh starts them and runs this test"]
async fn binary_stops_cleanly_on_sigterm() {
    let kubeconfig = std::env::var_os("KNSQ_TEST_KUBECONFIG")
        .expect("KNSQ_TEST_KUBECONFIG names the test API server's kubeconfig (see scripts/test-operator.sh)");
    let admin = client(Path::new(&kubeconfig), "admin").await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("address").port()
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_knsq-operator"))
        .args([
            format!("--http-address=127.0.0.1:{port}"),
            "--namespace=knsq-sigterm-test".to_owned(),
            "--lease-name=knsq-operator-sigterm".to_owned(),
            "--lease-namespace=default".to_owned(),
            "--identity=sigterm-test".to_owned(),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .spawn()
        .expect("start knsq-operator");
    let child = KillOnDrop(&mut child);
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "default");
    eventually("the binary to be ready and lead", || async {
        let ready = match tokio::net::TcpStream::connect(http).await {
            Ok(_) => http_get(http, "/readyz").await.starts_with("HTTP/1.1 200"),
            Err(_) => false,
        };
        let lease = get(&leases, "knsq-operator-sigterm").await?;
        let holder = lease.spec?.holder_identity;
        (ready && holder.as_deref() == Some("sigterm-test")).then_some(())
    })
    .await;

    let pid = child.0.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = eventually("the binary to exit", || {
        let exited = child.0.try_wait().expect("wait");
        async move { exited }
    })
    .await;
    assert!(status.success(), "exit status {status}");
    let lease = get(&leases, "knsq-operator-sigterm").await.expect("Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "released on the way out"
    );
}

/// Kills the child process if the test fails before it exits.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
