//! Latency histogram and the report a side prints.
//!
//! The histogram is log-linear: values below 2^[`SUB_BITS`] ns are exact, larger ones fall in
//! one of 2^[`SUB_BITS`] buckets per power of two, so a reported percentile is within 1/128
//! (under 0.8 %) of the true value. Recording is an index computation and an increment, cheap
//! enough for every message at millions per second.

use std::fmt::Write as _;
use std::time::Duration;

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) << SUB_BITS;

/// Latencies in nanoseconds.
#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("max", &self.max)
            .finish()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = v >> shift; // in [SUB, 2 * SUB)
    (((shift + 1) as usize) << SUB_BITS) + (mantissa - SUB) as usize
}

/// The smallest and largest value that fall in bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < SUB as usize {
        return (i as u64, i as u64);
    }
    let shift = (i >> SUB_BITS) as u32 - 1;
    let mantissa = (i as u64 & (SUB - 1)) + SUB;
    let low = mantissa << shift;
    (low, low + ((1u64 << shift) - 1))
}

impl Histogram {
    pub(crate) fn record(&mut self, nanos: u64) {
        self.counts[bucket_of(nanos)] += 1;
        self.total += 1;
        self.max = self.max.max(nanos);
    }

    pub(crate) fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    pub(crate) fn max(&self) -> u64 {
        self.max
    }

    /// The value at percentile `p` (0–100): the smallest recorded value with at least `p` % of
    /// all values at or below it (nearest rank), reported as its bucket's midpoint and never
    /// above the maximum. 0 when empty.
    pub(crate) fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        // The epsilon keeps float error (0.9 * 100 = 90.000…01) from bumping the rank.
        let rank = ((p / 100.0) * self.total as f64 - 1e-9).ceil().max(1.0) as u64;
        let rank = rank.min(self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, high) = bucket_range(i);
                return (low + (high - low) / 2).min(self.max);
            }
        }
        self.max
    }
}

/// The percentiles every report shows.
pub(crate) const PERCENTILES: [(&str, f64); 4] =
    [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)];

/// What one side (writer or reader) measured.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) side: &'static str,
    pub(crate) msgs: u64,
    pub(crate) elapsed: Duration,
    pub(crate) size: u32,
    pub(crate) batch_size: u32,
    pub(crate) connections: u32,
    /// What `latency` measures, for the reader of the output.
    pub(crate) latency_kind: &'static str,
    pub(crate) latency: Histogram,
    /// Why the side ended early, if it did.
    pub(crate) error: Option<String>,
}

impl Report {
    pub(crate) fn msgs_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.msgs as f64 / secs
        } else {
            0.0
        }
    }

    pub(crate) fn mb_per_sec(&self) -> f64 {
        self.msgs_per_sec() * f64::from(self.size) / 1e6
    }

    /// `writer: 123 msgs in 10.00s: 12.3 msgs/s, 0.0 MB/s; batch latency p50=… max=…`
    pub(crate) fn text(&self) -> String {
        let mut out = format!(
            "{}: {} msgs in {:.2}s: {:.1} msgs/s, {:.1} MB/s; {} latency",
            self.side,
            self.msgs,
            self.elapsed.as_secs_f64(),
            self.msgs_per_sec(),
            self.mb_per_sec(),
            self.latency_kind,
        );
        for (name, p) in PERCENTILES {
            let _ = write!(out, " {name}={}", human(self.latency.percentile(p)));
        }
        let _ = write!(out, " max={}", human(self.latency.max()));
        if let Some(e) = &self.error {
            let _ = write!(out, "; error: {e}");
        }
        out
    }

    /// The same numbers as one JSON object; latencies in nanoseconds.
    pub(crate) fn json(&self) -> String {
        let mut out = format!(
            concat!(
                "{{\"side\":\"{}\",\"msgs\":{},\"secs\":{:.6},\"msgs_per_sec\":{:.1},",
                "\"mb_per_sec\":{:.3},\"size\":{},\"batch_size\":{},\"connections\":{},",
                "\"latency\":\"{}\",\"latency_samples\":{}"
            ),
            self.side,
            self.msgs,
            self.elapsed.as_secs_f64(),
            self.msgs_per_sec(),
            self.mb_per_sec(),
            self.size,
            self.batch_size,
            self.connections,
            self.latency_kind,
            self.latency.count(),
        );
        for (name, p) in PERCENTILES {
            let key = name.replace('.', "");
            let _ = write!(out, ",\"{key}_ns\":{}", self.latency.percentile(p));
        }
        let _ = write!(out, ",\"max_ns\":{}", self.latency.max());
        if let Some(e) = &self.error {
            out.push_str(",\"error\":");
            json_string(&mut out, e);
        }
        out.push('}');
        out
    }
}

/// Appends `text` as a JSON string literal.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A latency in the largest unit that keeps it at or above 1: `850ns`, `12.3us`, `4.56ms`.
pub(crate) fn human(nanos: u64) -> String {
    let n = nanos as f64;
    if nanos < 1_000 {
        format!("{nanos}ns")
    } else if nanos < 1_000_000 {
        format!("{:.1}us", n / 1e3)
    } else if nanos < 1_000_000_000 {
        format!("{:.2}ms", n / 1e6)
    } else {
        format!("{:.2}s", n / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut prev_high = None::<u64>;
        for i in 0..BUCKETS {
            let (low, high) = bucket_range(i);
            assert!(low <= high, "bucket {i}");
            if let Some(p) = prev_high {
                assert_eq!(low, p + 1, "gap before bucket {i}");
            }
            assert_eq!(bucket_of(low), i);
            assert_eq!(bucket_of(high), i);
            // Relative width stays under 1/128.
            assert!((high - low) as f64 <= low as f64 / SUB as f64, "bucket {i}");
            prev_high = Some(high);
        }
        assert_eq!(prev_high, Some(u64::MAX));
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::default();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.percentile(50.0), 50);
        assert_eq!(h.percentile(90.0), 90);
        assert_eq!(h.percentile(99.0), 99);
        assert_eq!(h.percentile(99.9), 100);
        assert_eq!(h.percentile(100.0), 100);
        assert_eq!(h.max(), 100);
    }

    #[test]
    fn large_values_are_within_one_percent() {
        let mut h = Histogram::default();
        // 1 ms .. 1000 ms in 1 ms steps.
        for v in 1..=1000u64 {
            h.record(v * 1_000_000);
        }
        for (p, want) in [(50.0, 500e6), (90.0, 900e6), (99.0, 990e6), (99.9, 999e6)] {
            let got = h.percentile(p) as f64;
            assert!((got - want).abs() / want < 0.01, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.max(), 1_000_000_000);
        assert_eq!(h.percentile(100.0), 1_000_000_000);
    }

    #[test]
    fn skewed_distribution_and_merge() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for _ in 0..990 {
            a.record(10);
        }
        for _ in 0..9 {
            b.record(1_000);
        }
        b.record(u64::MAX);
        a.merge(&b);
        assert_eq!(a.count(), 1000);
        assert_eq!(a.percentile(50.0), 10);
        assert_eq!(a.percentile(99.0), 10);
        let p999 = a.percentile(99.9);
        assert!((992..=1008).contains(&p999), "{p999}");
        assert_eq!(a.max(), u64::MAX);
        assert!(a.percentile(100.0) > u64::MAX / 2);
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let h = Histogram::default();
        assert_eq!(h.percentile(99.0), 0);
        assert_eq!(h.max(), 0);
    }

    #[test]
    fn report_text_and_json() {
        let mut latency = Histogram::default();
        latency.record(1_500);
        latency.record(2_000_000);
        let r = Report {
            side: "writer",
            msgs: 12_345_678,
            elapsed: Duration::from_secs(10),
            size: 200,
            batch_size: 200,
            connections: 1,
            latency_kind: "batch",
            latency,
            error: None,
        };
        let text = r.text();
        assert!(
            text.starts_with(
                "writer: 12345678 msgs in 10.00s: 1234567.8 msgs/s, 246.9 MB/s; batch latency p50=1.5us"
            ),
            "{text}"
        );
        assert!(text.ends_with("max=2.00ms"), "{text}");
        let json = r.json();
        assert!(
            json.starts_with("{\"side\":\"writer\",\"msgs\":12345678,"),
            "{json}"
        );
        assert!(json.contains("\"msgs_per_sec\":1234567.8,"), "{json}");
        assert!(json.contains("\"p999_ns\":"), "{json}");
        assert!(json.ends_with(",\"max_ns\":2000000}"), "{json}");
        assert_eq!(json.matches('{').count(), 1);
        let failed = Report {
            error: Some("broker said \"no\"\n".into()),
            ..r
        };
        assert!(failed.text().ends_with("; error: broker said \"no\"\n"));
        assert!(
            failed
                .json()
                .ends_with(r#","error":"broker said \"no\"\n"}"#),
            "{}",
            failed.json()
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human(850), "850ns");
        assert_eq!(human(12_345), "12.3us");
        assert_eq!(human(4_560_000), "4.56ms");
        assert_eq!(human(2_500_000_000), "2.50s");
    }
}
