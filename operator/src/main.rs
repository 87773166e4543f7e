//! `knsq-operator`: runs the NSQCluster controller; `knsq-operator crd` prints the CRD.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use operator::children::DefaultImages;
use operator::leader::LeaseConfig;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser, Debug)]
#[command(
    name = "knsq-operator",
    version,
    about = "Runs knsq clusters described by NSQCluster resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "KNSQ_OPERATOR_HTTP_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    http_address: String,
    /// Watch NSQClusters only in this namespace (default: every namespace).
    #[arg(long, env = "KNSQ_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Broker image for clusters that do not name one.
    #[arg(long, env = "KNSQ_OPERATOR_BROKER_IMAGE", default_value_t = format!("knsq/knsq-broker:{VERSION}"))]
    broker_image: String,
    /// Lookupd image for clusters that do not name one.
    #[arg(long, env = "KNSQ_OPERATOR_LOOKUPD_IMAGE", default_value_t = format!("knsq/knsq-lookupd:{VERSION}"))]
    lookupd_image: String,
    /// Compete for a Lease so only one of several replicas reconciles.
    #[arg(long, env = "KNSQ_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "KNSQ_OPERATOR_LEASE_NAME",
        default_value = "knsq-operator"
    )]
    lease_name: String,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leadership lasts without renewal.
    #[arg(long, env = "KNSQ_OPERATOR_LEASE_DURATION", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds to finish running reconciles after SIGTERM.
    #[arg(long, env = "KNSQ_OPERATOR_SHUTDOWN_GRACE", default_value_t = 20)]
    shutdown_grace_seconds: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the NSQCluster CustomResourceDefinition as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        print!(
            "{}",
            operator::crd::crd_yaml().context("rendering the CRD")?
        );
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listener = tokio::net::TcpListener::bind(&cli.http_address)
        .await
        .with_context(|| format!("binding --http-address {}", cli.http_address))?;
    let client = kube::Client::try_default()
        .await
        .context("loading the kubeconfig or in-cluster config")?;
    let identity = match cli.identity {
        Some(identity) => identity,
        None => format!("knsq-operator-{}", std::process::id()),
    };
    let lease_duration = Duration::from_secs(cli.lease_duration_seconds.max(3));
    let settings = operator::Settings {
        namespace: cli.namespace,
        images: DefaultImages {
            broker: cli.broker_image,
            lookupd: cli.lookupd_image,
        },
        leader_election: cli.leader_elect.then(|| LeaseConfig {
            name: cli.lease_name,
            namespace: cli.lease_namespace,
            identity,
            lease_duration,
            renew_every: lease_duration / 3,
        }),
    };

    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(operator::run(client, settings, listener, shutdown.clone()));
    tokio::pin!(operator);
    tokio::select! {
        result = &mut operator => return Ok(result.context("operator task")??),
        () = terminate() => tracing::info!("shutting down"),
    }
    shutdown.cancel();
    let grace = Duration::from_secs(cli.shutdown_grace_seconds);
    match tokio::time::timeout(grace, operator).await {
        Ok(result) => Ok(result.context("operator task")??),
        Err(_) => anyhow::bail!("reconciles still running after {grace:?}; exiting"),
    }
}

/// SIGTERM (the kubelet stopping the pod) or SIGINT.
async fn terminate() {
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the operator");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
