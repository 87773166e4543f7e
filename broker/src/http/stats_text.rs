//! `/stats` as text, laid out like nsqd's `printStats` for people and `watch`.

use crate::stats::{ClientStats, E2eStats, NodeStats};
use server_kit::flags::format_go_duration;
use std::fmt::Write;
use std::time::Duration;

pub(super) fn render_stats(stats: &NodeStats) -> String {
    let mut w = String::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let _ = writeln!(
        w,
        "nsqd v{} (built w/knsq-broker {})",
        stats.version,
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(w, "start_time {}", rfc3339(stats.start_time));
    let uptime = Duration::from_secs(u64::try_from(now - stats.start_time).unwrap_or(0));
    let _ = writeln!(w, "uptime {}", format_go_duration(uptime));
    let _ = writeln!(w, "\nHealth: {}", stats.health);
    if let Some(drain) = &stats.drain {
        // knsq only, while draining.
        let state = serde_json::to_value(drain.state).unwrap_or_default();
        let _ = writeln!(
            w,
            "Draining: {} - {} messages left, {} handed off{}",
            state.as_str().unwrap_or_default(),
            drain.remaining_messages,
            drain.handed_off_messages,
            drain
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
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
        damage_line(&mut w, "   ", t.disk_damaged_records, t.disk_damaged_bytes);
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
            damage_line(
                &mut w,
                "      ",
                c.disk_damaged_records,
                c.disk_damaged_bytes,
            );
            if let Some(d) = &c.dead_letter {
                let _ = writeln!(
                    w,
                    "        dead-letter: max-attempts: {} -> {} dead-lettered: {}",
                    d.max_attempts, d.dead_letter_topic, d.dead_lettered_count
                );
            }
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

/// knsq only: what a queue lost to damaged disk records, once it lost any.
fn damage_line(w: &mut String, indent: &str, records: u64, bytes: u64) {
    if records > 0 || bytes > 0 {
        let _ = writeln!(
            w,
            "{indent}  damaged on disk: {records} records, {bytes} bytes skipped"
        );
    }
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

/// Unix seconds as RFC 3339 in UTC (`2026-11-22T18:33:45Z`), as Go's `time.RFC3339` prints.
fn rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), era by era of 400 years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_372_425), "2026-11-22T18:33:45Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }
}
