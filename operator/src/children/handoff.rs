//! The one-off Job that empties the claim of a broker that is gone for good: `knsq-broker
//! handoff` opens the stopped broker's data directory and hands every message to the brokers
//! registered with the lookupds, exiting 0 once the directory is empty.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::config::lookupd_addresses;
use super::pod::{container_security_context, pod_basics};
use super::statefulset::{
    CLUSTER_TLS_VOLUME, DATA_PATH, DATA_VOLUME, cluster_tls_volume, lookupd_tls_args,
};
use super::{Component, child_meta, cluster_labels};
use crate::crd::NSQCluster;
use crate::pods::ordinal;

/// Label naming the claim a handoff Job empties.
pub const CLAIM_LABEL: &str = "knsq.io/claim";
/// The `app.kubernetes.io/component` of handoff Jobs and their pods: not the brokers', so no
/// broker Service, PodDisruptionBudget or StatefulSet selects them.
pub const HANDOFF_COMPONENT: &str = "handoff";
/// Attempts (pods) of one Job before it counts as failed.
const BACKOFF_LIMIT: i32 = 3;
/// A handoff that takes longer than this is stopped and counted as failed.
const DEADLINE_SECONDS: i64 = 3600;

/// Labels of a cluster's handoff Jobs and their pods.
pub fn handoff_labels(cluster: &NSQCluster) -> BTreeMap<String, String> {
    let mut labels = cluster_labels(cluster);
    labels.insert(
        "app.kubernetes.io/component".to_owned(),
        HANDOFF_COMPONENT.to_owned(),
    );
    labels
}

/// Name of the Job that empties broker `ordinal`'s claim.
pub fn handoff_job_name(cluster: &NSQCluster, ordinal: i32) -> String {
    format!("{}-{ordinal}-handoff", Component::Broker.name(cluster))
}

/// The claim of broker `ordinal`, as the StatefulSet controller names it.
pub fn broker_claim_name(cluster: &NSQCluster, ordinal: i32) -> String {
    format!(
        "{DATA_VOLUME}-{}-{ordinal}",
        Component::Broker.name(cluster)
    )
}

/// The ordinal of a broker claim of this cluster, from its name.
pub fn claim_ordinal(cluster: &NSQCluster, claim: &str) -> Option<i32> {
    // A claim is named like a pod of a set called `<volume>-<StatefulSet>`.
    ordinal(
        claim,
        &format!("{DATA_VOLUME}-{}", Component::Broker.name(cluster)),
    )
}

/// The Job handing off what broker `ordinal` left on its claim. It runs as the brokers do (image,
/// security contexts, node placement, pull secrets, service account), mounting the claim where
/// the broker did.
pub fn handoff_job(cluster: &NSQCluster, default_image: &str, ordinal: i32) -> Job {
    let broker = &cluster.spec.broker;
    let pod = &broker.pod;
    let mut args = vec!["handoff".to_owned(), format!("--data-path={DATA_PATH}")];
    args.extend(
        lookupd_addresses(cluster)
            .into_iter()
            .map(|a| format!("--lookupd-grpc-address={a}")),
    );
    let mut volume_mounts = vec![VolumeMount {
        name: DATA_VOLUME.to_owned(),
        mount_path: DATA_PATH.to_owned(),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: DATA_VOLUME.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: broker_claim_name(cluster, ordinal),
            read_only: None,
        }),
        ..Volume::default()
    }];
    if let Some(tls) = &cluster.spec.cluster_tls {
        args.extend(lookupd_tls_args());
        let (mount, volume) = cluster_tls_volume(&tls.secret_name);
        debug_assert_eq!(volume.name, CLUSTER_TLS_VOLUME);
        volume_mounts.push(mount);
        volumes.push(volume);
    }
    let container = Container {
        name: HANDOFF_COMPONENT.to_owned(),
        image: Some(
            pod.image
                .clone()
                .unwrap_or_else(|| default_image.to_owned()),
        ),
        args: Some(args),
        resources: pod.resources.clone(),
        volume_mounts: Some(volume_mounts),
        security_context: Some(container_security_context(pod)),
        ..Container::default()
    };
    let mut labels = handoff_labels(cluster);
    labels.insert(CLAIM_LABEL.to_owned(), broker_claim_name(cluster, ordinal));
    let mut pod_labels = labels.clone();
    pod_labels.remove("app.kubernetes.io/managed-by");
    Job {
        metadata: child_meta(cluster, handoff_job_name(cluster, ordinal), labels),
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            active_deadline_seconds: Some(DEADLINE_SECONDS),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    restart_policy: Some("Never".to_owned()),
                    volumes: Some(volumes),
                    // The user's affinity only: the brokers' default spreads pods apart.
                    affinity: pod.scheduling.affinity.clone(),
                    ..pod_basics(pod)
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::{ClusterTlsSpec, NSQClusterSpec};

    #[test]
    fn claim_names_and_ordinals() {
        let c = cluster(NSQClusterSpec::default());
        assert_eq!(broker_claim_name(&c, 2), "data-events-broker-2");
        assert_eq!(claim_ordinal(&c, "data-events-broker-2"), Some(2));
        assert_eq!(claim_ordinal(&c, "data-events-broker-12"), Some(12));
        for other in [
            "data-events-broker-",
            "data-events-broker-+1",
            "data-events-broker-2x",
            "data-other-broker-2",
            "logs-events-broker-2",
        ] {
            assert_eq!(claim_ordinal(&c, other), None, "{other}");
        }
    }

    #[test]
    fn job_hands_off_the_claim_to_the_lookupds_brokers() {
        let mut spec = NSQClusterSpec::default();
        spec.lookupd.replicas = 2;
        spec.broker.pod.image = Some("example/broker:2".to_owned());
        let job = handoff_job(&cluster(spec), "knsq/knsq-broker:1.0.0", 4);
        assert_eq!(
            job.metadata.name.as_deref(),
            Some("events-broker-4-handoff")
        );
        let labels = job.metadata.labels.clone().expect("labels");
        assert_eq!(labels["app.kubernetes.io/component"], "handoff");
        assert_eq!(labels[CLAIM_LABEL], "data-events-broker-4");
        assert_eq!(
            job.metadata.owner_references.expect("owner")[0].kind,
            "NSQCluster"
        );
        let spec = job.spec.expect("spec");
        let template_labels = spec
            .template
            .metadata
            .and_then(|m| m.labels)
            .expect("pod labels");
        assert_eq!(template_labels["app.kubernetes.io/component"], "handoff");
        let pod = spec.template.spec.expect("pod");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("example/broker:2"));
        assert_eq!(
            container.command, None,
            "the image's entrypoint: knsq-broker"
        );
        assert_eq!(
            container.args.clone().expect("args"),
            [
                "handoff",
                "--data-path=/data",
                "--lookupd-grpc-address=events-lookupd-0.events-lookupd-headless.prod.svc:4160",
                "--lookupd-grpc-address=events-lookupd-1.events-lookupd-headless.prod.svc:4160",
            ]
        );
        let volume = &pod.volumes.expect("volumes")[0];
        assert_eq!(
            volume
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("data-events-broker-4")
        );
        assert_eq!(
            pod.security_context.and_then(|s| s.fs_group),
            Some(65532),
            "reads the files the broker wrote"
        );
    }

    #[test]
    fn job_registers_over_cluster_tls() {
        let spec = NSQClusterSpec {
            cluster_tls: Some(ClusterTlsSpec {
                secret_name: "mtls".to_owned(),
            }),
            ..NSQClusterSpec::default()
        };
        let job = handoff_job(&cluster(spec), "b", 0);
        let pod = job.spec.and_then(|s| s.template.spec).expect("pod");
        let args = pod.containers[0].args.clone().expect("args");
        assert!(
            args.iter()
                .any(|a| a == "--lookupd-tls-cert=/etc/knsq/cluster-tls/tls.crt"),
            "{args:?}"
        );
        let names: Vec<_> = pod
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["data", "cluster-tls"]);
    }
}
