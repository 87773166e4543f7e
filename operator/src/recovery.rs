//! Recovering orphaned broker claims: a claim whose ordinal no broker will have again (left by a
//! forced scale-down, a StatefulSet deleted with its claims, or `deleteClaimOnScaleDown` turned
//! on later) is emptied by a one-off Job running the broker's offline handoff, then deleted.
//! A drained scale-down ends the same way, so no claim is deleted before a handoff found it
//! empty. One Job per claim, and never while a pod of that ordinal exists: the handoff must have
//! the data directory to itself.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::VolumeRecovery;

/// A failed handoff Job is replaced by a new one after this long (its pods' logs stay until then).
pub const RETRY: Duration = Duration::from_secs(300);

pub const RUNNING: &str = "running";
pub const FAILED: &str = "failed";

/// Where a handoff Job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded,
    /// Failed (its attempts or its deadline spent), at this time.
    Failed(Timestamp),
}

/// A handoff Job of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobView {
    pub name: String,
    pub claim: String,
    pub state: JobState,
}

/// A broker claim of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimView {
    pub name: String,
    pub ordinal: i32,
    /// Already being deleted.
    pub deleting: bool,
}

/// What to do about orphaned claims in this reconcile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Ordinals whose claim needs a handoff Job.
    pub create: Vec<i32>,
    pub delete_jobs: Vec<String>,
    /// Claims a handoff emptied.
    pub delete_claims: Vec<String>,
    /// Jobs that failed since the last reconcile said so.
    pub newly_failed: Vec<String>,
    /// The recoveries under way, for the status.
    pub status: Vec<VolumeRecovery>,
    /// The broker StatefulSet must stay below this ordinal: a handoff still runs on the claim of
    /// a broker the spec wants back.
    pub hold_below: Option<i32>,
}

/// The inputs of [`plan`].
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub claims: &'a [ClaimView],
    pub jobs: &'a [JobView],
    /// Ordinals of the broker pods that exist (terminating ones too).
    pub pods: &'a BTreeSet<i32>,
    /// Brokers the spec asks for.
    pub wanted: i32,
    /// Replicas of the broker StatefulSet as applied (which a scale-down in progress holds above
    /// `wanted`).
    pub applied: i32,
    pub delete_claims: bool,
    /// The recoveries the status listed.
    pub previous: &'a [VolumeRecovery],
    pub now: Timestamp,
}

/// Decide the Jobs and deletions for the orphaned claims.
pub fn plan(o: &Observed<'_>, job_name: impl Fn(i32) -> String) -> Plan {
    let mut out = Plan::default();
    let claims: BTreeMap<&str, &ClaimView> =
        o.claims.iter().map(|c| (c.name.as_str(), c)).collect();
    let jobs: BTreeMap<&str, &JobView> = o.jobs.iter().map(|j| (j.claim.as_str(), j)).collect();
    for job in o.jobs {
        match claims.get(job.claim.as_str()) {
            // Its claim is gone (deleted after the handoff, or by hand).
            None => out.delete_jobs.push(job.name.clone()),
            Some(claim) if claim.ordinal < o.wanted => match job.state {
                // The broker is wanted back: it starts once the handoff is done.
                JobState::Running => {
                    out.hold_below = Some(
                        out.hold_below
                            .map_or(claim.ordinal, |h| h.min(claim.ordinal)),
                    );
                }
                _ => out.delete_jobs.push(job.name.clone()),
            },
            Some(_) => {}
        }
    }
    let orphaned_from = o.wanted.max(o.applied);
    for claim in o.claims {
        if claim.ordinal < orphaned_from || claim.deleting || !o.delete_claims {
            continue;
        }
        if o.pods.contains(&claim.ordinal) {
            // Its broker is still stopping.
            continue;
        }
        let record = |state: &str, job: &str| VolumeRecovery {
            claim: claim.name.clone(),
            job: job.to_owned(),
            state: state.to_owned(),
        };
        match jobs.get(claim.name.as_str()) {
            None => {
                out.create.push(claim.ordinal);
                out.status.push(record(RUNNING, &job_name(claim.ordinal)));
            }
            Some(job) => match job.state {
                JobState::Running => out.status.push(record(RUNNING, &job.name)),
                JobState::Succeeded => {
                    out.delete_claims.push(claim.name.clone());
                    out.delete_jobs.push(job.name.clone());
                }
                JobState::Failed(at) => {
                    let known = o
                        .previous
                        .iter()
                        .any(|r| r.claim == claim.name && r.state == FAILED);
                    if !known {
                        out.newly_failed.push(job.name.clone());
                    }
                    let retry = SignedDuration::try_from(RETRY).unwrap_or(SignedDuration::MAX);
                    if o.now.duration_since(at) > retry {
                        out.delete_jobs.push(job.name.clone());
                    }
                    out.status.push(record(FAILED, &job.name));
                }
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("time")
    }

    fn claim(ordinal: i32) -> ClaimView {
        ClaimView {
            name: format!("data-events-broker-{ordinal}"),
            ordinal,
            deleting: false,
        }
    }

    fn job(ordinal: i32, state: JobState) -> JobView {
        JobView {
            name: job_name(ordinal),
            claim: format!("data-events-broker-{ordinal}"),
            state,
        }
    }

    fn job_name(ordinal: i32) -> String {
        format!("events-broker-{ordinal}-handoff")
    }

    struct Case {
        claims: Vec<ClaimView>,
        jobs: Vec<JobView>,
        pods: BTreeSet<i32>,
        wanted: i32,
        applied: i32,
        delete_claims: bool,
        previous: Vec<VolumeRecovery>,
    }

    impl Case {
        fn new(claims: &[i32], pods: &[i32], wanted: i32) -> Case {
            Case {
                claims: claims.iter().map(|&o| claim(o)).collect(),
                jobs: Vec::new(),
                pods: pods.iter().copied().collect(),
                wanted,
                applied: wanted,
                delete_claims: true,
                previous: Vec::new(),
            }
        }

        fn plan(&self, now: Timestamp) -> Plan {
            plan(
                &Observed {
                    claims: &self.claims,
                    jobs: &self.jobs,
                    pods: &self.pods,
                    wanted: self.wanted,
                    applied: self.applied,
                    delete_claims: self.delete_claims,
                    previous: &self.previous,
                    now,
                },
                job_name,
            )
        }
    }

    #[test]
    fn claims_of_live_brokers_are_left_alone() {
        assert_eq!(
            Case::new(&[0, 1, 2], &[0, 1, 2], 3).plan(at(0)),
            Plan::default()
        );
    }

    #[test]
    fn an_orphan_gets_a_job_once_its_pod_is_gone() {
        let stopping = Case::new(&[0, 1, 2], &[0, 1, 2], 2);
        assert_eq!(
            stopping.plan(at(0)),
            Plan::default(),
            "broker-2 still stops"
        );
        let gone = Case::new(&[0, 1, 2], &[0, 1], 2);
        let plan = gone.plan(at(0));
        assert_eq!(plan.create, [2]);
        assert_eq!(
            plan.status,
            [VolumeRecovery {
                claim: "data-events-broker-2".to_owned(),
                job: "events-broker-2-handoff".to_owned(),
                state: RUNNING.to_owned(),
            }]
        );
    }

    #[test]
    fn a_scale_down_in_progress_holds_its_claims() {
        let mut case = Case::new(&[0, 1, 2], &[0, 1], 1);
        case.applied = 3;
        assert_eq!(case.plan(at(0)), Plan::default());
    }

    #[test]
    fn success_deletes_the_claim_and_the_job() {
        let mut case = Case::new(&[0, 1, 2], &[0, 1], 2);
        case.jobs = vec![job(2, JobState::Succeeded)];
        let plan = case.plan(at(0));
        assert_eq!(plan.delete_claims, ["data-events-broker-2"]);
        assert_eq!(plan.delete_jobs, ["events-broker-2-handoff"]);
        assert!(plan.status.is_empty());
        // Next time the claim is gone; a Job left over is deleted.
        let mut after = Case::new(&[0, 1], &[0, 1], 2);
        after.jobs = vec![job(2, JobState::Succeeded)];
        assert_eq!(after.plan(at(1)).delete_jobs, ["events-broker-2-handoff"]);
    }

    #[test]
    fn failures_are_reported_once_and_retried_later() {
        let mut case = Case::new(&[0, 1, 2], &[0, 1], 2);
        case.jobs = vec![job(2, JobState::Failed(at(0)))];
        let plan = case.plan(at(10));
        assert_eq!(plan.newly_failed, ["events-broker-2-handoff"]);
        assert!(plan.delete_jobs.is_empty(), "kept for its logs");
        assert_eq!(plan.status[0].state, FAILED);
        case.previous = plan.status;
        let later = case.plan(at(10 + i64::try_from(RETRY.as_secs()).expect("secs")));
        assert!(later.newly_failed.is_empty());
        assert_eq!(
            later.delete_jobs,
            ["events-broker-2-handoff"],
            "a new Job follows"
        );
        assert!(later.delete_claims.is_empty());
    }

    #[test]
    fn claims_are_kept_when_the_spec_says_so() {
        let mut case = Case::new(&[0, 1, 2], &[0, 1], 2);
        case.delete_claims = false;
        assert_eq!(case.plan(at(0)), Plan::default());
    }

    #[test]
    fn a_broker_wanted_back_waits_for_its_handoff() {
        let mut case = Case::new(&[0, 1, 2], &[0, 1], 3);
        case.applied = 2;
        case.jobs = vec![job(2, JobState::Running)];
        let plan = case.plan(at(0));
        assert_eq!(plan.hold_below, Some(2));
        assert!(plan.delete_claims.is_empty());
        case.jobs = vec![job(2, JobState::Succeeded)];
        let plan = case.plan(at(1));
        assert_eq!(plan.hold_below, None);
        assert_eq!(plan.delete_jobs, ["events-broker-2-handoff"]);
        assert!(plan.delete_claims.is_empty(), "broker-2 comes back on it");
    }

    #[test]
    fn claims_being_deleted_need_nothing() {
        let mut case = Case::new(&[0, 1, 2], &[0, 1], 2);
        case.claims[2].deleting = true;
        assert_eq!(case.plan(at(0)), Plan::default());
    }
}
