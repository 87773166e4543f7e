//! A stand-in for the kubelet, for end-to-end tests on a real API server and controller
//! manager: it binds the Pods of one namespace to its node and runs each Pod's containers as
//! local processes with exactly the command, arguments and environment of the Pod spec
//! (downward API, ConfigMap and Secret references resolved, `$(VAR)` expanded, the image's
//! entrypoint when the spec has no command).
//!
//! - [`network`]: each pod in its own network namespace on a bridge, with an address of its
//!   own and its DNS names in a shared hosts file;
//! - [`runtime`]: the container's root (host programs, the image's files, the pod's volumes at
//!   the paths its spec names), user and hostname, through `nsenter`, `unshare` and `chroot`;
//! - [`env`]: the container's environment and command line;
//! - [`probe`]: startup, readiness and liveness probes;
//! - `pod`: one pod's life — volumes (a directory per claim, kept across pods; one per
//!   emptyDir), init containers, restarts by policy, status written back, and deletion under the
//!   grace period (preStop, SIGTERM, SIGKILL) before the final delete.
//!
//! What it leaves out: images are a fixed table of this workspace's binaries, HTTPS probes, and
//! volumes other than claims and emptyDirs (a pod needing them stays `ContainerCreating`,
//! saying why).

pub mod env;
pub mod network;
mod pod;
pub mod probe;
pub mod runtime;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use runtime::Image;

use network::Network;
use pod::Node;

/// What a stand-in runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The namespace whose Pods it runs.
    pub namespace: String,
    /// The node it binds them to.
    pub node: String,
    /// Its pods get the addresses `127.1.<subnet>.0/24`.
    pub subnet: u8,
    /// Where the pods' roots, logs and volumes live.
    pub dir: PathBuf,
    /// The hosts file shared with the test process.
    pub hosts: PathBuf,
    /// Images it can run, by repository (`knsq/knsq-broker`, any tag).
    pub images: BTreeMap<String, Image>,
}

/// A running stand-in.
pub struct Kubelet {
    node: Arc<Node>,
    task: JoinHandle<()>,
}

impl Kubelet {
    pub async fn start(client: Client, config: Config) -> Result<Kubelet> {
        std::fs::create_dir_all(&config.dir)?;
        let network = Network::new(config.subnet, &config.hosts).await?;
        let resolv = runtime::resolver_file(&config.dir)?;
        let node = Arc::new(Node {
            client: client.clone(),
            name: config.node.clone(),
            network,
            images: config.images,
            dir: config.dir,
            resolv,
            stop: CancellationToken::new(),
        });
        let api: Api<Pod> = Api::namespaced(client, &config.namespace);
        let task = tokio::spawn(watch_pods(node.clone(), api));
        Ok(Kubelet { node, task })
    }

    /// A container's log (stdout and stderr of every run), for a test's failure message.
    pub fn log(&self, pod_uid: &str, container: &str) -> String {
        let path = self
            .node
            .dir
            .join("pods")
            .join(pod_uid)
            .join(format!("{container}.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Every container log of the pods that ran, newest last, for a test's failure message.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        let Ok(pods) = std::fs::read_dir(self.node.dir.join("pods")) else {
            return out;
        };
        let mut entries: Vec<_> = pods.flatten().collect();
        entries.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
        for pod in entries {
            let Ok(files) = std::fs::read_dir(pod.path()) else {
                continue;
            };
            for file in files.flatten() {
                if file.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(file.path()).unwrap_or_default();
                    out.push_str(&format!("==> {} <==\n{text}\n", file.path().display()));
                }
            }
        }
        out
    }

    /// Kill every container (SIGKILL) and stop watching; the pods are left as they are.
    pub async fn stop(self) {
        self.node.stop.cancel();
        // The watch ends, and waits for the workers to kill their containers.
        let _ = self.task.await;
    }
}

/// Hand each pod of the namespace to a worker of its own, keyed by uid.
async fn watch_pods(node: Arc<Node>, api: Api<Pod>) {
    let mut workers: BTreeMap<String, (watch::Sender<Option<Pod>>, JoinHandle<()>)> =
        BTreeMap::new();
    let mut relisted: Option<Vec<String>> = None;
    let events = watcher(api, watcher::Config::default());
    futures::pin_mut!(events);
    loop {
        let event = tokio::select! {
            () = node.stop.cancelled() => break,
            event = events.next() => event,
        };
        let Some(event) = event else { break };
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "watching pods");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        match event {
            watcher::Event::Init => relisted = Some(Vec::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let uid = pod.uid().unwrap_or_default();
                if let Some(seen) = relisted.as_mut() {
                    seen.push(uid.clone());
                }
                let ours = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .is_none_or(|n| n == node.name);
                if !ours {
                    continue;
                }
                match workers.get(&uid) {
                    Some((updates, _)) => {
                        let _ = updates.send(Some(pod));
                    }
                    None => {
                        let (updates, receiver) = watch::channel(Some(pod));
                        let worker = tokio::spawn(pod::run(node.clone(), receiver));
                        workers.insert(uid, (updates, worker));
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((updates, _)) = workers.get(&pod.uid().unwrap_or_default()) {
                    let _ = updates.send(None);
                }
            }
            watcher::Event::InitDone => {
                // Pods gone while the watch was down are gone for their workers too.
                let seen = relisted.take().unwrap_or_default();
                for (uid, (updates, _)) in &workers {
                    if !seen.contains(uid) {
                        let _ = updates.send(None);
                    }
                }
            }
        }
        workers.retain(|_, (_, worker)| !worker.is_finished());
    }
    for (_, (updates, worker)) in workers {
        drop(updates);
        let _ = worker.await;
    }
}
