//! knsq's Prometheus alerts: one list, rendered for the chart (every cluster, and the operator
//! itself) into `charts/knsq/files/prometheus-rules.yaml`, and per cluster into the
//! PrometheusRule the operator creates for `spec.metrics.prometheusRule`.
//!
//! The expressions use the labels knsq's ServiceMonitors give every series: `namespace`,
//! `nsqcluster` (the NSQCluster's name), `pod`, and `job` (`broker` or `lookupd`). Each alert has
//! a runbook section in `docs/alerts.md` and a `promtool test rules` case in
//! `operator/tests/alerts/`.

use serde_json::{Value, json};

/// Placeholder in the expressions for the label matchers that pick the clusters alerted on.
const SEL: &str = "SEL";

/// Where the runbook sections live.
const RUNBOOK: &str = concat!(env!("CARGO_PKG_REPOSITORY"), "/blob/main/docs/alerts.md");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Critical,
}

/// One alerting rule.
#[derive(Clone, Copy, Debug)]
pub struct Alert {
    pub name: &'static str,
    pub group: &'static str,
    /// PromQL; `SEL` stands for the matchers of the clusters alerted on.
    pub expr: &'static str,
    pub for_: &'static str,
    pub severity: Severity,
    pub summary: &'static str,
    pub description: &'static str,
}

/// Alerts about the clusters: their queues, brokers, lookupds and status.
pub const CLUSTER_ALERTS: &[Alert] = &[
    Alert {
        name: "KnsqChannelDepthGrowing",
        group: "knsq-queues",
        expr: "nsq_channel_depth{SEL} > 1000 and delta(nsq_channel_depth{SEL}[15m]) > 0",
        for_: "15m",
        severity: Severity::Warning,
        summary: "Channel {{ $labels.topic }}/{{ $labels.channel }} on {{ $labels.pod }} keeps growing: {{ $value }} messages queued.",
        description: "Consumers of the channel have not kept up with its publishers for 15 minutes.",
    },
    Alert {
        name: "KnsqChannelLatencyHigh",
        group: "knsq-queues",
        expr: "max without (quantile) (nsq_channel_e2e_processing_latency_seconds{SEL}) > 300",
        for_: "10m",
        severity: Severity::Warning,
        summary: "Messages of {{ $labels.topic }}/{{ $labels.channel }} on {{ $labels.pod }} are finished {{ $value | humanizeDuration }} after they were published.",
        description: "The highest end-to-end latency quantile (publish to FIN) of the channel is over 5 minutes: its messages wait that long.",
    },
    Alert {
        name: "KnsqChannelWithoutConsumers",
        group: "knsq-queues",
        expr: "nsq_channel_depth{SEL} > 0 and nsq_channel_clients{SEL} == 0 and nsq_channel_paused{SEL} == 0",
        for_: "15m",
        severity: Severity::Warning,
        summary: "Channel {{ $labels.topic }}/{{ $labels.channel }} on {{ $labels.pod }} holds {{ $value }} messages and has no consumer.",
        description: "Messages pile up in a channel nobody reads; it is not paused.",
    },
    Alert {
        name: "KnsqChannelTimeoutsHigh",
        group: "knsq-queues",
        expr: "sum by (namespace, nsqcluster, topic, channel) (rate(nsq_channel_timed_out_total{SEL}[5m])) / sum by (namespace, nsqcluster, topic, channel) (rate(nsq_channel_messages_total{SEL}[5m])) > 0.05",
        for_: "15m",
        severity: Severity::Warning,
        summary: "{{ $value | humanizePercentage }} of the messages of {{ $labels.topic }}/{{ $labels.channel }} time out in flight.",
        description: "Consumers take longer than their msg_timeout on more than 5% of the messages, which are then delivered again.",
    },
    Alert {
        name: "KnsqChannelRequeuesHigh",
        group: "knsq-queues",
        expr: "sum by (namespace, nsqcluster, topic, channel) (rate(nsq_channel_requeued_total{SEL}[5m])) / sum by (namespace, nsqcluster, topic, channel) (rate(nsq_channel_messages_total{SEL}[5m])) > 0.2",
        for_: "15m",
        severity: Severity::Warning,
        summary: "Consumers of {{ $labels.topic }}/{{ $labels.channel }} requeue {{ $value | humanizePercentage }} of its messages.",
        description: "More than a fifth of the channel's messages are sent back with REQ: its consumers are failing them.",
    },
    Alert {
        name: "KnsqBrokerUnhealthy",
        group: "knsq-brokers",
        expr: "knsq_healthy{SEL} == 0",
        for_: "1m",
        severity: Severity::Critical,
        summary: "Broker {{ $labels.pod }} cannot write to its disk and refuses publishes.",
        description: "A disk queue or metadata write failed and none has succeeded since; /ping answers 500 and publishes get E_PUB_FAILED.",
    },
    Alert {
        name: "KnsqBrokerDiskWriteErrors",
        group: "knsq-brokers",
        expr: "increase(knsq_disk_write_errors_total{SEL}[5m]) > 0",
        for_: "0m",
        severity: Severity::Warning,
        summary: "Broker {{ $labels.pod }} failed {{ $value }} disk writes in 5 minutes.",
        description: "Writes or fsyncs of its disk queues failed; the publishes they belonged to were refused.",
    },
    Alert {
        name: "KnsqBrokerDiskAlmostFull",
        group: "knsq-brokers",
        expr: "knsq_data_path_available_bytes{SEL} / knsq_data_path_size_bytes{SEL} < 0.15",
        for_: "5m",
        severity: Severity::Warning,
        summary: "Broker {{ $labels.pod }} has {{ $value | humanizePercentage }} of its volume left.",
        description: "Less than 15% of the filesystem of --data-path is free; once it is full the broker refuses publishes.",
    },
    Alert {
        name: "KnsqBrokerDiskFull",
        group: "knsq-brokers",
        expr: "knsq_data_path_available_bytes{SEL} / knsq_data_path_size_bytes{SEL} < 0.05",
        for_: "1m",
        severity: Severity::Critical,
        summary: "Broker {{ $labels.pod }} has {{ $value | humanizePercentage }} of its volume left.",
        description: "Less than 5% of the filesystem of --data-path is free; publishes start failing when it is full.",
    },
    Alert {
        name: "KnsqBrokerNotRegistered",
        group: "knsq-brokers",
        expr: "knsq_lookupd_connected{SEL} == 0",
        for_: "5m",
        severity: Severity::Warning,
        summary: "Broker {{ $labels.pod }} is not registered with lookupd {{ $labels.address }}.",
        description: "Consumers asking that lookupd do not find this broker's topics.",
    },
    Alert {
        name: "KnsqPodDown",
        group: "knsq-brokers",
        expr: "up{SEL,job=~\"broker|lookupd\"} == 0",
        for_: "5m",
        severity: Severity::Critical,
        summary: "{{ $labels.job }} {{ $labels.pod }} cannot be scraped.",
        description: "Prometheus has not reached the pod's /metrics for 5 minutes: it is down, not started, or unreachable.",
    },
    Alert {
        name: "KnsqLookupdWithoutBrokers",
        group: "knsq-lookupds",
        expr: "knsq_lookupd_brokers{SEL} == 0 and on (namespace, nsqcluster) (count by (namespace, nsqcluster) (knsq_healthy{SEL}) > 0)",
        for_: "10m",
        severity: Severity::Warning,
        summary: "Lookupd {{ $labels.pod }} knows no broker while the cluster has some.",
        description: "Consumers asking this lookupd find no producer for any topic.",
    },
    Alert {
        name: "KnsqClusterNotReady",
        group: "knsq-clusters",
        expr: "knsq_operator_cluster_condition{SEL,condition=\"Ready\"} == 0",
        for_: "15m",
        severity: Severity::Warning,
        summary: "NSQCluster {{ $labels.namespace }}/{{ $labels.nsqcluster }} has not been Ready for 15 minutes.",
        description: "Some of its brokers or lookupds are not ready, or a rollout does not finish.",
    },
    Alert {
        name: "KnsqClusterDegraded",
        group: "knsq-clusters",
        expr: "knsq_operator_cluster_condition{SEL,condition=\"Degraded\"} == 1",
        for_: "15m",
        severity: Severity::Warning,
        summary: "NSQCluster {{ $labels.namespace }}/{{ $labels.nsqcluster }} is Degraded.",
        description: "Its spec was refused, the operator cannot apply it, or pods are missing; the condition's message says which.",
    },
];

/// Alerts about the operator itself, in the chart's rules only.
pub const OPERATOR_ALERTS: &[Alert] = &[
    Alert {
        name: "KnsqOperatorReconcileErrors",
        group: "knsq-operator",
        expr: "sum by (namespace, job) (rate(knsq_operator_reconcile_errors_total[5m])) > 0",
        for_: "15m",
        severity: Severity::Warning,
        summary: "knsq-operator in {{ $labels.namespace }} keeps failing to reconcile NSQClusters.",
        description: "Reconciles have failed for 15 minutes; the reason label of knsq_operator_reconcile_errors_total and the clusters' Degraded condition say why.",
    },
    Alert {
        name: "KnsqOperatorNotLeading",
        group: "knsq-operator",
        expr: "max by (namespace, job) (knsq_operator_leader) == 0",
        for_: "10m",
        severity: Severity::Warning,
        summary: "No knsq-operator replica in {{ $labels.namespace }} holds the leader Lease.",
        description: "No replica reconciles: changes to NSQClusters are not applied.",
    },
];

/// Which clusters a rendering alerts on.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every cluster knsq's ServiceMonitors scrape, and the operator: the chart's rules.
    Everything,
    /// One NSQCluster.
    Cluster { namespace: &'a str, name: &'a str },
}

impl Alert {
    fn rule(&self, matchers: &str) -> Value {
        let severity = match self.severity {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        };
        json!({
            "alert": self.name,
            "expr": self.expr.replace(SEL, matchers),
            "for": self.for_,
            "labels": {"severity": severity},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": format!("{RUNBOOK}#{}", self.name.to_lowercase()),
            },
        })
    }
}

/// Every alert of a scope.
pub fn alerts(scope: Scope<'_>) -> Vec<&'static Alert> {
    let mut all: Vec<&Alert> = CLUSTER_ALERTS.iter().collect();
    if matches!(scope, Scope::Everything) {
        all.extend(OPERATOR_ALERTS);
    }
    all
}

/// The rule groups (a Prometheus rule file's `groups`, a PrometheusRule's `spec.groups`).
pub fn groups(scope: Scope<'_>) -> Value {
    let matchers = match scope {
        Scope::Everything => "nsqcluster!=\"\"".to_owned(),
        Scope::Cluster { namespace, name } => {
            format!("namespace={namespace:?},nsqcluster={name:?}")
        }
    };
    let mut groups: Vec<(&str, Vec<Value>)> = Vec::new();
    for alert in alerts(scope) {
        let rule = alert.rule(&matchers);
        match groups.iter_mut().find(|(g, _)| *g == alert.group) {
            Some((_, rules)) => rules.push(rule),
            None => groups.push((alert.group, vec![rule])),
        }
    }
    Value::Array(
        groups
            .into_iter()
            .map(|(name, rules)| json!({"name": name, "rules": rules}))
            .collect(),
    )
}

/// The chart's rule file, as `knsq-operator prometheus-rules` prints it.
pub fn rules_yaml() -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&json!({"groups": groups(Scope::Everything)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_expression_is_scoped() {
        let all = alerts(Scope::Everything);
        let names: std::collections::BTreeSet<_> = all.iter().map(|a| a.name).collect();
        assert_eq!(names.len(), all.len());
        for alert in CLUSTER_ALERTS {
            assert!(alert.expr.contains("{SEL"), "{} is not scoped", alert.name);
        }
    }

    #[test]
    fn a_cluster_scope_selects_its_series_only() {
        let groups = groups(Scope::Cluster {
            namespace: "prod",
            name: "events",
        });
        let rules: Vec<&Value> = groups
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules"))
            .collect();
        assert_eq!(rules.len(), CLUSTER_ALERTS.len());
        assert_eq!(
            rules[0]["expr"],
            "nsq_channel_depth{namespace=\"prod\",nsqcluster=\"events\"} > 1000 and delta(nsq_channel_depth{namespace=\"prod\",nsqcluster=\"events\"}[15m]) > 0"
        );
        assert!(
            rules
                .iter()
                .all(|r| !r["expr"].as_str().unwrap_or("").contains("SEL"))
        );
        assert_eq!(
            rules[0]["annotations"]["runbook_url"],
            "https://example.invalid/knsq/blob/main/docs/alerts.md#knsqchanneldepthgrowing"
        );
    }
}
