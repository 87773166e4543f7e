//! nsqadmin (`spec.admin`): NSQ's own web UI from its upstream image, a Deployment pointed at
//! the cluster's lookupd Service, a ClusterIP Service, and an optional Ingress.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::pod::{Health, ProbeTarget, Workload, pod_template};
use super::{
    ADMIN_HTTP, Component, LOOKUPD_HTTP, child_meta, client_service, labels, selector_labels,
};
use crate::crd::NSQCluster;
use crate::crd::Violation;

/// NSQ's release that knsq matches, as published by the NSQ project.
pub const ADMIN_IMAGE: &str = "nsqio/nsq:v1.3.0";

/// nsqadmin's objects: built when `spec.admin` is set, otherwise the names to delete.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdminChildren {
    pub deployment: Option<Deployment>,
    pub service: Option<Service>,
    pub ingress: Option<Ingress>,
    /// Name of the Deployment and Service when `spec.admin` is unset.
    pub disabled: Option<String>,
    /// Name of the Ingress when there is none to apply.
    pub disabled_ingress: Option<String>,
}

pub fn admin_children(cluster: &NSQCluster) -> Result<AdminChildren, Violation> {
    let component = Component::Admin;
    let name = component.name(cluster);
    let Some(spec) = &cluster.spec.admin else {
        return Ok(AdminChildren {
            disabled: Some(name.clone()),
            disabled_ingress: Some(name),
            ..AdminChildren::default()
        });
    };
    let base_path = spec
        .ingress
        .as_ref()
        .map(|i| i.path.trim_end_matches('/'))
        .filter(|p| !p.is_empty());
    let mut args = vec![
        format!("--http-address=0.0.0.0:{}", ADMIN_HTTP.port),
        format!(
            "--lookupd-http-address={}:{}",
            Component::Lookupd.service_host(cluster),
            LOOKUPD_HTTP.port
        ),
    ];
    args.extend(base_path.map(|p| format!("--base-path={p}")));
    let template = pod_template(
        cluster,
        Workload {
            component,
            pod: &spec.pod,
            default_image: ADMIN_IMAGE,
            // The image holds every NSQ program; /nsqadmin is its link to nsqadmin.
            command: Some(vec!["/nsqadmin".to_owned()]),
            args,
            env: Vec::new(),
            ports: component.ports(cluster),
            probe: ProbeTarget::Http(ADMIN_HTTP),
            health: Health::PING,
            metrics_port: None,
            checksum: None,
            termination_grace_period_seconds: 30,
            volume_mounts: Vec::new(),
            volumes: Vec::new(),
        },
    )?;
    let deployment = Deployment {
        metadata: child_meta(cluster, name.clone(), labels(cluster, component)),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(cluster, component)),
                ..LabelSelector::default()
            },
            template,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let ingress = spec.ingress.as_ref().map(|i| {
        let mut meta = child_meta(cluster, name.clone(), labels(cluster, component));
        meta.annotations = (!i.annotations.is_empty()).then(|| i.annotations.clone());
        let backend = IngressBackend {
            service: Some(IngressServiceBackend {
                name: name.clone(),
                port: Some(ServiceBackendPort {
                    name: Some(ADMIN_HTTP.name.to_owned()),
                    ..ServiceBackendPort::default()
                }),
            }),
            ..IngressBackend::default()
        };
        Ingress {
            metadata: meta,
            spec: Some(IngressSpec {
                ingress_class_name: i.ingress_class_name.clone(),
                rules: Some(vec![IngressRule {
                    host: i.host.clone(),
                    http: Some(HTTPIngressRuleValue {
                        paths: vec![HTTPIngressPath {
                            path: Some(i.path.clone()),
                            path_type: "Prefix".to_owned(),
                            backend,
                        }],
                    }),
                }]),
                tls: i.tls_secret_name.as_ref().map(|secret| {
                    vec![IngressTLS {
                        hosts: i.host.clone().map(|h| vec![h]),
                        secret_name: Some(secret.clone()),
                    }]
                }),
                ..IngressSpec::default()
            }),
            ..Ingress::default()
        }
    });
    Ok(AdminChildren {
        deployment: Some(deployment),
        service: Some(client_service(cluster, component)),
        disabled_ingress: ingress.is_none().then_some(name),
        ingress,
        disabled: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::{AdminIngressSpec, AdminSpec, NSQClusterSpec};
    use serde_json::json;

    fn admin(ingress: Option<AdminIngressSpec>) -> AdminChildren {
        let spec = NSQClusterSpec {
            admin: Some(serde_json::from_value(json!({})).expect("defaults")),
            ..NSQClusterSpec::default()
        };
        let mut c = cluster(spec);
        if let Some(a) = c.spec.admin.as_mut() {
            a.ingress = ingress;
        }
        admin_children(&c).expect("valid")
    }

    #[test]
    fn nothing_but_names_to_delete_without_spec_admin() {
        let children = admin_children(&cluster(NSQClusterSpec::default())).expect("valid");
        assert_eq!(
            children,
            AdminChildren {
                disabled: Some("events-admin".to_owned()),
                disabled_ingress: Some("events-admin".to_owned()),
                ..AdminChildren::default()
            }
        );
    }

    #[test]
    fn nsqadmin_points_at_the_lookupd_service() {
        let children = admin(None);
        let deployment = children.deployment.expect("deployment");
        assert_eq!(deployment.metadata.name.as_deref(), Some("events-admin"));
        let spec = deployment.spec.expect("spec");
        assert_eq!(spec.replicas, Some(1));
        let pod = spec.template.spec.expect("pod");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("nsqio/nsq:v1.3.0"));
        assert_eq!(c.command, Some(vec!["/nsqadmin".to_owned()]));
        assert_eq!(
            c.args.clone().expect("args"),
            [
                "--http-address=0.0.0.0:4171",
                "--lookupd-http-address=events-lookupd.prod.svc:4161"
            ]
        );
        let probe = c
            .readiness_probe
            .clone()
            .and_then(|p| p.http_get)
            .expect("probe");
        assert_eq!(probe.path.as_deref(), Some("/ping"));
        // No /metrics: not announced to Prometheus.
        let annotations = spec.template.metadata.and_then(|m| m.annotations);
        assert!(
            !annotations
                .unwrap_or_default()
                .contains_key("prometheus.io/scrape")
        );
        let service = children.service.expect("service");
        let ports = service.spec.and_then(|s| s.ports).expect("ports");
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("http"), 4171)
        );
        assert_eq!(children.ingress, None);
        assert_eq!(children.disabled_ingress.as_deref(), Some("events-admin"));
    }

    #[test]
    fn ingress_with_a_path_sets_the_base_path() {
        let children = admin(Some(AdminIngressSpec {
            ingress_class_name: Some("nginx".to_owned()),
            host: Some("nsq.example.com".to_owned()),
            path: "/nsqadmin/".to_owned(),
            annotations: [("a".to_owned(), "b".to_owned())].into(),
            tls_secret_name: Some("nsq-tls".to_owned()),
        }));
        let args = children
            .deployment
            .and_then(|d| d.spec)
            .expect("spec")
            .template
            .spec
            .expect("pod")
            .containers[0]
            .args
            .clone()
            .expect("args");
        assert!(
            args.contains(&"--base-path=/nsqadmin".to_owned()),
            "{args:?}"
        );
        let ingress = serde_json::to_value(children.ingress.expect("ingress")).expect("json");
        assert_eq!(ingress["metadata"]["annotations"], json!({"a": "b"}));
        assert_eq!(
            ingress["spec"],
            json!({
                "ingressClassName": "nginx",
                "rules": [{"host": "nsq.example.com", "http": {"paths": [{
                    "path": "/nsqadmin/", "pathType": "Prefix",
                    "backend": {"service": {"name": "events-admin", "port": {"name": "http"}}},
                }]}}],
                "tls": [{"hosts": ["nsq.example.com"], "secretName": "nsq-tls"}],
            })
        );
        assert_eq!(children.disabled_ingress, None);
        let _ = AdminSpec {
            replicas: 1,
            pod: Default::default(),
            ingress: None,
        };
    }
}
