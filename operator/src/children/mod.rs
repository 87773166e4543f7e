//! Pure builders of the objects an `NSQCluster` owns. Nothing here talks to the API server: each
//! builder turns the cluster (and the operator's defaults) into the object to server-side apply.

mod admin;
mod config;
mod handoff;
mod monitor;
mod pdb;
mod pod;
mod rules;
mod services;
mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::Value;

use crate::crd::Violation;
use crate::crd::{NSQCluster, PodSettings};

pub use admin::{ADMIN_IMAGE, AdminChildren, admin_children};
pub use config::{LOOKUPD_ADDRESSES_KEY, config_checksum, config_map, lookupd_addresses};
pub use handoff::{
    CLAIM_LABEL, HANDOFF_COMPONENT, broker_claim_name, claim_ordinal, handoff_job,
    handoff_job_name, handoff_labels,
};
pub use monitor::{MONITORING_API_VERSION, service_monitor};
pub use pdb::pod_disruption_budget;
pub use rules::prometheus_rule;
pub use services::{client_service, headless_service};
pub(crate) use statefulset::{CLUSTER_TLS_VOLUME, DATA_VOLUME, TLS_VOLUME, reserved_env};
pub use statefulset::{TEMPLATE_HASH_ANNOTATION, broker_statefulset, lookupd_statefulset};

/// Pod annotation holding a digest of a component's settings, so a change restarts its pods.
pub const CHECKSUM_ANNOTATION: &str = "knsq.io/config-checksum";
/// The value of `app.kubernetes.io/managed-by` on every child.
pub const MANAGER: &str = "knsq-operator";

/// The workloads of a cluster: two StatefulSets, and nsqadmin's Deployment when asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    Broker,
    Lookupd,
    Admin,
}

/// A named TCP port of a component's container and Services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub name: &'static str,
    pub port: i32,
    /// The Service's `appProtocol`.
    pub app_protocol: &'static str,
}

pub const BROKER_TCP: PortSpec = PortSpec {
    name: "tcp",
    port: 4150,
    app_protocol: "knsq.io/nsq-tcp",
};
pub const BROKER_HTTP: PortSpec = PortSpec {
    name: "http",
    port: 4151,
    app_protocol: "http",
};
/// The brokers' HTTP API over TLS, served only with `spec.broker.tls`.
pub const BROKER_HTTPS: PortSpec = PortSpec {
    name: "https",
    port: 4152,
    app_protocol: "https",
};
/// Broker-to-broker gRPC: drained brokers hand their messages off to their peers here.
pub const BROKER_HANDOFF: PortSpec = PortSpec {
    name: "handoff",
    port: 4153,
    app_protocol: "kubernetes.io/h2c",
};
pub const LOOKUPD_GRPC: PortSpec = PortSpec {
    name: "grpc",
    port: 4160,
    app_protocol: "kubernetes.io/h2c",
};
pub const LOOKUPD_HTTP: PortSpec = PortSpec {
    name: "http",
    port: 4161,
    app_protocol: "http",
};
/// nsqadmin's web UI.
pub const ADMIN_HTTP: PortSpec = PortSpec {
    name: "http",
    port: 4171,
    app_protocol: "http",
};
/// Label telling a component's headless Service from its client Service: the ServiceMonitor
/// selects the headless ones only, so Prometheus scrapes each pod once, ready or not.
pub const SERVICE_LABEL: &str = "knsq.io/service";

impl Component {
    /// The StatefulSet components, in the order they are applied.
    pub const STATEFUL: [Component; 2] = [Component::Lookupd, Component::Broker];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Broker => "broker",
            Component::Lookupd => "lookupd",
            Component::Admin => "admin",
        }
    }

    /// Where the component's settings are in the NSQCluster, for messages naming a field.
    pub fn spec_path(self) -> &'static str {
        match self {
            Component::Broker => "spec.broker",
            Component::Lookupd => "spec.lookupd",
            Component::Admin => "spec.admin",
        }
    }

    /// The component's pod settings; `None` for nsqadmin when `spec.admin` is unset.
    pub fn pod_settings(self, cluster: &NSQCluster) -> Option<&PodSettings> {
        match self {
            Component::Broker => Some(&cluster.spec.broker.pod),
            Component::Lookupd => Some(&cluster.spec.lookupd.pod),
            Component::Admin => cluster.spec.admin.as_ref().map(|a| &a.pod),
        }
    }

    /// Every port the component's container listens on.
    pub fn ports(self, cluster: &NSQCluster) -> Vec<PortSpec> {
        match self {
            Component::Broker => {
                let mut ports = self.client_ports(cluster);
                ports.push(cluster_grpc(cluster, BROKER_HANDOFF));
                ports
            }
            Component::Admin => self.client_ports(cluster),
            Component::Lookupd => vec![cluster_grpc(cluster, LOOKUPD_GRPC), LOOKUPD_HTTP],
        }
    }

    /// The ports clients reach through the component's ClusterIP Service.
    pub fn client_ports(self, cluster: &NSQCluster) -> Vec<PortSpec> {
        match self {
            Component::Broker if cluster.spec.broker.tls.is_some() => {
                vec![BROKER_TCP, BROKER_HTTP, BROKER_HTTPS]
            }
            Component::Broker => vec![BROKER_TCP, BROKER_HTTP],
            Component::Lookupd => vec![LOOKUPD_HTTP],
            Component::Admin => vec![ADMIN_HTTP],
        }
    }

    /// Name of the component's workload, ClusterIP Service and PodDisruptionBudget.
    pub fn name(self, cluster: &NSQCluster) -> String {
        format!("{}-{}", cluster.name_any(), self.as_str())
    }

    /// Name of the headless Service that gives each pod a stable DNS name.
    pub fn headless_name(self, cluster: &NSQCluster) -> String {
        format!("{}-headless", self.name(cluster))
    }

    /// Stable DNS name of pod `ordinal`.
    pub fn pod_host(self, cluster: &NSQCluster, ordinal: i32) -> String {
        format!(
            "{}-{ordinal}.{}.{}.svc",
            self.name(cluster),
            self.headless_name(cluster),
            namespace(cluster)
        )
    }

    /// DNS name of the component's ClusterIP Service.
    pub fn service_host(self, cluster: &NSQCluster) -> String {
        format!("{}.{}.svc", self.name(cluster), namespace(cluster))
    }
}

/// A gRPC port between knsq's own servers (registration, handoff): HTTP/2 in clear text, or
/// over TLS (`https`) with `spec.clusterTls`.
fn cluster_grpc(cluster: &NSQCluster, port: PortSpec) -> PortSpec {
    if cluster.spec.cluster_tls.is_some() {
        PortSpec {
            app_protocol: "https",
            ..port
        }
    } else {
        port
    }
}

/// Labels that select a component's pods.
pub fn selector_labels(cluster: &NSQCluster, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "knsq".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cluster.name_any()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.as_str().to_owned(),
        ),
    ])
}

/// Labels on every object of a component: the selector plus `managed-by`.
pub fn labels(cluster: &NSQCluster, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster, component);
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        MANAGER.to_owned(),
    );
    labels
}

/// Labels of the children that belong to no one component (ConfigMap, ServiceMonitor,
/// PrometheusRule).
pub fn cluster_labels(cluster: &NSQCluster) -> BTreeMap<String, String> {
    let mut labels = labels(cluster, Component::Broker);
    labels.remove("app.kubernetes.io/component");
    labels
}

/// Metadata of a child: its name, the cluster's namespace, labels and the controller owner
/// reference that makes the garbage collector delete it with the cluster.
pub fn child_meta(
    cluster: &NSQCluster,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(cluster)),
        labels: Some(labels),
        owner_references: cluster.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    }
}

fn namespace(cluster: &NSQCluster) -> String {
    cluster.namespace().unwrap_or_else(|| "default".to_owned())
}

/// Images used when the cluster does not name its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultImages {
    pub broker: String,
    pub lookupd: String,
}

/// Every object a cluster owns, in the order they are applied: configuration and Services
/// before the StatefulSets that use them.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub config_map: ConfigMap,
    pub services: Vec<Service>,
    pub lookupd: StatefulSet,
    pub broker: StatefulSet,
    pub pdbs: Vec<PodDisruptionBudget>,
    /// Names of the PodDisruptionBudgets the spec turns off, deleted if they exist.
    pub disabled_pdbs: Vec<String>,
    /// The ServiceMonitor (`monitoring.coreos.com/v1`), when enabled in the spec.
    pub service_monitor: Option<Value>,
    /// Name of the ServiceMonitor when the spec turns it off, deleted if it exists.
    pub disabled_service_monitor: Option<String>,
    /// The PrometheusRule (`monitoring.coreos.com/v1`), when enabled in the spec.
    pub prometheus_rule: Option<Value>,
    /// Name of the PrometheusRule when the spec turns it off, deleted if it exists.
    pub disabled_prometheus_rule: Option<String>,
    /// nsqadmin's Deployment, Service and Ingress, when `spec.admin` is set.
    pub admin: AdminChildren,
}

impl Children {
    /// Every child of the cluster, or the first field that keeps one from being built (a
    /// `podTemplate` that merges into no valid pod template).
    pub fn build(cluster: &NSQCluster, images: &DefaultImages) -> Result<Children, Violation> {
        let config_map = config_map(cluster);
        let services = Component::STATEFUL
            .into_iter()
            .flat_map(|c| [headless_service(cluster, c), client_service(cluster, c)])
            .collect();
        let lookupd = lookupd_statefulset(cluster, &images.lookupd, &config_map)?;
        let broker = broker_statefulset(cluster, &images.broker, &config_map)?;
        let (pdbs, disabled_pdbs) = Component::STATEFUL.into_iter().fold(
            (Vec::new(), Vec::new()),
            |(mut on, mut off), c| {
                match pod_disruption_budget(cluster, c) {
                    Some(pdb) => on.push(pdb),
                    None => off.push(c.name(cluster)),
                }
                (on, off)
            },
        );
        let service_monitor = service_monitor(cluster);
        let disabled_service_monitor = service_monitor.is_none().then(|| cluster.name_any());
        let prometheus_rule = prometheus_rule(cluster);
        let disabled_prometheus_rule = prometheus_rule.is_none().then(|| cluster.name_any());
        Ok(Children {
            config_map,
            services,
            lookupd,
            broker,
            pdbs,
            disabled_pdbs,
            service_monitor,
            disabled_service_monitor,
            prometheus_rule,
            disabled_prometheus_rule,
            admin: admin_children(cluster)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::NSQClusterSpec;

    /// A cluster as the API server returns it: named, namespaced, with a uid and generation.
    pub(crate) fn cluster(spec: NSQClusterSpec) -> NSQCluster {
        let mut cluster = NSQCluster::new("events", spec);
        cluster.metadata.namespace = Some("prod".to_owned());
        cluster.metadata.uid = Some("0b7c5f2e-1111-2222-3333-444455556666".to_owned());
        cluster.metadata.generation = Some(1);
        cluster
    }

    pub(crate) fn images() -> DefaultImages {
        DefaultImages {
            broker: "knsq/knsq-broker:1.0.0".to_owned(),
            lookupd: "knsq/knsq-lookupd:1.0.0".to_owned(),
        }
    }

    #[test]
    fn names_and_dns() {
        let c = cluster(NSQClusterSpec::default());
        assert_eq!(Component::Broker.name(&c), "events-broker");
        assert_eq!(
            Component::Lookupd.headless_name(&c),
            "events-lookupd-headless"
        );
        assert_eq!(
            Component::Lookupd.pod_host(&c, 2),
            "events-lookupd-2.events-lookupd-headless.prod.svc"
        );
        assert_eq!(Component::Broker.service_host(&c), "events-broker.prod.svc");
    }

    #[test]
    fn child_meta_is_owned_by_the_cluster() {
        let c = cluster(NSQClusterSpec::default());
        let meta = child_meta(&c, "x".to_owned(), labels(&c, Component::Broker));
        let owner = &meta.owner_references.expect("owner reference")[0];
        assert_eq!(owner.kind, "NSQCluster");
        assert_eq!(owner.api_version, "knsq.io/v1alpha1");
        assert_eq!(owner.name, "events");
        assert_eq!(owner.uid, "0b7c5f2e-1111-2222-3333-444455556666");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("prod"));
        assert_eq!(
            meta.labels.expect("labels")["app.kubernetes.io/managed-by"],
            "knsq-operator"
        );
    }

    #[test]
    fn children_in_apply_order() {
        let c = cluster(NSQClusterSpec::default());
        let children = Children::build(&c, &images()).expect("valid");
        let services: Vec<_> = children.services.iter().map(|s| s.name_any()).collect();
        assert_eq!(
            services,
            [
                "events-lookupd-headless",
                "events-lookupd",
                "events-broker-headless",
                "events-broker"
            ]
        );
        let pdbs: Vec<_> = children.pdbs.iter().map(|p| p.name_any()).collect();
        assert_eq!(pdbs, ["events-lookupd", "events-broker"]);
        assert_eq!(children.disabled_pdbs, Vec::<String>::new());
        assert_eq!(children.service_monitor, None);
        assert_eq!(children.disabled_service_monitor.as_deref(), Some("events"));
    }

    #[test]
    fn disabled_optional_children_are_named_for_deletion() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.pdb.enabled = false;
        spec.metrics.service_monitor.enabled = true;
        let children = Children::build(&cluster(spec), &images()).expect("valid");
        assert_eq!(children.pdbs.len(), 1);
        assert_eq!(children.disabled_pdbs, ["events-broker"]);
        assert!(children.service_monitor.is_some());
        assert_eq!(children.disabled_service_monitor, None);
    }
}
