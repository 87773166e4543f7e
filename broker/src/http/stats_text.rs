//! `/stats` as text, laid out like nsqd's `printStats` for people and `watch`.

use crate::stats::{ClientStats, E2eStats, NodeStats};
use std::fmt::Write;

pub(super) fn render_stats(stats: &NodeStats) -> String {
    let mut w = String::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let _ = writeln!(
        w,
        "knsq-broker v{} (nsqd {} compatible)",
        env!("CARGO_PKG_VERSION"),
        stats.version
    );
    let _ = writeln!(w, "start_time {}", stats.start_time);
    let _ = writeln!(w, "uptime {}s", now - stats.start_time);
    let _ = writeln!(w, "\nHealth: {}", stats.health);
    if let Some(m) = &stats.memory {
        let _ = writeln!(w, "\nMemory:");
        for (name, value) in [
            ("heap_objects", m.heap_objects),
            ("heap_idle_bytes", m.heap_idle_bytes),
            ("heap_in_use_bytes", m.heap_in_use_bytes),
            ("heap_released_bytes", m.heap_released_bytes),
            ("gc_pause_usec_100", m.gc_pause_usec_100),
            ("gc_pause_usec_99", m.gc_pause_usec_99),
            ("gc_pause_usec_95", m.gc_pause_usec_95),
            ("next_gc_bytes", m.next_gc_bytes),
            ("gc_total_runs", m.gc_total_runs),
        ] {
            let _ = writeln!(w, "   {name:<25}\t{value}");
        }
    }
    let topics = stats.topics.as_deref().unwrap_or_default();
    if topics.is_empty() {
        let _ = writeln!(w, "\nTopics: None");
    } else {
        let _ = write!(w, "\nTopics:");
    }
    for t in topics {
        let _ = writeln!(
            w,
            "\n{}[{:<15}] depth: {:<5} be-depth: {:<5} msgs: {:<8} e2e%: {}",
            if t.paused { "*P " } else { "   " },
            t.topic_name,
            t.depth,
            t.backend_depth,
            t.message_count,
            e2e(&t.e2e_processing_latency)
        );
        for c in &t.channels {
            let _ = writeln!(
                w,
                "{}[{:<25}] depth: {:<5} be-depth: {:<5} inflt: {:<4} def: {:<4} re-q: {:<5} timeout: {:<5} msgs: {:<8} e2e%: {}",
                if c.paused { "   *P " } else { "      " },
                c.channel_name,
                c.depth,
                c.backend_depth,
                c.in_flight_count,
                c.deferred_count,
                c.requeue_count,
                c.timeout_count,
                c.message_count,
                e2e(&c.e2e_processing_latency)
            );
            for client in c.clients.as_deref().unwrap_or_default() {
                let _ = writeln!(w, "        {}", client_line(client, now));
            }
        }
    }
    let producers = stats.producers.as_deref().unwrap_or_default();
    if producers.is_empty() {
        let _ = writeln!(w, "\nProducers: None");
    } else {
        let _ = writeln!(w, "\nProducers:");
        for p in producers {
            let _ = writeln!(w, "   {}", client_line(p, now));
        }
    }
    w
}

fn e2e(stats: &E2eStats) -> String {
    let Some(percentiles) = &stats.percentiles else {
        return String::new();
    };
    percentiles
        .iter()
        .map(|p| format!("{}%: {:.3}ms", p.quantile * 100.0, p.value as f64 / 1e6))
        .collect::<Vec<_>>()
        .join(", ")
}

fn client_line(c: &ClientStats, now: i64) -> String {
    let port = c.remote_address.rsplit(':').next().unwrap_or("");
    let id = format!("{}:{} {}", c.hostname, port, c.user_agent);
    let connected = now - c.connect_ts;
    if !c.pub_counts.is_empty() {
        let total: u64 = c.pub_counts.iter().map(|p| p.count).sum();
        let topics: Vec<String> = c
            .pub_counts
            .iter()
            .map(|p| format!("{}={}", p.topic, p.count))
            .collect();
        return format!(
            "[{} {:<21}] msgs: {:<8} topics: {} connected: {}s",
            c.version,
            id,
            total,
            topics.join(","),
            connected
        );
    }
    format!(
        "[{} {:<21}] state: {} inflt: {:<4} rdy: {:<4} fin: {:<8} re-q: {:<8} msgs: {:<8} connected: {}s",
        c.version,
        id,
        c.state,
        c.in_flight_count,
        c.ready_count,
        c.finish_count,
        c.requeue_count,
        c.message_count,
        connected
    )
}
