//! The reconciler: server-side applies every child of an `NSQCluster`, records events for what
//! changed, and writes the status. The brokers' day-2 operations (draining scale-downs, paced
//! rolls, orphaned claims, lookupd changes) are in [`brokers`].

mod brokers;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{
    Deployment, RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{Instrument, info, info_span, warn};

use crate::children::{
    AdminChildren, CHECKSUM_ANNOTATION, Children, Component, DefaultImages, MANAGER,
    TEMPLATE_HASH_ANNOTATION, lookupd_addresses as lookupd_addresses_of,
};
use crate::crd::Violation;
use crate::crd::{NSQCluster, StorageStatus};
use crate::knsq_http::KnsqHttp;
use crate::metrics::Metrics;
use crate::quantity;
use crate::status::{self, Observed, Outcome};
use crate::validation::{self, AppliedStorage};

/// How often a healthy cluster is looked at again even when nothing changed.
const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How often claims asked to grow are looked at until their volumes have.
const RESIZE_POLL: Duration = Duration::from_secs(15);
/// How often a cluster is looked at while brokers drain, roll or hand off a volume: the
/// operator follows those through the brokers' HTTP APIs, which send no events.
const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NSQCluster {name} has no namespace")]
    MissingNamespace { name: String },
    #[error("reading {kind} {name}")]
    Get {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {kind} {name}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}")]
    Delete {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("updating the status of NSQCluster {name}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("encoding {kind} {name}")]
    Encode {
        kind: &'static str,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The metrics label: the API server's reason (`Forbidden`, `Invalid`, …) when it answered,
    /// otherwise what went wrong on our side.
    pub fn reason(&self) -> String {
        let source = match self {
            Error::MissingNamespace { .. } => return "MissingNamespace".to_owned(),
            Error::Encode { .. } => return "Encode".to_owned(),
            Error::Get { source, .. }
            | Error::Apply { source, .. }
            | Error::Delete { source, .. }
            | Error::Status { source, .. } => source,
        };
        match source {
            kube::Error::Api(status) if !status.reason.is_empty() => status.reason.clone(),
            kube::Error::Api(status) => format!("HTTP{}", status.code),
            _ => "Transport".to_owned(),
        }
    }

    /// The error with its whole source chain, for status messages and events.
    fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}

/// The resources whose version or presence depends on the API server.
#[derive(Clone, Debug)]
pub struct Resources {
    /// `policy/v1` PodDisruptionBudgets, or `policy/v1beta1` on clusters older than 1.21.
    pub pdb: ApiResource,
    /// The ServiceMonitor resource, when the Prometheus operator's CRD is installed.
    pub service_monitor: Option<ApiResource>,
    /// The PrometheusRule resource, when the Prometheus operator's CRD is installed.
    pub prometheus_rule: Option<ApiResource>,
}

/// Everything a reconcile needs besides the cluster itself.
pub struct Context {
    pub client: Client,
    pub images: DefaultImages,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub resources: Resources,
    /// The brokers' and lookupds' own HTTP APIs.
    pub http: KnsqHttp,
    failures: Mutex<HashMap<ObjectRef<NSQCluster>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        images: DefaultImages,
        metrics: Metrics,
        resources: Resources,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            images,
            recorder,
            metrics,
            resources,
            http: KnsqHttp::default(),
            failures: Mutex::default(),
        }
    }

    /// The same context, reaching knsq's servers through `http` (tests script it).
    pub fn with_http(mut self, http: KnsqHttp) -> Self {
        self.http = http;
        self
    }

    /// Consecutive failures of this cluster, after counting one more (or resetting on success).
    fn record_failure(&self, cluster: &ObjectRef<NSQCluster>, failed: bool) -> u32 {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if failed {
            let n = failures.entry(cluster.clone()).or_insert(0);
            *n += 1;
            *n
        } else {
            failures.remove(cluster);
            0
        }
    }
}

/// Delay before retrying after `failures` consecutive failed reconciles.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// The controller's error policy: count the failure and retry with exponential backoff.
pub fn error_policy(cluster: Arc<NSQCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(&error.reason());
    let failures = ctx.record_failure(&ObjectRef::from_obj(cluster.as_ref()), true);
    let delay = backoff(failures);
    warn!(cluster = %cluster.name_any(), error = %error.chain(), failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Reconcile one cluster.
pub async fn reconcile(cluster: Arc<NSQCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", cluster = %cluster.name_any(), namespace = cluster.namespace().as_deref().unwrap_or(""), generation = cluster.metadata.generation);
    let started = Instant::now();
    let result = reconcile_inner(&cluster, &ctx).instrument(span).await;
    ctx.metrics.reconciled(started.elapsed());
    if result.is_ok() {
        ctx.record_failure(&ObjectRef::from_obj(cluster.as_ref()), false);
    }
    result
}

async fn reconcile_inner(cluster: &NSQCluster, ctx: &Context) -> Result<Action, Error> {
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::MissingNamespace { name: name.clone() })?;
    if cluster.metadata.deletion_timestamp.is_some() {
        info!("being deleted; the garbage collector removes its children");
        return Ok(Action::await_change());
    }
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let lookupd_name = Component::Lookupd.name(cluster);
    let broker_name = Component::Broker.name(cluster);
    let before_lookupd = get_opt(&statefulsets, &lookupd_name).await?;
    let before_broker = get_opt(&statefulsets, &broker_name).await?;
    let previous = cluster.status.clone().unwrap_or_default();
    let before = Observed {
        lookupd: before_lookupd.as_ref(),
        broker: before_broker.as_ref(),
        admin: previous.admin.clone(),
        storage: carried_storage(cluster),
        scale_down: previous.scale_down.clone(),
        volume_recovery: previous.volume_recovery.clone(),
        lookupd_addresses: previous.lookupd_addresses.clone(),
    };

    if cluster.is_paused() {
        info!("reconciliation paused by annotation");
        write_status(cluster, ctx, &before, &Outcome::Paused).await?;
        return Ok(Action::requeue(RESYNC));
    }

    let applied_storage = before_broker.as_ref().and_then(validation::applied_storage);
    let mut violations = validation::check(cluster);
    if let Some(applied) = &applied_storage {
        violations.extend(validation::check_storage(cluster, applied));
    }
    let children = if violations.is_empty() {
        Children::build(cluster, &ctx.images).map_err(|v| violations.push(v))
    } else {
        Err(())
    };
    let Ok(mut children) = children else {
        return refuse(cluster, ctx, &before, &violations).await;
    };
    // A StatefulSet's claim template cannot change: keep the applied one, and grow the claims
    // themselves below.
    if let (Some(AppliedStorage::Claims { .. }), Some(applied), Some(desired)) = (
        &applied_storage,
        before_broker.as_ref().and_then(|s| s.spec.as_ref()),
        children.broker.spec.as_mut(),
    ) {
        desired
            .volume_claim_templates
            .clone_from(&applied.volume_claim_templates);
    }

    let now = Timestamp::now();
    let seen = brokers::observe(ctx, cluster, &namespace, before_broker.as_ref()).await?;
    let scaling = brokers::scale(
        ctx,
        cluster,
        &namespace,
        before_broker.as_ref(),
        &seen.pods,
        now,
    )
    .await?;
    let plan = brokers::recovery_plan(cluster, &seen, scaling.replicas, now);
    let replicas = plan
        .hold_below
        .map_or(scaling.replicas, |h| scaling.replicas.min(h));
    let hash = children
        .broker
        .annotations()
        .get(TEMPLATE_HASH_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let partition = brokers::partition(
        ctx,
        cluster,
        &namespace,
        before_broker.as_ref(),
        &hash,
        replicas,
        &seen.pods,
    )
    .await?;
    if let Some(spec) = children.broker.spec.as_mut() {
        spec.replicas = Some(replicas);
        spec.update_strategy = Some(StatefulSetUpdateStrategy {
            type_: Some("RollingUpdate".to_owned()),
            rolling_update: Some(RollingUpdateStatefulSetStrategy {
                partition: Some(partition),
                ..RollingUpdateStatefulSetStrategy::default()
            }),
        });
    }
    // A drain under way keeps the broker StatefulSet as it is: rolling a draining broker would
    // only bring it back serving.
    let held = before_broker.as_ref().filter(|_| scaling.hold);

    match apply_children(ctx, cluster, &namespace, &children, held).await {
        Ok(applied) => {
            let broker_change = match held {
                Some(_) => None,
                None => Some((Component::Broker, &before_broker, &children.broker)),
            };
            for (component, before, desired) in [
                Some((Component::Lookupd, &before_lookupd, &children.lookupd)),
                broker_change,
            ]
            .into_iter()
            .flatten()
            {
                let related = desired.object_ref(&());
                for (reason, note) in changes(component, before.as_ref(), desired) {
                    publish(
                        ctx,
                        cluster,
                        EventType::Normal,
                        reason,
                        note,
                        Some(related.clone()),
                    )
                    .await;
                }
            }
            brokers::recover(ctx, cluster, &namespace, &plan).await?;
            let storage = match &applied_storage {
                Some(AppliedStorage::Claims { .. }) => Some(
                    grow_claims(cluster, ctx, &namespace, &applied.broker, &seen.claims).await?,
                ),
                _ => storage_status(cluster, Vec::new()),
            };
            let resizing = storage.as_ref().is_some_and(|s| !s.resizing.is_empty());
            let lookupd_addresses = brokers::share_lookupds(ctx, cluster, &seen.pods).await;
            let lookupds_pending = lookupd_addresses != lookupd_addresses_of(cluster);
            let rolling = partition > 0 || status::rolling(&applied.broker);
            let busy = scaling.status.is_some()
                || scaling.restarted
                || !plan.status.is_empty()
                || !plan.delete_claims.is_empty()
                || rolling
                || lookupds_pending;
            let after = Observed {
                lookupd: Some(&applied.lookupd),
                broker: Some(&applied.broker),
                admin: applied.admin.as_ref().map(status::deployment_status),
                storage,
                scale_down: scaling.status,
                volume_recovery: plan.status,
                lookupd_addresses,
            };
            write_status(cluster, ctx, &after, &Outcome::Applied).await?;
            Ok(Action::requeue(if busy {
                POLL
            } else if resizing {
                // Volume expansion is reported by the claims, which the operator does not watch.
                RESIZE_POLL
            } else {
                RESYNC
            }))
        }
        Err(error) => {
            let message = error.chain();
            publish(
                ctx,
                cluster,
                EventType::Warning,
                "ReconcileFailed",
                message.clone(),
                None,
            )
            .await;
            let failed = Outcome::Failed(message);
            if let Err(status_error) = write_status(cluster, ctx, &before, &failed).await {
                warn!(error = %status_error.chain(), "could not record the failure in the status");
            }
            Err(error)
        }
    }
}

/// The storage status before this reconcile looked at the claims.
fn carried_storage(cluster: &NSQCluster) -> Option<StorageStatus> {
    cluster
        .status
        .as_ref()
        .and_then(|s| s.storage.clone())
        .or_else(|| storage_status(cluster, Vec::new()))
}

/// The storage status of a cluster whose claims are `resizing`; `None` when ephemeral.
fn storage_status(cluster: &NSQCluster, resizing: Vec<String>) -> Option<StorageStatus> {
    let storage = &cluster.spec.broker.storage;
    (!storage.ephemeral).then(|| StorageStatus {
        size: storage.size.0.clone(),
        resizing,
    })
}

/// Refuse a spec the CRD's CEL rules (or the operator's own checks) reject: nothing is applied,
/// the cluster turns `Degraded` naming the fields, and a warning event says so once.
async fn refuse(
    cluster: &NSQCluster,
    ctx: &Context,
    before: &Observed<'_>,
    violations: &[Violation],
) -> Result<Action, Error> {
    let message = violations
        .iter()
        .map(Violation::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    warn!(%message, "refusing an invalid spec");
    let known = cluster.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == status::DEGRADED && c.reason == status::INVALID_SPEC && c.message == message
        })
    });
    if !known {
        publish(
            ctx,
            cluster,
            EventType::Warning,
            status::INVALID_SPEC,
            message.clone(),
            None,
        )
        .await;
    }
    write_status(cluster, ctx, before, &Outcome::Invalid(message)).await?;
    Ok(Action::await_change())
}

/// Ask every broker claim smaller than the spec's size to grow to it; the names of those whose
/// volume has not reached it yet. Claims are found by the StatefulSet's selector, so those of
/// pods removed by a scale-down grow too, ready for their return.
async fn grow_claims(
    cluster: &NSQCluster,
    ctx: &Context,
    namespace: &str,
    broker: &StatefulSet,
    listed: &[PersistentVolumeClaim],
) -> Result<StorageStatus, Error> {
    let size = &cluster.spec.broker.storage.size;
    let wanted = quantity::bytes(&size.0).unwrap_or(0.0);
    let applied = validation::applied_storage(broker);
    let template_size = match &applied {
        Some(AppliedStorage::Claims { .. }) => broker
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.as_ref())
            .and_then(|v| v.first())
            .and_then(claim_request),
        _ => None,
    };
    // Claims made from a template already this size need nothing: no request at all.
    if template_size.is_some_and(|t| t >= wanted) {
        return Ok(storage_status(cluster, Vec::new()).unwrap_or_default());
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let mut resizing = Vec::new();
    for claim in listed {
        let name = claim.name_any();
        if claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if claim_request(claim).is_some_and(|r| r < wanted) {
            let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}});
            claims
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|source| Error::Apply {
                    kind: "PersistentVolumeClaim".to_owned(),
                    name: name.clone(),
                    source,
                })?;
            info!(claim = %name, size = %size.0, "asked the claim to grow");
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "VolumeResizing",
                format!("asked {name} to grow to {}", size.0),
                None,
            )
            .await;
        }
        let capacity = claim
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .and_then(|q| quantity::bytes(&q.0));
        if capacity.is_none_or(|c| c < wanted) {
            resizing.push(name);
        }
    }
    Ok(storage_status(cluster, resizing).unwrap_or_default())
}

/// The bytes a claim (or claim template) asks for.
fn claim_request(claim: &PersistentVolumeClaim) -> Option<f64> {
    quantity::bytes(&quantity::requested_storage(claim)?.0)
}

async fn get_opt(api: &Api<StatefulSet>, name: &str) -> Result<Option<StatefulSet>, Error> {
    api.get_opt(name).await.map_err(|source| Error::Get {
        kind: "StatefulSet",
        name: name.to_owned(),
        source,
    })
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

pub(crate) async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let name = object.name_any();
    api.patch(&name, &apply_params(), &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply {
            kind: K::kind(&K::DynamicType::default()).into_owned(),
            name,
            source,
        })
}

async fn apply_dynamic(
    ctx: &Context,
    namespace: &str,
    resource: &ApiResource,
    mut object: Value,
) -> Result<(), Error> {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    object["apiVersion"] = Value::String(resource.api_version.clone());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, resource);
    api.patch(&name, &apply_params(), &Patch::Apply(&object))
        .await
        .map_err(|source| Error::Apply {
            kind: resource.kind.clone(),
            name,
            source,
        })?;
    Ok(())
}

/// Delete an optional child the spec turned off; one that does not exist is fine.
async fn delete_dynamic(
    ctx: &Context,
    namespace: &str,
    resource: &ApiResource,
    name: &str,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, resource);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            info!(kind = %resource.kind, name, "deleted what the spec turned off");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete {
            kind: resource.kind.clone(),
            name: name.to_owned(),
            source,
        }),
    }
}

/// What applying the children returned that the status needs.
struct Applied {
    lookupd: StatefulSet,
    broker: StatefulSet,
    admin: Option<Deployment>,
}

/// Apply every child in order, and delete the optional ones the spec turned off; returns the
/// workloads as the API server answered them.
async fn apply_children(
    ctx: &Context,
    cluster: &NSQCluster,
    namespace: &str,
    children: &Children,
    held_broker: Option<&StatefulSet>,
) -> Result<Applied, Error> {
    let client = &ctx.client;
    apply(
        &Api::namespaced(client.clone(), namespace),
        &children.config_map,
    )
    .await?;
    let services = Api::namespaced(client.clone(), namespace);
    for service in &children.services {
        apply(&services, service).await?;
    }
    let statefulsets = Api::namespaced(client.clone(), namespace);
    let lookupd = apply(&statefulsets, &children.lookupd).await?;
    let broker = match held_broker {
        Some(live) => live.clone(),
        None => apply(&statefulsets, &children.broker).await?,
    };
    for pdb in &children.pdbs {
        let value = serde_json::to_value(pdb).map_err(|source| Error::Encode {
            kind: "PodDisruptionBudget",
            name: pdb.name_any(),
            source,
        })?;
        apply_dynamic(ctx, namespace, &ctx.resources.pdb, value).await?;
    }
    for name in &children.disabled_pdbs {
        delete_dynamic(ctx, namespace, &ctx.resources.pdb, name).await?;
    }
    let optional = [
        (
            &ctx.resources.service_monitor,
            &children.service_monitor,
            &children.disabled_service_monitor,
        ),
        (
            &ctx.resources.prometheus_rule,
            &children.prometheus_rule,
            &children.disabled_prometheus_rule,
        ),
    ];
    for (resource, object, disabled) in optional {
        let Some(resource) = resource else { continue };
        match (object, disabled) {
            (Some(object), _) => apply_dynamic(ctx, namespace, resource, object.clone()).await?,
            (None, Some(name)) => delete_dynamic(ctx, namespace, resource, name).await?,
            (None, None) => {}
        }
    }
    let admin = apply_admin(ctx, namespace, &children.admin).await?;
    delete_admin(ctx, cluster, namespace, &children.admin).await?;
    Ok(Applied {
        lookupd,
        broker,
        admin,
    })
}

/// nsqadmin's objects: applied when asked for; deleted once `spec.admin` is gone (known from
/// the status, so clusters that never had nsqadmin cost no request).
async fn apply_admin(
    ctx: &Context,
    namespace: &str,
    admin: &AdminChildren,
) -> Result<Option<Deployment>, Error> {
    let client = &ctx.client;
    let deployment = match (&admin.deployment, &admin.service) {
        (Some(deployment), Some(service)) => {
            apply(&Api::namespaced(client.clone(), namespace), service).await?;
            Some(apply(&Api::namespaced(client.clone(), namespace), deployment).await?)
        }
        _ => None,
    };
    if let Some(ingress) = &admin.ingress {
        apply(
            &Api::<Ingress>::namespaced(client.clone(), namespace),
            ingress,
        )
        .await?;
    }
    Ok(deployment)
}

/// Delete nsqadmin's objects when the spec no longer asks for them.
async fn delete_admin(
    ctx: &Context,
    cluster: &NSQCluster,
    namespace: &str,
    admin: &AdminChildren,
) -> Result<(), Error> {
    let had_admin = cluster.status.as_ref().is_some_and(|s| s.admin.is_some());
    let mut gone: Vec<(ApiResource, &String)> = Vec::new();
    if let (Some(name), true) = (&admin.disabled, had_admin) {
        gone.push((ApiResource::erase::<Deployment>(&()), name));
        gone.push((ApiResource::erase::<Service>(&()), name));
    }
    if let (Some(name), true) = (&admin.disabled_ingress, had_admin) {
        gone.push((ApiResource::erase::<Ingress>(&()), name));
    }
    for (resource, name) in gone {
        delete_dynamic(ctx, namespace, &resource, name).await?;
    }
    Ok(())
}

pub(crate) fn replicas(sts: &StatefulSet) -> i32 {
    sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn image(sts: &StatefulSet) -> Option<&str> {
    sts.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .as_deref()
}

fn checksum(sts: &StatefulSet) -> Option<&str> {
    sts.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CHECKSUM_ANNOTATION)
        .map(String::as_str)
}

/// What applying `desired` over `before` changes that a user should hear about, as event
/// (reason, note) pairs.
pub fn changes(
    component: Component,
    before: Option<&StatefulSet>,
    desired: &StatefulSet,
) -> Vec<(&'static str, String)> {
    let what = component.as_str();
    let Some(before) = before else {
        return vec![(
            "Created",
            format!(
                "created the {what} StatefulSet with {} replicas",
                replicas(desired)
            ),
        )];
    };
    let mut out = Vec::new();
    if replicas(before) != replicas(desired) {
        out.push((
            "Scaled",
            format!(
                "scaled {what}s from {} to {}",
                replicas(before),
                replicas(desired)
            ),
        ));
    }
    if image(before) != image(desired) {
        out.push((
            "ImageChanged",
            format!(
                "rolling {what}s to image {}",
                image(desired).unwrap_or_default()
            ),
        ));
    }
    if checksum(before) != checksum(desired) {
        out.push((
            "SettingsChanged",
            format!("{what} settings changed; rolling the pods"),
        ));
    }
    out
}

/// Record an event on the cluster; `related` names the child it concerns, which also keeps
/// events about different children from being merged into one series.
pub(crate) async fn publish(
    ctx: &Context,
    cluster: &NSQCluster,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: related,
    };
    if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        warn!(%error, reason, "could not record event");
    }
}

/// Patch the status subresource when the computed status differs from the stored one.
async fn write_status(
    cluster: &NSQCluster,
    ctx: &Context,
    observed: &Observed<'_>,
    outcome: &Outcome,
) -> Result<(), Error> {
    let new = status::compute(cluster, observed, outcome, Time(Timestamp::now()));
    if cluster.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let name = cluster.name_any();
    let api: Api<NSQCluster> = Api::namespaced(
        ctx.client.clone(),
        cluster.namespace().as_deref().unwrap_or("default"),
    );
    // Applied, so a field the new status leaves out (nsqadmin removed, claims done resizing)
    // is removed rather than kept as a merge would.
    let patch = json!({"apiVersion": "knsq.io/v1alpha1", "kind": "NSQCluster", "status": new});
    api.patch_status(&name, &apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Status { name, source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::{cluster, images};
    use crate::crd::NSQClusterSpec;

    fn broker(spec: NSQClusterSpec) -> StatefulSet {
        Children::build(&cluster(spec), &images())
            .expect("valid")
            .broker
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 9, 10, 40]
            .into_iter()
            .map(|n| backoff(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 256, 300, 300]);
    }

    #[test]
    fn change_events() {
        let base = broker(NSQClusterSpec::default());
        assert_eq!(
            changes(Component::Broker, None, &base),
            [(
                "Created",
                "created the broker StatefulSet with 3 replicas".to_owned()
            )]
        );
        assert_eq!(changes(Component::Broker, Some(&base), &base), []);
        let mut spec = NSQClusterSpec::default();
        spec.broker.replicas = 5;
        spec.broker.pod.image = Some("example/broker:2".to_owned());
        spec.broker.settings.max_rdy_count = 100;
        let reasons: Vec<_> = changes(Component::Broker, Some(&base), &broker(spec))
            .into_iter()
            .collect();
        assert_eq!(
            reasons,
            [
                ("Scaled", "scaled brokers from 3 to 5".to_owned()),
                (
                    "ImageChanged",
                    "rolling brokers to image example/broker:2".to_owned()
                ),
                (
                    "SettingsChanged",
                    "broker settings changed; rolling the pods".to_owned()
                ),
            ]
        );
    }
}
