//! knsq-broker: an nsqd-compatible message broker.
//!
//! - [`config`]: flags with nsqd's names, defaults and Go syntax.
//! - `protocol`: the NSQ TCP V2 server side, over the `proto::wire` codec.
//! - `queue`: topics, channels, in-flight and deferred messages.
//! - `http`: nsqd's HTTP API and `/metrics`.
//! - `auth`: authorization of TCP clients through nsqd-style auth servers.
//!
//! [`run`] serves on already-bound [`Listeners`] until its shutdown token is cancelled;
//! [`Server`] wraps both for tests and embedding.

pub mod config;

mod auth;
mod broker;
mod handoff;
mod health;
mod http;
mod lookup;
mod metrics;
mod persist;
mod protocol;
mod queue;
mod stats;
mod storage;
mod tcp;

pub use config::{Config, Options};
pub use server_kit::process::LogLevelSetter;

use server_kit::listen::{BindError, bind, local_address, raise_fd_limit, reserved_fds};
use server_kit::tls::server::{HttpsListener, https_config};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot use --data-path {path}: {source}")]
    DataPath {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use --data-path {path}: not a directory")]
    DataPathNotDirectory { path: String },
    #[error("cannot use --data-path {path}: its parent directory {parent} does not exist")]
    DataPathNoParent { path: String, parent: String },
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("broker task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("handoff service: {}", server_kit::with_sources(.0))]
    Handoff(#[from] tonic::transport::Error),
    #[error("offline handoff of {path}: {reason}")]
    OfflineHandoff { path: String, reason: String },
}

/// The broker's listening sockets, bound before it runs (port 0 picks a free port).
#[derive(Debug)]
pub struct Listeners {
    tcp: TcpListener,
    http: TcpListener,
    /// Only with TLS (`--tls-cert` and `--tls-key`) and a non-empty `--https-address`, as nsqd.
    https: Option<TcpListener>,
    /// Unless `--handoff-address` is empty.
    handoff: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(options: &Options) -> Result<Listeners, BindError> {
        let tcp = bind("tcp-address", &options.tcp_address).await?;
        let http = bind("http-address", &options.http_address).await?;
        let https = if options.tls.serves_https() {
            Some(bind("https-address", &options.tls.https_address).await?)
        } else {
            None
        };
        let handoff = if options.drain.handoff_address.is_empty() {
            None
        } else {
            Some(bind("handoff-address", &options.drain.handoff_address).await?)
        };
        Ok(Listeners {
            tcp,
            http,
            https,
            handoff,
        })
    }

    pub fn tcp_address(&self) -> Result<SocketAddr, BindError> {
        local_address(&self.tcp, "tcp-address")
    }

    pub fn http_address(&self) -> Result<SocketAddr, BindError> {
        local_address(&self.http, "http-address")
    }

    /// The HTTPS address, when TLS is on and `--https-address` is not empty.
    pub fn https_address(&self) -> Result<Option<SocketAddr>, BindError> {
        let https = self.https.as_ref();
        https.map(|l| local_address(l, "https-address")).transpose()
    }
}

/// Runs the broker until `stop` is cancelled (SIGTERM) — then, after `--shutdown-delay` of
/// reporting not ready, it shuts down cleanly or, with `--sigterm=drain`, drains first — or
/// until a drain finishes. Shutting down closes every connection and waits for them, at most
/// `--shutdown-timeout`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    stop: CancellationToken,
    set_log_level: Option<LogLevelSetter>,
) -> Result<(), BrokerError> {
    let Config {
        options,
        client_tls,
        lookupd_tls,
        auth,
        handoff_tls,
    } = config;
    let shutdown = CancellationToken::new();
    prepare_data_path(&options.data_path)?;
    let _lock = persist::DataDirLock::acquire(&options.data_path)?;
    let tcp_address = listeners.tcp_address()?;
    let http_address = listeners.http_address()?;
    // A listener bound for HTTPS is served only when the options still say so.
    let https_listener = listeners.https.filter(|_| options.tls.serves_https());
    let https_address = match &https_listener {
        Some(l) => Some(local_address(l, "https-address")?),
        None => None,
    };

    let fd_limit = raise_fd_limit();
    let http_limits = http_limits(&options, fd_limit);
    let tcp_limit = tcp_connections(&options, fd_limit);
    tracing::debug!(
        ?fd_limit,
        ?http_limits,
        tcp_limit,
        "file descriptors and connection limits"
    );
    let (metrics, server_metrics) = metrics::Metrics::new()?;
    metrics.register_data_path(options.data_path.clone())?;
    let settings = queue_settings(&options, &server_metrics);
    // Lookupd registrations (issue 4): started once the topics are restored.
    let lookup_metrics = lookup::LookupMetrics::new()?;
    metrics.register(lookup_metrics.collectors())?;
    let lookup = Arc::new(lookup::Lookup::new(
        options.lookupd_grpc_addresses.clone(),
        lookupd_tls.clone(),
        options.lookupd_heartbeat_interval,
        lookup_metrics,
        shutdown.clone(),
    ));
    let handoff_address = match &listeners.handoff {
        Some(l) => Some(local_address(l, "handoff-address")?),
        None => None,
    };
    let handoff_port = match (options.drain.broadcast_handoff_port, handoff_address) {
        (0, Some(address)) => address.port(),
        (port, _) => port,
    };
    let tcp_port = broadcast_tcp_port(&options, tcp_address);
    let peers = handoff::Peers::new(
        peer_source(&options, tcp_port),
        lookupd_tls.clone(),
        format!("{}:{tcp_port}", options.broadcast_address),
    );
    let state = Arc::new(broker::Broker::new(
        options,
        settings,
        tcp_address,
        http_address,
        handoff_port,
        lookup.clone(),
    ));
    metrics.register_queues(Arc::downgrade(&state))?;
    state.connect_dead_letters();
    state.restore()?;
    state.save_metadata();
    lookup.start(&state);
    let syncer = tokio::spawn(sync_disks(state.clone(), shutdown.clone()));
    tracing::info!(
        node_id = state.options.node_id,
        version = env!("CARGO_PKG_VERSION"),
        "knsq-broker starting"
    );
    tracing::info!("TCP: listening on {tcp_address}");
    tracing::info!("HTTP: listening on {http_address}");
    if let Some(address) = https_address {
        tracing::info!("HTTPS: listening on {address}");
    }
    let handoff_server = listeners.handoff.map(|listener| {
        if let Some(address) = handoff_address {
            tracing::info!("handoff: listening on {address}");
        }
        tokio::spawn(handoff::receiver::serve(
            listener,
            handoff_tls,
            state.clone(),
            shutdown.clone(),
        ))
    });
    tokio::spawn(stop_when_asked(state.clone(), stop, shutdown.clone()));
    let drainer = tokio::spawn(drain_then_stop(
        state.clone(),
        peers,
        lookup.clone(),
        shutdown.clone(),
    ));

    let clients = Arc::new(protocol::Clients::default());
    let protocol = Arc::new(protocol::Shared {
        broker: state.clone(),
        clients: clients.clone(),
        auth: auth.as_ref().map(auth::AuthServers::new),
        tls_required: client_tls.is_some()
            && state.options.tls.required() != config::TlsRequired::No,
        tls: client_tls.clone(),
        metrics: server_metrics.connections.clone(),
    });
    tokio::spawn({
        let (broker, clients, shutdown) = (state.clone(), clients.clone(), shutdown.clone());
        async move {
            tokio::select! {
                () = broker.drain_started() => clients.send_producers_away(),
                _ = shutdown.cancelled() => {}
            }
        }
    });
    let connections = TaskTracker::new();
    let tcp = tokio::spawn(tcp::serve(
        listeners.tcp,
        protocol,
        tcp_limit,
        shutdown.clone(),
        connections.clone(),
    ));
    let app = http::AppState {
        broker: state.clone(),
        clients: clients.clone(),
        lookup: lookup.clone(),
        metrics: Arc::new(metrics),
        log_level: Arc::new(Mutex::new(state.options.log_level.clone())),
        set_log_level,
    };
    // HTTPS serves the API with the TCP clients' TLS config, so the same client
    // certificates are asked for; it needs listeners bound with TLS on. Without an HTTPS
    // listener, `--tls-required=true` answers plain HTTP with `https_port: 0`.
    let https = match (https_listener, https_address, &client_tls) {
        (Some(listener), Some(address), Some(tls)) => {
            let listener = HttpsListener::new(listener, address, https_config(tls));
            Some(tokio::spawn(http::serve_https(
                listener,
                app.clone(),
                http_limits,
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    let plain = match state.options.tls.required() {
        // nsqd sends plain-HTTP clients to HTTPS only for --tls-required=true.
        config::TlsRequired::Yes => http::PlainHttp::TlsRequired {
            https_port: https_address.map_or(0, |a| a.port()),
        },
        config::TlsRequired::No | config::TlsRequired::TcpOnly => http::PlainHttp::Api,
    };
    let http = tokio::spawn(http::serve(
        listeners.http,
        app,
        plain,
        http_limits,
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    tracing::info!("shutting down: closing listeners and client connections");
    clients.close_all();
    connections.close();
    let grace = state.options.shutdown_timeout;
    let drained = tokio::time::timeout(grace, async {
        let _ = tcp.await;
        connections.wait().await;
        let _ = http.await;
        if let Some(https) = https {
            let _ = https.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace period over; closing connections that are still open"
        );
    }
    let _ = syncer.await;
    if let Some(server) = handoff_server {
        match server.await {
            Ok(Err(e)) => {
                tracing::warn!(error = %server_kit::with_sources(&e), "handoff service ended")
            }
            Err(e) => tracing::warn!(error = %e, "handoff service task failed"),
            Ok(Ok(())) => {}
        }
    }
    // The registration streams end, so lookupds drop this broker at once.
    lookup.stopped(grace).await;
    // A drain stops with the shutdown, putting back a batch it was handing off.
    let _ = drainer.await;
    // Messages in memory, in flight and deferred go to disk; nothing acknowledged is lost.
    let persisting = state.clone();
    tokio::task::spawn_blocking(move || persisting.persist()).await?;
    tracing::info!("knsq-broker stopped");
    Ok(())
}

/// The HTTP limits from the flags, with connections capped by the file descriptor limit: HTTP
/// and HTTPS get an eighth each of what is left after the broker's own reserve.
fn http_limits(o: &Options, fd_limit: Option<u64>) -> http::HttpLimits {
    let by_fds = fd_limit.map_or(u64::MAX, |limit| {
        (limit.saturating_sub(reserved_fds(limit)) / 8).max(1)
    });
    http::HttpLimits {
        header_timeout: o.http_header_timeout,
        max_header_bytes: usize::try_from(o.http_max_header_bytes).unwrap_or(usize::MAX),
        max_connections: usize::try_from(o.http_max_connections.min(by_fds)).unwrap_or(usize::MAX),
    }
}

/// The most NSQ TCP connections at once: `--max-connections`, capped by the file descriptor
/// limit (three quarters of what is left after the broker's own reserve, since clients are
/// what a broker is for; HTTP and HTTPS get an eighth each), so clients past it are told why
/// instead of the accept failing.
fn tcp_connections(o: &Options, fd_limit: Option<u64>) -> usize {
    let by_fds = fd_limit.map_or(u64::MAX, |limit| {
        (limit.saturating_sub(reserved_fds(limit)) / 4 * 3).max(1)
    });
    usize::try_from(by_fds).map_or(o.max_connections, |by_fds| by_fds.min(o.max_connections))
}

/// Fsyncs changed disk queues every `--sync-timeout`, sooner when one has done `--sync-every`
/// operations or a `--sync-publish` publisher waits; off the async runtime, since fsync
/// blocks.
async fn sync_disks(broker: Arc<broker::Broker>, shutdown: CancellationToken) {
    let every = broker.options.sync_timeout;
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let commits = &broker.settings.commits;
    loop {
        // The timer's pass stores read positions too; a pass for waiting publishers (or for
        // --sync-every) makes the writes durable and no more, which takes one fsync.
        let full = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = timer.tick() => true,
            _ = commits.wanted.notified() => false,
        };
        // Writes made before this read are covered by the pass below (group commit).
        let newest = commits.newest();
        let syncing = broker.clone();
        let ok = tokio::task::spawn_blocking(move || syncing.sync_disks(full))
            .await
            .unwrap_or(false);
        commits.pass_done(newest, ok);
    }
}

/// What every topic and channel reads, from the options, reporting to `metrics`.
fn queue_settings(options: &Options, metrics: &metrics::ServerMetrics) -> queue::QueueSettings {
    let health = health::Health::new(metrics.healthy.clone(), metrics.disk_write_errors.clone());
    let disk = storage::DiskQueueOptions {
        max_bytes_per_file: options.max_bytes_per_file,
        sync_every: options.sync_every,
        // A dead letter's body carries its origin too.
        max_msg_size: options.max_msg_size + queue::ENVELOPE_MAX,
        faults: storage::FaultSwitch::default(),
        passes: Arc::default(),
    };
    queue::QueueSettings::new(options, disk, health, metrics.damage.clone())
}

/// `knsq-broker handoff`: hands everything in a stopped broker's `--data-path` off to peer
/// brokers (`--handoff-peer`, or those registered with `--lookupd-grpc-address`), then
/// deletes what it handed off, leaving the directory empty. Fails, with what is left, when no
/// peer took everything within `--drain-timeout`; nothing is deleted that a peer did not
/// store.
pub async fn handoff_offline(config: Config) -> Result<(), BrokerError> {
    let Config {
        options,
        lookupd_tls,
        ..
    } = config;
    let path = options.data_path.display().to_string();
    let offline_error = |reason: String| BrokerError::OfflineHandoff {
        path: path.clone(),
        reason,
    };
    if !options.data_path.is_dir() {
        return Err(offline_error("not a directory".into()));
    }
    let lock = persist::DataDirLock::acquire(&options.data_path)?;
    let (_metrics, server_metrics) = metrics::Metrics::new()?;
    let settings = queue_settings(&options, &server_metrics);
    let unused = SocketAddr::from(([127, 0, 0, 1], 0));
    let peers = handoff::Peers::new(
        peer_source(&options, options.broadcast_tcp_port),
        lookupd_tls,
        format!(
            "{}:{}",
            options.broadcast_address, options.broadcast_tcp_port
        ),
    );
    let limit = options.drain.drain_timeout;
    let state = Arc::new(broker::Broker::new(
        options,
        settings,
        unused,
        unused,
        0,
        Arc::new(broker::Alone),
    ));
    state.restore()?;
    let held = state.messages_held();
    tracing::info!(path = %path, messages = held, "offline handoff starting");
    state.start_drain();
    // Nobody consumes here: everything is handed off at once.
    let stop = CancellationToken::new();
    let drained = tokio::select! {
        done = handoff::drain(state.clone(), peers, std::time::Duration::ZERO, stop.clone()) => done,
        () = tokio::time::sleep(limit) => false,
    };
    stop.cancel();
    let status = state.drain_status();
    if !drained {
        let persisting = state.clone();
        tokio::task::spawn_blocking(move || persisting.persist()).await?;
        return Err(offline_error(format!(
            "{} messages left after --drain-timeout {}: {}",
            status.remaining_messages,
            server_kit::flags::format_go_duration(limit),
            status.reason.as_deref().unwrap_or("peers too slow")
        )));
    }
    let emptying = state.clone();
    tokio::task::spawn_blocking(move || emptying.delete_everything()).await??;
    drop(lock);
    tracing::info!(
        path = %path,
        handed_off = status.handed_off_messages,
        "offline handoff done; the data directory is empty"
    );
    Ok(())
}

/// Where a draining broker finds peers: `--handoff-peer`, else the lookupds (leaving out the
/// broker registered as `broadcast_address:tcp_port`: this one).
fn peer_source(o: &Options, tcp_port: u16) -> handoff::PeerSource {
    if o.drain.handoff_peers.is_empty() {
        handoff::PeerSource::Lookupds {
            lookupds: o.lookupd_grpc_addresses.clone(),
            myself: (o.broadcast_address.clone(), tcp_port),
        }
    } else {
        handoff::PeerSource::Listed(o.drain.handoff_peers.clone())
    }
}

/// The TCP port lookupds are told.
fn broadcast_tcp_port(o: &Options, tcp_address: SocketAddr) -> u16 {
    match o.broadcast_tcp_port {
        0 => tcp_address.port(),
        port => port,
    }
}

/// On `stop` (SIGTERM): not ready at once, serving on for `--shutdown-delay` (lame duck),
/// then a clean shutdown or, with `--sigterm=drain`, a drain.
async fn stop_when_asked(
    broker: Arc<broker::Broker>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = shutdown.cancelled() => return,
    }
    broker.set_stopping();
    let delay = broker.options.drain.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(?delay, "stop asked: not ready; serving on before stopping");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
    match broker.options.drain.sigterm {
        config::SigtermMode::CleanShutdown => shutdown.cancel(),
        config::SigtermMode::Drain => {
            broker.start_drain();
        }
    }
}

/// Runs a drain once one starts; when it finishes, leaves the lookupds and shuts down (or,
/// with `--stay-up-when-drained`, only leaves the lookupds).
async fn drain_then_stop(
    broker: Arc<broker::Broker>,
    peers: handoff::Peers,
    lookup: Arc<lookup::Lookup>,
    shutdown: CancellationToken,
) {
    let timeout = broker.options.drain.drain_timeout;
    let finished = handoff::drain(broker.clone(), peers, timeout, shutdown.clone()).await;
    if !finished {
        return;
    }
    if broker.options.drain.stay_up_when_drained {
        tracing::info!("drained: leaving the lookupds and staying up idle");
        lookup.set_addresses(Vec::new());
    } else {
        tracing::info!("drained: shutting down");
        shutdown.cancel();
    }
}

/// A broker running in this process: for tests and embedding.
#[derive(Debug)]
pub struct Server {
    tcp_address: SocketAddr,
    http_address: SocketAddr,
    https_address: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), BrokerError>>,
}

impl Server {
    /// Binds the configured addresses and starts serving.
    pub async fn start(options: Options) -> Result<Server, BrokerError> {
        let config = options.validate()?;
        let listeners = Listeners::bind(&options).await?;
        let tcp_address = listeners.tcp_address()?;
        let http_address = listeners.http_address()?;
        let https_address = listeners.https_address()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, listeners, shutdown.clone(), None));
        Ok(Server {
            tcp_address,
            http_address,
            https_address,
            shutdown,
            task,
        })
    }

    pub fn tcp_address(&self) -> SocketAddr {
        self.tcp_address
    }

    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// The HTTPS address, when TLS is on (`--tls-cert` and `--tls-key`) and `--https-address`
    /// is not empty.
    pub fn https_address(&self) -> Option<SocketAddr> {
        self.https_address
    }

    /// Shuts the broker down and waits for it.
    pub async fn stop(self) -> Result<(), BrokerError> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// Checks `--data-path` and creates it if it does not exist yet, as nsqd does; its parent must
/// exist (a mistyped path is an error rather than a fresh tree that hides the data).
fn prepare_data_path(path: &std::path::Path) -> Result<(), BrokerError> {
    let shown = || path.display().to_string();
    let data_error = |source| BrokerError::DataPath {
        path: shown(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => return Err(BrokerError::DataPathNotDirectory { path: shown() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(BrokerError::DataPathNotDirectory { path: shown() });
        }
        Err(e) => return Err(data_error(e)),
    }
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            Err(BrokerError::DataPathNoParent {
                path: shown(),
                parent: parent.display().to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(BrokerError::DataPathNotDirectory { path: shown() })
        }
        Err(e) => Err(data_error(e)),
    }
}
