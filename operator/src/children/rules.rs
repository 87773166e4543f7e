//! The PrometheusRule (`monitoring.coreos.com/v1`) with knsq's alerts for one cluster
//! (`spec.metrics.prometheusRule`); the alerts themselves are in [`crate::alerts`].

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{MONITORING_API_VERSION, child_meta, cluster_labels, namespace};
use crate::alerts::{Scope, groups};
use crate::crd::NSQCluster;

/// The cluster's PrometheusRule, or `None` when the spec does not ask for one.
pub fn prometheus_rule(cluster: &NSQCluster) -> Option<Value> {
    let spec = &cluster.spec.metrics.prometheus_rule;
    if !spec.enabled {
        return None;
    }
    let mut labels = cluster_labels(cluster);
    labels.extend(spec.labels.clone());
    let name = cluster.name_any();
    let namespace = namespace(cluster);
    Some(json!({
        "apiVersion": MONITORING_API_VERSION,
        "kind": "PrometheusRule",
        "metadata": child_meta(cluster, name.clone(), labels),
        "spec": {"groups": groups(Scope::Cluster { namespace: &namespace, name: &name })},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::NSQClusterSpec;

    #[test]
    fn built_only_when_enabled_and_scoped_to_the_cluster() {
        assert_eq!(prometheus_rule(&cluster(NSQClusterSpec::default())), None);
        let mut spec = NSQClusterSpec::default();
        spec.metrics.prometheus_rule.enabled = true;
        spec.metrics
            .prometheus_rule
            .labels
            .insert("release".to_owned(), "prom".to_owned());
        let rule = prometheus_rule(&cluster(spec)).expect("enabled");
        assert_eq!(rule["kind"], "PrometheusRule");
        assert_eq!(rule["metadata"]["name"], "events");
        assert_eq!(rule["metadata"]["labels"]["release"], "prom");
        assert_eq!(rule["metadata"]["ownerReferences"][0]["kind"], "NSQCluster");
        let expr = rule["spec"]["groups"][0]["rules"][0]["expr"]
            .as_str()
            .expect("expr");
        assert!(
            expr.contains("namespace=\"prod\",nsqcluster=\"events\""),
            "{expr}"
        );
    }
}
