//! The lookupd and broker StatefulSets.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapKeySelector, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, SecretVolumeSource, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use sha2::{Digest, Sha256};

use super::config::{LOOKUPD_ADDRESSES_KEY, config_map_name, settings};
use super::pod::{Health, ProbeTarget, Workload, field_env, non_empty, pod_template};
use super::{BROKER_HANDOFF, BROKER_HTTP, BROKER_HTTPS, BROKER_TCP, Component};
use super::{LOOKUPD_GRPC, LOOKUPD_HTTP};
use super::{child_meta, config_checksum, labels, namespace, selector_labels};
use crate::crd::{ClientAuthPolicy, NSQCluster};
use crate::crd::{STORAGE_SIZE_ANNOTATION, Violation};

/// Where a broker keeps its queues.
pub(crate) const DATA_PATH: &str = "/data";
pub(crate) const DATA_VOLUME: &str = "data";
/// The brokers' client TLS Secret (`spec.broker.tls`).
pub(crate) const TLS_VOLUME: &str = "tls";
const TLS_PATH: &str = "/etc/knsq/tls";
/// The broker↔lookupd mutual TLS Secret (`spec.clusterTls`), mounted by both components.
pub(crate) const CLUSTER_TLS_VOLUME: &str = "cluster-tls";
pub(crate) const CLUSTER_TLS_PATH: &str = "/etc/knsq/cluster-tls";
/// Owner and group (the pods' fsGroup) may read the keys, nobody else.
const SECRET_MODE: i32 = 0o440;

/// What differs between the two StatefulSets besides the pod.
struct Stateful<'a> {
    workload: Workload<'a>,
    replicas: i32,
    volume_claim_templates: Vec<PersistentVolumeClaim>,
}

/// The lookupd StatefulSet: `--broadcast-address` is each pod's stable DNS name.
pub fn lookupd_statefulset(
    cluster: &NSQCluster,
    default_image: &str,
    config_map: &ConfigMap,
) -> Result<StatefulSet, Violation> {
    let spec = &cluster.spec.lookupd;
    let component = Component::Lookupd;
    let mut args = vec![
        format!("--grpc-address=0.0.0.0:{}", LOOKUPD_GRPC.port),
        format!("--http-address=0.0.0.0:{}", LOOKUPD_HTTP.port),
    ];
    let (mut volume_mounts, mut volumes) = (Vec::new(), Vec::new());
    if let Some(tls) = &cluster.spec.cluster_tls {
        // Serve gRPC with the cluster certificate and accept only brokers signed by its CA.
        args.extend([
            format!("--grpc-tls-cert={CLUSTER_TLS_PATH}/tls.crt"),
            format!("--grpc-tls-key={CLUSTER_TLS_PATH}/tls.key"),
            format!("--grpc-tls-client-ca-file={CLUSTER_TLS_PATH}/ca.crt"),
        ]);
        let (mount, volume) = cluster_tls_volume(&tls.secret_name);
        volume_mounts.push(mount);
        volumes.push(volume);
    }
    statefulset(
        cluster,
        config_map,
        Stateful {
            workload: Workload {
                component,
                pod: &spec.pod,
                default_image,
                command: None,
                args,
                env: Vec::new(),
                ports: component.ports(cluster),
                probe: ProbeTarget::Http(LOOKUPD_HTTP),
                health: Health::PING,
                metrics_port: Some(LOOKUPD_HTTP),
                checksum: None,
                termination_grace_period_seconds: 30,
                volume_mounts,
                volumes,
            },
            replicas: spec.replicas,
            volume_claim_templates: Vec::new(),
        },
    )
}

/// The broker StatefulSet: a node id from the pod name's ordinal, the stable pod DNS name as
/// broadcast address, every lookupd pod as a registration target (from the ConfigMap, so the
/// list changes without a restart), and data on a claim (or an emptyDir). The StatefulSet
/// carries a digest of its pod template, which tells the operator a rolling update begins.
pub fn broker_statefulset(
    cluster: &NSQCluster,
    default_image: &str,
    config_map: &ConfigMap,
) -> Result<StatefulSet, Violation> {
    let spec = &cluster.spec.broker;
    let component = Component::Broker;
    // The broker takes the ordinal at the end of its pod name as node id: that works on every
    // Kubernetes version, unlike the pod-index label (1.28+).
    let mut args = vec![
        format!("--tcp-address=0.0.0.0:{}", BROKER_TCP.port),
        format!("--http-address=0.0.0.0:{}", BROKER_HTTP.port),
        format!("--handoff-address=0.0.0.0:{}", BROKER_HANDOFF.port),
        format!("--data-path={DATA_PATH}"),
        "--node-id=$(POD_NAME)".to_owned(),
    ];
    let mut volume_mounts = vec![VolumeMount {
        name: DATA_VOLUME.to_owned(),
        mount_path: DATA_PATH.to_owned(),
        ..VolumeMount::default()
    }];
    let mut tls_volumes = Vec::new();
    if let Some(tls) = &spec.tls {
        args.extend([
            format!("--https-address=0.0.0.0:{}", BROKER_HTTPS.port),
            format!("--tls-cert={TLS_PATH}/tls.crt"),
            format!("--tls-key={TLS_PATH}/tls.key"),
        ]);
        let mut keys = vec!["tls.crt", "tls.key"];
        // Listing ca.crt makes a Secret without it fail the pod's volume mount with a message
        // naming the key, rather than the broker failing later on a missing file.
        if tls.client_auth_policy == Some(ClientAuthPolicy::RequireVerify) {
            args.push(format!("--tls-root-ca-file={TLS_PATH}/ca.crt"));
            keys.push("ca.crt");
        }
        volume_mounts.push(secret_mount(TLS_VOLUME, TLS_PATH));
        tls_volumes.push(secret_volume(TLS_VOLUME, &tls.secret_name, &keys));
    }
    if let Some(tls) = &cluster.spec.cluster_tls {
        args.extend(lookupd_tls_args());
        // The handoff listener takes the same certificate, and peers dial it as they dial the
        // lookupds: the certificate must also name the brokers' pods.
        args.extend([
            format!("--handoff-tls-cert={CLUSTER_TLS_PATH}/tls.crt"),
            format!("--handoff-tls-key={CLUSTER_TLS_PATH}/tls.key"),
            format!("--handoff-tls-client-ca-file={CLUSTER_TLS_PATH}/ca.crt"),
        ]);
        let (mount, volume) = cluster_tls_volume(&tls.secret_name);
        volume_mounts.push(mount);
        tls_volumes.push(volume);
    }

    let storage = &spec.storage;
    let (mut volumes, volume_claim_templates) = if storage.ephemeral {
        let empty_dir = EmptyDirVolumeSource {
            size_limit: Some(storage.size.clone()),
            ..EmptyDirVolumeSource::default()
        };
        (
            vec![Volume {
                name: DATA_VOLUME.to_owned(),
                empty_dir: Some(empty_dir),
                ..Volume::default()
            }],
            Vec::new(),
        )
    } else {
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(DATA_VOLUME.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                storage_class_name: storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        storage.size.clone(),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        };
        (Vec::new(), vec![claim])
    };
    volumes.extend(tls_volumes);
    let mut sts = statefulset(
        cluster,
        config_map,
        Stateful {
            workload: Workload {
                component,
                pod: &spec.pod,
                default_image,
                command: None,
                args,
                env: vec![lookupd_addresses_env(cluster)],
                ports: component.ports(cluster),
                probe: broker_probe(cluster),
                health: Health::BROKER,
                metrics_port: Some(BROKER_HTTP),
                checksum: None,
                termination_grace_period_seconds: spec.termination_grace_period_seconds,
                volume_mounts,
                volumes,
            },
            replicas: spec.replicas,
            volume_claim_templates,
        },
    )?;
    let mut annotations =
        BTreeMap::from([(TEMPLATE_HASH_ANNOTATION.to_owned(), template_hash(&sts))]);
    if !storage.ephemeral {
        // The claim template keeps the size the claims were made with; this is what they were
        // last asked to grow to.
        annotations.insert(STORAGE_SIZE_ANNOTATION.to_owned(), storage.size.0.clone());
    }
    sts.metadata.annotations = Some(annotations);
    Ok(sts)
}

/// Annotation on the broker StatefulSet: a digest of the pod template it was applied with. A
/// new digest means the pods roll, which the operator then paces one broker at a time.
pub const TEMPLATE_HASH_ANNOTATION: &str = "knsq.io/template-hash";

fn template_hash(sts: &StatefulSet) -> String {
    let template = sts
        .spec
        .as_ref()
        .and_then(|s| serde_json::to_vec(&s.template).ok())
        .unwrap_or_default();
    Sha256::digest(&template)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The flags with which a broker registers with lookupds requiring mutual TLS. The lookupd
/// addresses stay the pods' stable DNS names, which the certificate names, so no
/// `--lookupd-tls-server-name` is needed.
pub(crate) fn lookupd_tls_args() -> [String; 3] {
    [
        format!("--lookupd-tls-root-ca-file={CLUSTER_TLS_PATH}/ca.crt"),
        format!("--lookupd-tls-cert={CLUSTER_TLS_PATH}/tls.crt"),
        format!("--lookupd-tls-key={CLUSTER_TLS_PATH}/tls.key"),
    ]
}

/// The broker reads its lookupd list from this variable when no `--lookupd-grpc-address` is
/// given; it comes from the ConfigMap, so a new list reaches new pods without a new template.
fn lookupd_addresses_env(cluster: &NSQCluster) -> EnvVar {
    EnvVar {
        name: LOOKUPD_ADDRESSES_KEY.to_owned(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: config_map_name(cluster),
                key: LOOKUPD_ADDRESSES_KEY.to_owned(),
                ..ConfigMapKeySelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Names of the pod's volumes, containers and environment variables the operator sets for a
/// component; the user's must not reuse them.
pub(crate) fn reserved_env(cluster: &NSQCluster, component: Component) -> Vec<String> {
    let mut names = vec!["POD_NAME".to_owned()];
    if component == Component::Broker {
        names.push(LOOKUPD_ADDRESSES_KEY.to_owned());
    }
    names.extend(
        settings(cluster, component)
            .into_iter()
            .map(|s| s.key.to_owned()),
    );
    names
}

/// The cluster TLS Secret as both components (and the handoff Jobs) mount it.
pub(crate) fn cluster_tls_volume(secret_name: &str) -> (VolumeMount, Volume) {
    (
        secret_mount(CLUSTER_TLS_VOLUME, CLUSTER_TLS_PATH),
        secret_volume(
            CLUSTER_TLS_VOLUME,
            secret_name,
            &["tls.crt", "tls.key", "ca.crt"],
        ),
    )
}

/// Plain HTTP while the broker answers it; HTTPS once it refuses plain HTTP; a TCP connect once
/// HTTPS wants a client certificate.
fn broker_probe(cluster: &NSQCluster) -> ProbeTarget {
    match &cluster.spec.broker.tls {
        Some(tls) if tls.https_only() && tls.client_auth_policy.is_some() => {
            ProbeTarget::Tcp(BROKER_TCP)
        }
        Some(tls) if tls.https_only() => ProbeTarget::Https(BROKER_HTTPS),
        _ => ProbeTarget::Http(BROKER_HTTP),
    }
}

/// A read-only Secret volume with only `keys`: a Secret missing one fails the mount by name.
fn secret_volume(name: &str, secret_name: &str, keys: &[&str]) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.to_owned()),
            items: Some(
                keys.iter()
                    .map(|k| KeyToPath {
                        key: (*k).to_owned(),
                        path: (*k).to_owned(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            default_mode: Some(SECRET_MODE),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn secret_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn setting_args(cluster: &NSQCluster, component: Component) -> impl Iterator<Item = String> {
    settings(cluster, component)
        .into_iter()
        .map(|s| format!("--{}=$({})", s.flag, s.key))
}

fn setting_env(cluster: &NSQCluster, component: Component) -> impl Iterator<Item = EnvVar> {
    let config_map = config_map_name(cluster);
    settings(cluster, component)
        .into_iter()
        .map(move |s| EnvVar {
            name: s.key.to_owned(),
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: config_map.clone(),
                    key: s.key.to_owned(),
                    ..ConfigMapKeySelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        })
}

fn statefulset(
    cluster: &NSQCluster,
    config_map: &ConfigMap,
    s: Stateful<'_>,
) -> Result<StatefulSet, Violation> {
    let mut w = s.workload;
    let component = w.component;
    // Each pod announces its stable DNS name, never its IP.
    let mut args = vec![format!(
        "--broadcast-address=$(POD_NAME).{}.{}.svc",
        component.headless_name(cluster),
        namespace(cluster)
    )];
    args.append(&mut w.args);
    args.extend(setting_args(cluster, component));
    w.args = args;
    let mut env = vec![field_env("POD_NAME", "metadata.name")];
    env.append(&mut w.env);
    env.extend(setting_env(cluster, component));
    w.env = env;
    w.checksum = Some(config_checksum(config_map, component));
    Ok(StatefulSet {
        metadata: child_meta(cluster, component.name(cluster), labels(cluster, component)),
        spec: Some(StatefulSetSpec {
            replicas: Some(s.replicas),
            service_name: Some(component.headless_name(cluster)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(cluster, component)),
                ..LabelSelector::default()
            },
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                ..StatefulSetUpdateStrategy::default()
            }),
            template: pod_template(cluster, w)?,
            volume_claim_templates: non_empty(s.volume_claim_templates),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::children::{CHECKSUM_ANNOTATION, config_map};
    use crate::crd::{BrokerTlsSpec, ClusterTlsSpec, NSQClusterSpec, TlsRequired, TlsVersion};
    use k8s_openapi::api::core::v1::{Affinity, Container, PodSpec, Probe};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn build_broker(spec: NSQClusterSpec) -> StatefulSet {
        let c = cluster(spec);
        broker_statefulset(&c, "knsq/knsq-broker:1.0.0", &config_map(&c)).expect("valid")
    }

    fn pod(sts: &StatefulSet) -> PodSpec {
        sts.spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("pod spec")
    }

    fn container(sts: &StatefulSet) -> Container {
        pod(sts).containers[0].clone()
    }

    fn checksum(sts: &StatefulSet) -> String {
        let template = &sts.spec.as_ref().expect("spec").template;
        template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .expect("annotations")[CHECKSUM_ANNOTATION]
            .clone()
    }

    #[test]
    fn broker_args_give_identity_lookupds_and_settings() {
        let sts = build_broker(NSQClusterSpec::default());
        let args = container(&sts).args.expect("args");
        assert_eq!(
            args,
            [
                "--broadcast-address=$(POD_NAME).events-broker-headless.prod.svc",
                "--tcp-address=0.0.0.0:4150",
                "--http-address=0.0.0.0:4151",
                "--handoff-address=0.0.0.0:4153",
                "--data-path=/data",
                "--node-id=$(POD_NAME)",
                "--mem-queue-size=$(BROKER_MEM_QUEUE_SIZE)",
                "--msg-timeout=$(BROKER_MSG_TIMEOUT)",
                "--max-msg-timeout=$(BROKER_MAX_MSG_TIMEOUT)",
                "--max-msg-size=$(BROKER_MAX_MSG_SIZE)",
                "--max-body-size=$(BROKER_MAX_BODY_SIZE)",
                "--max-rdy-count=$(BROKER_MAX_RDY_COUNT)",
                "--sync-every=$(BROKER_SYNC_EVERY)",
                "--sync-timeout=$(BROKER_SYNC_TIMEOUT)",
                "--shutdown-delay=$(BROKER_SHUTDOWN_DELAY)",
                "--shutdown-timeout=$(BROKER_SHUTDOWN_TIMEOUT)",
                "--drain-timeout=$(BROKER_DRAIN_TIMEOUT)",
                "--sigterm=$(BROKER_SIGTERM)",
                "--stay-up-when-drained=$(BROKER_STAY_UP_WHEN_DRAINED)",
            ]
        );
        let env = container(&sts).env.expect("env");
        // The pod name, whose ordinal the broker takes as node id: no pod-index label, which
        // only Kubernetes 1.28+ sets.
        let pod_name = env
            .iter()
            .find(|e| e.name == "POD_NAME")
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.field_ref);
        assert_eq!(
            pod_name.map(|f| f.field_path).as_deref(),
            Some("metadata.name")
        );
        assert!(!env.iter().any(|e| e.name == "POD_INDEX"), "{env:?}");
        let mem = env
            .iter()
            .find(|e| e.name == "BROKER_MEM_QUEUE_SIZE")
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.config_map_key_ref)
            .expect("configMapKeyRef");
        assert_eq!(
            (mem.name.as_str(), mem.key.as_str()),
            ("events-config", "BROKER_MEM_QUEUE_SIZE")
        );
    }

    #[test]
    fn lookupds_come_from_the_config_map_so_scaling_them_restarts_no_broker() {
        let base = build_broker(NSQClusterSpec::default());
        let env = container(&base).env.expect("env");
        let lookupds = env
            .iter()
            .find(|e| e.name == "KNSQ_LOOKUPD_GRPC_ADDRESSES")
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.config_map_key_ref)
            .expect("configMapKeyRef");
        assert_eq!(
            (lookupds.name.as_str(), lookupds.key.as_str()),
            ("events-config", "KNSQ_LOOKUPD_GRPC_ADDRESSES")
        );
        let mut spec = NSQClusterSpec::default();
        spec.lookupd.replicas = 1;
        let scaled = build_broker(spec);
        assert_eq!(
            base.spec.as_ref().map(|s| &s.template),
            scaled.spec.as_ref().map(|s| &s.template)
        );
        assert_eq!(
            base.metadata
                .annotations
                .as_ref()
                .map(|a| &a[TEMPLATE_HASH_ANNOTATION]),
            scaled
                .metadata
                .annotations
                .as_ref()
                .map(|a| &a[TEMPLATE_HASH_ANNOTATION])
        );
    }

    #[test]
    fn template_hash_follows_the_pod_template() {
        let hash = |spec: NSQClusterSpec| {
            build_broker(spec)
                .metadata
                .annotations
                .expect("annotations")[TEMPLATE_HASH_ANNOTATION]
                .clone()
        };
        let base = hash(NSQClusterSpec::default());
        assert_eq!(base.len(), 16);
        let mut scaled = NSQClusterSpec::default();
        scaled.broker.replicas = 7;
        assert_eq!(hash(scaled), base, "replicas are not the template");
        let mut image = NSQClusterSpec::default();
        image.broker.pod.image = Some("example/broker:2".to_owned());
        assert_ne!(hash(image), base);
        let mut settings = NSQClusterSpec::default();
        settings.broker.shutdown_delay = "1s".to_owned();
        assert_ne!(hash(settings), base, "through the settings checksum");
    }

    #[test]
    fn broker_data_on_a_claim_template() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.storage.size = Quantity("50Gi".to_owned());
        spec.broker.storage.storage_class_name = Some("fast".to_owned());
        let sts = build_broker(spec);
        let claims = sts
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.clone())
            .expect("claims");
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let claim = claims[0].spec.clone().expect("claim spec");
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim.resources.and_then(|r| r.requests).expect("requests")["storage"],
            Quantity("50Gi".to_owned())
        );
        assert_eq!(
            sts.metadata.annotations.as_ref().expect("annotations")["knsq.io/storage-size"],
            "50Gi"
        );
        assert_eq!(pod(&sts).volumes, None);
        let mounts = container(&sts).volume_mounts.expect("mounts");
        assert_eq!(
            (mounts[0].name.as_str(), mounts[0].mount_path.as_str()),
            ("data", "/data")
        );
    }

    #[test]
    fn ephemeral_broker_data_on_an_empty_dir() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.storage.ephemeral = true;
        let sts = build_broker(spec);
        assert_eq!(
            sts.spec
                .as_ref()
                .and_then(|s| s.volume_claim_templates.clone()),
            None
        );
        let volumes = pod(&sts).volumes.expect("volumes");
        assert_eq!(volumes[0].name, "data");
        assert_eq!(
            volumes[0]
                .empty_dir
                .as_ref()
                .and_then(|e| e.size_limit.clone()),
            Some(Quantity("10Gi".to_owned()))
        );
    }

    #[test]
    fn probes_ports_and_grace() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.termination_grace_period_seconds = 300;
        let sts = build_broker(spec);
        let c = container(&sts);
        // Readiness follows draining and stopping; liveness only whether the process serves
        // (a full disk is /ping's business, and must not restart the broker); the startup
        // probe gives a large disk queue an hour to recover.
        for (probe, path, period, failures) in [
            (c.readiness_probe.clone(), "/readyz", 5, 1),
            (c.liveness_probe.clone(), "/livez", 10, 6),
            (c.startup_probe.clone(), "/livez", 5, 720),
        ] {
            let probe = probe.expect("probe");
            let get = probe.http_get.expect("httpGet");
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::String("http".to_owned()));
            assert_eq!(
                (probe.period_seconds, probe.failure_threshold),
                (Some(period), Some(failures))
            );
        }
        let ports: Vec<_> = c
            .ports
            .expect("ports")
            .into_iter()
            .map(|p| (p.name, p.container_port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("tcp".to_owned()), 4150, Some("TCP".to_owned())),
                (Some("http".to_owned()), 4151, Some("TCP".to_owned())),
                (Some("handoff".to_owned()), 4153, Some("TCP".to_owned()))
            ]
        );
        assert_eq!(pod(&sts).termination_grace_period_seconds, Some(300));
        assert_eq!(
            sts.spec.as_ref().and_then(|s| s.service_name.as_deref()),
            Some("events-broker-headless")
        );
    }

    #[test]
    fn replicas_image_and_pod_metadata() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.replicas = 5;
        spec.broker.pod.image = Some("example/broker:2".to_owned());
        spec.broker
            .pod
            .pod_metadata
            .labels
            .insert("team".to_owned(), "payments".to_owned());
        spec.broker
            .pod
            .pod_metadata
            .annotations
            .insert("note".to_owned(), "x".to_owned());
        let sts = build_broker(spec);
        let s = sts.spec.as_ref().expect("spec");
        assert_eq!(s.replicas, Some(5));
        assert_eq!(container(&sts).image.as_deref(), Some("example/broker:2"));
        let meta = s.template.metadata.as_ref().expect("template metadata");
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["team"], "payments");
        assert_eq!(labels["app.kubernetes.io/component"], "broker");
        assert_eq!(meta.annotations.as_ref().expect("annotations")["note"], "x");
        assert_eq!(
            s.selector
                .match_labels
                .as_ref()
                .expect("selector")
                .get("team"),
            None
        );
        assert_eq!(
            container(&build_broker(NSQClusterSpec::default()))
                .image
                .as_deref(),
            Some("knsq/knsq-broker:1.0.0")
        );
    }

    #[test]
    fn settings_change_rolls_only_the_brokers() {
        let base = build_broker(NSQClusterSpec::default());
        let mut spec = NSQClusterSpec::default();
        spec.broker.settings.msg_timeout = "30s".to_owned();
        assert_ne!(checksum(&base), checksum(&build_broker(spec)));
        let mut spec = NSQClusterSpec::default();
        spec.lookupd.settings.tombstone_lifetime = "1m".to_owned();
        assert_eq!(checksum(&base), checksum(&build_broker(spec)));
    }

    #[test]
    fn default_anti_affinity_unless_user_sets_one() {
        let sts = build_broker(NSQClusterSpec::default());
        let anti = pod(&sts)
            .affinity
            .and_then(|a| a.pod_anti_affinity)
            .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
            .expect("anti-affinity");
        assert_eq!(
            anti[0].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        let mut spec = NSQClusterSpec::default();
        spec.broker.pod.scheduling.affinity = Some(Affinity::default());
        assert_eq!(pod(&build_broker(spec)).affinity, Some(Affinity::default()));
    }

    #[test]
    fn lookupd_statefulset_args() {
        let c = cluster(NSQClusterSpec::default());
        let sts =
            lookupd_statefulset(&c, "knsq/knsq-lookupd:1.0.0", &config_map(&c)).expect("valid");
        assert_eq!(sts.metadata.name.as_deref(), Some("events-lookupd"));
        let s = sts.spec.as_ref().expect("spec");
        assert_eq!(s.replicas, Some(3));
        assert_eq!(s.volume_claim_templates, None);
        assert_eq!(
            container(&sts).args.expect("args"),
            [
                "--broadcast-address=$(POD_NAME).events-lookupd-headless.prod.svc",
                "--grpc-address=0.0.0.0:4160",
                "--http-address=0.0.0.0:4161",
                "--inactive-producer-timeout=$(LOOKUPD_INACTIVE_PRODUCER_TIMEOUT)",
                "--tombstone-lifetime=$(LOOKUPD_TOMBSTONE_LIFETIME)",
            ]
        );
        let probe = container(&sts)
            .readiness_probe
            .and_then(|p| p.http_get)
            .expect("probe");
        assert_eq!(probe.port, IntOrString::String("http".to_owned()));
    }

    fn tls_spec(policy: Option<ClientAuthPolicy>, required: Option<TlsRequired>) -> NSQClusterSpec {
        let mut spec = NSQClusterSpec::default();
        spec.broker.tls = Some(BrokerTlsSpec {
            secret_name: "events-tls".to_owned(),
            required,
            client_auth_policy: policy,
            min_version: None,
        });
        spec
    }

    fn volume_keys(sts: &StatefulSet, name: &str) -> (String, Vec<String>) {
        let volume = pod(sts)
            .volumes
            .expect("volumes")
            .into_iter()
            .find(|v| v.name == name)
            .expect("volume");
        let secret = volume.secret.expect("secret volume");
        assert_eq!(secret.default_mode, Some(0o440));
        let keys = secret
            .items
            .expect("items")
            .into_iter()
            .map(|i| i.key)
            .collect();
        (secret.secret_name.expect("secret name"), keys)
    }

    fn mount(sts: &StatefulSet, name: &str) -> Option<VolumeMount> {
        container(sts)
            .volume_mounts
            .expect("mounts")
            .into_iter()
            .find(|m| m.name == name)
    }

    #[test]
    fn broker_tls_adds_flags_secret_mount_and_https_port() {
        let sts = build_broker(tls_spec(None, None));
        let args = container(&sts).args.expect("args");
        for flag in [
            "--https-address=0.0.0.0:4152",
            "--tls-cert=/etc/knsq/tls/tls.crt",
            "--tls-key=/etc/knsq/tls/tls.key",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
        assert!(!args.iter().any(|a| a.starts_with("--tls-root-ca-file")));
        assert!(!args.iter().any(|a| a.starts_with("--lookupd-tls")));
        assert_eq!(
            volume_keys(&sts, "tls"),
            (
                "events-tls".to_owned(),
                vec!["tls.crt".into(), "tls.key".into()]
            )
        );
        let m = mount(&sts, "tls").expect("tls mount");
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("/etc/knsq/tls", Some(true))
        );
        // The data volume is still the claim template's.
        assert!(mount(&sts, "data").is_some());
        let ports: Vec<_> = container(&sts)
            .ports
            .expect("ports")
            .into_iter()
            .map(|p| (p.name.expect("name"), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("tcp".to_owned(), 4150),
                ("http".to_owned(), 4151),
                ("https".to_owned(), 4152),
                ("handoff".to_owned(), 4153)
            ]
        );
    }

    #[test]
    fn settings_flags_come_from_the_config_map() {
        let mut spec = tls_spec(Some(ClientAuthPolicy::Require), Some(TlsRequired::True));
        spec.broker.tls.as_mut().expect("tls").min_version = Some(TlsVersion::Tls13);
        spec.broker.settings.snappy = Some(false);
        spec.broker.settings.max_deflate_level = Some(3);
        spec.broker.settings.max_attempts = Some(10);
        let args = container(&build_broker(spec)).args.expect("args");
        for flag in [
            "--snappy=$(BROKER_SNAPPY)",
            "--max-deflate-level=$(BROKER_MAX_DEFLATE_LEVEL)",
            "--max-attempts=$(BROKER_MAX_ATTEMPTS)",
            "--tls-required=$(BROKER_TLS_REQUIRED)",
            "--tls-client-auth-policy=$(BROKER_TLS_CLIENT_AUTH_POLICY)",
            "--tls-min-version=$(BROKER_TLS_MIN_VERSION)",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
        // Secret names are not flags.
        assert!(!args.iter().any(|a| a.contains("SECRET")), "{args:?}");
        assert!(!args.iter().any(|a| a.starts_with("--deflate")));
    }

    #[test]
    fn require_verify_mounts_and_passes_the_ca() {
        let sts = build_broker(tls_spec(Some(ClientAuthPolicy::RequireVerify), None));
        let args = container(&sts).args.expect("args");
        assert!(
            args.iter()
                .any(|a| a == "--tls-root-ca-file=/etc/knsq/tls/ca.crt")
        );
        assert_eq!(volume_keys(&sts, "tls").1, ["tls.crt", "tls.key", "ca.crt"]);
    }

    /// Readiness, liveness and, when there is one, startup.
    fn probes(sts: &StatefulSet) -> Vec<Probe> {
        let c = container(sts);
        [
            c.readiness_probe.clone(),
            c.liveness_probe.clone(),
            c.startup_probe.clone(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    #[test]
    fn broker_probes_follow_the_tls_policy() {
        let http = |spec| {
            for p in probes(&build_broker(spec)) {
                let get = p.http_get.expect("httpGet");
                assert_eq!(get.port, IntOrString::String("http".to_owned()));
                assert_eq!(get.scheme, None);
                assert_eq!(p.tcp_socket, None);
            }
        };
        http(NSQClusterSpec::default());
        http(tls_spec(None, None));
        http(tls_spec(None, Some(TlsRequired::False)));
        // tcp-https still serves plain HTTP, client certificates or not.
        http(tls_spec(None, Some(TlsRequired::TcpHttps)));
        http(tls_spec(
            Some(ClientAuthPolicy::RequireVerify),
            Some(TlsRequired::TcpHttps),
        ));

        let paths: Vec<_> = probes(&build_broker(tls_spec(None, Some(TlsRequired::True))))
            .into_iter()
            .map(|p| {
                let get = p.http_get.expect("httpGet");
                assert_eq!(get.port, IntOrString::String("https".to_owned()));
                assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
                get.path.expect("path")
            })
            .collect();
        assert_eq!(paths, ["/readyz", "/livez", "/livez"]);

        // The kubelet has no client certificate to show.
        for policy in [ClientAuthPolicy::Require, ClientAuthPolicy::RequireVerify] {
            for required in [None, Some(TlsRequired::True)] {
                for p in probes(&build_broker(tls_spec(Some(policy), required))) {
                    assert_eq!(p.http_get, None);
                    let tcp = p.tcp_socket.expect("tcpSocket");
                    assert_eq!(tcp.port, IntOrString::String("tcp".to_owned()));
                }
            }
        }
    }

    #[test]
    fn cluster_tls_on_both_sides() {
        let spec = NSQClusterSpec {
            cluster_tls: Some(ClusterTlsSpec {
                secret_name: "events-cluster-tls".to_owned(),
            }),
            ..NSQClusterSpec::default()
        };
        let c = cluster(spec.clone());
        let broker = build_broker(spec);
        let args = container(&broker).args.expect("args");
        for flag in [
            "--lookupd-tls-root-ca-file=/etc/knsq/cluster-tls/ca.crt",
            "--lookupd-tls-cert=/etc/knsq/cluster-tls/tls.crt",
            "--lookupd-tls-key=/etc/knsq/cluster-tls/tls.key",
            "--handoff-tls-cert=/etc/knsq/cluster-tls/tls.crt",
            "--handoff-tls-key=/etc/knsq/cluster-tls/tls.key",
            "--handoff-tls-client-ca-file=/etc/knsq/cluster-tls/ca.crt",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("--lookupd-tls-server-name"))
        );
        assert!(!args.iter().any(|a| a.starts_with("--tls-cert")));
        let cluster_keys = (
            "events-cluster-tls".to_owned(),
            vec![
                "tls.crt".to_owned(),
                "tls.key".to_owned(),
                "ca.crt".to_owned(),
            ],
        );
        assert_eq!(volume_keys(&broker, "cluster-tls"), cluster_keys);
        // Persistent storage: the Secret is the pod's only volume.
        assert_eq!(pod(&broker).volumes.expect("volumes").len(), 1);

        let lookupd =
            lookupd_statefulset(&c, "knsq/knsq-lookupd:1.0.0", &config_map(&c)).expect("valid");
        assert_eq!(
            container(&lookupd).args.expect("args")[3..6],
            [
                "--grpc-tls-cert=/etc/knsq/cluster-tls/tls.crt",
                "--grpc-tls-key=/etc/knsq/cluster-tls/tls.key",
                "--grpc-tls-client-ca-file=/etc/knsq/cluster-tls/ca.crt",
            ]
        );
        assert_eq!(volume_keys(&lookupd, "cluster-tls"), cluster_keys);
        let m = mount(&lookupd, "cluster-tls").expect("mount");
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("/etc/knsq/cluster-tls", Some(true))
        );
        // The lookupds' HTTP port is not affected.
        for p in probes(&lookupd) {
            assert_eq!(
                p.http_get.expect("httpGet").port,
                IntOrString::String("http".to_owned())
            );
        }
    }

    #[test]
    fn ephemeral_broker_keeps_data_next_to_the_secrets() {
        let mut spec = tls_spec(None, None);
        spec.broker.storage.ephemeral = true;
        let names: Vec<_> = pod(&build_broker(spec))
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["data", "tls"]);
    }

    #[test]
    fn tls_changes_roll_the_pods() {
        let c = |spec: NSQClusterSpec| cluster(spec);
        // The whole pod template: a change anywhere in it rolls the pods.
        let template = |sts: &StatefulSet| {
            serde_json::to_string(&sts.spec.as_ref().expect("spec").template).expect("json")
        };
        let lookupd = |spec: NSQClusterSpec| {
            let c = c(spec);
            template(&lookupd_statefulset(&c, "l", &config_map(&c)).expect("valid"))
        };
        let base = NSQClusterSpec::default();
        let with_tls = tls_spec(None, None);
        let mut renamed = with_tls.clone();
        renamed.broker.tls.as_mut().expect("tls").secret_name = "other".to_owned();
        let required = tls_spec(None, Some(TlsRequired::True));
        let verify = tls_spec(Some(ClientAuthPolicy::RequireVerify), None);
        let mut min_version = with_tls.clone();
        min_version.broker.tls.as_mut().expect("tls").min_version = Some(TlsVersion::Tls12);
        let mut deflate = base.clone();
        deflate.broker.settings.deflate = Some(false);
        let mut cluster_tls = base.clone();
        cluster_tls.cluster_tls = Some(ClusterTlsSpec {
            secret_name: "mtls".to_owned(),
        });
        let mut cluster_renamed = base.clone();
        cluster_renamed.cluster_tls = Some(ClusterTlsSpec {
            secret_name: "mtls2".to_owned(),
        });
        let broker_templates: Vec<String> = [
            &base,
            &with_tls,
            &renamed,
            &required,
            &verify,
            &min_version,
            &deflate,
            &cluster_tls,
            &cluster_renamed,
        ]
        .into_iter()
        .map(|s| template(&build_broker(s.clone())))
        .collect();
        let unique: std::collections::BTreeSet<_> = broker_templates.iter().collect();
        assert_eq!(unique.len(), broker_templates.len(), "{broker_templates:?}");
        // Settings change the checksum; a Secret's new name is in the template itself.
        let broker_sums: Vec<String> = [&base, &required, &verify, &min_version, &deflate]
            .into_iter()
            .map(|s| checksum(&build_broker(s.clone())))
            .collect();
        let unique: std::collections::BTreeSet<_> = broker_sums.iter().collect();
        assert_eq!(unique.len(), broker_sums.len(), "{broker_sums:?}");
        assert_eq!(
            checksum(&build_broker(with_tls.clone())),
            checksum(&build_broker(renamed.clone()))
        );

        // Client TLS is the brokers' alone; cluster TLS rolls the lookupds too.
        assert_eq!(lookupd(base.clone()), lookupd(required));
        assert_ne!(lookupd(base), lookupd(cluster_tls.clone()));
        assert_ne!(lookupd(cluster_tls), lookupd(cluster_renamed));
    }
}
