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

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, CustomResourceExt, ResourceExt};
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

/// Install the CRD, the namespaces and the chart's RBAC for the operator's user.
async fn install(admin: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    // Created, not applied: server-side apply on 1.20 refuses the CEL rules it does not know,
    // while a plain create drops them.
    crds.create(&PostParams::default(), &NSQCluster::crd())
        .await
        .expect("create CRD");
    eventually("the CRD to be established", || async {
        let crd = get(&crds, "nsqclusters.knsq.io").await?;
        let conditions = crd.status?.conditions?;
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;

    let namespaces: Api<Namespace> = Api::all(admin.clone());
    for ns in [NS, OPERATOR_NS] {
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: meta(ns, None),
                    ..Namespace::default()
                },
            )
            .await
            .expect("namespace");
    }
    let subject = Subject {
        kind: "User".to_owned(),
        name: OPERATOR_USER.to_owned(),
        api_group: Some("rbac.authorization.k8s.io".to_owned()),
        namespace: None,
    };

    let role = ClusterRole {
        metadata: meta("knsq-operator", None),
        rules: Some(chart_rules("operator-rules.yaml")),
        ..ClusterRole::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .expect("ClusterRole");
    let binding = ClusterRoleBinding {
        metadata: meta("knsq-operator", None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: "knsq-operator".to_owned(),
        },
        subjects: Some(vec![subject.clone()]),
    };
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("ClusterRoleBinding");

    let role = Role {
        metadata: meta("knsq-operator-leader-election", Some(OPERATOR_NS)),
        rules: Some(chart_rules("leader-election-rules.yaml")),
    };
    Api::<Role>::namespaced(admin.clone(), OPERATOR_NS)
        .create(&PostParams::default(), &role)
        .await
        .expect("Role");
    let binding = RoleBinding {
        metadata: meta("knsq-operator-leader-election", Some(OPERATOR_NS)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: "knsq-operator-leader-election".to_owned(),
        },
        subjects: Some(vec![subject]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), OPERATOR_NS)
        .create(&PostParams::default(), &binding)
        .await
        .expect("RoleBinding");
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

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: scripts/test-operator.sh starts them and runs this test"]
async fn operator_runs_a_cluster_on_a_real_api_server() {
    let kubeconfig = std::env::var_os("KNSQ_TEST_KUBECONFIG")
        .expect("KNSQ_TEST_KUBECONFIG names the test API server's kubeconfig (see scripts/test-operator.sh)");
    let kubeconfig = PathBuf::from(kubeconfig);
    let admin = client(&kubeconfig, "admin").await;
    install(&admin).await;

    // The operator, as its own user with only the chart's permissions.
    let leader = Replica::start(&kubeconfig, "operator-test-0").await;
    eventually("the first replica to lead", || async {
        let metrics = http_get(leader.http, "/metrics").await;
        (sample(&metrics, "knsq_operator_leader") == Some(1.0)).then_some(())
    })
    .await;
    // A second replica waits for the Lease instead of reconciling beside the leader.
    let standby = Replica::start(&kubeconfig, "operator-test-1").await;

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
    let args = container(&broker).args.expect("args");
    assert!(
        args.contains(
            &"--lookupd-grpc-address=events-lookupd-0.events-lookupd-headless.knsq-test.svc:4160"
                .to_owned()
        ),
        "{args:?}"
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
    assert_eq!(config.data.expect("data")["BROKER_MEM_QUEUE_SIZE"], "10000");
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
    for reason in ["Created", "Scaled", "ImageChanged"] {
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

/// One operator replica running in this process.
struct Replica {
    http: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), operator::Error>>,
}

impl Replica {
    async fn start(kubeconfig: &Path, identity: &str) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let settings = operator::Settings {
            namespace: None,
            images: DefaultImages {
                broker: "knsq/knsq-broker:test".to_owned(),
                lookupd: "knsq/knsq-lookupd:test".to_owned(),
            },
            leader_election: Some(LeaseConfig {
                name: "knsq-operator".to_owned(),
                namespace: OPERATOR_NS.to_owned(),
                identity: identity.to_owned(),
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(1),
            }),
        };
        let client = client(kubeconfig, "operator").await;
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
