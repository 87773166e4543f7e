//! Prometheus metrics, in place of nsqd's statsd loop.
//!
//! Queue figures are read from the topics and channels when Prometheus scrapes, so the
//! message path does no metric work at all. Names follow nsqd's statsd keys mapped to
//! Prometheus conventions (`nsq_topic_messages_total`, …).

use crate::broker::Broker;
use crate::protocol::ConnectionMetrics;
use crate::stats::E2eStats;
use prometheus::core::{Collector, Desc, MetricVec, MetricVecBuilder};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::path::PathBuf;
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

/// What the servers and queues update as they go.
#[derive(Debug, Clone)]
pub(crate) struct ServerMetrics {
    pub(crate) connections: ConnectionMetrics,
    /// 1 while disk writes succeed, 0 after one failed (nsqd's health).
    pub(crate) healthy: IntGauge,
    pub(crate) disk_write_errors: IntCounter,
    pub(crate) damage: crate::queue::DamageCounters,
}

impl Metrics {
    pub(crate) fn new() -> Result<(Metrics, ServerMetrics), prometheus::Error> {
        let registry = Registry::new();
        let server = ServerMetrics {
            connections: ConnectionMetrics {
                open: IntGauge::new("knsq_tcp_connections", "Open NSQ TCP connections")?,
                accepted: IntCounter::new(
                    "knsq_tcp_connections_total",
                    "NSQ TCP connections accepted",
                )?,
                refused: IntCounter::new(
                    "knsq_tcp_connections_refused_total",
                    "NSQ TCP connections refused past --max-connections",
                )?,
            },
            healthy: IntGauge::new(
                "knsq_healthy",
                "1 while disk writes succeed; 0 after a write failed, until one succeeds",
            )?,
            disk_write_errors: IntCounter::new(
                "knsq_disk_write_errors_total",
                "Failed writes and fsyncs of disk queues and metadata",
            )?,
            damage: crate::queue::DamageCounters {
                records: IntCounter::new(
                    "knsq_disk_damaged_records_total",
                    "Damaged disk queue records stepped over and set aside as .bad files",
                )?,
                bytes: IntCounter::new(
                    "knsq_disk_damaged_bytes_total",
                    "Bytes of damaged disk queue records stepped over and set aside",
                )?,
            },
        };
        registry.register(Box::new(server.connections.open.clone()))?;
        registry.register(Box::new(server.connections.accepted.clone()))?;
        registry.register(Box::new(server.connections.refused.clone()))?;
        registry.register(Box::new(server.healthy.clone()))?;
        registry.register(Box::new(server.disk_write_errors.clone()))?;
        registry.register(Box::new(server.damage.records.clone()))?;
        registry.register(Box::new(server.damage.bytes.clone()))?;
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
            .register(Box::new(QueueCollector::new(broker.clone())?))?;
        self.registry
            .register(Box::new(DrainCollector::new(broker)?))
    }

    /// Adds the size and free space of the filesystem holding `--data-path`.
    pub(crate) fn register_data_path(&self, path: PathBuf) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(DataPathCollector::new(path)?))
    }

    /// Adds collectors owned elsewhere (the lookupd registrations' metrics).
    pub(crate) fn register(
        &self,
        collectors: Vec<Box<dyn Collector>>,
    ) -> Result<(), prometheus::Error> {
        collectors
            .into_iter()
            .try_for_each(|c| self.registry.register(c))
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
    channel_depth: IntGaugeVec,
    channel_backend_depth: IntGaugeVec,
    channel_in_flight: IntGaugeVec,
    channel_deferred: IntGaugeVec,
    channel_messages: IntCounterVec,
    channel_requeued: IntCounterVec,
    channel_timed_out: IntCounterVec,
    channel_clients: IntGaugeVec,
    channel_paused: IntGaugeVec,
    channel_max_attempts: IntGaugeVec,
    channel_dead_lettered: IntCounterVec,
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
            channel_max_attempts: ig(
                "nsq_channel_max_attempts",
                "Deliveries of a message before it goes to the dead-letter topic (0: no limit)",
                CHANNEL,
            )?,
            channel_dead_lettered: ic(
                "nsq_channel_dead_lettered_total",
                "Messages moved to the channel's dead-letter topic (kept across restarts)",
                CHANNEL,
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
            &self.channel_depth,
            &self.channel_backend_depth,
            &self.channel_in_flight,
            &self.channel_deferred,
            &self.channel_messages,
            &self.channel_requeued,
            &self.channel_timed_out,
            &self.channel_clients,
            &self.channel_paused,
            &self.channel_max_attempts,
            &self.channel_dead_lettered,
        ]
    }

    /// Sets every family from the broker's current state; returns the e2e latency summaries,
    /// which the prometheus crate has no vector type for.
    fn fill(&self, broker: &Broker) -> Vec<MetricFamily> {
        let mut topic_e2e = Summaries::new(TOPIC_E2E, TOPIC);
        let mut channel_e2e = Summaries::new(CHANNEL_E2E, CHANNEL);
        for family in self.collectors() {
            family.clear();
        }
        for topic in broker.topics() {
            let t = topic.stats(None, false, None);
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
            topic_e2e.add(&tl, &t.e2e_processing_latency);
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
                let (max_attempts, dead_lettered) = c
                    .dead_letter
                    .as_ref()
                    .map_or((0, 0), |d| (d.max_attempts, d.dead_lettered_count));
                self.channel_max_attempts
                    .with_label_values(&cl)
                    .set(i64::from(max_attempts));
                self.channel_dead_lettered
                    .with_label_values(&cl)
                    .inc_by(dead_lettered);
                channel_e2e.add(&cl, &c.e2e_processing_latency);
            }
        }
        [topic_e2e, channel_e2e]
            .into_iter()
            .filter_map(Summaries::into_family)
            .collect()
    }
}

const TOPIC_E2E: &str = "nsq_topic_e2e_processing_latency_seconds";
const CHANNEL_E2E: &str = "nsq_channel_e2e_processing_latency_seconds";
const E2E_HELP: &str =
    "End-to-end processing latency (publish to FIN) over --e2e-processing-latency-window-time";

/// One e2e latency summary family being built for a scrape.
struct Summaries {
    name: &'static str,
    labels: &'static [&'static str],
    metrics: Vec<Metric>,
}

impl Summaries {
    fn new(name: &'static str, labels: &'static [&'static str]) -> Summaries {
        Summaries {
            name,
            labels,
            metrics: Vec::new(),
        }
    }

    fn add(&mut self, values: &[&str], e2e: &E2eStats) {
        let Some(percentiles) = &e2e.percentiles else {
            return;
        };
        let mut summary = Summary::default();
        summary.set_sample_count(e2e.count);
        summary.set_sample_sum(e2e.sum_seconds);
        summary.set_quantile(
            percentiles
                .iter()
                .map(|p| {
                    let mut q = Quantile::default();
                    q.set_quantile(p.quantile);
                    q.set_value(p.value as f64 / 1e9);
                    q
                })
                .collect(),
        );
        let labels = self
            .labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.to_string());
                pair.set_value(value.to_string());
                pair
            })
            .collect();
        let mut metric = Metric::from_label(labels);
        metric.set_summary(summary);
        self.metrics.push(metric);
    }

    fn into_family(self) -> Option<MetricFamily> {
        if self.metrics.is_empty() {
            return None;
        }
        let mut family = MetricFamily::default();
        family.set_name(self.name.to_string());
        family.set_help(E2E_HELP.to_string());
        family.set_field_type(MetricType::SUMMARY);
        family.set_metric(self.metrics);
        Some(family)
    }

    fn desc(name: &str, labels: &[&str]) -> Result<Desc, prometheus::Error> {
        Desc::new(
            name.to_string(),
            E2E_HELP.to_string(),
            labels.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        )
    }
}

impl QueueCollector {
    fn new(broker: Weak<Broker>) -> Result<QueueCollector, prometheus::Error> {
        let families = Families::new()?;
        let mut descs: Vec<Desc> = families
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        descs.push(Summaries::desc(TOPIC_E2E, TOPIC)?);
        descs.push(Summaries::desc(CHANNEL_E2E, CHANNEL)?);
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
        let summaries = families.fill(&broker);
        families
            .collectors()
            .iter()
            .flat_map(|c| c.collect())
            .chain(summaries)
            .collect()
    }
}

/// The filesystem of `--data-path`, read at each scrape: a broker whose disk fills refuses
/// publishes, so alerts need to see it coming.
struct DataPathCollector {
    path: PathBuf,
    available: IntGauge,
    size: IntGauge,
}

impl DataPathCollector {
    fn new(path: PathBuf) -> Result<DataPathCollector, prometheus::Error> {
        Ok(DataPathCollector {
            path,
            available: IntGauge::new(
                "knsq_data_path_available_bytes",
                "Bytes the broker may still write on the filesystem of --data-path",
            )?,
            size: IntGauge::new(
                "knsq_data_path_size_bytes",
                "Size in bytes of the filesystem of --data-path",
            )?,
        })
    }
}

impl Collector for DataPathCollector {
    fn desc(&self) -> Vec<&Desc> {
        [&self.available, &self.size]
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stat = match rustix::fs::statvfs(&self.path) {
            Ok(stat) => stat,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "statvfs of the data path failed");
                return Vec::new();
            }
        };
        let bytes =
            |blocks: u64| i64::try_from(blocks.saturating_mul(stat.f_frsize)).unwrap_or(i64::MAX);
        self.available.set(bytes(stat.f_bavail));
        self.size.set(bytes(stat.f_blocks));
        [&self.available, &self.size]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

/// Whether the broker drains, and what it still holds then, read at each scrape.
struct DrainCollector {
    broker: Weak<Broker>,
    draining: IntGauge,
    remaining: IntGauge,
    handed_off: IntGauge,
}

impl DrainCollector {
    fn new(broker: Weak<Broker>) -> Result<DrainCollector, prometheus::Error> {
        Ok(DrainCollector {
            broker,
            draining: IntGauge::new(
                "knsq_draining",
                "1 while the broker drains (refuses publishes, hands off what consumers leave)",
            )?,
            remaining: IntGauge::new(
                "knsq_drain_remaining_messages",
                "Messages a draining broker still holds (0 when not draining)",
            )?,
            handed_off: IntGauge::new(
                "knsq_drain_handed_off_messages",
                "Messages a draining broker handed off to peers so far",
            )?,
        })
    }

    fn gauges(&self) -> [&IntGauge; 3] {
        [&self.draining, &self.remaining, &self.handed_off]
    }
}

impl Collector for DrainCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges().into_iter().flat_map(|g| g.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(broker) = self.broker.upgrade() else {
            return Vec::new();
        };
        let status = broker.drain_status();
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.draining.set(i64::from(broker.is_draining()));
        self.remaining.set(count(status.remaining_messages));
        self.handed_off.set(count(status.handed_off_messages));
        self.gauges()
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_path_size_and_free_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (metrics, _) = Metrics::new().expect("metrics");
        metrics
            .register_data_path(dir.path().to_path_buf())
            .expect("register");
        let text = metrics.render().expect("render");
        let value = |name: &str| -> i64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        let (available, size) = (
            value("knsq_data_path_available_bytes"),
            value("knsq_data_path_size_bytes"),
        );
        assert!(size > 0 && (0..=size).contains(&available), "{text}");

        // A path that is gone yields no samples rather than a failed scrape.
        let gone = dir.path().join("gone");
        let (metrics, _) = Metrics::new().expect("metrics");
        metrics.register_data_path(gone).expect("register");
        let text = metrics.render().expect("render");
        assert!(!text.contains("knsq_data_path_"), "{text}");
    }
}
