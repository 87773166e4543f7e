//! knsq-operator: reconciles `NSQCluster` resources into running knsq clusters.
//!
//! - [`crd`]: the custom resource and its schema;
//! - [`validation`]: the operator's own checks of a spec (CEL's twins);
//! - [`children`]: pure builders of the objects a cluster owns;
//! - [`alerts`]: the Prometheus alerts;
//! - [`status`]: status computation;
//! - [`pods`], [`scale_down`], [`rollout`], [`recovery`]: what the brokers' day-2 operations
//!   decide (a scale-down that drains, rolls paced by registration, orphaned claims);
//! - [`knsq_http`]: the brokers' and lookupds' own HTTP APIs;
//! - [`controller`]: the reconciler;
//! - [`leader`]: Lease-based leader election;
//! - [`server`], [`metrics`]: `/metrics`, `/healthz`, `/readyz`.

pub mod alerts;
pub mod children;
pub mod controller;
// kube's `KubeSchema` derive emits a hidden copy of each schema struct with the same
// visibility, which the lint reports as unreachable.
#[allow(unreachable_pub)]
pub mod crd;
pub mod knsq_http;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod quantity;
pub mod recovery;
pub mod rollout;
pub mod scale_down;
pub mod server;
pub mod status;
pub mod validation;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::children::{DefaultImages, MANAGER};
use crate::controller::{Context, Resources};
use crate::crd::NSQCluster;
use crate::leader::{Elector, LeaseConfig};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registering metrics")]
    Metrics(#[source] prometheus::Error),
    #[error("discovering the API server's resources ({api_version})")]
    Discovery {
        api_version: String,
        #[source]
        source: kube::Error,
    },
    #[error("leader election")]
    Leader(#[source] leader::Error),
    #[error("serving HTTP")]
    Http(#[source] std::io::Error),
}

/// What the operator reconciles and how.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch only this namespace; every namespace when `None`.
    pub namespace: Option<String>,
    pub images: DefaultImages,
    /// Compete for this Lease before reconciling; reconcile at once when `None`.
    pub leader_election: Option<LeaseConfig>,
}

/// Run the operator until `shutdown` is cancelled: the HTTP server on `listener`, leader
/// election, and the controller. Returns an error when leadership is lost, so the process
/// restarts instead of reconciling beside a new leader.
pub async fn run(
    client: Client,
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).map_err(Error::Metrics)?;
    let ready = Arc::new(AtomicBool::new(false));
    let http = tokio::spawn(server::run(
        listener,
        server::router(registry, ready.clone()),
        shutdown.clone(),
    ));

    let result = lead_and_reconcile(client, settings, metrics, &ready, &shutdown).await;
    shutdown.cancel();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return result.and(Err(Error::Http(e))),
        Err(e) => warn!(error = %e, "HTTP server task failed"),
    }
    result
}

async fn lead_and_reconcile(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    ready: &AtomicBool,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let resources = Resources {
        pdb: pdb_resource(&client).await?,
        service_monitor: monitoring_resource(&client, "ServiceMonitor", "servicemonitors").await?,
        prometheus_rule: monitoring_resource(&client, "PrometheusRule", "prometheusrules").await?,
    };
    ready.store(true, Ordering::Relaxed);
    info!(pdb = %resources.pdb.api_version, service_monitors = resources.service_monitor.is_some(), prometheus_rules = resources.prometheus_rule.is_some(), "discovered the API server");

    let elector = settings
        .leader_election
        .clone()
        .map(|config| Elector::new(client.clone(), config));
    let stop = shutdown.child_token();
    let keeper = match &elector {
        Some(elector) => {
            if !elector.acquire(shutdown).await.map_err(Error::Leader)? {
                return Ok(());
            }
            metrics.set_leader(true);
            Some(keep_leading(elector, stop.clone()))
        }
        None => None,
    };

    let ctx = Arc::new(Context::new(
        client.clone(),
        settings.images,
        metrics.clone(),
        resources,
    ));
    let controller = controller(client, settings.namespace.as_deref(), &ctx, stop.clone());
    let lost = match keeper {
        Some(keeper) => {
            let (lost, ()) = tokio::join!(keeper, controller);
            lost
        }
        None => {
            controller.await;
            Ok(())
        }
    };
    metrics.set_leader(false);
    lost.map_err(Error::Leader)?;
    if let Some(elector) = &elector
        && let Err(e) = elector.release().await
    {
        warn!(error = %e, "could not release the leader Lease");
    }
    Ok(())
}

/// Renew the Lease until `stop`; when it is lost, cancel `stop` so the controller halts.
async fn keep_leading(elector: &Elector, stop: CancellationToken) -> Result<(), leader::Error> {
    let result = elector.keep(&stop).await;
    if let Err(e) = &result {
        error!(error = %e, "leadership lost; stopping the controller");
    }
    stop.cancel();
    result
}

async fn controller(
    client: Client,
    namespace: Option<&str>,
    ctx: &Arc<Context>,
    stop: CancellationToken,
) {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let dynamic_api = |resource: &ApiResource| match namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource),
        None => Api::<DynamicObject>::all_with(client.clone(), resource),
    };
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let mut controller = Controller::new(
        api::<NSQCluster>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(api::<StatefulSet>(&client, namespace), owned.clone())
    .owns(api::<Service>(&client, namespace), owned.clone())
    .owns(api::<ConfigMap>(&client, namespace), owned.clone())
    .owns(api::<Deployment>(&client, namespace), owned.clone())
    .owns_with(
        dynamic_api(&ctx.resources.pdb),
        ctx.resources.pdb.clone(),
        owned.clone(),
    );
    for resource in [
        &ctx.resources.service_monitor,
        &ctx.resources.prometheus_rule,
    ]
    .into_iter()
    .flatten()
    {
        controller = controller.owns_with(dynamic_api(resource), resource.clone(), owned.clone());
    }
    let store = controller.store();
    ctx.metrics.watch_clusters(store.clone());
    let running = controller
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::reconcile, controller::error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => info!(cluster = %object, "reconciled"),
                Err(e) => warn!(error = %e, "controller"),
            }
        });
    // kube's graceful shutdown waits for the first list of NSQClusters, which never comes while
    // it fails (the CRD not installed yet, say); with nothing reconciled there is nothing to
    // finish, so stop at once then.
    let never_listed = async {
        stop.cancelled().await;
        if store.wait_until_ready().now_or_never().is_some() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = running => {}
        () = never_listed => warn!("stopping before NSQClusters could ever be listed"),
    }
}

/// Whether the API server serves `resource` (plural) in `api_version`.
async fn serves(client: &Client, api_version: &str, resource: &str) -> Result<bool, Error> {
    match client.list_api_group_resources(api_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == resource)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(Error::Discovery {
            api_version: api_version.to_owned(),
            source,
        }),
    }
}

/// `policy/v1` PodDisruptionBudgets, or `policy/v1beta1` on API servers older than 1.21.
async fn pdb_resource(client: &Client) -> Result<ApiResource, Error> {
    let version = if serves(client, "policy/v1", "poddisruptionbudgets").await? {
        "v1"
    } else {
        "v1beta1"
    };
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", version, "PodDisruptionBudget"),
        "poddisruptionbudgets",
    ))
}

/// A resource of the Prometheus operator (ServiceMonitor, PrometheusRule), when its CRD is
/// installed.
async fn monitoring_resource(
    client: &Client,
    kind: &str,
    plural: &str,
) -> Result<Option<ApiResource>, Error> {
    let served = serves(client, children::MONITORING_API_VERSION, plural).await?;
    Ok(served.then(|| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind),
            plural,
        )
    }))
}
