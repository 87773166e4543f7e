//! The pod template every component's workload runs: the operator's container, probes and
//! security defaults, then the user's pod settings, then the user's `podTemplate` merged last.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecurityContext, TCPSocketAction, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value};

use super::{CHECKSUM_ANNOTATION, Component, PortSpec, labels, selector_labels};
use crate::crd::Violation;
use crate::crd::{NSQCluster, PodSettings};

/// The unprivileged user the images run as.
const RUN_AS: i64 = 65532;

/// What the kubelet's probes hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProbeTarget {
    /// An HTTP `GET` on a port.
    Http(PortSpec),
    /// An HTTPS `GET` (the kubelet does not verify the certificate).
    Https(PortSpec),
    /// A TCP connect: brokers requiring client certificates refuse the kubelet's HTTPS, since it
    /// cannot show one.
    Tcp(PortSpec),
}

/// The endpoints behind a component's probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Health {
    /// Readiness: whether the Service may send the pod clients.
    pub(super) readiness: &'static str,
    /// Failed readiness checks in a row before the pod leaves its Services.
    pub(super) readiness_failures: i32,
    /// Liveness: whether the process still serves; failing it restarts the container.
    pub(super) liveness: &'static str,
    /// A startup probe on this path holds liveness back while the process starts (a broker
    /// recovering a large disk queue).
    pub(super) startup: Option<&'static str>,
}

impl Health {
    /// nsqlookupd's and nsqadmin's one health check, `/ping`.
    pub(super) const PING: Health = Health {
        readiness: "/ping",
        readiness_failures: 2,
        liveness: "/ping",
        startup: None,
    };
    /// The broker keeps `/ping` as nsqd's disk health: a full disk must not restart it, and a
    /// draining or stopping broker must leave its Services at once.
    pub(super) const BROKER: Health = Health {
        readiness: "/readyz",
        readiness_failures: 1,
        liveness: "/livez",
        startup: Some("/livez"),
    };
}

/// A startup probe's allowance: an hour of checks every 5 s.
const STARTUP_PERIOD: i32 = 5;
const STARTUP_FAILURES: i32 = 720;

/// What differs between the components' pods.
pub(super) struct Workload<'a> {
    pub(super) component: Component,
    pub(super) pod: &'a PodSettings,
    pub(super) default_image: &'a str,
    /// The container's command, when the image's entrypoint is not the program.
    pub(super) command: Option<Vec<String>>,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<EnvVar>,
    pub(super) ports: Vec<PortSpec>,
    pub(super) probe: ProbeTarget,
    pub(super) health: Health,
    /// The port serving `/metrics`, announced in the `prometheus.io/*` annotations.
    pub(super) metrics_port: Option<PortSpec>,
    /// Digest of the component's settings: a change rolls the pods.
    pub(super) checksum: Option<String>,
    pub(super) termination_grace_period_seconds: i64,
    pub(super) volume_mounts: Vec<VolumeMount>,
    pub(super) volumes: Vec<Volume>,
}

pub(super) fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(target: ProbeTarget, path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    // The scheme stays unset (HTTP) for plain probes, as before TLS existed.
    let http_get = |port: PortSpec, scheme: Option<&str>| HTTPGetAction {
        path: Some(path.to_owned()),
        port: IntOrString::String(port.name.to_owned()),
        scheme: scheme.map(str::to_owned),
        ..HTTPGetAction::default()
    };
    let (http_get, tcp_socket) = match target {
        ProbeTarget::Http(port) => (Some(http_get(port, None)), None),
        ProbeTarget::Https(port) => (Some(http_get(port, Some("HTTPS"))), None),
        ProbeTarget::Tcp(port) => (
            None,
            Some(TCPSocketAction {
                port: IntOrString::String(port.name.to_owned()),
                ..TCPSocketAction::default()
            }),
        ),
    };
    Probe {
        http_get,
        tcp_socket,
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Spread a component's pods over nodes unless the user set their own affinity.
fn default_affinity(cluster: &NSQCluster, component: Component) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".to_owned(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(cluster, component)),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// What every pod of a component runs with, the handoff Jobs' included: where it may run, as
/// whom, and with which credentials.
pub(super) fn pod_basics(pod: &PodSettings) -> PodSpec {
    let scheduling = &pod.scheduling;
    PodSpec {
        node_selector: non_empty_map(scheduling.node_selector.clone()),
        tolerations: non_empty(scheduling.tolerations.clone()),
        enable_service_links: Some(false),
        image_pull_secrets: non_empty(pod.image_pull_secrets.clone()),
        priority_class_name: pod.priority_class_name.clone(),
        service_account_name: pod.service_account_name.clone(),
        security_context: Some(
            pod.pod_security_context
                .clone()
                .unwrap_or_else(default_pod_security_context),
        ),
        ..PodSpec::default()
    }
}

/// The main container's security context: the user's, or the operator's default.
pub(super) fn container_security_context(pod: &PodSettings) -> SecurityContext {
    pod.security_context
        .clone()
        .unwrap_or_else(default_security_context)
}

fn default_pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

fn default_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

pub(super) fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

fn non_empty_map(m: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then_some(m)
}

/// The pod template of a workload, with the user's `podTemplate` merged in; a `podTemplate`
/// that leaves no valid pod template is refused, naming the field.
pub(super) fn pod_template(
    cluster: &NSQCluster,
    w: Workload<'_>,
) -> Result<PodTemplateSpec, Violation> {
    let component = w.component;
    let patch = w.pod.pod_template.as_ref();
    let template = generated(cluster, w);
    match patch {
        None => Ok(template),
        Some(patch) => merge_template(&template, patch).map_err(|e| Violation {
            field: format!("{}.podTemplate", component.spec_path()),
            message: format!("does not merge into a valid pod template: {e}"),
        }),
    }
}

/// `template` with `patch` merged in: objects key by key, lists of named items by name (an item
/// with `"$patch": "delete"` removes its namesake), anything else replaced; `null` removes a key.
fn merge_template(
    template: &PodTemplateSpec,
    patch: &Value,
) -> Result<PodTemplateSpec, serde_json::Error> {
    let mut merged = serde_json::to_value(template)?;
    merge(&mut merged, patch);
    serde_json::from_value(merged)
}

fn merge(base: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !base.is_object() {
                *base = Value::Object(Map::new());
            }
            if let Value::Object(base) = base {
                for (key, value) in fields {
                    if value.is_null() {
                        base.remove(key);
                    } else {
                        merge(base.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        Value::Array(items) if named(items) => {
            let mut list = match base.take() {
                Value::Array(list) if named(&list) => list,
                _ => Vec::new(),
            };
            for item in items {
                let name = &item["name"];
                let at = list.iter().position(|i| &i["name"] == name);
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    list.retain(|i| &i["name"] != name);
                    continue;
                }
                let mut item = item.clone();
                if let Value::Object(fields) = &mut item {
                    fields.remove("$patch");
                }
                match at {
                    Some(at) => merge(&mut list[at], &item),
                    None => {
                        let mut fresh = Value::Null;
                        merge(&mut fresh, &item);
                        list.push(fresh);
                    }
                }
            }
            *base = Value::Array(list);
        }
        _ => *base = patch.clone(),
    }
}

/// A list whose items are all objects with a string `name`.
fn named(items: &[Value]) -> bool {
    !items.is_empty()
        && items
            .iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
}

/// The template as the operator generates it from the spec's fields.
fn generated(cluster: &NSQCluster, w: Workload<'_>) -> PodTemplateSpec {
    let component = w.component;
    let pod = w.pod;
    let mut pod_labels = pod.pod_metadata.labels.clone();
    pod_labels.extend(labels(cluster, component));
    let mut annotations = pod.pod_metadata.annotations.clone();
    if let Some(checksum) = w.checksum {
        annotations.insert(CHECKSUM_ANNOTATION.to_owned(), checksum);
    }
    if let Some(port) = w.metrics_port {
        annotations.insert("prometheus.io/scrape".to_owned(), "true".to_owned());
        annotations.insert("prometheus.io/port".to_owned(), port.port.to_string());
        annotations.insert("prometheus.io/path".to_owned(), "/metrics".to_owned());
    }

    let ports = w
        .ports
        .iter()
        .map(|p| ContainerPort {
            name: Some(p.name.to_owned()),
            container_port: p.port,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        })
        .collect();
    let mut env = w.env;
    env.extend(pod.env.iter().cloned());
    let mut volume_mounts = w.volume_mounts;
    volume_mounts.extend(pod.volume_mounts.iter().cloned());
    let mut volumes = w.volumes;
    volumes.extend(pod.volumes.iter().cloned());
    let main = Container {
        name: component.as_str().to_owned(),
        image: Some(
            pod.image
                .clone()
                .unwrap_or_else(|| w.default_image.to_owned()),
        ),
        command: w.command,
        args: Some(w.args),
        env: non_empty(env),
        ports: Some(ports),
        readiness_probe: Some(probe(
            w.probe,
            w.health.readiness,
            5,
            w.health.readiness_failures,
        )),
        liveness_probe: Some(probe(w.probe, w.health.liveness, 10, 6)),
        startup_probe: w
            .health
            .startup
            .map(|path| probe(w.probe, path, STARTUP_PERIOD, STARTUP_FAILURES)),
        resources: pod.resources.clone(),
        volume_mounts: non_empty(volume_mounts),
        security_context: Some(container_security_context(pod)),
        ..Container::default()
    };
    let mut containers = vec![main];
    containers.extend(pod.sidecars.iter().cloned());
    let scheduling = &pod.scheduling;
    let spec = PodSpec {
        containers,
        init_containers: non_empty(pod.init_containers.clone()),
        termination_grace_period_seconds: Some(w.termination_grace_period_seconds),
        volumes: non_empty(volumes),
        affinity: Some(
            scheduling
                .affinity
                .clone()
                .unwrap_or_else(|| default_affinity(cluster, component)),
        ),
        topology_spread_constraints: non_empty(scheduling.topology_spread_constraints.clone()),
        ..pod_basics(pod)
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged(base: Value, patch: Value) -> Value {
        let mut base = base;
        merge(&mut base, &patch);
        base
    }

    #[test]
    fn objects_merge_and_null_removes() {
        assert_eq!(
            merged(
                json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 4}),
                json!({"b": {"c": 5, "x": 6}, "e": null, "f": {"g": null, "h": 7}})
            ),
            json!({"a": 1, "b": {"c": 5, "d": 3, "x": 6}, "f": {"h": 7}})
        );
    }

    #[test]
    fn named_lists_merge_by_name_and_others_replace() {
        let base = json!({
            "containers": [{"name": "broker", "image": "a", "args": ["--x"]}],
            "tolerations": [{"key": "a"}],
        });
        let patch = json!({
            "containers": [
                {"name": "broker", "args": ["--y"], "stdin": true},
                {"name": "proxy", "image": "p", "env": [{"name": "E", "value": null}]},
            ],
            "tolerations": [{"key": "b"}],
        });
        assert_eq!(
            merged(base, patch),
            json!({
                "containers": [
                    {"name": "broker", "image": "a", "args": ["--y"], "stdin": true},
                    {"name": "proxy", "image": "p", "env": [{"name": "E"}]},
                ],
                "tolerations": [{"key": "b"}],
            })
        );
    }

    #[test]
    fn patch_delete_removes_a_named_item() {
        assert_eq!(
            merged(
                json!({"volumes": [{"name": "a"}, {"name": "b"}]}),
                json!({"volumes": [{"name": "a", "$patch": "delete"}, {"name": "c", "$patch": "merge"}]})
            ),
            json!({"volumes": [{"name": "b"}, {"name": "c"}]})
        );
    }

    #[test]
    fn a_template_that_is_no_pod_template_is_an_error() {
        let template = PodTemplateSpec::default();
        assert!(merge_template(&template, &json!({"spec": {"containers": "x"}})).is_err());
        let ok = merge_template(
            &template,
            &json!({"spec": {"containers": [{"name": "c"}], "hostNetwork": true}}),
        )
        .expect("a pod template");
        assert_eq!(ok.spec.expect("spec").host_network, Some(true));
    }
}
