//! The Prometheus operator's ServiceMonitor (`monitoring.coreos.com/v1`), built as JSON because
//! its types are not part of Kubernetes.

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Component, child_meta, labels};
use crate::crd::NSQCluster;

pub const SERVICE_MONITOR_API_VERSION: &str = "monitoring.coreos.com/v1";

/// A ServiceMonitor scraping `/metrics` on the HTTP port of every broker and lookupd pod
/// (through the headless Services), or `None` when the spec does not ask for one.
pub fn service_monitor(cluster: &NSQCluster) -> Option<Value> {
    let spec = &cluster.spec.metrics.service_monitor;
    if !spec.enabled {
        return None;
    }
    let mut labels = labels(cluster, Component::Broker);
    labels.remove("app.kubernetes.io/component");
    let mut selector = labels.clone();
    selector.remove("app.kubernetes.io/managed-by");
    labels.extend(spec.labels.clone());
    let meta = child_meta(cluster, cluster.name_any(), labels);
    Some(json!({
        "apiVersion": SERVICE_MONITOR_API_VERSION,
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {
                "matchLabels": selector,
                "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": ["broker", "lookupd"]}],
            },
            "endpoints": [{"port": "http", "path": "/metrics", "interval": spec.interval}],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::NSQClusterSpec;

    #[test]
    fn built_only_when_enabled() {
        assert_eq!(service_monitor(&cluster(NSQClusterSpec::default())), None);
        let mut spec = NSQClusterSpec::default();
        spec.metrics.service_monitor.enabled = true;
        spec.metrics.service_monitor.interval = "15s".to_owned();
        spec.metrics
            .service_monitor
            .labels
            .insert("release".to_owned(), "prom".to_owned());
        let sm = service_monitor(&cluster(spec)).expect("enabled");
        assert_eq!(sm["kind"], "ServiceMonitor");
        assert_eq!(sm["metadata"]["name"], "events");
        assert_eq!(sm["metadata"]["labels"]["release"], "prom");
        assert_eq!(sm["metadata"]["ownerReferences"][0]["kind"], "NSQCluster");
        assert_eq!(
            sm["spec"]["endpoints"],
            json!([{"port": "http", "path": "/metrics", "interval": "15s"}])
        );
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
            "events"
        );
        assert!(
            sm["spec"]["selector"]["matchLabels"]
                .get("app.kubernetes.io/managed-by")
                .is_none()
        );
    }
}
