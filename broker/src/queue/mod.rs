//! Topics, channels and the queues inside them.
//!
//! A [`Topic`] fans every published message out to all its channels; the body is one
//! `Bytes` shared by every copy. A [`Channel`] hands its messages to its consumers by their
//! RDY counts and tracks what is in flight, deferred and queued. Memory queues are bounded by
//! `--mem-queue-size`; a publish that would overflow one is refused, never dropped.

mod channel;
mod deferred;
pub(crate) mod e2e;
mod guid;
mod in_flight;
mod message;
mod topic;

pub(crate) use channel::{Channel, SubscribeError};
pub(crate) use topic::{PublishError, Topic};

use std::time::Duration;

/// The options every topic and channel reads.
#[derive(Debug, Clone)]
pub(crate) struct QueueSettings {
    pub(crate) node_id: u16,
    pub(crate) mem_queue_size: usize,
    pub(crate) max_msg_timeout: Duration,
    pub(crate) max_channel_consumers: usize,
    /// Quantiles to report for e2e latency; none disables its tracking.
    pub(crate) e2e_quantiles: Vec<f64>,
    pub(crate) e2e_window: Duration,
}

impl QueueSettings {
    pub(crate) fn from_options(o: &crate::config::Options) -> Self {
        QueueSettings {
            node_id: o.node_id,
            mem_queue_size: usize::try_from(o.mem_queue_size).unwrap_or(usize::MAX),
            max_msg_timeout: o.max_msg_timeout,
            max_channel_consumers: usize::try_from(o.max_channel_consumers).unwrap_or(usize::MAX),
            e2e_quantiles: o.e2e_processing_latency_percentiles.clone(),
            e2e_window: o.e2e_processing_latency_window_time,
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
