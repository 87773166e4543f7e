//! knsq-lookupd: an nsqlookupd-compatible directory of knsq brokers.
//!
//! - [`registry`]: who produces which topics and channels; pure, time passed in.
//! - `grpc`: the `knsq.cluster.v1.Registry` service brokers register through.
//! - `http`: nsqlookupd's HTTP API for clients, and `/metrics`.
//! - [`config`]: flags with nsqlookupd's names, defaults and Go syntax.
//!
//! [`run`] serves on already-bound [`Listeners`] until its shutdown token is cancelled;
//! [`Server`] wraps both for tests and embedding.

pub mod config;
pub mod registry;

mod directory;
mod grpc;
mod http;
mod metrics;

pub use config::{Config, Options};

use directory::{Directory, LookupdInfo};
use server_kit::listen::{BindError, bind, local_address};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The nsqlookupd release whose HTTP API knsq-lookupd matches; `/info` reports it.
pub use server_kit::NSQ_COMPAT_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum LookupdError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("lookupd task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The lookupd's listening sockets, bound before it runs (port 0 picks a free port).
#[derive(Debug)]
pub struct Listeners {
    grpc: TcpListener,
    http: TcpListener,
}

impl Listeners {
    pub async fn bind(options: &Options) -> Result<Listeners, BindError> {
        Ok(Listeners {
            grpc: bind("grpc-address", &options.grpc_address).await?,
            http: bind("http-address", &options.http_address).await?,
        })
    }

    pub fn grpc_address(&self) -> Result<SocketAddr, BindError> {
        local_address(&self.grpc, "grpc-address")
    }

    pub fn http_address(&self) -> Result<SocketAddr, BindError> {
        local_address(&self.http, "http-address")
    }
}

/// Runs the lookupd until `shutdown` is cancelled, then ends every registration stream and
/// waits for both servers, at most `--shutdown-timeout`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), LookupdError> {
    let options = &config.options;
    let grpc_address = listeners.grpc_address()?;
    let http_address = listeners.http_address()?;
    let directory = Arc::new(Directory::new(
        registry::Registry::new(options.lifetimes()),
        metrics::Metrics::new()?,
        LookupdInfo {
            broadcast_address: options.broadcast_address.clone(),
            hostname: server_kit::flags::default_hostname(),
            grpc_port: grpc_address.port(),
            http_port: http_address.port(),
        },
    ));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        broadcast_address = %options.broadcast_address,
        "knsq-lookupd starting"
    );
    let grpc_server = grpc::server(&config)?;
    tracing::info!("GRPC: listening on {grpc_address}");
    tracing::info!("HTTP: listening on {http_address}");

    let grpc = tokio::spawn(grpc::serve(
        grpc_server,
        listeners.grpc,
        directory.clone(),
        shutdown.clone(),
    ));
    let http = tokio::spawn(http::serve(listeners.http, directory, shutdown.clone()));

    shutdown.cancelled().await;
    tracing::info!("shutting down: ending registration streams and closing listeners");
    let grace = options.shutdown_timeout;
    let drained = tokio::time::timeout(grace, async {
        let grpc = grpc.await;
        let http = http.await;
        (grpc, http)
    })
    .await;
    match drained {
        Ok((grpc, http)) => {
            if let Err(e) = http? {
                tracing::warn!(error = %e, "HTTP server ended with an error");
            }
            grpc??;
        }
        Err(_) => tracing::warn!(
            ?grace,
            "shutdown grace period over; exiting with requests still open"
        ),
    }
    tracing::info!("knsq-lookupd stopped");
    Ok(())
}

/// A lookupd running in this process: for tests and embedding.
#[derive(Debug)]
pub struct Server {
    grpc_address: SocketAddr,
    http_address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), LookupdError>>,
}

impl Server {
    /// Binds the configured addresses and starts serving.
    pub async fn start(options: Options) -> Result<Server, LookupdError> {
        let config = options.validate()?;
        let listeners = Listeners::bind(&options).await?;
        let grpc_address = listeners.grpc_address()?;
        let http_address = listeners.http_address()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, listeners, shutdown.clone()));
        Ok(Server {
            grpc_address,
            http_address,
            shutdown,
            task,
        })
    }

    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc_address
    }

    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// Shuts the lookupd down and waits for it.
    pub async fn stop(self) -> Result<(), LookupdError> {
        self.shutdown.cancel();
        self.task.await?
    }
}
