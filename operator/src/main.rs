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
    /// Print the NSQCluster CustomResourceDefinition as YAML, or apply it.
    Crd {
        /// Server-side apply it to the cluster of KUBECONFIG or the in-cluster config (the
        /// chart's pre-upgrade hook), instead of printing it.
        #[arg(long)]
        apply: bool,
    },
    /// Print knsq's Prometheus alerting rules for every cluster, as a rule file.
    PrometheusRules,
    /// Print the objects the operator makes of an NSQCluster (YAML file, `-` for stdin).
    Render { file: std::path::PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Crd { apply: false }) => {
            print!(
                "{}",
                operator::crd::crd_yaml().context("rendering the CRD")?
            );
            return Ok(());
        }
        Some(Command::Crd { apply: true }) => {
            let client = kube::Client::try_default()
                .await
                .context("loading the kubeconfig or in-cluster config")?;
            let crd = operator::crd::apply_definition(&client)
                .await
                .context("applying the NSQCluster CRD")?;
            let generation = crd.metadata.generation.unwrap_or_default();
            println!("applied the NSQCluster CRD (generation {generation})");
            return Ok(());
        }
        Some(Command::PrometheusRules) => {
            print!(
                "{}",
                operator::alerts::rules_yaml().context("rendering the rules")?
            );
            return Ok(());
        }
        Some(Command::Render { file }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let images = DefaultImages {
                broker: cli.broker_image.clone(),
                lookupd: cli.lookupd_image.clone(),
            };
            print!("{}", render(&text, &images)?);
            return Ok(());
        }
        None => {}
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

/// The objects the operator makes of an NSQCluster given as YAML, as a YAML stream: what
/// `knsq-operator render` prints, for review and for schema checks of every Kubernetes version.
/// The cluster's namespace defaults to `default`; PodDisruptionBudgets are `policy/v1`.
fn render(cluster_yaml: &str, images: &DefaultImages) -> anyhow::Result<String> {
    let mut cluster: operator::crd::NSQCluster =
        serde_saphyr::from_str(cluster_yaml).context("parsing the NSQCluster")?;
    cluster
        .metadata
        .namespace
        .get_or_insert_with(|| "default".to_owned());
    let mut problems = operator::validation::check(&cluster);
    let children =
        operator::children::Children::build(&cluster, images).map_err(|v| problems.push(v));
    let children = match children {
        Ok(children) if problems.is_empty() => children,
        _ => anyhow::bail!(
            "the operator refuses this spec: {}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    let mut objects: Vec<serde_json::Value> = Vec::new();
    let mut push = |o: serde_json::Result<serde_json::Value>| -> anyhow::Result<()> {
        objects.push(o.context("encoding")?);
        Ok(())
    };
    push(serde_json::to_value(&children.config_map))?;
    for service in &children.services {
        push(serde_json::to_value(service))?;
    }
    push(serde_json::to_value(&children.lookupd))?;
    push(serde_json::to_value(&children.broker))?;
    for pdb in &children.pdbs {
        push(serde_json::to_value(pdb))?;
    }
    let admin = &children.admin;
    push(serde_json::to_value(&admin.service))?;
    push(serde_json::to_value(&admin.deployment))?;
    push(serde_json::to_value(&admin.ingress))?;
    objects.extend(children.service_monitor.clone());
    objects.extend(children.prometheus_rule.clone());
    let mut out = String::new();
    for object in objects.into_iter().filter(|o| !o.is_null()) {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&object).context("writing YAML")?);
    }
    Ok(out)
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
