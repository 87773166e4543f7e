//! Prometheus metrics, in place of nsqd's statsd loop.
//!
//! Queue figures are read from the topics and channels when Prometheus scrapes, so the
//! message path does no metric work at all. Names follow nsqd's statsd keys mapped to
//! Prometheus conventions (`nsq_topic_messages_total`, …).

use crate::broker::Broker;
use prometheus::core::{Collector, Desc, MetricVec, MetricVecBuilder};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::{Mutex, Weak};

/// One registry per process, created at start and passed down.
pub(crate) struct Metrics {
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Counters the servers update as connections come and go.
#[derive(Debug, Clone)]
pub(crate) struct ServerMetrics {
    connections: IntGauge,
    connections_total: IntCounter,
}

impl ServerMetrics {
    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
        self.connections_total.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }
}

impl Metrics {
    pub(crate) fn new() -> Result<(Metrics, ServerMetrics), prometheus::Error> {
        let registry = Registry::new();
        let server = ServerMetrics {
            connections: IntGauge::new("knsq_tcp_connections", "Open NSQ TCP connections")?,
            connections_total: IntCounter::new(
                "knsq_tcp_connections_total",
                "NSQ TCP connections accepted",
            )?,
        };
        registry.register(Box::new(server.connections.clone()))?;
        registry.register(Box::new(server.connections_total.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new(
                "knsq_build_info",
                "knsq version, and the nsqd version it matches",
            ),
            &["version", "nsqd_version"],
        )?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::config::NSQ_COMPAT_VERSION])
            .set(1);
        registry.register(Box::new(build))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok((Metrics { registry }, server))
    }

    /// Adds the per-topic and per-channel figures of `broker`.
    pub(crate) fn register_queues(&self, broker: Weak<Broker>) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(QueueCollector::new(broker)?))
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

struct QueueCollector {
    broker: Weak<Broker>,
    /// Rebuilt on every scrape; the lock keeps two scrapes from mixing their values.
    families: Mutex<Families>,
    descs: Vec<Desc>,
}

struct Families {
    topic_depth: IntGaugeVec,
    topic_backend_depth: IntGaugeVec,
    topic_messages: IntCounterVec,
    topic_message_bytes: IntCounterVec,
    topic_paused: IntGaugeVec,
    topic_e2e: GaugeVec,
    channel_depth: IntGaugeVec,
    channel_backend_depth: IntGaugeVec,
    channel_in_flight: IntGaugeVec,
    channel_deferred: IntGaugeVec,
    channel_messages: IntCounterVec,
    channel_requeued: IntCounterVec,
    channel_timed_out: IntCounterVec,
    channel_clients: IntGaugeVec,
    channel_paused: IntGaugeVec,
    channel_e2e: GaugeVec,
}

/// A labelled metric family that can drop all its children between scrapes.
trait Family: Collector {
    fn clear(&self);
}

impl<T: MetricVecBuilder> Family for MetricVec<T> {
    fn clear(&self) {
        self.reset();
    }
}

const TOPIC: &[&str] = &["topic"];
const CHANNEL: &[&str] = &["topic", "channel"];

impl Families {
    fn new() -> Result<Families, prometheus::Error> {
        let ig = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let ic = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let e2e = |name: &str, labels: &[&str]| {
            GaugeVec::new(
                Opts::new(
                    name,
                    "End-to-end processing latency (publish to FIN) at a quantile, over --e2e-processing-latency-window-time",
                ),
                labels,
            )
        };
        Ok(Families {
            topic_depth: ig(
                "nsq_topic_depth",
                "Messages queued in the topic (memory and disk)",
                TOPIC,
            )?,
            topic_backend_depth: ig(
                "nsq_topic_backend_depth",
                "Messages queued in the topic on disk",
                TOPIC,
            )?,
            topic_messages: ic(
                "nsq_topic_messages_total",
                "Messages published to the topic",
                TOPIC,
            )?,
            topic_message_bytes: ic(
                "nsq_topic_message_bytes_total",
                "Bytes of message bodies published to the topic",
                TOPIC,
            )?,
            topic_paused: ig("nsq_topic_paused", "1 when the topic is paused", TOPIC)?,
            topic_e2e: e2e(
                "nsq_topic_e2e_processing_latency_seconds",
                &["topic", "quantile"],
            )?,
            channel_depth: ig(
                "nsq_channel_depth",
                "Messages queued in the channel (memory and disk)",
                CHANNEL,
            )?,
            channel_backend_depth: ig(
                "nsq_channel_backend_depth",
                "Messages queued in the channel on disk",
                CHANNEL,
            )?,
            channel_in_flight: ig(
                "nsq_channel_in_flight",
                "Messages delivered and not yet finished",
                CHANNEL,
            )?,
            channel_deferred: ig(
                "nsq_channel_deferred",
                "Messages waiting for their deferred time",
                CHANNEL,
            )?,
            channel_messages: ic(
                "nsq_channel_messages_total",
                "Messages put into the channel",
                CHANNEL,
            )?,
            channel_requeued: ic(
                "nsq_channel_requeued_total",
                "Messages requeued by consumers",
                CHANNEL,
            )?,
            channel_timed_out: ic(
                "nsq_channel_timed_out_total",
                "Messages requeued after their in-flight timeout",
                CHANNEL,
            )?,
            channel_clients: ig(
                "nsq_channel_clients",
                "Consumers connected to the channel",
                CHANNEL,
            )?,
            channel_paused: ig(
                "nsq_channel_paused",
                "1 when the channel is paused",
                CHANNEL,
            )?,
            channel_e2e: e2e(
                "nsq_channel_e2e_processing_latency_seconds",
                &["topic", "channel", "quantile"],
            )?,
        })
    }

    fn collectors(&self) -> [&dyn Family; 16] {
        [
            &self.topic_depth,
            &self.topic_backend_depth,
            &self.topic_messages,
            &self.topic_message_bytes,
            &self.topic_paused,
            &self.topic_e2e,
            &self.channel_depth,
            &self.channel_backend_depth,
            &self.channel_in_flight,
            &self.channel_deferred,
            &self.channel_messages,
            &self.channel_requeued,
            &self.channel_timed_out,
            &self.channel_clients,
            &self.channel_paused,
            &self.channel_e2e,
        ]
    }

    fn fill(&self, broker: &Broker) {
        for family in self.collectors() {
            family.clear();
        }
        for topic in broker.topics() {
            let t = topic.stats(None, false);
            let tl = [t.topic_name.as_str()];
            self.topic_depth.with_label_values(&tl).set(t.depth);
            self.topic_backend_depth
                .with_label_values(&tl)
                .set(t.backend_depth);
            self.topic_messages
                .with_label_values(&tl)
                .inc_by(t.message_count);
            self.topic_message_bytes
                .with_label_values(&tl)
                .inc_by(t.message_bytes);
            self.topic_paused
                .with_label_values(&tl)
                .set(i64::from(t.paused));
            for p in t.e2e_processing_latency.percentiles.iter().flatten() {
                let q = p.quantile.to_string();
                self.topic_e2e
                    .with_label_values(&[t.topic_name.as_str(), q.as_str()])
                    .set(p.value as f64 / 1e9);
            }
            for c in &t.channels {
                let cl = [t.topic_name.as_str(), c.channel_name.as_str()];
                self.channel_depth.with_label_values(&cl).set(c.depth);
                self.channel_backend_depth
                    .with_label_values(&cl)
                    .set(c.backend_depth);
                self.channel_in_flight
                    .with_label_values(&cl)
                    .set(c.in_flight_count as i64);
                self.channel_deferred
                    .with_label_values(&cl)
                    .set(c.deferred_count as i64);
                self.channel_messages
                    .with_label_values(&cl)
                    .inc_by(c.message_count);
                self.channel_requeued
                    .with_label_values(&cl)
                    .inc_by(c.requeue_count);
                self.channel_timed_out
                    .with_label_values(&cl)
                    .inc_by(c.timeout_count);
                self.channel_clients
                    .with_label_values(&cl)
                    .set(c.client_count as i64);
                self.channel_paused
                    .with_label_values(&cl)
                    .set(i64::from(c.paused));
                for p in c.e2e_processing_latency.percentiles.iter().flatten() {
                    let q = p.quantile.to_string();
                    self.channel_e2e
                        .with_label_values(&[cl[0], cl[1], q.as_str()])
                        .set(p.value as f64 / 1e9);
                }
            }
        }
    }
}

impl QueueCollector {
    fn new(broker: Weak<Broker>) -> Result<QueueCollector, prometheus::Error> {
        let families = Families::new()?;
        let descs = families
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Ok(QueueCollector {
            broker,
            families: Mutex::new(families),
            descs,
        })
    }
}

impl Collector for QueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(broker) = self.broker.upgrade() else {
            return Vec::new();
        };
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        families.fill(&broker);
        families
            .collectors()
            .iter()
            .flat_map(|c| c.collect())
            .collect()
    }
}
