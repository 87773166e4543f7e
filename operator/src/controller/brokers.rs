//! The brokers' day-2 operations within one reconcile: a scale-down that drains first, rolls
//! paced one registered broker at a time, orphaned claims emptied by handoff Jobs, and the
//! lookupd list handed to running brokers. The decisions are pure ([`crate::scale_down`],
//! [`crate::rollout`], [`crate::recovery`]); this module observes and acts.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::{Context, Error, apply, publish, replicas};
use crate::children::{
    BROKER_HTTP, CLAIM_LABEL, Component, DATA_VOLUME, LOOKUPD_HTTP, claim_ordinal, handoff_job,
    handoff_job_name, handoff_labels, lookupd_addresses, selector_labels,
};
use crate::crd::{DrainingBroker, NSQCluster, ScaleDownStatus};
use crate::pods::PodView;
use crate::recovery::{self, ClaimView, JobState, JobView, Plan};
use crate::rollout::{self, Step};
use crate::scale_down::{self, Seen, UNREACHABLE};
use crate::status::BLOCKED;

/// The brokers' pods, claims and handoff Jobs as this reconcile found them.
pub(super) struct Observation {
    pub(super) pods: Vec<PodView>,
    pub(super) claims: Vec<PersistentVolumeClaim>,
    pub(super) jobs: Vec<JobView>,
}

fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The pods of a component's StatefulSet.
pub(super) async fn pods(
    ctx: &Context,
    cluster: &NSQCluster,
    namespace: &str,
    component: Component,
) -> Result<Vec<PodView>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let set = component.name(cluster);
    let listed = api
        .list(&ListParams::default().labels(&selector(&selector_labels(cluster, component))))
        .await
        .map_err(|source| Error::Get {
            kind: "Pod",
            name: format!("{set}-*"),
            source,
        })?;
    Ok(listed
        .items
        .iter()
        .filter_map(|pod| PodView::of(pod, &set, component.as_str()))
        .collect())
}

/// Read the brokers' pods (when their StatefulSet exists), claims (when they are claims) and
/// handoff Jobs (when a claim may need one).
pub(super) async fn observe(
    ctx: &Context,
    cluster: &NSQCluster,
    namespace: &str,
    live: Option<&StatefulSet>,
) -> Result<Observation, Error> {
    let pods = match live {
        Some(_) => pods(ctx, cluster, namespace, Component::Broker).await?,
        None => Vec::new(),
    };
    let claims = if cluster.spec.broker.storage.ephemeral {
        Vec::new()
    } else {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
        let listed = api
            .list(
                &ListParams::default()
                    .labels(&selector(&selector_labels(cluster, Component::Broker))),
            )
            .await
            .map_err(|source| Error::Get {
                kind: "PersistentVolumeClaim",
                name: format!("{DATA_VOLUME}-{}-*", Component::Broker.name(cluster)),
                source,
            })?;
        listed
            .items
            .into_iter()
            .filter(|c| claim_ordinal(cluster, &c.name_any()).is_some())
            .collect()
    };
    // Jobs matter once a claim outlives its broker, or while the status lists a recovery.
    let highest = live.map_or(0, replicas).max(cluster.spec.broker.replicas);
    let orphans = claims
        .iter()
        .any(|c| claim_ordinal(cluster, &c.name_any()).is_some_and(|o| o >= highest));
    let recovering = cluster
        .status
        .as_ref()
        .is_some_and(|s| !s.volume_recovery.is_empty());
    let jobs = if orphans || recovering {
        let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
        let listed = api
            .list(&ListParams::default().labels(&selector(&handoff_labels(cluster))))
            .await
            .map_err(|source| Error::Get {
                kind: "Job",
                name: format!("{}-*-handoff", Component::Broker.name(cluster)),
                source,
            })?;
        listed.items.iter().filter_map(job_view).collect()
    } else {
        Vec::new()
    };
    Ok(Observation { pods, claims, jobs })
}

fn job_view(job: &Job) -> Option<JobView> {
    let claim = job.labels().get(CLAIM_LABEL)?.clone();
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let state = conditions
        .iter()
        .filter(|c| c.status == "True")
        .find_map(|c| match c.type_.as_str() {
            "Complete" => Some(JobState::Succeeded),
            "Failed" => Some(JobState::Failed(
                c.last_transition_time
                    .as_ref()
                    .map_or_else(Timestamp::now, |t| t.0),
            )),
            _ => None,
        })
        .unwrap_or(JobState::Running);
    Some(JobView {
        name: job.name_any(),
        claim,
        state,
    })
}

/// The broker StatefulSet's replicas for this reconcile, and whether its other changes wait.
pub(super) struct Scaling {
    pub(super) replicas: i32,
    /// A drain is under way: the StatefulSet is left as it is until it ends.
    pub(super) hold: bool,
    pub(super) status: Option<ScaleDownStatus>,
    /// Pods restarted because the scale-down they were draining for was called off.
    pub(super) restarted: bool,
}

/// Drain the brokers a lower `spec.broker.replicas` removes, and lower the StatefulSet only
/// once they are empty (or at once when forced).
pub(super) async fn scale(
    ctx: &Context,
    cluster: &NSQCluster,
    namespace: &str,
    live: Option<&StatefulSet>,
    pods: &[PodView],
    now: Timestamp,
) -> Result<Scaling, Error> {
    let wanted = cluster.spec.broker.replicas;
    let set = Component::Broker.name(cluster);
    let previous = cluster.status.as_ref().and_then(|s| s.scale_down.as_ref());
    let mut restarted = false;
    if let Some(previous) = previous {
        let kept: Vec<&DrainingBroker> =
            scale_down::kept(&previous.brokers, wanted, &set).collect();
        for broker in &kept {
            restart(ctx, namespace, broker).await?;
            restarted = true;
        }
        if !kept.is_empty() {
            let names: Vec<&str> = kept.iter().map(|b| b.name.as_str()).collect();
            publish(
                ctx,
                cluster,
                EventType::Normal,
                "ScaleDownCancelled",
                format!(
                    "the spec keeps {} after all: restarted to end their drain (what they handed off stays on the other brokers)",
                    names.join(", ")
                ),
                None,
            )
            .await;
        }
    }
    let unchanged = Scaling {
        replicas: wanted,
        hold: false,
        status: None,
        restarted,
    };
    let Some(current) = live.map(replicas) else {
        return Ok(unchanged);
    };
    if wanted >= current {
        return Ok(unchanged);
    }
    if cluster.forces_scale_down() {
        publish(
            ctx,
            cluster,
            EventType::Warning,
            "ForcedScaleDown",
            format!(
                "lowering the brokers from {current} to {wanted} without draining ({} is set); what they hold is handed off from their volumes",
                crate::crd::FORCE_SCALE_DOWN_ANNOTATION
            ),
            None,
        )
        .await;
        return Ok(unchanged);
    }

    let mut brokers = Vec::new();
    for ordinal in (wanted..current).rev() {
        let name = format!("{set}-{ordinal}");
        let pod = pods.iter().find(|p| p.ordinal == ordinal);
        let address = pod.and_then(|p| p.address(BROKER_HTTP.port));
        let seen = match address {
            Some(address) => Some(match ctx.http.drain_report(address).await {
                Ok(report) => Seen::Report(report),
                Err(e) => Seen::Unreachable(e.to_string()),
            }),
            None => None,
        };
        let before = previous.and_then(|p| p.brokers.iter().find(|b| b.name == name));
        let (mut record, ask) = scale_down::track(&name, before, pod, seen, now);
        if let (true, Some(address)) = (ask, address) {
            match ctx.http.start_drain(address).await {
                Ok(()) => info!(broker = %name, "asked to drain"),
                Err(e) => {
                    record.state = UNREACHABLE.to_owned();
                    record.reason = Some(e.to_string());
                }
            }
        }
        if record.state == BLOCKED && before.is_none_or(|b| b.state != BLOCKED) {
            publish(
                ctx,
                cluster,
                EventType::Warning,
                "ScaleDownBlocked",
                format!(
                    "{name} cannot finish its drain: {}; the StatefulSet stays at {current}",
                    record.reason.as_deref().unwrap_or("no reason given")
                ),
                None,
            )
            .await;
        }
        brokers.push(record);
    }
    let names: Vec<&str> = brokers.iter().map(|b| b.name.as_str()).collect();
    if previous.is_none() {
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "ScaleDownStarted",
            format!(
                "draining {} before lowering the brokers from {current} to {wanted}",
                names.join(", ")
            ),
            None,
        )
        .await;
    }
    if scale_down::finished(&brokers) {
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "ScaledDown",
            format!(
                "{} drained; lowering the brokers from {current} to {wanted}",
                names.join(", ")
            ),
            None,
        )
        .await;
        return Ok(unchanged);
    }
    Ok(Scaling {
        replicas: current,
        hold: true,
        status: Some(ScaleDownStatus {
            from: previous.map_or(current, |p| p.from),
            to: wanted,
            brokers,
        }),
        restarted,
    })
}

/// Delete the pod a drain was asked of (and only that one: a newer pod never drained).
async fn restart(ctx: &Context, namespace: &str, broker: &DrainingBroker) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let params = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some(broker.pod_uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&broker.name, &params).await {
        Ok(_) => {
            info!(pod = %broker.name, "restarted: its scale-down was called off");
            Ok(())
        }
        // Gone already, or replaced (the uid precondition failed): not draining either way.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(source) => Err(Error::Delete {
            kind: "Pod".to_owned(),
            name: broker.name.clone(),
            source,
        }),
    }
}

/// What to do about claims no broker will come back to.
pub(super) fn recovery_plan(
    cluster: &NSQCluster,
    seen: &Observation,
    applied: i32,
    now: Timestamp,
) -> Plan {
    let claims: Vec<ClaimView> = seen
        .claims
        .iter()
        .filter_map(|c| {
            Some(ClaimView {
                name: c.name_any(),
                ordinal: claim_ordinal(cluster, &c.name_any())?,
                deleting: c.metadata.deletion_timestamp.is_some(),
            })
        })
        .collect();
    let pods: BTreeSet<i32> = seen.pods.iter().map(|p| p.ordinal).collect();
    let previous = cluster
        .status
        .as_ref()
        .map(|s| s.volume_recovery.as_slice())
        .unwrap_or_default();
    recovery::plan(
        &recovery::Observed {
            claims: &claims,
            jobs: &seen.jobs,
            pods: &pods,
            wanted: cluster.spec.broker.replicas,
            applied,
            delete_claims: cluster.spec.broker.storage.delete_claim_on_scale_down,
            previous,
            now,
        },
        |ordinal| handoff_job_name(cluster, ordinal),
    )
}

/// Start, clean up and finish the handoffs the plan asks for.
pub(super) async fn recover(
    ctx: &Context,
    cluster: &NSQCluster,
    namespace: &str,
    plan: &Plan,
) -> Result<(), Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    for &ordinal in &plan.create {
        let job = handoff_job(cluster, &ctx.images.broker, ordinal);
        apply(&jobs, &job).await?;
        let claim = job.labels().get(CLAIM_LABEL).cloned().unwrap_or_default();
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "VolumeRecoveryStarted",
            format!(
                "{claim} has no broker to come back to: Job {} hands off what is left on it",
                job.name_any()
            ),
            None,
        )
        .await;
    }
    for name in &plan.newly_failed {
        publish(
            ctx,
            cluster,
            EventType::Warning,
            "VolumeRecoveryFailed",
            format!(
                "Job {name} could not hand off its claim (see its pods' logs); a new one follows in {}s, the claim is kept",
                recovery::RETRY.as_secs()
            ),
            None,
        )
        .await;
    }
    for name in &plan.delete_jobs {
        delete(&jobs, "Job", name, &DeleteParams::background()).await?;
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    for name in &plan.delete_claims {
        delete(
            &claims,
            "PersistentVolumeClaim",
            name,
            &DeleteParams::default(),
        )
        .await?;
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "VolumeRecovered",
            format!("{name} is empty, every message handed off; deleted it"),
            None,
        )
        .await;
    }
    Ok(())
}

async fn delete<K>(api: &Api<K>, kind: &str, name: &str, params: &DeleteParams) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete {
            kind: kind.to_owned(),
            name: name.to_owned(),
            source,
        }),
    }
}

/// The partition for the broker StatefulSet: a roll moves one broker further once the updated
/// ones are registered with every reachable lookupd.
pub(super) async fn partition(
    ctx: &Context,
    cluster: &NSQCluster,
    namespace: &str,
    live: Option<&StatefulSet>,
    hash: &str,
    replicas: i32,
    pods: &[PodView],
) -> Result<i32, Error> {
    let (partition, updated) = match rollout::step(live, hash, replicas, pods) {
        Step::Partition(partition) => return Ok(partition),
        Step::Registering { partition, pods } => (partition, pods),
    };
    let lookupds = self::pods(ctx, cluster, namespace, Component::Lookupd).await?;
    let mut registered: Vec<BTreeSet<(String, u16)>> = Vec::new();
    for lookupd in lookupds.iter().filter(|l| l.ready) {
        let Some(address) = lookupd.address(LOOKUPD_HTTP.port) else {
            continue;
        };
        match ctx.http.registered_brokers(address).await {
            Ok(brokers) => registered.push(
                brokers
                    .into_iter()
                    .map(|b| (b.broadcast_address, b.http_port))
                    .collect(),
            ),
            // A lookupd that cannot answer cannot hold the roll.
            Err(e) => {
                warn!(lookupd = %lookupd.name, error = %e, "could not read the registered brokers")
            }
        }
    }
    let http_port = u16::try_from(BROKER_HTTP.port).unwrap_or_default();
    let waiting: Vec<&str> = updated
        .iter()
        .filter(|pod| {
            let host = Component::Broker.pod_host(cluster, pod.ordinal);
            registered
                .iter()
                .any(|set| !set.contains(&(host.clone(), http_port)))
        })
        .map(|pod| pod.name.as_str())
        .collect();
    if !waiting.is_empty() {
        info!(brokers = ?waiting, "rolled brokers are ready, waiting for them to register with every lookupd");
        return Ok(partition);
    }
    let next = partition - 1;
    publish(
        ctx,
        cluster,
        EventType::Normal,
        "RollingBroker",
        format!(
            "{} ready and registered with every lookupd; rolling {}-{next}",
            if updated.is_empty() {
                "no broker to wait for".to_owned()
            } else {
                let names: Vec<&str> = updated.iter().map(|p| p.name.as_str()).collect();
                format!("{} runs the new template,", names.join(", "))
            },
            Component::Broker.name(cluster)
        ),
        None,
    )
    .await;
    Ok(next)
}

/// Hand running brokers the lookupd list when it changed (brokers started since read it from
/// the ConfigMap). The list every running broker was seen with, for the status: the new one once
/// all have it, the old one until then.
pub(super) async fn share_lookupds(
    ctx: &Context,
    cluster: &NSQCluster,
    pods: &[PodView],
) -> Vec<String> {
    let wanted = lookupd_addresses(cluster);
    let known = cluster
        .status
        .as_ref()
        .map(|s| s.lookupd_addresses.clone())
        .unwrap_or_default();
    if known == wanted {
        return known;
    }
    let sorted = |list: &[String]| list.iter().cloned().collect::<BTreeSet<String>>();
    let mut everyone = true;
    let mut told = Vec::new();
    for pod in pods {
        let Some(address) = pod.address(BROKER_HTTP.port) else {
            continue;
        };
        let result = match ctx.http.lookupd_addresses(address).await {
            Ok(current) if sorted(&current) == sorted(&wanted) => Ok(false),
            Ok(_) => ctx
                .http
                .set_lookupd_addresses(address, &wanted)
                .await
                .map(|()| true),
            Err(e) => Err(e),
        };
        match result {
            Ok(true) => told.push(pod.name.clone()),
            Ok(false) => {}
            Err(e) => {
                warn!(broker = %pod.name, error = %e, "could not hand the broker its lookupds");
                everyone = false;
            }
        }
    }
    if !told.is_empty() {
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "LookupdsChanged",
            format!(
                "{} now register with {}",
                told.join(", "),
                wanted.join(", ")
            ),
            None,
        )
        .await;
    }
    if everyone { wanted } else { known }
}
