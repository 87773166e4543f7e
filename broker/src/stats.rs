//! `/stats` shapes, field for field as nsqd 1.3 serializes them.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub(crate) struct NodeStats {
    pub(crate) version: &'static str,
    pub(crate) health: String,
    pub(crate) start_time: i64,
    /// `null` when a `topic` filter matches nothing, as in nsqd.
    pub(crate) topics: Option<Vec<TopicStats>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) memory: Option<MemoryStats>,
    pub(crate) producers: Option<Vec<ClientStats>>,
    /// knsq only, and only while draining: how the drain goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) drain: Option<DrainStatus>,
}

/// Where a drain stands (`GET /drain`, `/stats`, `/info`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DrainState {
    /// Not draining.
    #[default]
    Serving,
    /// Consumers take what is left; channels without consumers are handed off.
    Draining,
    /// The drain timeout passed: everything left goes to peers.
    HandingOff,
    /// Nothing is left.
    Drained,
    /// Messages are left that no peer can take now (`reason` says why); retried.
    Blocked,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DrainStatus {
    pub(crate) state: DrainState,
    pub(crate) remaining_messages: u64,
    /// Messages handed off to peers so far.
    pub(crate) handed_off_messages: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Serialize)]
pub(crate) struct TopicStats {
    pub(crate) topic_name: String,
    pub(crate) channels: Vec<ChannelStats>,
    pub(crate) depth: i64,
    pub(crate) backend_depth: i64,
    pub(crate) message_count: u64,
    pub(crate) message_bytes: u64,
    pub(crate) paused: bool,
    pub(crate) e2e_processing_latency: E2eStats,
    /// knsq only, and only once there was any: records and bytes of the topic's disk queue
    /// lost to damage.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) disk_damaged_records: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) disk_damaged_bytes: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChannelStats {
    pub(crate) channel_name: String,
    pub(crate) depth: i64,
    pub(crate) backend_depth: i64,
    pub(crate) in_flight_count: usize,
    pub(crate) deferred_count: usize,
    pub(crate) message_count: u64,
    pub(crate) requeue_count: u64,
    pub(crate) timeout_count: u64,
    pub(crate) client_count: usize,
    pub(crate) clients: Option<Vec<ClientStats>>,
    pub(crate) paused: bool,
    pub(crate) e2e_processing_latency: E2eStats,
    /// knsq only, and only once there was any: records and bytes of the channel's disk queue
    /// lost to damage.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) disk_damaged_records: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) disk_damaged_bytes: u64,
    /// knsq only, while a maximum of attempts is in force or once anything was dead-lettered.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub(crate) dead_letter: Option<DeadLetterStats>,
}

/// knsq only: a channel's maximum of attempts (0: none), where what reaches it goes, and how
/// many went there (kept across restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct DeadLetterStats {
    pub(crate) max_attempts: u16,
    pub(crate) dead_letter_topic: String,
    pub(crate) dead_lettered_count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClientStats {
    pub(crate) client_id: String,
    pub(crate) hostname: String,
    pub(crate) version: &'static str,
    pub(crate) remote_address: String,
    pub(crate) state: i32,
    pub(crate) ready_count: u64,
    pub(crate) in_flight_count: u64,
    pub(crate) message_count: u64,
    pub(crate) finish_count: u64,
    pub(crate) requeue_count: u64,
    pub(crate) connect_ts: i64,
    pub(crate) sample_rate: i32,
    pub(crate) deflate: bool,
    pub(crate) snappy: bool,
    pub(crate) user_agent: String,
    /// Whether the client's AUTH was granted authorizations; omitted when false, as nsqd's
    /// `omitempty` does, like the two identity fields.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) authed: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) auth_identity: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) auth_identity_url: String,
    pub(crate) topology_zone: String,
    pub(crate) topology_region: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) pub_counts: Vec<PubCount>,
    pub(crate) tls: bool,
    pub(crate) tls_cipher_suite: String,
    pub(crate) tls_version: String,
    pub(crate) tls_negotiated_protocol: String,
    pub(crate) tls_negotiated_protocol_is_mutual: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct PubCount {
    pub(crate) topic: String,
    pub(crate) count: u64,
}

/// nsqd's `quantile.Result`: `{"count":0,"percentiles":null}` when e2e tracking is off.
#[derive(Debug, Serialize)]
pub(crate) struct E2eStats {
    pub(crate) count: u64,
    pub(crate) percentiles: Option<Vec<Percentile>>,
    /// For Prometheus; nsqd's JSON has no such field.
    #[serde(skip)]
    pub(crate) sum_seconds: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Percentile {
    pub(crate) quantile: f64,
    /// Nanoseconds.
    pub(crate) value: u64,
}

/// nsqd reports Go runtime memory figures; knsq reports the process's own under the same
/// keys: resident memory as `heap_in_use_bytes`, and zero for the garbage-collector figures
/// (Rust has no collector).
#[derive(Debug, Serialize)]
pub(crate) struct MemoryStats {
    pub(crate) heap_objects: u64,
    pub(crate) heap_idle_bytes: u64,
    pub(crate) heap_in_use_bytes: u64,
    pub(crate) heap_released_bytes: u64,
    pub(crate) gc_pause_usec_100: u64,
    pub(crate) gc_pause_usec_99: u64,
    pub(crate) gc_pause_usec_95: u64,
    pub(crate) next_gc_bytes: u64,
    pub(crate) gc_total_runs: u64,
}

impl MemoryStats {
    pub(crate) fn current() -> MemoryStats {
        MemoryStats {
            heap_objects: 0,
            heap_idle_bytes: 0,
            heap_in_use_bytes: resident_bytes(),
            heap_released_bytes: 0,
            gc_pause_usec_100: 0,
            gc_pause_usec_99: 0,
            gc_pause_usec_95: 0,
            next_gc_bytes: 0,
            gc_total_runs: 0,
        }
    }
}

/// Resident set size from `/proc/self/statm` (0 where there is no procfs).
pub(crate) fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
