//! The operator's Prometheus metrics, registered in the process's one `Registry`.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone, Debug)]
pub struct Metrics {
    reconciles: IntCounter,
    failures: IntCounterVec,
    duration: Histogram,
    leader: IntGauge,
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
        Ok(Self {
            reconciles,
            failures,
            duration,
            leader,
        })
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
}
