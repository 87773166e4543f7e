//! Pacing a rolling update of the brokers. The StatefulSet controller replaces a pod and waits
//! for it to be ready before the next, but a broker is ready as soon as it takes clients, before
//! its consumers can find it through the lookupds — and readiness must not wait for the
//! lookupds, or a lookupd outage would take every broker out of its Service. So the operator
//! holds the roll with `rollingUpdate.partition`: a new pod template goes out with the partition
//! at the highest ordinal, and each step down waits until the pods above it run the new
//! revision, are ready, and are registered with every reachable lookupd. If the operator stops,
//! the roll simply pauses.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;

use crate::children::TEMPLATE_HASH_ANNOTATION;
use crate::pods::PodView;

/// What the partition of the broker StatefulSet should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Apply this partition.
    Partition(i32),
    /// These pods (ordinals at or above the partition) run the new revision and are ready; the
    /// partition may go one lower once they are registered with the lookupds.
    Registering { partition: i32, pods: Vec<PodView> },
}

/// The partition for the broker StatefulSet, given the one applied (`live`), the template hash
/// of what is applied now, the replicas it will have and its pods.
pub fn step(
    live: Option<&StatefulSet>,
    desired_hash: &str,
    replicas: i32,
    pods: &[PodView],
) -> Step {
    let Some(live) = live else {
        // A new StatefulSet makes its pods from the one template there is.
        return Step::Partition(0);
    };
    if live
        .annotations()
        .get(TEMPLATE_HASH_ANNOTATION)
        .map(String::as_str)
        != Some(desired_hash)
    {
        // A new template: only the highest ordinal may take it for now.
        return Step::Partition((replicas - 1).max(0));
    }
    let partition = live
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0)
        // Above the replicas (scaled down during a roll) there is no pod to wait for.
        .min(replicas);
    if partition <= 0 {
        return Step::Partition(0);
    }
    let status = live.status.clone().unwrap_or_default();
    // The controller's revisions describe the applied template only once it has seen it.
    if status.observed_generation.unwrap_or(0) < live.metadata.generation.unwrap_or(0) {
        return Step::Partition(partition);
    }
    let Some(update_revision) = status.update_revision else {
        return Step::Partition(partition);
    };
    let mut updated = Vec::new();
    for ordinal in partition..replicas {
        let Some(pod) = pods.iter().find(|p| p.ordinal == ordinal) else {
            return Step::Partition(partition);
        };
        if pod.revision.as_deref() != Some(update_revision.as_str())
            || !pod.ready
            || pod.terminating
        {
            return Step::Partition(partition);
        }
        updated.push(pod.clone());
    }
    Step::Registering {
        partition,
        pods: updated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        RollingUpdateStatefulSetStrategy, StatefulSetSpec, StatefulSetStatus,
        StatefulSetUpdateStrategy,
    };
    use std::collections::BTreeMap;

    fn live(hash: &str, partition: i32, generation: i64, observed: i64) -> StatefulSet {
        let mut sts = StatefulSet::default();
        sts.metadata.annotations = Some(BTreeMap::from([(
            TEMPLATE_HASH_ANNOTATION.to_owned(),
            hash.to_owned(),
        )]));
        sts.metadata.generation = Some(generation);
        sts.spec = Some(StatefulSetSpec {
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    partition: Some(partition),
                    ..RollingUpdateStatefulSetStrategy::default()
                }),
            }),
            ..StatefulSetSpec::default()
        });
        sts.status = Some(StatefulSetStatus {
            observed_generation: Some(observed),
            update_revision: Some("new".to_owned()),
            current_revision: Some("old".to_owned()),
            ..StatefulSetStatus::default()
        });
        sts
    }

    fn pod(ordinal: i32, revision: &str, ready: bool) -> PodView {
        PodView {
            name: format!("events-broker-{ordinal}"),
            ordinal,
            revision: Some(revision.to_owned()),
            ready,
            running: true,
            ..PodView::default()
        }
    }

    #[test]
    fn a_new_statefulset_has_no_partition() {
        assert_eq!(step(None, "h1", 3, &[]), Step::Partition(0));
    }

    #[test]
    fn a_new_template_starts_at_the_highest_ordinal() {
        let sts = live("h1", 0, 1, 1);
        assert_eq!(step(Some(&sts), "h2", 3, &[]), Step::Partition(2));
        assert_eq!(step(Some(&sts), "h2", 0, &[]), Step::Partition(0));
        assert_eq!(step(Some(&sts), "h1", 3, &[]), Step::Partition(0));
    }

    #[test]
    fn each_step_waits_for_updated_ready_pods() {
        let sts = live("h2", 2, 2, 2);
        let old = [pod(0, "old", true), pod(1, "old", true)];
        let waiting = [&old[..], &[pod(2, "old", true)]].concat();
        assert_eq!(step(Some(&sts), "h2", 3, &waiting), Step::Partition(2));
        let not_ready = [&old[..], &[pod(2, "new", false)]].concat();
        assert_eq!(step(Some(&sts), "h2", 3, &not_ready), Step::Partition(2));
        let missing = old.to_vec();
        assert_eq!(step(Some(&sts), "h2", 3, &missing), Step::Partition(2));
        let done = [&old[..], &[pod(2, "new", true)]].concat();
        assert_eq!(
            step(Some(&sts), "h2", 3, &done),
            Step::Registering {
                partition: 2,
                pods: vec![pod(2, "new", true)]
            }
        );
    }

    #[test]
    fn revisions_are_trusted_only_once_the_controller_saw_the_template() {
        let sts = live("h2", 2, 3, 2);
        let pods = [
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        assert_eq!(step(Some(&sts), "h2", 3, &pods), Step::Partition(2));
    }

    #[test]
    fn a_partition_above_the_replicas_steps_down_at_once() {
        // Scaled down below the partition during a roll: no pod to wait for.
        let sts = live("h2", 4, 2, 2);
        assert_eq!(
            step(
                Some(&sts),
                "h2",
                2,
                &[pod(0, "old", true), pod(1, "old", true)]
            ),
            Step::Registering {
                partition: 2,
                pods: Vec::new()
            }
        );
    }
}
