//! The operator's Prometheus metrics, registered in the process's one `Registry`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::crd::NSQCluster;

#[derive(Clone, Debug)]
pub struct Metrics {
    reconciles: IntCounter,
    failures: IntCounterVec,
    duration: Histogram,
    leader: IntGauge,
    clusters: Arc<Mutex<Option<Store<NSQCluster>>>>,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconciles = IntCounter::new(
            "knsq_operator_reconciles_total",
            "NSQCluster reconciles started",
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "knsq_operator_reconcile_errors_total",
                "NSQCluster reconciles that failed, by reason",
            ),
            &["reason"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "knsq_operator_reconcile_duration_seconds",
                "Time one NSQCluster reconcile took",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let leader = IntGauge::new(
            "knsq_operator_leader",
            "Whether this replica holds the leader Lease (1) or waits for it (0)",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        let clusters = Arc::new(Mutex::new(None));
        registry.register(Box::new(ClusterConditions::new(clusters.clone())?))?;
        Ok(Self {
            reconciles,
            failures,
            duration,
            leader,
            clusters,
        })
    }

    /// Report the conditions of the clusters in `store` (the controller's own cache).
    pub fn watch_clusters(&self, store: Store<NSQCluster>) {
        *self.clusters.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

/// `knsq_operator_cluster_condition{namespace, nsqcluster, condition}`: 1 while the condition is
/// True, 0 while False, read from the controller's cache at each scrape, so a deleted cluster's
/// series go with it. Only the leader, which runs the controller, has any.
struct ClusterConditions {
    clusters: Arc<Mutex<Option<Store<NSQCluster>>>>,
    gauge: IntGaugeVec,
}

impl ClusterConditions {
    fn new(clusters: Arc<Mutex<Option<Store<NSQCluster>>>>) -> Result<Self, prometheus::Error> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "knsq_operator_cluster_condition",
                "Status conditions of each NSQCluster: 1 when True, 0 when False",
            ),
            &["namespace", "nsqcluster", "condition"],
        )?;
        Ok(Self { clusters, gauge })
    }
}

impl Collector for ClusterConditions {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let store = self
            .clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.gauge.reset();
        for cluster in store.iter().flat_map(Store::state) {
            let namespace = cluster.namespace().unwrap_or_default();
            let name = cluster.name_any();
            for condition in cluster.status.iter().flat_map(|s| &s.conditions) {
                let value = match condition.status.as_str() {
                    "True" => 1,
                    "False" => 0,
                    _ => continue,
                };
                self.gauge
                    .with_label_values(&[namespace.as_str(), name.as_str(), &condition.type_])
                    .set(value);
            }
        }
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    #[test]
    fn exposes_counters_by_reason_and_durations() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("register");
        metrics.reconciled(Duration::from_millis(30));
        metrics.reconciled(Duration::from_millis(70));
        metrics.failed("Forbidden");
        metrics.set_leader(true);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .expect("encode");
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            text.lines()
                .any(|l| l == "knsq_operator_reconciles_total 2"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "knsq_operator_reconcile_errors_total{reason=\"Forbidden\"} 1"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "knsq_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "knsq_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1"),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l == "knsq_operator_leader 1"),
            "{text}"
        );
        assert!(
            Metrics::register(&registry).is_err(),
            "a second registration must fail"
        );
    }

    #[test]
    fn cluster_conditions_come_from_the_store() {
        use crate::crd::{NSQClusterSpec, NSQClusterStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        use kube::runtime::watcher::Event;

        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("register");
        let render = || {
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&registry.gather(), &mut out)
                .expect("encode");
            String::from_utf8(out).expect("utf8")
        };
        assert!(
            !render().contains("knsq_operator_cluster_condition{"),
            "nothing before the controller runs"
        );

        let (store, mut writer) = kube::runtime::reflector::store::<NSQCluster>();
        metrics.watch_clusters(store);
        let mut cluster = NSQCluster::new("events", NSQClusterSpec::default());
        cluster.metadata.namespace = Some("prod".to_owned());
        let at = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let condition = |type_: &str, status: &str| Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: "R".to_owned(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: at.clone(),
        };
        cluster.status = Some(NSQClusterStatus {
            conditions: vec![
                condition("Ready", "False"),
                condition("Degraded", "True"),
                condition("Progressing", "Unknown"),
            ],
            ..NSQClusterStatus::default()
        });
        writer.apply_watcher_event(&Event::Apply(cluster.clone()));
        let text = render();
        for line in [
            r#"knsq_operator_cluster_condition{condition="Ready",namespace="prod",nsqcluster="events"} 0"#,
            r#"knsq_operator_cluster_condition{condition="Degraded",namespace="prod",nsqcluster="events"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(!text.contains("Progressing"), "{text}");
        writer.apply_watcher_event(&Event::Delete(cluster));
        assert!(
            !render().contains("knsq_operator_cluster_condition{"),
            "gone with the cluster"
        );
    }
}
