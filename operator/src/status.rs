//! Status computation: from the StatefulSets the API server reports to the cluster's
//! `NSQClusterStatus`. Pure, so every condition transition is tested without a server.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::children::{ADMIN_HTTP, BROKER_HTTP, BROKER_TCP, Component, LOOKUPD_HTTP};
use crate::crd::{ComponentStatus, Endpoints, NSQCluster, NSQClusterStatus, StorageStatus};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// The `Degraded` reason of a spec the operator refuses.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// How the last reconcile went, as far as status is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every child was applied.
    Applied,
    /// The pause annotation is set; nothing was applied.
    Paused,
    /// Applying failed with this message.
    Failed(String),
    /// The spec was refused for these reasons; nothing was applied.
    Invalid(String),
}

/// What the status is computed from: the workloads as the API server reports them, and the
/// brokers' claims as the reconcile found them.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    pub lookupd: Option<&'a StatefulSet>,
    pub broker: Option<&'a StatefulSet>,
    pub admin: Option<ComponentStatus>,
    pub storage: Option<StorageStatus>,
}

/// Replica counts of nsqadmin's Deployment.
pub fn deployment_status(deployment: &Deployment) -> ComponentStatus {
    let status = deployment.status.clone().unwrap_or_default();
    ComponentStatus {
        replicas: status.replicas.unwrap_or(0),
        ready_replicas: status.ready_replicas.unwrap_or(0),
        updated_replicas: status.updated_replicas.unwrap_or(0),
    }
}

/// One component's rollout as read from its StatefulSet.
#[derive(Clone, Debug)]
struct Rollout {
    desired: i32,
    counts: ComponentStatus,
    /// The StatefulSet controller has not yet caught up with the spec, or pods still run an old
    /// revision.
    in_progress: bool,
}

fn rollout(sts: Option<&StatefulSet>, desired: i32) -> Rollout {
    let Some(sts) = sts else {
        return Rollout {
            desired,
            counts: ComponentStatus::default(),
            in_progress: desired > 0,
        };
    };
    let status = sts.status.clone().unwrap_or_default();
    let counts = ComponentStatus {
        replicas: status.replicas,
        ready_replicas: status.ready_replicas.unwrap_or(0),
        updated_replicas: status.updated_replicas.unwrap_or(0),
    };
    let observed = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    let revision_done = match (&status.current_revision, &status.update_revision) {
        (Some(current), Some(update)) => current == update,
        _ => true,
    };
    let in_progress = !observed
        || !revision_done
        || counts.updated_replicas < desired
        || counts.replicas != desired;
    Rollout {
        desired,
        counts,
        in_progress,
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Keep a condition's `lastTransitionTime` when its status did not change.
fn carry_transition_times(conditions: &mut [Condition], previous: &[Condition]) {
    for c in conditions {
        if let Some(old) = previous
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
}

/// The status the cluster should have given its StatefulSets and the reconcile outcome.
pub fn compute(
    cluster: &NSQCluster,
    observed: &Observed<'_>,
    outcome: &Outcome,
    now: Time,
) -> NSQClusterStatus {
    let generation = cluster.metadata.generation;
    let rollouts = [
        (
            Component::Lookupd,
            rollout(observed.lookupd, cluster.spec.lookupd.replicas),
        ),
        (
            Component::Broker,
            rollout(observed.broker, cluster.spec.broker.replicas),
        ),
    ];
    let resizing = observed
        .storage
        .as_ref()
        .map(|s| s.resizing.as_slice())
        .unwrap_or_default();
    let not_ready: Vec<String> = rollouts
        .iter()
        .filter(|(_, r)| r.counts.ready_replicas < r.desired)
        .map(|(c, r)| {
            format!(
                "{}/{} {}s ready",
                r.counts.ready_replicas,
                r.desired,
                c.as_str()
            )
        })
        .collect();
    let rolling: Vec<&str> = rollouts
        .iter()
        .filter(|(_, r)| r.in_progress)
        .map(|(c, _)| c.as_str())
        .collect();
    let all_ready = not_ready.is_empty() && rolling.is_empty();

    let ready = if all_ready {
        condition(
            READY,
            true,
            "AllReplicasReady",
            "every broker and lookupd is ready".to_owned(),
            generation,
            &now,
        )
    } else if not_ready.is_empty() {
        condition(
            READY,
            false,
            "RollingUpdate",
            format!("updating {}", rolling.join(" and ")),
            generation,
            &now,
        )
    } else {
        condition(
            READY,
            false,
            "ReplicasNotReady",
            not_ready.join(", "),
            generation,
            &now,
        )
    };
    let progressing = match outcome {
        Outcome::Paused => condition(
            PROGRESSING,
            false,
            "ReconciliationPaused",
            format!(
                "the {} annotation is \"true\"",
                crate::crd::PAUSE_ANNOTATION
            ),
            generation,
            &now,
        ),
        _ if !rolling.is_empty() => condition(
            PROGRESSING,
            true,
            "RollingUpdate",
            format!("rolling out {}", rolling.join(" and ")),
            generation,
            &now,
        ),
        _ if !resizing.is_empty() => condition(
            PROGRESSING,
            true,
            "VolumeResizing",
            format!(
                "growing {} to {}",
                resizing.join(", "),
                observed.storage.as_ref().map_or("", |s| s.size.as_str())
            ),
            generation,
            &now,
        ),
        _ => condition(
            PROGRESSING,
            false,
            "RolloutComplete",
            "every pod runs the current spec".to_owned(),
            generation,
            &now,
        ),
    };
    let degraded = match outcome {
        Outcome::Failed(message) => condition(
            DEGRADED,
            true,
            "ReconcileFailed",
            message.clone(),
            generation,
            &now,
        ),
        Outcome::Invalid(message) => condition(
            DEGRADED,
            true,
            INVALID_SPEC,
            message.clone(),
            generation,
            &now,
        ),
        _ if !not_ready.is_empty() && rolling.is_empty() => condition(
            DEGRADED,
            true,
            "ReplicasUnavailable",
            not_ready.join(", "),
            generation,
            &now,
        ),
        _ => condition(
            DEGRADED,
            false,
            "AsExpected",
            "no failures".to_owned(),
            generation,
            &now,
        ),
    };
    let mut conditions = vec![ready, progressing, degraded];
    let previous = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    carry_transition_times(&mut conditions, previous);

    let [(_, lookupd), (_, broker)] = rollouts;
    NSQClusterStatus {
        observed_generation: generation,
        conditions,
        broker: broker.counts,
        lookupd: lookupd.counts,
        admin: cluster
            .spec
            .admin
            .as_ref()
            .map(|_| observed.admin.clone().unwrap_or_default()),
        storage: observed.storage.clone(),
        endpoints: Some(endpoints(cluster)),
    }
}

/// Where clients reach the cluster.
pub fn endpoints(cluster: &NSQCluster) -> Endpoints {
    let broker = Component::Broker.service_host(cluster);
    Endpoints {
        broker_tcp: format!("{broker}:{}", BROKER_TCP.port),
        broker_http: format!("http://{broker}:{}", BROKER_HTTP.port),
        lookupd_http: format!(
            "http://{}:{}",
            Component::Lookupd.service_host(cluster),
            LOOKUPD_HTTP.port
        ),
        admin_http: cluster.spec.admin.as_ref().map(|_| {
            format!(
                "http://{}:{}",
                Component::Admin.service_host(cluster),
                ADMIN_HTTP.port
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::NSQClusterSpec;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + seconds).expect("valid time"))
    }

    fn sts(
        generation: i64,
        observed: i64,
        replicas: i32,
        ready: i32,
        updated: i32,
        revisions: (&str, &str),
    ) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                current_revision: Some(revisions.0.to_owned()),
                update_revision: Some(revisions.1.to_owned()),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn healthy(replicas: i32) -> StatefulSet {
        sts(1, 1, replicas, replicas, replicas, ("r1", "r1"))
    }

    /// Status after a successful apply, with three ready lookupds and these brokers.
    fn applied(cluster: &NSQCluster, broker: &StatefulSet) -> NSQClusterStatus {
        compute(
            cluster,
            &seen(Some(&healthy(3)), Some(broker)),
            &Outcome::Applied,
            at(0),
        )
    }

    fn seen<'a>(lookupd: Option<&'a StatefulSet>, broker: Option<&'a StatefulSet>) -> Observed<'a> {
        Observed {
            lookupd,
            broker,
            ..Observed::default()
        }
    }

    fn get<'a>(status: &'a NSQClusterStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    fn summary(status: &NSQClusterStatus) -> Vec<(String, String, String)> {
        status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn triple(t: &str, s: &str, r: &str) -> (String, String, String) {
        (t.to_owned(), s.to_owned(), r.to_owned())
    }

    #[test]
    fn new_cluster_without_statefulsets_is_progressing() {
        let c = cluster(NSQClusterSpec::default());
        let status = compute(&c, &seen(None, None), &Outcome::Applied, at(0));
        assert_eq!(
            summary(&status),
            [
                triple(READY, "False", "ReplicasNotReady"),
                triple(PROGRESSING, "True", "RollingUpdate"),
                triple(DEGRADED, "False", "AsExpected")
            ]
        );
        assert_eq!(
            get(&status, READY).message,
            "0/3 lookupds ready, 0/3 brokers ready"
        );
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.broker, ComponentStatus::default());
    }

    #[test]
    fn all_ready_cluster() {
        let c = cluster(NSQClusterSpec::default());
        let status = applied(&c, &healthy(3));
        assert_eq!(
            summary(&status),
            [
                triple(READY, "True", "AllReplicasReady"),
                triple(PROGRESSING, "False", "RolloutComplete"),
                triple(DEGRADED, "False", "AsExpected")
            ]
        );
        assert_eq!(
            status.broker,
            ComponentStatus {
                replicas: 3,
                ready_replicas: 3,
                updated_replicas: 3
            }
        );
        assert_eq!(
            status.endpoints,
            Some(Endpoints {
                broker_tcp: "events-broker.prod.svc:4150".to_owned(),
                broker_http: "http://events-broker.prod.svc:4151".to_owned(),
                lookupd_http: "http://events-lookupd.prod.svc:4161".to_owned(),
                admin_http: None,
            })
        );
    }

    #[test]
    fn rolling_update_after_image_change() {
        let c = cluster(NSQClusterSpec::default());
        let broker = sts(2, 2, 3, 3, 1, ("r1", "r2"));
        let status = applied(&c, &broker);
        assert_eq!(
            summary(&status),
            [
                triple(READY, "False", "RollingUpdate"),
                triple(PROGRESSING, "True", "RollingUpdate"),
                triple(DEGRADED, "False", "AsExpected")
            ]
        );
        assert_eq!(get(&status, PROGRESSING).message, "rolling out broker");
    }

    #[test]
    fn unobserved_generation_counts_as_progressing() {
        let c = cluster(NSQClusterSpec::default());
        let broker = sts(3, 2, 3, 3, 3, ("r1", "r1"));
        let status = applied(&c, &broker);
        assert_eq!(get(&status, PROGRESSING).status, "True");
    }

    #[test]
    fn scale_up_waits_for_new_replicas() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.replicas = 5;
        let c = cluster(spec);
        let status = applied(&c, &healthy(3));
        assert_eq!(get(&status, READY).reason, "ReplicasNotReady");
        assert_eq!(get(&status, READY).message, "3/5 brokers ready");
        assert_eq!(get(&status, PROGRESSING).status, "True");
    }

    #[test]
    fn lost_pods_degrade_the_cluster() {
        let c = cluster(NSQClusterSpec::default());
        let broker = sts(1, 1, 3, 1, 3, ("r1", "r1"));
        let status = applied(&c, &broker);
        assert_eq!(
            summary(&status),
            [
                triple(READY, "False", "ReplicasNotReady"),
                triple(PROGRESSING, "False", "RolloutComplete"),
                triple(DEGRADED, "True", "ReplicasUnavailable")
            ]
        );
        assert_eq!(get(&status, DEGRADED).message, "1/3 brokers ready");
    }

    #[test]
    fn failed_and_paused_reconciles() {
        let c = cluster(NSQClusterSpec::default());
        let failed = compute(
            &c,
            &seen(Some(&healthy(3)), Some(&healthy(3))),
            &Outcome::Failed("boom".to_owned()),
            at(0),
        );
        assert_eq!(get(&failed, DEGRADED).reason, "ReconcileFailed");
        assert_eq!(get(&failed, DEGRADED).message, "boom");
        let paused = compute(
            &c,
            &seen(Some(&healthy(3)), Some(&healthy(3))),
            &Outcome::Paused,
            at(0),
        );
        assert_eq!(get(&paused, PROGRESSING).reason, "ReconciliationPaused");
        assert_eq!(get(&paused, PROGRESSING).status, "False");
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut c = cluster(NSQClusterSpec::default());
        c.status = Some(compute(&c, &seen(None, None), &Outcome::Applied, at(0)));
        let still_progressing = compute(
            &c,
            &seen(Some(&healthy(3)), None),
            &Outcome::Applied,
            at(10),
        );
        assert_eq!(get(&still_progressing, READY).last_transition_time, at(0));
        assert_eq!(
            get(&still_progressing, PROGRESSING).last_transition_time,
            at(0)
        );
        let ready = compute(
            &c,
            &seen(Some(&healthy(3)), Some(&healthy(3))),
            &Outcome::Applied,
            at(20),
        );
        assert_eq!(get(&ready, READY).last_transition_time, at(20));
        assert_eq!(get(&ready, DEGRADED).last_transition_time, at(0));
    }

    #[test]
    fn zero_brokers_is_ready_without_a_statefulset_status() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.replicas = 0;
        let c = cluster(spec);
        let broker = sts(1, 1, 0, 0, 0, ("r1", "r1"));
        let status = applied(&c, &broker);
        assert_eq!(get(&status, READY).status, "True");
    }
}
