//! One pod's life on the stand-in's node: binding, sandbox, volumes, init containers, the
//! containers with their probes and restarts, the status written back, and termination under the
//! grace period (preStop, SIGTERM, SIGKILL) ending with the pod's final deletion.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, PersistentVolumeClaim, Pod, PodCondition, PodIP,
    PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use rustix::process::Signal;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::env;
use super::network::Network;
use super::probe::{self, Tally};
use super::runtime::{self, Image, Launch, Mount};

/// What every pod worker of a stand-in shares.
pub(super) struct Node {
    pub(super) client: Client,
    pub(super) name: String,
    pub(super) network: Network,
    pub(super) images: BTreeMap<String, Image>,
    pub(super) dir: PathBuf,
    pub(super) resolv: PathBuf,
    pub(super) stop: CancellationToken,
}

/// The node's own address: the bridge's.
const HOST_IP: Ipv4Addr = super::network::GATEWAY;
/// Restart backoff: the kubelet's doubling, from 1 s to 10 s (the kubelet's runs from 10 s to
/// 5 min; shorter here so a test sees restarts within its budget).
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Something that happened to a container.
enum Event {
    Exited {
        index: usize,
        run: u64,
        code: i32,
    },
    Probe {
        index: usize,
        run: u64,
        kind: Kind,
        passing: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Startup,
    Readiness,
    Liveness,
}

/// One container of the pod.
struct Runner {
    spec: Container,
    image: Image,
    /// Counts the container's runs, so events of an earlier run are told apart.
    run: u64,
    pid: Option<u32>,
    env: Vec<(String, String)>,
    user: Option<(i64, i64)>,
    restarts: i32,
    state: ContainerState,
    last_state: Option<ContainerState>,
    started: bool,
    ready: bool,
    probes: Vec<JoinHandle<()>>,
    /// When a container waiting to restart starts again.
    restart_at: Option<Instant>,
    backoff: Duration,
    /// When the current run began.
    since: Instant,
    /// Stopped on purpose (termination): no restart.
    stopping: bool,
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message,
        }),
        ..ContainerState::default()
    }
}

fn terminated(code: i32, started: Option<Time>) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.to_owned()),
            started_at: started,
            finished_at: Some(now()),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    }
}

impl Runner {
    fn running(&self) -> bool {
        self.state.running.is_some()
    }

    fn status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.spec.name.clone(),
            image: self.spec.image.clone().unwrap_or_default(),
            image_id: format!("knsq-e2e://{}", self.spec.image.clone().unwrap_or_default()),
            container_id: self.pid.map(|pid| format!("knsq-e2e://{pid}")),
            ready: self.ready,
            started: Some(self.started),
            restart_count: self.restarts,
            state: Some(self.state.clone()),
            last_state: self.last_state.clone(),
            ..ContainerStatus::default()
        }
    }

    fn stop_probes(&mut self) {
        for probe in self.probes.drain(..) {
            probe.abort();
        }
    }
}

/// The pod worker: runs until the pod is gone or the node stops.
pub(super) async fn run(node: Arc<Node>, mut updates: watch::Receiver<Option<Pod>>) {
    let Some(pod) = updates.borrow().clone() else {
        return;
    };
    let name = pod.name_any();
    let mut worker = match Worker::new(node.clone(), pod).await {
        Ok(worker) => worker,
        Err(e) => {
            warn!(pod = %name, error = %format!("{e:#}"), "cannot run the pod");
            return;
        }
    };
    if let Err(e) = worker.live(&mut updates).await {
        warn!(pod = %name, error = %format!("{e:#}"), "pod worker failed");
    }
    worker.kill_all().await;
}

struct Worker {
    node: Arc<Node>,
    pod: Pod,
    spec: PodSpec,
    api: Api<Pod>,
    ip: Ipv4Addr,
    netns: String,
    dir: PathBuf,
    volumes: BTreeMap<String, PathBuf>,
    runners: Vec<Runner>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    conditions: BTreeMap<String, (bool, Time)>,
    start_time: Time,
    initialized: bool,
    written: Option<serde_json::Value>,
}

impl Worker {
    async fn new(node: Arc<Node>, pod: Pod) -> Result<Worker> {
        let namespace = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(node.client.clone(), &namespace);
        let (events_tx, events) = mpsc::unbounded_channel();
        let dir = node.dir.join("pods").join(pod.uid().unwrap_or_default());
        Ok(Worker {
            node,
            spec: pod.spec.clone().unwrap_or_default(),
            pod,
            api,
            ip: Ipv4Addr::UNSPECIFIED,
            netns: String::new(),
            dir,
            volumes: BTreeMap::new(),
            runners: Vec::new(),
            events_tx,
            events,
            conditions: BTreeMap::new(),
            start_time: now(),
            initialized: false,
            written: None,
        })
    }

    fn spec(&self) -> &PodSpec {
        &self.spec
    }

    fn restart_policy(&self) -> &str {
        self.spec().restart_policy.as_deref().unwrap_or("Always")
    }

    /// Bind the pod to this node, like the scheduler.
    async fn bind(&self) -> Result<()> {
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": self.pod.name_any()},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node.name},
        });
        self.api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &self.pod.name_any(),
                &PostParams::default(),
                &binding,
            )
            .await
            .context("binding")?;
        Ok(())
    }

    async fn live(&mut self, updates: &mut watch::Receiver<Option<Pod>>) -> Result<()> {
        if self.spec().node_name.is_none() {
            self.bind().await?;
        }
        let name = self.pod.name_any();
        let sandbox = self.node.network.sandbox(&name).await?;
        self.ip = sandbox.ip;
        self.netns = sandbox.netns;
        let hostname = self.spec().hostname.clone().unwrap_or_else(|| name.clone());
        let mut names = vec![hostname.clone()];
        if let Some(subdomain) = &self.spec().subdomain {
            let namespace = self.pod.namespace().unwrap_or_default();
            let fqdn = format!("{hostname}.{subdomain}.{namespace}.svc");
            names.push(format!("{fqdn}.cluster.local"));
            names.push(fqdn);
        }
        self.node.network.publish(self.ip, &names)?;

        // Volumes: a claim may not exist yet; wait for it as the kubelet does.
        loop {
            match self.prepare_volumes().await {
                Ok(volumes) => {
                    self.volumes = volumes;
                    break;
                }
                Err(e) => {
                    self.write_waiting("ContainerCreating", &format!("{e:#}"))
                        .await;
                    if self.wait_or_deleted(updates, Duration::from_secs(1)).await {
                        return self.terminate().await;
                    }
                }
            }
        }
        if !self.run_init_containers(updates).await? {
            return self.terminate().await;
        }
        self.initialized = true;
        let containers = self.spec().containers.clone();
        for spec in containers {
            let runner = self.runner(spec)?;
            self.runners.push(runner);
        }
        for index in 0..self.runners.len() {
            self.start(index).await;
        }
        self.write_status().await;
        loop {
            let restart_due = self.runners.iter().filter_map(|r| r.restart_at).min();
            tokio::select! {
                () = self.node.stop.cancelled() => return Ok(()),
                changed = updates.changed() => {
                    let gone = changed.is_err() || updates.borrow().is_none();
                    if gone {
                        // Deleted at once (grace 0, or by the garbage collector of a
                        // finished pod): nothing to wait for.
                        return Ok(());
                    }
                    if let Some(pod) = updates.borrow().clone() {
                        self.pod = pod;
                    }
                    self.spec = self.pod.spec.clone().unwrap_or_default();
                    if self.pod.metadata.deletion_timestamp.is_some() {
                        return self.terminate().await;
                    }
                }
                Some(event) = self.events.recv() => self.handle(event).await,
                () = sleep_until(restart_due) => {
                    let due: Vec<usize> = self
                        .runners
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.restart_at.is_some_and(|at| at <= Instant::now()))
                        .map(|(i, _)| i)
                        .collect();
                    for index in due {
                        self.start(index).await;
                    }
                }
            }
            self.write_status().await;
        }
    }

    /// Wait `delay`; whether the pod was deleted meanwhile.
    async fn wait_or_deleted(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        delay: Duration,
    ) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            changed = updates.changed() => {
                match (changed, updates.borrow().clone()) {
                    (Ok(()), Some(pod)) => {
                        self.pod = pod;
                        self.pod.metadata.deletion_timestamp.is_some()
                    }
                    _ => true,
                }
            }
        }
    }

    fn image(&self, container: &Container) -> Result<Image> {
        let reference = container.image.clone().unwrap_or_default();
        let repository = reference
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map_or(reference.as_str(), |(repo, _)| repo);
        self.node
            .images
            .get(repository)
            .cloned()
            .ok_or_else(|| anyhow!("image {reference} is not one the kubelet stand-in can run"))
    }

    fn runner(&self, spec: Container) -> Result<Runner> {
        let image = self.image(&spec)?;
        Ok(Runner {
            spec,
            image,
            run: 0,
            pid: None,
            env: Vec::new(),
            user: None,
            restarts: 0,
            state: waiting("ContainerCreating", None),
            last_state: None,
            started: false,
            ready: false,
            probes: Vec::new(),
            restart_at: None,
            backoff: BACKOFF_START,
            since: Instant::now(),
            stopping: false,
        })
    }

    /// The claims' directories (one per claim, kept across pods) and the pod's emptyDirs.
    async fn prepare_volumes(&self) -> Result<BTreeMap<String, PathBuf>> {
        let namespace = self.pod.namespace().unwrap_or_default();
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.node.client.clone(), &namespace);
        let fs_group = self
            .spec()
            .security_context
            .as_ref()
            .and_then(|s| s.fs_group);
        let mut out = BTreeMap::new();
        for volume in self.spec().volumes.iter().flatten() {
            let dir = if let Some(claim) = &volume.persistent_volume_claim {
                let claim = claims.get_opt(&claim.claim_name).await?.ok_or_else(|| {
                    anyhow!("persistentvolumeclaim {} not found", claim.claim_name)
                })?;
                if claim.metadata.deletion_timestamp.is_some() {
                    bail!(
                        "persistentvolumeclaim {} is being deleted",
                        claim.name_any()
                    );
                }
                self.node
                    .dir
                    .join("volumes")
                    .join(claim.uid().unwrap_or_default())
            } else if volume.empty_dir.is_some() {
                self.dir.join("volumes").join(&volume.name)
            } else {
                bail!(
                    "volume {}: only persistentVolumeClaim and emptyDir volumes are supported by the kubelet stand-in",
                    volume.name
                );
            };
            std::fs::create_dir_all(&dir)?;
            // The kubelet hands a volume to the pod's fsGroup (setgid, group-writable).
            if let Some(group) = fs_group {
                std::os::unix::fs::chown(&dir, None, u32::try_from(group).ok())?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775))?;
            } else {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
            }
            out.insert(volume.name.clone(), dir);
        }
        Ok(out)
    }

    fn user(&self, container: &Container, image: &Image) -> Result<Option<(i64, i64)>> {
        let pod = self.spec().security_context.clone().unwrap_or_default();
        let own = container.security_context.clone().unwrap_or_default();
        let uid = own
            .run_as_user
            .or(pod.run_as_user)
            .or(image.user.map(|u| u.0));
        let gid = own
            .run_as_group
            .or(pod.run_as_group)
            .or(image.user.map(|u| u.1));
        let non_root = own.run_as_non_root.or(pod.run_as_non_root) == Some(true);
        if non_root && uid.unwrap_or(0) == 0 {
            bail!("container has runAsNonRoot and would run as root");
        }
        Ok(uid.map(|uid| (uid, gid.unwrap_or(uid))))
    }

    async fn launch(
        &self,
        container: &Container,
        image: &Image,
    ) -> Result<(Launch, Option<(i64, i64)>)> {
        let ip = self.ip.to_string();
        let env = env::resolve(
            &self.node.client,
            &self.pod,
            container,
            &ip,
            &HOST_IP.to_string(),
        )
        .await?;
        let argv = env::command_line(container, &env, &image.entrypoint, &image.command);
        let user = self.user(container, image)?;
        let mut mounts = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let mut source = self
                .volumes
                .get(&m.name)
                .cloned()
                .ok_or_else(|| anyhow!("volumeMount {}: no such volume", m.name))?;
            if let Some(sub) = m.sub_path.as_ref().filter(|s| !s.is_empty()) {
                source = source.join(sub);
                std::fs::create_dir_all(&source)?;
            }
            mounts.push(Mount {
                source,
                target: m.mount_path.clone(),
                read_only: m.read_only == Some(true),
            });
        }
        let groups = self
            .spec()
            .security_context
            .as_ref()
            .and_then(|s| s.fs_group)
            .into_iter()
            .chain(
                self.spec()
                    .security_context
                    .as_ref()
                    .and_then(|s| s.supplemental_groups.clone())
                    .unwrap_or_default(),
            )
            .collect();
        let read_only_root = container
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem)
            == Some(true);
        let hostname = self
            .spec()
            .hostname
            .clone()
            .unwrap_or_else(|| self.pod.name_any());
        let launch = Launch {
            netns: self.netns.clone(),
            root: self.dir.join("roots").join(&container.name),
            hostname,
            hosts: self.node.network.hosts_file().to_path_buf(),
            resolv: self.node.resolv.clone(),
            image: image.clone(),
            mounts,
            env,
            argv,
            workdir: container
                .working_dir
                .clone()
                .unwrap_or_else(|| "/".to_owned()),
            user,
            groups,
            read_only_root,
            log: self.dir.join(format!("{}.log", container.name)),
        };
        Ok((launch, user))
    }

    /// Run the init containers in order; false when the pod cannot go on (a failure under
    /// `restartPolicy: Never`, or deletion).
    async fn run_init_containers(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
    ) -> Result<bool> {
        let init = self.spec().init_containers.clone().unwrap_or_default();
        for container in init {
            let image = self.image(&container)?;
            let mut backoff = BACKOFF_START;
            loop {
                let (launch, _) = self.launch(&container, &image).await?;
                let mut child = runtime::spawn(&launch)?;
                let status = tokio::select! {
                    status = child.wait() => status?,
                    () = self.node.stop.cancelled() => return Ok(false),
                };
                if status.success() {
                    break;
                }
                if self.restart_policy() == "Never" {
                    self.write_phase("Failed").await;
                    return Ok(false);
                }
                if self.wait_or_deleted(updates, backoff).await {
                    return Ok(false);
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        Ok(true)
    }

    /// Start (or restart) container `index`.
    async fn start(&mut self, index: usize) {
        let spec = self.runners[index].spec.clone();
        let image = self.runners[index].image.clone();
        let prepared = self.launch(&spec, &image).await;
        let runner = &mut self.runners[index];
        runner.restart_at = None;
        let (launch, user) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                runner.state = waiting("CreateContainerConfigError", Some(format!("{e:#}")));
                runner.restart_at = Some(Instant::now() + runner.backoff);
                runner.backoff = (runner.backoff * 2).min(BACKOFF_MAX);
                return;
            }
        };
        let mut child = match runtime::spawn(&launch) {
            Ok(child) => child,
            Err(e) => {
                runner.state = waiting("RunContainerError", Some(format!("{e:#}")));
                runner.restart_at = Some(Instant::now() + runner.backoff);
                runner.backoff = (runner.backoff * 2).min(BACKOFF_MAX);
                return;
            }
        };
        runner.run += 1;
        runner.pid = child.id();
        runner.env = launch.env.clone();
        runner.user = user;
        runner.started = false;
        runner.ready = false;
        runner.stopping = false;
        runner.since = Instant::now();
        runner.state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(now()),
            }),
            ..ContainerState::default()
        };
        let run = runner.run;
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => status
                    .code()
                    .or_else(|| {
                        std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s)
                    })
                    .unwrap_or(-1),
                Err(_) => -1,
            };
            let _ = events.send(Event::Exited { index, run, code });
        });
        self.start_probes(index);
        info!(pod = %self.pod.name_any(), container = %spec.name, pid = ?self.runners[index].pid, "started");
    }

    fn start_probes(&mut self, index: usize) {
        let runner = &mut self.runners[index];
        runner.stop_probes();
        let target = probe::Target {
            ip: IpAddr::V4(self.ip),
            pid: runner.pid.unwrap_or_default(),
            user: runner.user,
            env: runner.env.clone(),
        };
        let spec = runner.spec.clone();
        let run = runner.run;
        let startup = spec.startup_probe.as_ref();
        let kinds: Vec<(Kind, Option<&k8s_openapi::api::core::v1::Probe>)> = if startup.is_some() {
            vec![(Kind::Startup, startup)]
        } else {
            runner.started = true;
            vec![
                (Kind::Readiness, spec.readiness_probe.as_ref()),
                (Kind::Liveness, spec.liveness_probe.as_ref()),
            ]
        };
        if startup.is_none() && spec.readiness_probe.is_none() {
            runner.ready = true;
        }
        for (kind, probe) in kinds {
            let Some(probe) = probe else { continue };
            let probe_spec = match probe::Spec::of(probe, &spec) {
                Ok(s) => s,
                Err(e) => {
                    warn!(container = %spec.name, ?kind, error = %e, "probe cannot run; it fails");
                    continue;
                }
            };
            let events = self.events_tx.clone();
            let target = target.clone();
            runner.probes.push(tokio::spawn(async move {
                tokio::time::sleep(probe_spec.initial_delay).await;
                let mut tally = Tally::new();
                loop {
                    let passed = probe::check(&probe_spec, &target).await;
                    if let Some(passing) = tally.record(&probe_spec, passed) {
                        let event = Event::Probe {
                            index,
                            run,
                            kind,
                            passing,
                        };
                        if events.send(event).is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(probe_spec.period).await;
                }
            }));
        }
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { index, run, code } => {
                let policy = self.restart_policy().to_owned();
                let runner = &mut self.runners[index];
                if run != runner.run {
                    return;
                }
                runner.stop_probes();
                let started_at = runner
                    .state
                    .running
                    .as_ref()
                    .and_then(|r| r.started_at.clone());
                let ended = terminated(code, started_at);
                runner.ready = false;
                runner.pid = None;
                info!(pod = %self.pod.name_any(), container = %runner.spec.name, code, "exited");
                let restart = !runner.stopping
                    && match policy.as_str() {
                        "Never" => false,
                        "OnFailure" => code != 0,
                        _ => true,
                    };
                if restart {
                    runner.restarts += 1;
                    runner.last_state = Some(ended);
                    runner.state = waiting("CrashLoopBackOff", None);
                    // The backoff starts over for a container that ran a while.
                    if runner.since.elapsed() > BACKOFF_MAX * 6 {
                        runner.backoff = BACKOFF_START;
                    }
                    runner.restart_at = Some(Instant::now() + runner.backoff);
                    runner.backoff = (runner.backoff * 2).min(BACKOFF_MAX);
                } else {
                    runner.state = ended;
                }
            }
            Event::Probe {
                index,
                run,
                kind,
                passing,
            } => {
                if run != self.runners[index].run {
                    return;
                }
                match (kind, passing) {
                    (Kind::Startup, true) => {
                        let runner = &mut self.runners[index];
                        runner.started = true;
                        runner.stop_probes();
                        self.start_after_startup(index);
                    }
                    (Kind::Readiness, passing) => self.runners[index].ready = passing,
                    (Kind::Startup | Kind::Liveness, false) => {
                        info!(pod = %self.pod.name_any(), container = %self.runners[index].spec.name, ?kind, "probe failed; restarting the container");
                        self.runners[index].ready = false;
                        self.stop_container(index).await;
                    }
                    (Kind::Liveness, true) => {}
                }
            }
        }
    }

    /// Readiness and liveness once the startup probe passed.
    fn start_after_startup(&mut self, index: usize) {
        let mut spec = self.runners[index].spec.clone();
        spec.startup_probe = None;
        let original = std::mem::replace(&mut self.runners[index].spec, spec);
        self.start_probes(index);
        self.runners[index].spec = original;
    }

    /// Stop one container under the pod's grace period (the kubelet's way of killing a
    /// container whose probe failed); its exit then restarts it.
    async fn stop_container(&mut self, index: usize) {
        let grace = self.grace();
        let Some(pid) = self.runners[index].pid else {
            return;
        };
        self.runners[index].stop_probes();
        runtime::signal(pid, Signal::TERM);
        let deadline = Instant::now() + grace;
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            // A no-op when it exited in time (its pid is not reused this soon).
            runtime::signal(pid, Signal::KILL);
        });
    }

    fn grace(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or(self.spec().termination_grace_period_seconds)
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
    }

    /// The pod is being deleted: preStop hooks, SIGTERM, SIGKILL at the end of the grace
    /// period, then the final deletion.
    async fn terminate(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.grace();
        info!(pod = %self.pod.name_any(), grace = ?self.grace(), "stopping");
        for runner in &mut self.runners {
            runner.stopping = true;
            runner.restart_at = None;
            runner.stop_probes();
        }
        // preStop hooks, all containers at once, within the grace period.
        let hooks: Vec<_> = self
            .runners
            .iter()
            .filter(|r| r.running())
            .filter_map(|r| {
                let hook = r.spec.lifecycle.as_ref()?.pre_stop.clone()?;
                Some((r.pid?, r.user, r.env.clone(), hook, r.spec.clone()))
            })
            .collect();
        let ip = IpAddr::V4(self.ip);
        let prestops = hooks
            .into_iter()
            .map(|(pid, user, env, hook, container)| async move {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Some(exec) = &hook.exec {
                    let argv = exec.command.clone().unwrap_or_default();
                    let _ = runtime::exec(pid, user, &env, &argv, left).await;
                } else if let Some(get) = &hook.http_get {
                    let probe = k8s_openapi::api::core::v1::Probe {
                        http_get: Some(get.clone()),
                        ..Default::default()
                    };
                    if let Ok(spec) = probe::Spec::of(&probe, &container) {
                        let spec = probe::Spec {
                            timeout: left,
                            ..spec
                        };
                        let target = probe::Target { ip, pid, user, env };
                        probe::check(&spec, &target).await;
                    }
                }
            });
        futures::future::join_all(prestops).await;
        for runner in &self.runners {
            if let Some(pid) = runner.pid {
                runtime::signal(pid, Signal::TERM);
            }
        }
        let mut killed = false;
        while self.runners.iter().any(|r| r.pid.is_some()) {
            tokio::select! {
                Some(event) = self.events.recv() => {
                    if matches!(event, Event::Exited { .. }) {
                        self.handle(event).await;
                    }
                }
                () = self.node.stop.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(deadline), if !killed => {
                    info!(pod = %self.pod.name_any(), "grace period over: SIGKILL");
                    for runner in &self.runners {
                        if let Some(pid) = runner.pid {
                            runtime::signal(pid, Signal::KILL);
                        }
                    }
                    killed = true;
                }
            }
        }
        self.write_status().await;
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&self.pod.name_any(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e).context("deleting the stopped pod"),
        }
    }

    /// SIGKILL whatever still runs (the stand-in stops, or the pod was removed under it).
    async fn kill_all(&mut self) {
        for runner in &mut self.runners {
            runner.stopping = true;
            runner.stop_probes();
            if let Some(pid) = runner.pid.take() {
                runtime::signal(pid, Signal::KILL);
            }
        }
    }

    fn condition(&mut self, type_: &str, status: bool) -> PodCondition {
        let entry = self
            .conditions
            .entry(type_.to_owned())
            .or_insert_with(|| (status, now()));
        if entry.0 != status {
            *entry = (status, now());
        }
        PodCondition {
            type_: type_.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            last_transition_time: Some(entry.1.clone()),
            ..PodCondition::default()
        }
    }

    fn phase(&self) -> &'static str {
        let policy = self.restart_policy();
        let all_done =
            !self.runners.is_empty() && self.runners.iter().all(|r| r.state.terminated.is_some());
        if all_done && policy != "Always" {
            let failed = self.runners.iter().any(|r| {
                r.state
                    .terminated
                    .as_ref()
                    .is_some_and(|t| t.exit_code != 0)
            });
            return if failed { "Failed" } else { "Succeeded" };
        }
        if self.runners.iter().any(|r| r.running() || r.restarts > 0) {
            "Running"
        } else {
            "Pending"
        }
    }

    fn status(&mut self) -> PodStatus {
        let ready = !self.runners.is_empty() && self.runners.iter().all(|r| r.ready);
        let initialized = self.initialized;
        let conditions = vec![
            self.condition("Initialized", initialized),
            self.condition("Ready", ready),
            self.condition("ContainersReady", ready),
            self.condition("PodScheduled", true),
        ];
        let ip = self.ip.to_string();
        PodStatus {
            phase: Some(self.phase().to_owned()),
            conditions: Some(conditions),
            container_statuses: Some(self.runners.iter().map(Runner::status).collect()),
            host_ip: Some(HOST_IP.to_string()),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            start_time: Some(self.start_time.clone()),
            ..PodStatus::default()
        }
    }

    async fn patch(&mut self, status: serde_json::Value) {
        if self.written.as_ref() == Some(&status) {
            return;
        }
        let patch = json!({ "status": status });
        match self
            .api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => self.written = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                warn!(pod = %self.pod.name_any(), error = %e, "could not write the pod status")
            }
        }
    }

    async fn write_status(&mut self) {
        let status = self.status();
        let value = serde_json::to_value(status).unwrap_or_default();
        self.patch(value).await;
    }

    async fn write_waiting(&mut self, reason: &str, message: &str) {
        let value = json!({
            "phase": "Pending",
            "hostIP": HOST_IP.to_string(),
            "podIP": self.ip.to_string(),
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "message": message,
            "reason": reason,
        });
        self.patch(value).await;
    }

    async fn write_phase(&mut self, phase: &str) {
        let mut status = self.status();
        status.phase = Some(phase.to_owned());
        let value = serde_json::to_value(status).unwrap_or_default();
        self.patch(value).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
