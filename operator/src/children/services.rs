//! Services: a headless one per component for stable pod DNS names (the brokers' broadcast
//! addresses and the lookupd addresses brokers register with), and a ClusterIP one per component
//! for clients.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Component, PortSpec, SERVICE_LABEL, child_meta, labels, selector_labels};
use crate::crd::NSQCluster;

fn service_ports(ports: &[PortSpec]) -> Vec<ServicePort> {
    ports
        .iter()
        .map(|p| ServicePort {
            name: Some(p.name.to_owned()),
            port: p.port,
            target_port: Some(IntOrString::String(p.name.to_owned())),
            protocol: Some("TCP".to_owned()),
            app_protocol: Some(p.app_protocol.to_owned()),
            ..ServicePort::default()
        })
        .collect()
}

fn service_labels(
    cluster: &NSQCluster,
    component: Component,
    kind: &str,
) -> std::collections::BTreeMap<String, String> {
    let mut labels = labels(cluster, component);
    labels.insert(SERVICE_LABEL.to_owned(), kind.to_owned());
    labels
}

/// The headless Service behind the component's StatefulSet. It publishes pods before they are
/// ready, so brokers and lookupds can find each other while starting.
pub fn headless_service(cluster: &NSQCluster, component: Component) -> Service {
    Service {
        metadata: child_meta(
            cluster,
            component.headless_name(cluster),
            service_labels(cluster, component, "headless"),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(cluster, component)),
            ports: Some(service_ports(&component.ports(cluster))),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The ClusterIP Service clients use: producers reach the brokers' TCP and HTTP ports, consumers
/// the lookupds' HTTP `/lookup`.
pub fn client_service(cluster: &NSQCluster, component: Component) -> Service {
    Service {
        metadata: child_meta(
            cluster,
            component.name(cluster),
            service_labels(cluster, component, "client"),
        ),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(cluster, component)),
            ports: Some(service_ports(&component.client_ports(cluster))),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::{BrokerTlsSpec, ClusterTlsSpec, NSQClusterSpec};

    fn port_summary(svc: &Service) -> Vec<(String, i32, String, String, String)> {
        svc.spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let target = match p.target_port {
                    Some(IntOrString::String(s)) => s,
                    other => panic!("target port {other:?}"),
                };
                (
                    p.name.unwrap_or_default(),
                    p.port,
                    target,
                    p.protocol.unwrap_or_default(),
                    p.app_protocol.unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn broker_headless_service_publishes_not_ready_pods() {
        let svc = headless_service(&cluster(NSQClusterSpec::default()), Component::Broker);
        assert_eq!(svc.metadata.name.as_deref(), Some("events-broker-headless"));
        let spec = svc.spec.clone().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(
            spec.selector.expect("selector")["app.kubernetes.io/component"],
            "broker"
        );
        assert_eq!(
            port_summary(&svc),
            [
                (
                    "tcp".into(),
                    4150,
                    "tcp".into(),
                    "TCP".into(),
                    "knsq.io/nsq-tcp".into()
                ),
                (
                    "http".into(),
                    4151,
                    "http".into(),
                    "TCP".into(),
                    "http".into()
                ),
                (
                    "handoff".into(),
                    4153,
                    "handoff".into(),
                    "TCP".into(),
                    "kubernetes.io/h2c".into()
                )
            ]
        );
        // Clients have no use for the brokers' handoff port.
        let client = client_service(&cluster(NSQClusterSpec::default()), Component::Broker);
        assert_eq!(port_summary(&client).len(), 2);
    }

    #[test]
    fn lookupd_client_service_exposes_only_http() {
        let svc = client_service(&cluster(NSQClusterSpec::default()), Component::Lookupd);
        assert_eq!(svc.metadata.name.as_deref(), Some("events-lookupd"));
        assert_eq!(
            svc.spec.as_ref().and_then(|s| s.type_.as_deref()),
            Some("ClusterIP")
        );
        assert_eq!(
            port_summary(&svc),
            [(
                "http".into(),
                4161,
                "http".into(),
                "TCP".into(),
                "http".into()
            )]
        );
        let headless = headless_service(&cluster(NSQClusterSpec::default()), Component::Lookupd);
        assert_eq!(
            port_summary(&headless)[0],
            (
                "grpc".into(),
                4160,
                "grpc".into(),
                "TCP".into(),
                "kubernetes.io/h2c".into()
            )
        );
    }

    #[test]
    fn tls_adds_https_and_marks_grpc_as_tls() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.tls = Some(BrokerTlsSpec {
            secret_name: "events-tls".to_owned(),
            required: None,
            client_auth_policy: None,
            min_version: None,
        });
        spec.cluster_tls = Some(ClusterTlsSpec {
            secret_name: "events-cluster-tls".to_owned(),
        });
        let c = cluster(spec);
        let https = (
            "https".into(),
            4152,
            "https".into(),
            "TCP".into(),
            "https".into(),
        );
        for svc in [
            client_service(&c, Component::Broker),
            headless_service(&c, Component::Broker),
        ] {
            let ports = port_summary(&svc);
            assert_eq!(ports[2], https);
        }
        // The brokers' handoff runs over the cluster TLS.
        let handoff = &port_summary(&headless_service(&c, Component::Broker))[3];
        assert_eq!(
            (handoff.0.as_str(), handoff.4.as_str()),
            ("handoff", "https")
        );
        let grpc = &port_summary(&headless_service(&c, Component::Lookupd))[0];
        assert_eq!((grpc.0.as_str(), grpc.4.as_str()), ("grpc", "https"));
    }
}
