//! Prometheus metrics of the lookupd: what is registered, open streams, and the HTTP and gRPC
//! requests served. One registry per process, created in `run` and passed down.

use crate::registry::Counts;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::time::Duration;

#[derive(Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    brokers: IntGauge,
    topics: IntGauge,
    channels: IntGauge,
    grpc_streams: IntGauge,
    grpc_requests: IntCounterVec,
    grpc_request_duration: HistogramVec,
    grpc_messages: IntCounterVec,
    http_requests: IntCounterVec,
    http_request_duration: HistogramVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Request latencies of a directory held in memory: mostly well under a millisecond.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

impl Metrics {
    pub(crate) fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let gauge = IntGauge::new(name, help)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(counter)
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let histogram = HistogramVec::new(opts, labels)?;
            registry.register(Box::new(histogram.clone()))?;
            Ok::<_, prometheus::Error>(histogram)
        };
        let metrics = Metrics {
            brokers: gauge("knsq_lookupd_brokers", "Brokers registered")?,
            topics: gauge("knsq_lookupd_topics", "Topic registrations")?,
            channels: gauge("knsq_lookupd_channels", "Channel registrations")?,
            grpc_streams: gauge(
                "knsq_lookupd_grpc_streams",
                "Open broker registration streams",
            )?,
            grpc_requests: counter(
                "knsq_lookupd_grpc_requests_total",
                "gRPC calls finished, by method and status code (streams count when they end)",
                &["method", "code"],
            )?,
            grpc_request_duration: histogram(
                "knsq_lookupd_grpc_request_duration_seconds",
                "Time to answer a unary gRPC call, or to apply one message of a registration stream",
                &["method"],
            )?,
            grpc_messages: counter(
                "knsq_lookupd_grpc_messages_total",
                "Messages received on registration streams, by kind",
                &["kind"],
            )?,
            http_requests: counter(
                "knsq_lookupd_http_requests_total",
                "HTTP requests served, by route and status",
                &["route", "status"],
            )?,
            http_request_duration: histogram(
                "knsq_lookupd_http_request_duration_seconds",
                "Time to answer an HTTP request, by route",
                &["route"],
            )?,
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new(
                "knsq_build_info",
                "knsq version, and the nsqlookupd version it matches",
            ),
            &["version", "nsqlookupd_version"],
        )?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::NSQ_COMPAT_VERSION])
            .set(1);
        metrics.registry.register(Box::new(build))?;
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    pub(crate) fn set_counts(&self, counts: Counts) {
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.brokers.set(as_i64(counts.brokers));
        self.topics.set(as_i64(counts.topics));
        self.channels.set(as_i64(counts.channels));
    }

    pub(crate) fn stream_opened(&self) {
        self.grpc_streams.inc();
    }

    pub(crate) fn stream_closed(&self, code: tonic::Code) {
        self.grpc_streams.dec();
        self.grpc_call("Register", code);
    }

    pub(crate) fn grpc_call(&self, method: &str, code: tonic::Code) {
        self.grpc_requests
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
    }

    pub(crate) fn grpc_latency(&self, method: &str, elapsed: Duration) {
        self.grpc_request_duration
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn grpc_message(&self, kind: &str) {
        self.grpc_messages.with_label_values(&[kind]).inc();
    }

    pub(crate) fn http_request(&self, route: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.http_request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
