//! The cluster's ConfigMap: every tunable setting of both components, one key each. Pods read
//! the keys through environment variables and pass them as nsqd/nsqlookupd flags, and carry a
//! checksum of their component's keys so a change rolls them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::{Component, LOOKUPD_GRPC, child_meta, cluster_labels};
use crate::crd::{NSQCluster, UpdateStrategy};

/// One setting: the command-line flag it feeds and the ConfigMap key (and environment variable)
/// holding its value. The TLS Secrets' names are not settings: they are in the pod template
/// (`volumes[].secret.secretName`), so renaming one rolls the pods by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Setting {
    pub(crate) flag: &'static str,
    pub(crate) key: &'static str,
    pub(crate) value: String,
}

fn setting(flag: &'static str, key: &'static str, value: impl ToString) -> Setting {
    Setting {
        flag,
        key,
        value: value.to_string(),
    }
}

/// The settings of one component, in flag order.
pub(crate) fn settings(cluster: &NSQCluster, component: Component) -> Vec<Setting> {
    match component {
        Component::Broker => {
            let broker = &cluster.spec.broker;
            let s = &broker.settings;
            let mut settings = vec![
                setting("mem-queue-size", "BROKER_MEM_QUEUE_SIZE", s.mem_queue_size),
                setting("msg-timeout", "BROKER_MSG_TIMEOUT", &s.msg_timeout),
                setting(
                    "max-msg-timeout",
                    "BROKER_MAX_MSG_TIMEOUT",
                    &s.max_msg_timeout,
                ),
                setting("max-msg-size", "BROKER_MAX_MSG_SIZE", s.max_msg_size),
                setting("max-body-size", "BROKER_MAX_BODY_SIZE", s.max_body_size),
                setting("max-rdy-count", "BROKER_MAX_RDY_COUNT", s.max_rdy_count),
                setting("sync-every", "BROKER_SYNC_EVERY", s.sync_every),
                setting("sync-timeout", "BROKER_SYNC_TIMEOUT", &s.sync_timeout),
                // How a broker stops: together with the pods' grace period (a CEL rule checks
                // the budget fits).
                setting(
                    "shutdown-delay",
                    "BROKER_SHUTDOWN_DELAY",
                    &broker.shutdown_delay,
                ),
                setting(
                    "shutdown-timeout",
                    "BROKER_SHUTDOWN_TIMEOUT",
                    &broker.shutdown_timeout,
                ),
                setting(
                    "drain-timeout",
                    "BROKER_DRAIN_TIMEOUT",
                    &broker.drain_timeout,
                ),
                setting("sigterm", "BROKER_SIGTERM", broker.update_strategy.as_str()),
                // A broker the operator drained for a scale-down stays up, idle, until the
                // StatefulSet is lowered: exiting, it would be restarted as a fresh broker
                // taking messages again. Not with SIGTERM draining, where a drained broker
                // staying up would only wait to be killed at the end of its grace period.
                setting(
                    "stay-up-when-drained",
                    "BROKER_STAY_UP_WHEN_DRAINED",
                    broker.update_strategy == UpdateStrategy::CleanShutdown,
                ),
            ];
            // Optional ones only when set: a new key would roll the pods of existing clusters.
            settings.extend(s.snappy.map(|v| setting("snappy", "BROKER_SNAPPY", v)));
            settings.extend(s.deflate.map(|v| setting("deflate", "BROKER_DEFLATE", v)));
            settings.extend(
                s.max_deflate_level
                    .map(|v| setting("max-deflate-level", "BROKER_MAX_DEFLATE_LEVEL", v)),
            );
            settings.extend(
                s.max_attempts
                    .map(|v| setting("max-attempts", "BROKER_MAX_ATTEMPTS", v)),
            );
            if !s.e2e_processing_latency_percentiles.is_empty() {
                let quantiles: Vec<String> = s
                    .e2e_processing_latency_percentiles
                    .iter()
                    .map(f64::to_string)
                    .collect();
                settings.push(setting(
                    "e2e-processing-latency-percentile",
                    "BROKER_E2E_PROCESSING_LATENCY_PERCENTILE",
                    quantiles.join(","),
                ));
            }
            if let Some(tls) = &cluster.spec.broker.tls {
                settings.extend(
                    tls.required
                        .map(|v| setting("tls-required", "BROKER_TLS_REQUIRED", v.as_str())),
                );
                settings.extend(tls.client_auth_policy.map(|v| {
                    setting(
                        "tls-client-auth-policy",
                        "BROKER_TLS_CLIENT_AUTH_POLICY",
                        v.as_str(),
                    )
                }));
                settings.extend(
                    tls.min_version
                        .map(|v| setting("tls-min-version", "BROKER_TLS_MIN_VERSION", v.as_str())),
                );
            }
            settings
        }
        Component::Admin => Vec::new(),
        Component::Lookupd => {
            let s = &cluster.spec.lookupd.settings;
            vec![
                setting(
                    "inactive-producer-timeout",
                    "LOOKUPD_INACTIVE_PRODUCER_TIMEOUT",
                    &s.inactive_producer_timeout,
                ),
                setting(
                    "tombstone-lifetime",
                    "LOOKUPD_TOMBSTONE_LIFETIME",
                    &s.tombstone_lifetime,
                ),
            ]
        }
    }
}

/// The ConfigMap key (and the brokers' environment variable, which `knsq-broker` reads as its
/// `--lookupd-grpc-address` list) holding every lookupd pod's gRPC address. Outside the
/// brokers' checksum: a broker takes the list at start, and the operator hands running brokers
/// a changed list over HTTP, so scaling the lookupds restarts no broker.
pub const LOOKUPD_ADDRESSES_KEY: &str = "KNSQ_LOOKUPD_GRPC_ADDRESSES";

/// The lookupd gRPC addresses brokers register with: each lookupd pod's stable DNS name.
pub fn lookupd_addresses(cluster: &NSQCluster) -> Vec<String> {
    (0..cluster.spec.lookupd.replicas)
        .map(|i| {
            format!(
                "{}:{}",
                Component::Lookupd.pod_host(cluster, i),
                LOOKUPD_GRPC.port
            )
        })
        .collect()
}

/// Name of the cluster's ConfigMap.
pub(crate) fn config_map_name(cluster: &NSQCluster) -> String {
    format!("{}-config", cluster.name_any())
}

/// The ConfigMap holding the settings of both components.
pub fn config_map(cluster: &NSQCluster) -> ConfigMap {
    let mut data: BTreeMap<String, String> = Component::STATEFUL
        .into_iter()
        .flat_map(|c| settings(cluster, c))
        .map(|s| (s.key.to_owned(), s.value))
        .collect();
    data.insert(
        LOOKUPD_ADDRESSES_KEY.to_owned(),
        lookupd_addresses(cluster).join(","),
    );
    ConfigMap {
        metadata: child_meta(cluster, config_map_name(cluster), cluster_labels(cluster)),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Digest of the keys one component reads from the ConfigMap (hex, 16 characters).
pub fn config_checksum(config_map: &ConfigMap, component: Component) -> String {
    let prefix = match component {
        Component::Broker => "BROKER_",
        Component::Lookupd => "LOOKUPD_",
        Component::Admin => "ADMIN_",
    };
    let empty = BTreeMap::new();
    let mut hasher = Sha256::new();
    for (key, value) in config_map
        .data
        .as_ref()
        .unwrap_or(&empty)
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
    {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::{
        BrokerTlsSpec, ClientAuthPolicy, ClusterTlsSpec, NSQClusterSpec, TlsRequired, TlsVersion,
    };

    #[test]
    fn holds_every_setting_of_both_components() {
        let cm = config_map(&cluster(NSQClusterSpec::default()));
        assert_eq!(cm.metadata.name.as_deref(), Some("events-config"));
        let data = cm.data.expect("data");
        assert_eq!(data.len(), 16);
        assert_eq!(data["BROKER_STAY_UP_WHEN_DRAINED"], "true");
        assert!(
            !data.contains_key("BROKER_MAX_ATTEMPTS"),
            "no limit unless set"
        );
        assert_eq!(data["BROKER_SHUTDOWN_DELAY"], "10s");
        assert_eq!(data["BROKER_SHUTDOWN_TIMEOUT"], "20s");
        assert_eq!(data["BROKER_DRAIN_TIMEOUT"], "30s");
        assert_eq!(data["BROKER_SIGTERM"], "clean-shutdown");
        assert_eq!(
            data[LOOKUPD_ADDRESSES_KEY],
            "events-lookupd-0.events-lookupd-headless.prod.svc:4160,events-lookupd-1.events-lookupd-headless.prod.svc:4160,events-lookupd-2.events-lookupd-headless.prod.svc:4160"
        );
        assert_eq!(data["BROKER_MEM_QUEUE_SIZE"], "10000");
        assert_eq!(data["BROKER_MSG_TIMEOUT"], "60s");
        assert_eq!(data["BROKER_MAX_MSG_SIZE"], "1048576");
        assert_eq!(data["LOOKUPD_INACTIVE_PRODUCER_TIMEOUT"], "300s");
        assert!(
            !cm.metadata
                .labels
                .expect("labels")
                .contains_key("app.kubernetes.io/component")
        );
    }

    #[test]
    fn checksum_changes_only_with_the_components_own_settings() {
        let mut spec = NSQClusterSpec::default();
        let base = config_map(&cluster(spec.clone()));
        spec.lookupd.settings.tombstone_lifetime = "90s".to_owned();
        let lookupd_changed = config_map(&cluster(spec.clone()));
        assert_eq!(
            config_checksum(&base, Component::Broker),
            config_checksum(&lookupd_changed, Component::Broker)
        );
        assert_ne!(
            config_checksum(&base, Component::Lookupd),
            config_checksum(&lookupd_changed, Component::Lookupd)
        );
        spec.broker.settings.mem_queue_size = 5;
        let broker_changed = config_map(&cluster(spec));
        assert_ne!(
            config_checksum(&base, Component::Broker),
            config_checksum(&broker_changed, Component::Broker)
        );
        assert_eq!(config_checksum(&base, Component::Broker).len(), 16);
    }

    #[test]
    fn scaling_lookupds_changes_no_checksum() {
        let base = config_map(&cluster(NSQClusterSpec::default()));
        let mut spec = NSQClusterSpec::default();
        spec.lookupd.replicas = 1;
        let scaled = config_map(&cluster(spec));
        assert_ne!(base.data, scaled.data);
        for component in Component::STATEFUL {
            assert_eq!(
                config_checksum(&base, component),
                config_checksum(&scaled, component)
            );
        }
    }

    #[test]
    fn drain_strategy_is_a_setting() {
        let mut spec = NSQClusterSpec::default();
        let base = config_map(&cluster(spec.clone()));
        spec.broker.update_strategy = crate::crd::UpdateStrategy::Drain;
        let drain = config_map(&cluster(spec));
        assert_eq!(
            drain.data.as_ref().expect("data")["BROKER_SIGTERM"],
            "drain"
        );
        assert_ne!(
            config_checksum(&base, Component::Broker),
            config_checksum(&drain, Component::Broker)
        );
    }

    #[test]
    fn optional_settings_and_tls_only_when_set() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.settings.deflate = Some(false);
        spec.broker.settings.max_attempts = Some(5);
        spec.broker.tls = Some(BrokerTlsSpec {
            secret_name: "events-tls".to_owned(),
            required: Some(TlsRequired::TcpHttps),
            client_auth_policy: Some(ClientAuthPolicy::RequireVerify),
            min_version: Some(TlsVersion::Tls13),
        });
        spec.cluster_tls = Some(ClusterTlsSpec {
            secret_name: "events-mtls".to_owned(),
        });
        let data = config_map(&cluster(spec)).data.expect("data");
        assert_eq!(data.len(), 21);
        assert_eq!(data["BROKER_DEFLATE"], "false");
        assert_eq!(data["BROKER_MAX_ATTEMPTS"], "5");
        assert!(!data.contains_key("BROKER_SNAPPY"));
        assert_eq!(data["BROKER_TLS_REQUIRED"], "tcp-https");
        assert_eq!(data["BROKER_TLS_CLIENT_AUTH_POLICY"], "require-verify");
        assert_eq!(data["BROKER_TLS_MIN_VERSION"], "tls1.3");
        // The Secrets' names are in the pod templates only.
        assert!(!data.keys().any(|k| k.ends_with("TLS_SECRET")), "{data:?}");
    }
}
