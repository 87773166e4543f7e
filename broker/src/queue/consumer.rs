//! Consumers as the queues know them: a narrow handle that the protocol layer implements for
//! its TCP clients, so the queues never depend on connections.

use crate::stats::ClientStats;
use bytes::BytesMut;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// A channel's handle on one of its consumers: where its messages go.
pub(crate) trait Consumer: Send + Sync + fmt::Debug {
    /// Appends message frames with `write` (called once), then writes out what is buffered
    /// when `flush` is set or the consumer's output buffer is full.
    fn push_messages(&self, flush: bool, write: &mut dyn FnMut(&mut BytesMut));

    /// Writes out what is buffered: the consumer can take no more for now.
    fn flush_messages(&self);

    /// Ends the consumer's connection: its channel is gone.
    fn close(&self);

    /// The counters its channel keeps up to date for `/stats`.
    fn counters(&self) -> &ConsumerCounters;

    /// What `/stats` shows of the consumer (`pub_topic`: the `/stats` topic filter).
    fn stats(&self, pub_topic: Option<&str>) -> ClientStats;
}

/// A consumer's figures as nsqd reports them per client.
#[derive(Debug, Default)]
pub(crate) struct ConsumerCounters {
    pub(crate) ready_count: AtomicU64,
    pub(crate) in_flight_count: AtomicU64,
    pub(crate) message_count: AtomicU64,
    pub(crate) finish_count: AtomicU64,
    pub(crate) requeue_count: AtomicU64,
}

/// A consumer joining a channel (SUB), with the settings its IDENTIFY chose.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    /// Unique among the broker's clients; FIN, REQ and TOUCH name their consumer by it.
    pub(crate) id: u64,
    pub(crate) consumer: Arc<dyn Consumer>,
    pub(crate) msg_timeout: Duration,
    /// Percent of messages delivered (0: all).
    pub(crate) sample_rate: u8,
}
