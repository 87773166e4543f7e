//! A broker scale-down, one reconcile at a time. The brokers that leave (the highest ordinals)
//! are asked to drain; the StatefulSet is lowered only once each of them is empty. What the
//! operator remembers between reconciles is in `status.scaleDown`: which pod was asked, and
//! its container's restart count then.
//!
//! A drained broker unregisters and stays up idle (`--stay-up-when-drained`, set with the
//! default `updateStrategy`); one that exits 0 instead is restarted by the kubelet (StatefulSet
//! pods always restart) as a fresh, serving broker: so "drained" is either what the broker
//! reports, or a restart since the request after an exit 0. A crash (any other exit) or a replaced pod
//! brings back a broker that still holds messages and is not draining: it is asked again.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::DrainingBroker;
use crate::knsq_http::DrainReport;
use crate::pods::PodView;
use crate::status::BLOCKED;

/// A drain whose remaining messages do not go down for this long is reported blocked.
pub const STALL: Duration = Duration::from_secs(300);

pub const DRAINED: &str = "drained";
/// Asked, and not yet seen draining.
pub const REQUESTED: &str = "requested";
pub const UNREACHABLE: &str = "unreachable";

/// What asking a leaving broker for its drain gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Report(DrainReport),
    /// The broker could not be asked (why).
    Unreachable(String),
}

/// The next record of leaving broker `name`, and whether it must be asked (again) to drain.
pub fn track(
    name: &str,
    previous: Option<&DrainingBroker>,
    pod: Option<&PodView>,
    seen: Option<Seen>,
    now: Timestamp,
) -> (DrainingBroker, bool) {
    let Some(pod) = pod else {
        // The StatefulSet controller makes it again (with a new uid, asked then).
        let mut record = previous.cloned().unwrap_or_else(|| fresh(name, "", 0, now));
        record.state = UNREACHABLE.to_owned();
        record.reason = Some("the pod is gone; the StatefulSet makes it again".to_owned());
        return (record, false);
    };
    let same_pod = previous.filter(|p| p.pod_uid == pod.uid);
    if let Some(previous) = same_pod {
        let exited_clean = pod.restarts > previous.restarts && pod.last_exit_code == Some(0);
        if previous.state == DRAINED || exited_clean {
            let mut record = previous.clone();
            record.state = DRAINED.to_owned();
            record.remaining_messages = 0;
            record.reason = None;
            record.restarts = pod.restarts;
            return (record, false);
        }
    }
    let mut record = same_pod
        .cloned()
        .unwrap_or_else(|| fresh(name, &pod.uid, pod.restarts, now));
    record.restarts = pod.restarts;
    let mut ask = false;
    match seen {
        Some(Seen::Report(report)) if !report.draining => {
            // Never asked, or a new broker process (a crash, a replaced pod): ask.
            ask = true;
            record.state = REQUESTED.to_owned();
            record.remaining_messages = report.remaining_messages;
            record.reason = None;
        }
        Some(Seen::Report(report)) => {
            if report.remaining_messages < record.remaining_messages || report.state != record.state
            {
                record.progressed_at = now.to_string();
            }
            record.remaining_messages = report.remaining_messages;
            record.reason = report.reason;
            record.state = report.state;
        }
        Some(Seen::Unreachable(why)) => {
            record.state = UNREACHABLE.to_owned();
            record.reason = Some(why);
        }
        None => {
            record.state = UNREACHABLE.to_owned();
            record.reason = Some("the broker is not running".to_owned());
        }
    }
    if record.state != BLOCKED && stalled(&record, now) {
        record.reason = Some(format!(
            "no progress for {}s, {} messages left",
            STALL.as_secs(),
            record.remaining_messages
        ));
        record.state = BLOCKED.to_owned();
    }
    (record, ask)
}

fn fresh(name: &str, uid: &str, restarts: i32, now: Timestamp) -> DrainingBroker {
    DrainingBroker {
        name: name.to_owned(),
        pod_uid: uid.to_owned(),
        restarts,
        state: REQUESTED.to_owned(),
        remaining_messages: 0,
        reason: None,
        progressed_at: now.to_string(),
    }
}

fn stalled(record: &DrainingBroker, now: Timestamp) -> bool {
    let Ok(since) = record.progressed_at.parse::<Timestamp>() else {
        return false;
    };
    let stall = SignedDuration::try_from(STALL).unwrap_or(SignedDuration::MAX);
    now.duration_since(since) > stall
}

/// Whether every leaving broker is empty.
pub fn finished(brokers: &[DrainingBroker]) -> bool {
    brokers.iter().all(|b| b.state == DRAINED)
}

/// Brokers asked to drain that the spec keeps after all (it was raised again) and that have not
/// drained yet: a drain cannot be cancelled in place, so their pods are restarted, which takes
/// the broker out of draining with whatever it still holds.
pub fn kept<'a>(
    brokers: &'a [DrainingBroker],
    replicas: i32,
    set: &str,
) -> impl Iterator<Item = &'a DrainingBroker> {
    brokers.iter().filter(move |b| {
        b.state != DRAINED
            && crate::pods::ordinal(&b.name, set).is_some_and(|ordinal| ordinal < replicas)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("time")
    }

    fn pod(uid: &str, restarts: i32, last_exit_code: Option<i32>) -> PodView {
        PodView {
            name: "events-broker-2".to_owned(),
            uid: uid.to_owned(),
            ordinal: 2,
            running: true,
            restarts,
            last_exit_code,
            ..PodView::default()
        }
    }

    fn report(draining: bool, state: &str, remaining: u64) -> Option<Seen> {
        Some(Seen::Report(DrainReport {
            draining,
            state: state.to_owned(),
            remaining_messages: remaining,
            reason: None,
        }))
    }

    const NAME: &str = "events-broker-2";

    /// The next record of broker 2, its pod being `pod`.
    fn next(
        previous: Option<&DrainingBroker>,
        pod: PodView,
        seen: Option<Seen>,
        seconds: i64,
    ) -> (DrainingBroker, bool) {
        track(NAME, previous, Some(&pod), seen, at(seconds))
    }

    #[test]
    fn a_serving_broker_is_asked_then_followed() {
        let (asked, ask) = next(None, pod("u1", 0, None), report(false, "serving", 900), 0);
        assert!(ask);
        assert_eq!(asked.state, REQUESTED);
        assert_eq!(
            (asked.pod_uid.as_str(), asked.remaining_messages),
            ("u1", 900)
        );

        let (draining, ask) = next(
            Some(&asked),
            pod("u1", 0, None),
            report(true, "handing_off", 400),
            10,
        );
        assert!(!ask);
        assert_eq!(
            (draining.state.as_str(), draining.remaining_messages),
            ("handing_off", 400)
        );
        assert_eq!(draining.progressed_at, at(10).to_string());

        let (done, _) = next(
            Some(&draining),
            pod("u1", 0, None),
            report(true, DRAINED, 0),
            20,
        );
        assert_eq!(done.state, DRAINED);
        assert!(finished(&[done]));
    }

    #[test]
    fn an_exit_0_and_restart_after_the_request_means_drained() {
        let (asked, _) = next(None, pod("u1", 0, None), report(false, "serving", 10), 0);
        // The restarted broker is fresh and serving; the restart with exit 0 tells.
        let (done, ask) = next(
            Some(&asked),
            pod("u1", 1, Some(0)),
            report(false, "serving", 0),
            5,
        );
        assert!(!ask);
        assert_eq!(done.state, DRAINED);
        // And it stays drained however the new process answers.
        let (still, ask) = next(
            Some(&done),
            pod("u1", 1, Some(0)),
            report(false, "serving", 3),
            9,
        );
        assert!(!ask);
        assert_eq!(still.state, DRAINED);
    }

    #[test]
    fn a_crash_or_a_new_pod_is_asked_again() {
        let (asked, _) = next(None, pod("u1", 0, None), report(false, "serving", 10), 0);
        let (draining, _) = next(
            Some(&asked),
            pod("u1", 0, None),
            report(true, "draining", 10),
            1,
        );
        let (crashed, ask) = next(
            Some(&draining),
            pod("u1", 1, Some(137)),
            report(false, "serving", 10),
            2,
        );
        assert!(ask, "a crash brought back a broker that is not draining");
        assert_eq!((crashed.state.as_str(), crashed.restarts), (REQUESTED, 1));

        let (replaced, ask) = next(
            Some(&draining),
            pod("u2", 0, None),
            report(false, "serving", 10),
            2,
        );
        assert!(ask);
        assert_eq!(replaced.pod_uid, "u2");
    }

    #[test]
    fn a_restart_with_an_old_exit_0_before_the_request_does_not_count() {
        // Restarted once long ago (exit 0), then asked: only a restart after the request counts.
        let (asked, _) = next(None, pod("u1", 1, Some(0)), report(false, "serving", 10), 0);
        let (draining, _) = next(
            Some(&asked),
            pod("u1", 1, Some(0)),
            report(true, "draining", 10),
            1,
        );
        assert_eq!(draining.state, "draining");
    }

    #[test]
    fn blocked_by_the_broker_or_by_no_progress() {
        let (asked, _) = next(None, pod("u1", 0, None), report(false, "serving", 10), 0);
        let blocked_report = Some(Seen::Report(DrainReport {
            draining: true,
            state: BLOCKED.to_owned(),
            remaining_messages: 10,
            reason: Some("no peer broker to hand off to".to_owned()),
        }));
        let (blocked, _) = next(Some(&asked), pod("u1", 0, None), blocked_report, 1);
        assert_eq!(blocked.state, BLOCKED);
        assert_eq!(
            blocked.reason.as_deref(),
            Some("no peer broker to hand off to")
        );

        let (draining, _) = next(
            Some(&asked),
            pod("u1", 0, None),
            report(true, "draining", 10),
            1,
        );
        let stuck = 1 + i64::try_from(STALL.as_secs()).expect("secs") + 1;
        let (stalled, _) = next(
            Some(&draining),
            pod("u1", 0, None),
            report(true, "draining", 10),
            stuck,
        );
        assert_eq!(stalled.state, BLOCKED);
        assert_eq!(
            stalled.reason.as_deref(),
            Some("no progress for 300s, 10 messages left")
        );
        // Progress clears it.
        let (moving, _) = next(
            Some(&stalled),
            pod("u1", 0, None),
            report(true, "draining", 9),
            stuck + 1,
        );
        assert_eq!(moving.state, "draining");
    }

    #[test]
    fn unreachable_and_gone_pods_wait() {
        let (asked, _) = next(None, pod("u1", 0, None), report(false, "serving", 10), 0);
        let (unreachable, ask) = next(
            Some(&asked),
            pod("u1", 0, None),
            Some(Seen::Unreachable("connection refused".to_owned())),
            1,
        );
        assert!(!ask);
        assert_eq!(unreachable.state, UNREACHABLE);
        assert_eq!(unreachable.remaining_messages, 10, "the last count is kept");
        let (gone, ask) = track(NAME, Some(&asked), None, None, at(1));
        assert!(!ask);
        assert_eq!(gone.state, UNREACHABLE);
        assert!(!finished(&[gone]));
    }

    #[test]
    fn kept_brokers_are_those_not_drained_below_the_new_count() {
        let record = |name: &str, state: &str| DrainingBroker {
            name: name.to_owned(),
            state: state.to_owned(),
            ..DrainingBroker::default()
        };
        let brokers = [
            record("events-broker-3", "draining"),
            record("events-broker-2", DRAINED),
            record("events-broker-1", "handing_off"),
        ];
        let kept: Vec<&str> = kept(&brokers, 4, "events-broker")
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(kept, ["events-broker-3", "events-broker-1"]);
        assert_eq!(kept_names(&brokers, 2), ["events-broker-1"]);
    }

    fn kept_names(brokers: &[DrainingBroker], replicas: i32) -> Vec<&str> {
        kept(brokers, replicas, "events-broker")
            .map(|b| b.name.as_str())
            .collect()
    }
}
