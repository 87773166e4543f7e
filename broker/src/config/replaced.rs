//! nsqd's flags for what knsq does another way: pushing statsd metrics (knsq serves
//! Prometheus metrics on `/metrics`) and tuning the 100 ms queue scan (knsq times in-flight
//! and deferred messages with a timer per channel). They are accepted, values checked as
//! nsqd checks them, so an nsqd command line or config file starts knsq unchanged, and one
//! startup warning names those given and what replaces them.

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use server_kit::flags::{DURATION, parse_go_bool, parse_go_duration};
use std::time::Duration;

#[derive(Debug, Clone, Args)]
#[command(
    next_help_heading = "nsqd flags knsq accepts and does not use (see the warning at start)"
)]
pub struct ReplacedOptions {
    /// nsqd: UDP <addr>:<port> of a statsd daemon; knsq serves /metrics instead
    #[arg(long, env = "KNSQ_STATSD_ADDRESS")]
    pub statsd_address: Option<String>,

    /// nsqd: prefix of statsd keys; knsq serves /metrics instead
    #[arg(long, env = "KNSQ_STATSD_PREFIX")]
    pub statsd_prefix: Option<String>,

    /// nsqd: time between pushes to statsd; knsq serves /metrics instead
    #[arg(long, env = "KNSQ_STATSD_INTERVAL", value_name = DURATION, value_parser = parse_go_duration)]
    pub statsd_interval: Option<Duration>,

    /// nsqd: send memory and GC stats to statsd; knsq serves process_* on /metrics instead
    #[arg(long, env = "KNSQ_STATSD_MEM_STATS", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub statsd_mem_stats: Option<bool>,

    /// nsqd: size of statsd UDP packets; knsq serves /metrics instead
    #[arg(long, env = "KNSQ_STATSD_UDP_PACKET_SIZE")]
    pub statsd_udp_packet_size: Option<u32>,

    /// nsqd: leave ephemeral topics and channels out of statsd; knsq serves /metrics instead
    #[arg(long, env = "KNSQ_STATSD_EXCLUDE_EPHEMERAL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub statsd_exclude_ephemeral: Option<bool>,

    /// nsqd: workers scanning channels for timed-out messages; knsq has a timer per channel
    #[arg(long, env = "KNSQ_QUEUE_SCAN_WORKER_POOL_MAX")]
    pub queue_scan_worker_pool_max: Option<u32>,

    /// nsqd: channels scanned per 100 ms; knsq has a timer per channel
    #[arg(long, env = "KNSQ_QUEUE_SCAN_SELECTION_COUNT")]
    pub queue_scan_selection_count: Option<u32>,

    /// nsqd's internal scan period (no nsqd flag; some deployments pass it); knsq has a timer
    /// per channel
    #[arg(long, env = "KNSQ_QUEUE_SCAN_INTERVAL", value_name = DURATION, value_parser = parse_go_duration)]
    pub queue_scan_interval: Option<Duration>,

    /// nsqd's internal scan refresh period (no nsqd flag); knsq has a timer per channel
    #[arg(long, env = "KNSQ_QUEUE_SCAN_REFRESH_INTERVAL", value_name = DURATION, value_parser = parse_go_duration)]
    pub queue_scan_refresh_interval: Option<Duration>,

    /// nsqd's internal rescan threshold (no nsqd flag); knsq has a timer per channel
    #[arg(long, env = "KNSQ_QUEUE_SCAN_DIRTY_PERCENT")]
    pub queue_scan_dirty_percent: Option<f64>,
}

/// The flags above by family, with what replaces the family in knsq.
const FAMILIES: &[(&str, &str)] = &[
    (
        "statsd_",
        "knsq does not push to statsd: it serves Prometheus metrics on /metrics (the HTTP port)",
    ),
    (
        "queue_scan_",
        "knsq does not scan queues: a timer per channel wakes at the next in-flight timeout or \
         deferred message, to the millisecond",
    ),
];

impl ReplacedOptions {
    /// The one warning about the flags of this group that were given (on the command line,
    /// in the environment or in the config file), or `None`.
    pub(super) fn warning(matches: &ArgMatches) -> Option<String> {
        let parts: Vec<String> = FAMILIES
            .iter()
            .filter_map(|(prefix, instead)| {
                let given: Vec<String> = matches
                    .ids()
                    .map(|id| id.as_str())
                    .filter(|id| id.starts_with(prefix))
                    .filter(|id| {
                        matches
                            .value_source(id)
                            .is_some_and(|s| s != ValueSource::DefaultValue)
                    })
                    .map(|id| format!("--{}", id.replace('_', "-")))
                    .collect();
                (!given.is_empty()).then(|| format!("{} ({instead})", given.join(", ")))
            })
            .collect();
        (!parts.is_empty()).then(|| format!("ignoring nsqd flags: {}", parts.join("; ")))
    }
}
