//! The Prometheus operator's ServiceMonitor (`monitoring.coreos.com/v1`), built as JSON because
//! its types are not part of Kubernetes.

use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Component, SERVICE_LABEL, child_meta, cluster_labels};
use crate::crd::NSQCluster;

pub const MONITORING_API_VERSION: &str = "monitoring.coreos.com/v1";

/// A ServiceMonitor scraping `/metrics` on the HTTP port of every broker and lookupd pod, or
/// `None` when the spec does not ask for one.
///
/// It selects the headless Services only: the client Services select the same pods, and
/// matching both would scrape every pod twice and double every sum. The headless ones also list
/// pods that are not ready, so an unhealthy broker (its `/ping` failing) is still scraped.
/// Every series gets `job` (`broker` or `lookupd`, from the Service's component label) and
/// `nsqcluster` (the cluster's name), besides the usual `namespace` and `pod`: knsq's alerts and
/// dashboard group by them.
pub fn service_monitor(cluster: &NSQCluster) -> Option<Value> {
    let spec = &cluster.spec.metrics.service_monitor;
    if !spec.enabled {
        return None;
    }
    let mut labels = cluster_labels(cluster);
    let mut selector = labels.clone();
    selector.remove("app.kubernetes.io/managed-by");
    selector.insert(SERVICE_LABEL.to_owned(), "headless".to_owned());
    labels.extend(spec.labels.clone());
    let meta = child_meta(cluster, cluster.name_any(), labels);
    let components = [Component::Broker.as_str(), Component::Lookupd.as_str()];
    Some(json!({
        "apiVersion": MONITORING_API_VERSION,
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "jobLabel": "app.kubernetes.io/component",
            "selector": {
                "matchLabels": selector,
                "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": components}],
            },
            "endpoints": [{
                "port": "http",
                "path": "/metrics",
                "interval": spec.interval,
                "relabelings": [{
                    "sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_instance"],
                    "targetLabel": "nsqcluster",
                }],
            }],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::{cluster, images};
    use crate::children::{Children, labels};
    use crate::crd::NSQClusterSpec;
    use std::collections::BTreeMap;

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
        assert_eq!(sm["spec"]["jobLabel"], "app.kubernetes.io/component");
        let endpoint = &sm["spec"]["endpoints"][0];
        assert_eq!(
            (&endpoint["port"], &endpoint["path"], &endpoint["interval"]),
            (&json!("http"), &json!("/metrics"), &json!("15s"))
        );
        assert_eq!(endpoint["relabelings"][0]["targetLabel"], "nsqcluster");
        assert!(
            sm["spec"]["selector"]["matchLabels"]
                .get("app.kubernetes.io/managed-by")
                .is_none()
        );
    }

    fn matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
        let exact = selector["matchLabels"]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
        let expressions = selector["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| {
                let key = e["key"].as_str().unwrap_or_default();
                assert_eq!(e["operator"], "In", "only In is understood here");
                e["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|v| labels.get(key).map(String::as_str) == v.as_str())
            });
        exact && expressions
    }

    /// Every Service the monitor picks that selects the pod and has the endpoint's port is a
    /// scrape of that pod: there must be exactly one per broker and lookupd pod, and none of
    /// nsqadmin's, which has no /metrics.
    #[test]
    fn each_pod_is_scraped_exactly_once() {
        let mut spec = NSQClusterSpec::default();
        spec.metrics.service_monitor.enabled = true;
        spec.admin = Some(serde_json::from_value(json!({})).expect("admin"));
        let c = cluster(spec);
        let children = Children::build(&c, &images()).expect("valid");
        let sm = children.service_monitor.clone().expect("enabled");
        let port = sm["spec"]["endpoints"][0]["port"].as_str().expect("port");
        let mut services = children.services.clone();
        services.extend(children.admin.service.clone());
        let pods = [
            (
                Component::Broker,
                &children.broker.spec.as_ref().expect("spec").template,
            ),
            (
                Component::Lookupd,
                &children.lookupd.spec.as_ref().expect("spec").template,
            ),
            (
                Component::Admin,
                &children
                    .admin
                    .deployment
                    .as_ref()
                    .and_then(|d| d.spec.as_ref())
                    .expect("spec")
                    .template,
            ),
        ];
        for (component, template) in pods {
            let pod_labels = template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .expect("labels");
            let scrapes: Vec<String> = services
                .iter()
                .filter(|s| {
                    matches(
                        &sm["spec"]["selector"],
                        s.metadata.labels.as_ref().expect("labels"),
                    )
                })
                .filter(|s| {
                    let spec = s.spec.as_ref().expect("spec");
                    spec.selector
                        .as_ref()
                        .expect("selector")
                        .iter()
                        .all(|(k, v)| pod_labels.get(k) == Some(v))
                        && spec
                            .ports
                            .iter()
                            .flatten()
                            .any(|p| p.name.as_deref() == Some(port))
                })
                .map(|s| s.name_any())
                .collect();
            let want = match component {
                Component::Admin => Vec::<String>::new(),
                _ => vec![component.headless_name(&c)],
            };
            assert_eq!(scrapes, want, "{component:?}");
        }
        // Both components' Services would match without the headless label.
        let all = services
            .iter()
            .filter(|s| {
                let mut l = s.metadata.labels.clone().expect("labels");
                l.insert(SERVICE_LABEL.to_owned(), "headless".to_owned());
                matches(&sm["spec"]["selector"], &l)
            })
            .count();
        assert_eq!(all, 4);
        assert_eq!(
            labels(&c, Component::Broker)["app.kubernetes.io/component"],
            "broker"
        );
    }
}
