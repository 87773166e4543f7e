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
    /// as `flush` says, or at once when the consumer's output buffer is full.
    fn push_messages(&self, flush: Flush, write: &mut dyn FnMut(&mut BytesMut));

    /// Writes out what is buffered: the consumer can take no more for now.
    fn flush_messages(&self);

    /// Writes out messages pushed with [`Flush::WhenDone`] that are still buffered.
    fn flush_delivered(&self);

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

/// When a consumer's buffered messages are written out (unless its buffer is full first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Now: the consumer can take no more.
    Now,
    /// When the delivering task has handled all it has read ([`flush_when_done`]).
    WhenDone,
    /// When the consumer's output buffer timeout passes.
    Timer,
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

tokio::task_local! {
    /// Consumers a task delivered to without writing out yet (see [`flush_when_done`]).
    static DELIVERED: std::cell::RefCell<Vec<Arc<dyn Consumer>>>;
}

/// Runs a connection's task so that messages it delivers (publishing, or raising its own RDY)
/// leave when it has handled all the commands it has read, instead of waiting for the
/// consumer's output buffer timeout: a consumer gets a message as soon as nothing more is
/// ready for it, and a publisher whose reads hold many commands still fills the consumer's
/// buffer before it is written. The output buffer size and timeout stay upper bounds.
pub(crate) async fn flush_when_done<F: Future>(task: F) -> F::Output {
    DELIVERED
        .scope(Default::default(), async {
            let output = task.await;
            flush_delivered();
            output
        })
        .await
}

/// How messages `consumer` can still take are written out when this task delivers them:
/// when it is done (noting the consumer for [`flush_delivered`]), or, outside
/// [`flush_when_done`] (timers, HTTP), when the output buffer timeout passes.
pub(super) fn flush_for(consumer: &Arc<dyn Consumer>) -> Flush {
    let noted = DELIVERED.try_with(|d| {
        let mut d = d.borrow_mut();
        if !d.iter().any(|c| Arc::ptr_eq(c, consumer)) {
            d.push(consumer.clone());
        }
    });
    match noted {
        Ok(()) => Flush::WhenDone,
        Err(_) => Flush::Timer,
    }
}

/// Writes out what this task delivered: it has nothing more ready for now. Call it with no
/// channel lock held.
pub(crate) fn flush_delivered() {
    let consumers = DELIVERED
        .try_with(|d| std::mem::take(&mut *d.borrow_mut()))
        .unwrap_or_default();
    for consumer in consumers {
        consumer.flush_delivered();
    }
}
