//! Status computation: from the StatefulSets the API server reports to the cluster's
//! `NSQClusterStatus`. Pure, so every condition transition is tested without a server.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::children::{ADMIN_HTTP, BROKER_HTTP, BROKER_TCP, Component, LOOKUPD_HTTP};
use crate::crd::{
    ComponentStatus, Endpoints, FORCE_SCALE_DOWN_ANNOTATION, NSQCluster, NSQClusterStatus,
    ScaleDownStatus, StorageStatus, VolumeRecovery,
};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const SCALING_DOWN: &str = "ScalingDown";
pub const SCALE_DOWN_BLOCKED: &str = "ScaleDownBlocked";
/// A draining broker's state when it cannot finish (the broker's own word, and the operator's
/// when it stops making progress).
pub const BLOCKED: &str = "blocked";
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
    /// The scale-down under way, if any.
    pub scale_down: Option<ScaleDownStatus>,
    /// Claims being emptied by handoff Jobs.
    pub volume_recovery: Vec<VolumeRecovery>,
    /// The lookupd addresses every running broker uses.
    pub lookupd_addresses: Vec<String>,
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

/// Whether the StatefulSet controller has yet to catch up with a StatefulSet's spec, or its pods
/// still run an older revision.
pub fn rolling(sts: &StatefulSet) -> bool {
    let status = sts.status.clone().unwrap_or_default();
    let observed = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    let revision_done = match (&status.current_revision, &status.update_revision) {
        (Some(current), Some(update)) => current == update,
        _ => true,
    };
    !observed || !revision_done
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
    let in_progress =
        rolling(sts) || counts.updated_replicas < desired || counts.replicas != desired;
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
    let recovering: Vec<&str> = observed
        .volume_recovery
        .iter()
        .map(|r| r.claim.as_str())
        .collect();
    let failed_recovery: Vec<&str> = observed
        .volume_recovery
        .iter()
        .filter(|r| r.state == "failed")
        .map(|r| r.claim.as_str())
        .collect();
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
        _ if observed.scale_down.is_some() => condition(
            PROGRESSING,
            true,
            "ScalingDown",
            "draining the brokers a scale-down removes".to_owned(),
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
        _ if !recovering.is_empty() => condition(
            PROGRESSING,
            true,
            "RecoveringVolumes",
            format!("handing off what is left on {}", recovering.join(", ")),
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
        _ if !not_ready.is_empty() && rolling.is_empty() && observed.scale_down.is_none() => {
            condition(
                DEGRADED,
                true,
                "ReplicasUnavailable",
                not_ready.join(", "),
                generation,
                &now,
            )
        }
        _ if !failed_recovery.is_empty() => condition(
            DEGRADED,
            true,
            "VolumeRecoveryFailed",
            format!(
                "the handoff of {} failed; it is retried (see the Jobs' pods' logs)",
                failed_recovery.join(", ")
            ),
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
    let (scaling_down, blocked) = scale_down_conditions(observed.scale_down.as_ref());
    let mut conditions = vec![
        ready,
        progressing,
        degraded,
        condition(
            SCALING_DOWN,
            scaling_down.is_some(),
            if scaling_down.is_some() {
                "Draining"
            } else {
                "NoScaleDown"
            },
            scaling_down.unwrap_or_else(|| "no broker is leaving".to_owned()),
            generation,
            &now,
        ),
        condition(
            SCALE_DOWN_BLOCKED,
            blocked.is_some(),
            if blocked.is_some() {
                "DrainBlocked"
            } else {
                "NotBlocked"
            },
            blocked.unwrap_or_else(|| "no drain is blocked".to_owned()),
            generation,
            &now,
        ),
    ];
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
        scale_down: observed.scale_down.clone(),
        volume_recovery: observed.volume_recovery.clone(),
        lookupd_addresses: observed.lookupd_addresses.clone(),
    }
}

/// The messages of `ScalingDown` and, when a leaving broker cannot finish, `ScaleDownBlocked`.
fn scale_down_conditions(scale_down: Option<&ScaleDownStatus>) -> (Option<String>, Option<String>) {
    let Some(scale_down) = scale_down else {
        return (None, None);
    };
    let brokers: Vec<String> = scale_down
        .brokers
        .iter()
        .map(|b| match b.state.as_str() {
            "drained" => format!("{} (drained)", b.name),
            state => format!(
                "{} ({state}, {} messages left)",
                b.name, b.remaining_messages
            ),
        })
        .collect();
    let scaling = format!(
        "from {} to {} brokers: the StatefulSet stays at {} until {} are empty",
        scale_down.from,
        scale_down.to,
        scale_down.from,
        brokers.join(", ")
    );
    let blocked: Vec<String> = scale_down
        .brokers
        .iter()
        .filter(|b| b.state == BLOCKED)
        .map(|b| {
            format!(
                "{}: {}",
                b.name,
                b.reason.as_deref().unwrap_or("the drain cannot finish")
            )
        })
        .collect();
    let blocked = (!blocked.is_empty()).then(|| {
        format!(
            "{}; nothing is lost meanwhile. Annotate {FORCE_SCALE_DOWN_ANNOTATION}=true to lower the StatefulSet anyway (what is left is then handed off from the volumes)",
            blocked.join("; ")
        )
    });
    (Some(scaling), blocked)
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
    use crate::crd::{DrainingBroker, NSQClusterSpec};
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

    /// `Ready`, `Progressing` and `Degraded` as given, and no scale-down.
    fn without_scale_down(
        ready: (&str, &str),
        progressing: (&str, &str),
        degraded: (&str, &str),
    ) -> [(String, String, String); 5] {
        [
            triple(READY, ready.0, ready.1),
            triple(PROGRESSING, progressing.0, progressing.1),
            triple(DEGRADED, degraded.0, degraded.1),
            triple(SCALING_DOWN, "False", "NoScaleDown"),
            triple(SCALE_DOWN_BLOCKED, "False", "NotBlocked"),
        ]
    }

    #[test]
    fn new_cluster_without_statefulsets_is_progressing() {
        let c = cluster(NSQClusterSpec::default());
        let status = compute(&c, &seen(None, None), &Outcome::Applied, at(0));
        assert_eq!(
            summary(&status),
            without_scale_down(
                ("False", "ReplicasNotReady"),
                ("True", "RollingUpdate"),
                ("False", "AsExpected")
            )
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
            without_scale_down(
                ("True", "AllReplicasReady"),
                ("False", "RolloutComplete"),
                ("False", "AsExpected")
            )
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
            without_scale_down(
                ("False", "RollingUpdate"),
                ("True", "RollingUpdate"),
                ("False", "AsExpected")
            )
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
            without_scale_down(
                ("False", "ReplicasNotReady"),
                ("False", "RolloutComplete"),
                ("True", "ReplicasUnavailable")
            )
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

    fn draining(name: &str, state: &str, remaining: u64, reason: Option<&str>) -> DrainingBroker {
        DrainingBroker {
            name: name.to_owned(),
            pod_uid: "u".to_owned(),
            restarts: 0,
            state: state.to_owned(),
            remaining_messages: remaining,
            reason: reason.map(str::to_owned),
            progressed_at: "2027-01-01T00:00:00Z".to_owned(),
        }
    }

    #[test]
    fn scale_down_in_progress_and_blocked() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.replicas = 1;
        let c = cluster(spec);
        let lookupd = healthy(3);
        let broker = sts(1, 1, 3, 2, 3, ("r1", "r1"));
        let mut observed = seen(Some(&lookupd), Some(&broker));
        observed.scale_down = Some(ScaleDownStatus {
            from: 3,
            to: 1,
            brokers: vec![
                draining("events-broker-2", "drained", 0, None),
                draining("events-broker-1", "handing_off", 120, None),
            ],
        });
        let status = compute(&c, &observed, &Outcome::Applied, at(0));
        assert_eq!(
            summary(&status),
            [
                triple(READY, "False", "RollingUpdate"),
                triple(PROGRESSING, "True", "ScalingDown"),
                triple(DEGRADED, "False", "AsExpected"),
                triple(SCALING_DOWN, "True", "Draining"),
                triple(SCALE_DOWN_BLOCKED, "False", "NotBlocked"),
            ]
        );
        assert_eq!(
            get(&status, SCALING_DOWN).message,
            "from 3 to 1 brokers: the StatefulSet stays at 3 until events-broker-2 (drained), events-broker-1 (handing_off, 120 messages left) are empty"
        );
        assert_eq!(status.scale_down, observed.scale_down);

        observed.scale_down = Some(ScaleDownStatus {
            from: 3,
            to: 1,
            brokers: vec![draining(
                "events-broker-1",
                BLOCKED,
                120,
                Some("no peer can take the messages"),
            )],
        });
        let status = compute(&c, &observed, &Outcome::Applied, at(0));
        let blocked = get(&status, SCALE_DOWN_BLOCKED);
        assert_eq!(
            (blocked.status.as_str(), blocked.reason.as_str()),
            ("True", "DrainBlocked")
        );
        assert!(
            blocked
                .message
                .starts_with("events-broker-1: no peer can take the messages; nothing is lost"),
            "{}",
            blocked.message
        );
        assert!(blocked.message.contains("knsq.io/force-scale-down=true"));
    }

    #[test]
    fn volume_recovery_progresses_and_failures_degrade() {
        let c = cluster(NSQClusterSpec::default());
        let (lookupd, broker) = (healthy(3), healthy(3));
        let mut observed = seen(Some(&lookupd), Some(&broker));
        observed.volume_recovery = vec![VolumeRecovery {
            claim: "data-events-broker-3".to_owned(),
            job: "events-broker-3-handoff".to_owned(),
            state: "running".to_owned(),
        }];
        let status = compute(&c, &observed, &Outcome::Applied, at(0));
        assert_eq!(get(&status, PROGRESSING).reason, "RecoveringVolumes");
        assert_eq!(
            get(&status, PROGRESSING).message,
            "handing off what is left on data-events-broker-3"
        );
        assert_eq!(get(&status, DEGRADED).status, "False");
        observed.volume_recovery[0].state = "failed".to_owned();
        let status = compute(&c, &observed, &Outcome::Applied, at(0));
        assert_eq!(get(&status, DEGRADED).reason, "VolumeRecoveryFailed");
        assert_eq!(status.volume_recovery, observed.volume_recovery);
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
