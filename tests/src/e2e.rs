//! The operator's end-to-end harness: one test's world on the API server and controller manager
//! that `scripts/test-operator.sh --e2e` starts in a private network namespace — a namespace of
//! its own, the kubelet stand-in running its pods, the real `knsq-operator` binary with only the
//! chart's permissions — and NSQ clients that find brokers the way consumers do, through a
//! lookupd, by the names brokers register.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use operator::crd::NSQCluster;
use proto::wire::{Command as Nsq, Frame, Name};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::crash::{Ledger, SharedLedger, body};
use crate::kubelet::{self, Image, Kubelet};
use crate::{NsqConn, binary_path, http_request};

/// How long a test waits for the cluster to get somewhere (pods starting, a roll, a drain).
pub const PATIENCE: Duration = Duration::from_secs(180);
/// The images the stand-in runs: this workspace's binaries, as the Dockerfile lays them out.
pub const BROKER_IMAGE: &str = "knsq/knsq-broker";
pub const LOOKUPD_IMAGE: &str = "knsq/knsq-lookupd";

fn env_path(name: &str) -> Result<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).ok_or_else(|| {
        anyhow!("{name} is not set: run these tests through `scripts/test-operator.sh --e2e`")
    })
}

async fn client(kubeconfig: &Path, context: &str) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let options = KubeConfigOptions {
        context: Some(context.to_owned()),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &options).await?;
    Ok(Client::try_from(config)?)
}

/// Poll `check` every 200 ms until it yields a value; fail after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One test's namespace, with its kubelet stand-in and operator.
pub struct Cluster {
    pub admin: Client,
    pub namespace: String,
    dir: PathBuf,
    kubelet: Option<Kubelet>,
    operator: Child,
    operator_log: PathBuf,
}

impl Cluster {
    /// A fresh namespace `e2e-<name>` whose pods get addresses in `127.1.<subnet>.0/24`.
    pub async fn start(name: &str, subnet: u8) -> Result<Cluster> {
        let kubeconfig = env_path("KNSQ_TEST_KUBECONFIG")?;
        let hosts = env_path("KNSQ_E2E_HOSTS")?;
        let dir = env_path("KNSQ_E2E_DIR")?.join(name);
        std::fs::create_dir_all(&dir)?;
        let admin = client(&kubeconfig, "admin").await?;
        operator::crd::apply_definition(&admin)
            .await
            .context("installing the CRD")?;
        let clusters: Api<NSQCluster> = Api::all(admin.clone());
        eventually("the NSQCluster resource served", PATIENCE, || async {
            clusters.list(&ListParams::default()).await.ok().map(drop)
        })
        .await?;
        let namespace = format!("e2e-{name}");
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}}))?,
            )
            .await
            .with_context(|| format!("creating namespace {namespace}"))?;
        grant_operator_rules(&admin, &namespace).await?;

        let images = [
            (
                BROKER_IMAGE,
                "knsq-broker",
                vec!["--data-path=/data".to_owned()],
            ),
            (LOOKUPD_IMAGE, "knsq-lookupd", Vec::new()),
        ]
        .into_iter()
        .map(|(repository, binary, command)| {
            let path = format!("/usr/local/bin/{binary}");
            (
                repository.to_owned(),
                Image {
                    files: vec![(binary_path(binary), path.clone())],
                    entrypoint: vec![path],
                    command,
                    user: Some((65532, 65532)),
                },
            )
        })
        .collect();
        let kubelet = Kubelet::start(
            admin.clone(),
            kubelet::Config {
                namespace: namespace.clone(),
                node: "knsq-e2e".to_owned(),
                subnet,
                dir: dir.join("node"),
                hosts,
                images,
            },
        )
        .await?;

        // The operator as its own user, holding only the chart's rules in this namespace.
        let text = std::fs::read_to_string(&kubeconfig)?;
        let operator_kubeconfig = dir.join("operator.kubeconfig");
        std::fs::write(
            &operator_kubeconfig,
            text.replace("current-context: admin", "current-context: operator"),
        )?;
        let operator_log = dir.join("operator.log");
        let log = std::fs::File::create(&operator_log)?;
        let operator = Command::new(binary_path("knsq-operator"))
            .args([
                "--namespace",
                &namespace,
                "--leader-elect=false",
                "--http-address=127.0.0.1:0",
                &format!("--broker-image={BROKER_IMAGE}:e2e-1"),
                &format!("--lookupd-image={LOOKUPD_IMAGE}:e2e-1"),
            ])
            .env("KUBECONFIG", &operator_kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting knsq-operator")?;
        Ok(Cluster {
            admin,
            namespace,
            dir,
            kubelet: Some(kubelet),
            operator,
            operator_log,
        })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.admin.clone(), &self.namespace)
    }

    /// Create NSQCluster `name` with `spec` (JSON, the CRD's defaults fill the rest).
    pub async fn create(&self, name: &str, spec: Value) -> Result<()> {
        let cluster: NSQCluster = serde_json::from_value(json!({
            "apiVersion": "knsq.io/v1alpha1", "kind": "NSQCluster",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        self.api::<NSQCluster>()
            .create(&PostParams::default(), &cluster)
            .await?;
        Ok(())
    }

    /// Merge `patch` into NSQCluster `name`.
    pub async fn patch(&self, name: &str, patch: Value) -> Result<()> {
        self.api::<NSQCluster>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    pub async fn cluster(&self, name: &str) -> Option<NSQCluster> {
        self.api::<NSQCluster>().get_opt(name).await.ok().flatten()
    }

    /// A condition of NSQCluster `name`: (status, reason, message).
    pub async fn condition(&self, name: &str, type_: &str) -> Option<(String, String, String)> {
        let cluster = self.cluster(name).await?;
        cluster
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason, c.message))
    }

    /// Wait until NSQCluster `name` is Ready for its current generation.
    pub async fn ready(&self, name: &str) -> Result<()> {
        eventually(&format!("{name} Ready"), PATIENCE, || async {
            let cluster = self.cluster(name).await?;
            let status = cluster.status.as_ref()?;
            let current = status.observed_generation == cluster.metadata.generation;
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (current && ready).then_some(())
        })
        .await
    }

    /// The pods of a component (`broker`, `lookupd`, `handoff`) of NSQCluster `name`.
    pub async fn pods(&self, name: &str, component: &str) -> Vec<Pod> {
        let selector =
            format!("app.kubernetes.io/instance={name},app.kubernetes.io/component={component}");
        self.api::<Pod>()
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// The events about NSQCluster `name`, oldest first.
    async fn events_about(&self, name: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
        let events: Api<k8s_openapi::api::events::v1::Event> = self.api();
        let mut list: Vec<_> = events
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        list.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
        list
    }

    /// Reasons and notes of the events about NSQCluster `name`, oldest first.
    pub async fn events(&self, name: &str) -> Vec<(String, String)> {
        self.events_about(name)
            .await
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// How many times an event of `reason` was recorded about NSQCluster `name`: repeats of
    /// one reason are one Event object with a series count.
    pub async fn event_count(&self, name: &str, reason: &str) -> i32 {
        self.events_about(name)
            .await
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.series.map_or(1, |s| s.count))
            .sum()
    }

    /// The stable DNS name of pod `ordinal` of component `component` of NSQCluster `name`.
    pub fn host(&self, name: &str, component: &str, ordinal: i32) -> String {
        format!(
            "{name}-{component}-{ordinal}.{name}-{component}-headless.{}.svc",
            self.namespace
        )
    }

    /// What to print when a test fails: the operator's log, every container's log, the events.
    pub async fn diagnostics(&self) -> String {
        let operator = std::fs::read_to_string(&self.operator_log).unwrap_or_default();
        let containers = self
            .kubelet
            .as_ref()
            .map(Kubelet::all_logs)
            .unwrap_or_default();
        format!(
            "==> operator <==\n{operator}\n{containers}\n==> files <==\n{}",
            self.dir.display()
        )
    }

    /// Stop the operator and every pod process.
    pub async fn stop(mut self) {
        let _ = self.operator.kill();
        let _ = self.operator.wait();
        if let Some(kubelet) = self.kubelet.take() {
            kubelet.stop().await;
        }
    }

    /// Run a scenario; on failure, print what explains it before failing.
    pub async fn run<F, Fut>(self, scenario: F) -> Result<()>
    where
        F: FnOnce(Arc<Cluster>) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let cluster = Arc::new(self);
        let result = scenario(cluster.clone()).await;
        if let Err(e) = &result {
            eprintln!("{e:#}\n{}", cluster.diagnostics().await);
        }
        match Arc::try_unwrap(cluster) {
            Ok(cluster) => cluster.stop().await,
            Err(_) => eprintln!("the scenario kept the cluster; its processes die with the test"),
        }
        result
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.operator.kill();
    }
}

/// Bind the chart's operator rules, as a Role in `namespace`, to the operator's user.
async fn grant_operator_rules(admin: &Client, namespace: &str) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?;
    let text = std::fs::read_to_string(root.join("charts/knsq/files/operator-rules.yaml"))?;
    let rules: Vec<PolicyRule> = serde_saphyr::from_str(&text)?;
    let role = Role {
        metadata: kube::api::ObjectMeta {
            name: Some("knsq-operator".to_owned()),
            ..Default::default()
        },
        rules: Some(rules),
    };
    Api::<Role>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &role)
        .await?;
    let binding = RoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some("knsq-operator".to_owned()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: "knsq-operator".to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "User".to_owned(),
            name: "knsq-operator".to_owned(),
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// `host:port` to an address, through the hosts file the stand-in keeps.
pub async fn resolve(host_port: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .ok_or_else(|| anyhow!("{host_port} has no address"))
}

/// An HTTP request to `host:port`; (status, body).
pub async fn http(host_port: &str, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let address = resolve(host_port).await?;
    let response = http_request(address, method, path, body).await?;
    Ok((response.status, response.text()))
}

/// `GET` of JSON that must answer 200.
pub async fn get_json(host_port: &str, path: &str) -> Result<Value> {
    let (status, body) = http(host_port, "GET", path, b"").await?;
    if status != 200 {
        bail!("GET {host_port}{path}: {status} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

fn name(text: &str) -> Result<Name> {
    Name::new(text).ok_or_else(|| anyhow!("invalid name {text:?}"))
}

/// Publish the numbered messages `numbers` to `topic` on one broker, in MPUBs of 100.
pub async fn publish(broker: &str, topic: &str, numbers: std::ops::Range<u64>) -> Result<()> {
    let mut conn = NsqConn::connect(resolve(broker).await?).await?;
    let numbers: Vec<u64> = numbers.collect();
    for chunk in numbers.chunks(100) {
        conn.send(&Nsq::Mpub {
            topic: name(topic)?,
            bodies: chunk.iter().map(|n| body(*n).into()).collect(),
        })
        .await?;
        conn.expect_response(b"OK").await?;
    }
    Ok(())
}

/// The brokers a lookupd knows for `topic`, as `host:port` of their TCP ports.
pub async fn lookup(lookupd: &str, topic: &str) -> Result<Vec<String>> {
    let (status, body) = http(lookupd, "GET", &format!("/lookup?topic={topic}"), b"").await?;
    if status == 404 {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(&body)?;
    Ok(value["producers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(format!(
                "{}:{}",
                p["broadcast_address"].as_str()?,
                p["tcp_port"]
            ))
        })
        .collect())
}

/// A consumer of one channel on every broker a lookupd lists, as NSQ's consumers work: it asks
/// the lookupd every second and connects to brokers it is not connected to.
pub struct Consumer {
    ledger: SharedLedger,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    pub fn start(lookupd: String, topic: &str, channel: &str) -> Consumer {
        let ledger = SharedLedger::default();
        let stop = CancellationToken::new();
        let (topic, channel) = (topic.to_owned(), channel.to_owned());
        let task = tokio::spawn({
            let (ledger, stop) = (ledger.clone(), stop.clone());
            async move {
                let connected: Arc<Mutex<BTreeSet<String>>> = Arc::default();
                while !stop.is_cancelled() {
                    for broker in lookup(&lookupd, &topic).await.unwrap_or_default() {
                        if !connected.lock().expect("lock").insert(broker.clone()) {
                            continue;
                        }
                        let (ledger, stop, connected) =
                            (ledger.clone(), stop.clone(), connected.clone());
                        let (topic, channel) = (topic.clone(), channel.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = consume(&broker, &topic, &channel, &ledger) => {}
                                () = stop.cancelled() => {}
                            }
                            connected.lock().expect("lock").remove(&broker);
                        });
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
        });
        Consumer { ledger, stop, task }
    }

    /// Numbers delivered so far.
    pub fn delivered(&self) -> BTreeSet<u64> {
        self.ledger
            .lock()
            .expect("ledger")
            .deliveries
            .keys()
            .copied()
            .collect()
    }

    /// Wait until every number of `wanted` was delivered.
    pub async fn wait_for(&self, wanted: &BTreeSet<u64>, limit: Duration) -> Result<()> {
        eventually(
            &format!("{} messages consumed", wanted.len()),
            limit,
            || async {
                let delivered = self.delivered();
                wanted.is_subset(&delivered).then_some(())
            },
        )
        .await
        .map_err(|e| {
            let missing = wanted.difference(&self.delivered()).count();
            anyhow!("{e}: {missing} missing")
        })
    }

    pub async fn stop(self) -> Ledger {
        self.stop.cancel();
        let _ = self.task.await;
        std::mem::take(&mut *self.ledger.lock().expect("ledger"))
    }
}

/// Consume from one broker, FINishing everything, until the connection ends.
async fn consume(broker: &str, topic: &str, channel: &str, ledger: &SharedLedger) -> Result<()> {
    let mut conn = NsqConn::connect(resolve(broker).await?).await?;
    conn.identify(&json!({"heartbeat_interval": 2000})).await?;
    conn.subscribe(topic, channel).await?;
    conn.send(&Nsq::Rdy(200)).await?;
    loop {
        match conn.next_frame_within(Duration::from_secs(10)).await? {
            Frame::Message(m) => {
                let n = ledger
                    .lock()
                    .expect("ledger")
                    .delivered(&m.body, m.attempts);
                conn.send(&Nsq::Fin(m.id)).await?;
                ledger.lock().expect("ledger").fin_sent.insert(n);
            }
            Frame::Response(r) if &r[..] == proto::wire::HEARTBEAT => conn.send(&Nsq::Nop).await?,
            other => bail!("{broker} sent {other:?}"),
        }
    }
}

/// A producer publishing numbered messages one at a time, as long as it runs, to whichever of
/// `brokers` takes them: a broker that refuses (draining) or goes away is left for the next,
/// and the message is published again. Only what a broker answered `OK` counts as acknowledged.
pub struct Producer {
    ledger: SharedLedger,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Producer {
    pub fn start(brokers: Vec<String>, topic: &str, pause: Duration) -> Producer {
        let ledger = SharedLedger::default();
        let stop = CancellationToken::new();
        let topic = topic.to_owned();
        let task = tokio::spawn({
            let (ledger, stop) = (ledger.clone(), stop.clone());
            async move {
                let mut which = 0;
                let mut conn: Option<NsqConn> = None;
                let mut next = 0u64;
                while !stop.is_cancelled() {
                    if conn.is_none() {
                        let broker = &brokers[which % brokers.len()];
                        conn = match resolve(broker).await {
                            Ok(address) => NsqConn::connect(address).await.ok(),
                            Err(_) => None,
                        };
                        if conn.is_none() {
                            which += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    let sent = match Name::new(&topic) {
                        Some(topic) => c
                            .send(&Nsq::Pub {
                                topic,
                                body: body(next).into(),
                            })
                            .await
                            .is_ok(),
                        None => false,
                    };
                    let acked = sent && c.expect_response(b"OK").await.is_ok();
                    if acked {
                        ledger.lock().expect("ledger").acked.insert(next);
                        next += 1;
                        tokio::time::sleep(pause).await;
                    } else {
                        // Refused or cut off: maybe stored, maybe not; not acknowledged.
                        conn = None;
                        which += 1;
                    }
                }
                ledger.lock().expect("ledger").next = next;
            }
        });
        Producer { ledger, stop, task }
    }

    pub fn acked(&self) -> usize {
        self.ledger.lock().expect("ledger").acked.len()
    }

    /// Stop, and the numbers acknowledged.
    pub async fn stop(self) -> BTreeSet<u64> {
        self.stop.cancel();
        let _ = self.task.await;
        self.ledger.lock().expect("ledger").acked.clone()
    }
}
