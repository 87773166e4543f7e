//! What the operator reads from a StatefulSet's pods: ordinal, address, readiness, restarts and
//! revision of the component's container.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The label the StatefulSet controller puts on each pod: the revision it was made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// One pod of a component's StatefulSet, as far as rolls and drains care.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub uid: String,
    pub ordinal: i32,
    pub ip: Option<IpAddr>,
    /// The component's container is running.
    pub running: bool,
    /// The pod's `Ready` condition is true.
    pub ready: bool,
    /// Restarts of the component's container.
    pub restarts: i32,
    /// Exit code of the container's previous run, after a restart.
    pub last_exit_code: Option<i32>,
    /// The StatefulSet revision the pod was made from.
    pub revision: Option<String>,
    /// The pod has been asked to stop.
    pub terminating: bool,
}

impl PodView {
    /// The view of `pod`, a pod of StatefulSet `set` whose main container is `container`;
    /// `None` for a pod that is no ordinal of that set.
    pub fn of(pod: &Pod, set: &str, container: &str) -> Option<PodView> {
        let name = pod.name_any();
        let ordinal = ordinal(&name, set)?;
        let status = pod.status.clone().unwrap_or_default();
        let container_status = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == container);
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Some(PodView {
            ordinal,
            uid: pod.uid().unwrap_or_default(),
            ip: status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()),
            running: container_status
                .and_then(|c| c.state.as_ref())
                .is_some_and(|s| s.running.is_some()),
            ready,
            restarts: container_status.map_or(0, |c| c.restart_count),
            last_exit_code: container_status
                .and_then(|c| c.last_state.as_ref())
                .and_then(|s| s.terminated.as_ref())
                .map(|t| t.exit_code),
            revision: pod.labels().get(REVISION_LABEL).cloned(),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            name,
        })
    }

    /// The pod's address on `port`, when it has an IP and its container runs.
    pub fn address(&self, port: i32) -> Option<SocketAddr> {
        let port = u16::try_from(port).ok()?;
        self.running
            .then_some(self.ip)
            .flatten()
            .map(|ip| SocketAddr::new(ip, port))
    }
}

/// The ordinal of pod `name` of StatefulSet `set`.
pub fn ordinal(name: &str, set: &str) -> Option<i32> {
    let digits = name.strip_prefix(set)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ordinals_of_the_set_only() {
        assert_eq!(ordinal("events-broker-2", "events-broker"), Some(2));
        assert_eq!(ordinal("events-broker-10", "events-broker"), Some(10));
        assert_eq!(ordinal("events-broker-x", "events-broker"), None);
        assert_eq!(
            ordinal("events-broker-2-handoff-abc", "events-broker"),
            None
        );
        assert_eq!(ordinal("events-broker", "events-broker"), None);
        assert_eq!(ordinal("other-broker-1", "events-broker"), None);
    }

    #[test]
    fn view_of_a_restarted_ready_pod() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "events-broker-1", "uid": "u1",
                         "labels": {"controller-revision-hash": "events-broker-7d"}},
            "status": {
                "podIP": "10.1.2.3",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {"name": "sidecar", "restartCount": 9, "ready": true, "image": "s", "imageID": "",
                     "state": {"running": {}}},
                    {"name": "broker", "restartCount": 2, "ready": true, "image": "b", "imageID": "",
                     "state": {"running": {}},
                     "lastState": {"terminated": {"exitCode": 0}}}
                ]
            }
        }))
        .expect("pod");
        let view = PodView::of(&pod, "events-broker", "broker").expect("an ordinal");
        assert_eq!(
            view,
            PodView {
                name: "events-broker-1".to_owned(),
                uid: "u1".to_owned(),
                ordinal: 1,
                ip: Some("10.1.2.3".parse().expect("ip")),
                running: true,
                ready: true,
                restarts: 2,
                last_exit_code: Some(0),
                revision: Some("events-broker-7d".to_owned()),
                terminating: false,
            }
        );
        assert_eq!(
            view.address(4151),
            Some("10.1.2.3:4151".parse().expect("address"))
        );
    }

    #[test]
    fn a_pod_not_running_has_no_address() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "events-broker-0", "deletionTimestamp": "2027-01-01T00:00:00Z"},
            "status": {"podIP": "10.1.2.3", "containerStatuses": [
                {"name": "broker", "restartCount": 0, "ready": false, "image": "b", "imageID": "",
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
        }))
        .expect("pod");
        let view = PodView::of(&pod, "events-broker", "broker").expect("an ordinal");
        assert!(view.terminating);
        assert!(!view.ready);
        assert_eq!(view.address(4151), None);
    }
}
