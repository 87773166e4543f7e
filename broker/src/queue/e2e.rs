//! End-to-end processing latency (publish to FIN) quantiles over a sliding window.
//!
//! Like nsqd, two sub-windows of half the window each are kept and rotated, so a quantile
//! covers between half and all of `--e2e-processing-latency-window-time`. Each sub-window is a
//! log-linear histogram (32 steps per power of two, about 3 % relative error): recording is
//! O(1) with no allocation, and sub-windows of channels merge exactly into a topic's.

use crate::stats::{E2eStats, Percentile};
use std::time::Duration;
use tokio::time::Instant;

const SUB_BITS: u32 = 5;
const SUBS: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUBS;

#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Box<[u32]>,
    total: u64,
    /// Sum of all samples in nanoseconds, for a Prometheus summary's `_sum`.
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
        }
    }
}

impl Histogram {
    pub(crate) fn record(&mut self, value: u64) {
        let i = bucket_of(value);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.total += 1;
        self.sum += u128::from(value);
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
        self.sum += other.sum;
    }

    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    pub(crate) fn sum_seconds(&self) -> f64 {
        self.sum as f64 / 1e9
    }

    /// The value at quantile `q` in (0,1]; 0 when empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return bucket_mid(i);
            }
        }
        bucket_mid(BUCKETS - 1)
    }
}

fn bucket_of(value: u64) -> usize {
    if value < SUBS as u64 {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros();
    let sub = (value >> (exp - SUB_BITS)) as usize & (SUBS - 1);
    ((exp - SUB_BITS + 1) as usize) * SUBS + sub
}

fn bucket_mid(index: usize) -> u64 {
    if index < SUBS {
        return index as u64;
    }
    let exp = (index / SUBS) as u32 + SUB_BITS - 1;
    let sub = (index % SUBS) as u64;
    let low = (1u64 << exp) | (sub << (exp - SUB_BITS));
    low + (1u64 << (exp - SUB_BITS)) / 2
}

/// A histogram of the last window, rotated lazily on use.
#[derive(Debug)]
pub(crate) struct LatencyWindow {
    half: Duration,
    rotated_at: Instant,
    current: Histogram,
    previous: Histogram,
}

impl LatencyWindow {
    pub(crate) fn new(window: Duration, now: Instant) -> Self {
        LatencyWindow {
            half: window / 2,
            rotated_at: now,
            current: Histogram::default(),
            previous: Histogram::default(),
        }
    }

    pub(crate) fn record(&mut self, latency_ns: u64, now: Instant) {
        self.rotate(now);
        self.current.record(latency_ns);
    }

    /// Adds this window's samples to `into`.
    pub(crate) fn merge_into(&mut self, into: &mut Histogram, now: Instant) {
        self.rotate(now);
        into.merge(&self.current);
        into.merge(&self.previous);
    }

    fn rotate(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.rotated_at);
        if elapsed < self.half {
            return;
        }
        if elapsed >= self.half * 2 {
            self.previous = Histogram::default();
        } else {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current = Histogram::default();
        self.rotated_at = now;
    }
}

impl E2eStats {
    /// The `/stats` shape of `samples` for the configured quantiles (none: tracking is off).
    pub(crate) fn new(quantiles: &[f64], samples: &Histogram) -> E2eStats {
        if quantiles.is_empty() {
            return E2eStats {
                count: 0,
                percentiles: None,
                sum_seconds: 0.0,
            };
        }
        E2eStats {
            count: samples.count(),
            sum_seconds: samples.sum_seconds(),
            percentiles: Some(
                quantiles
                    .iter()
                    .map(|&q| Percentile {
                        quantile: q,
                        value: samples.quantile(q),
                    })
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..100_000u64).chain((20..63).map(|e| 1u64 << e)) {
            let b = bucket_of(v);
            assert!(b >= last);
            last = b;
            let mid = bucket_mid(b);
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 0.04, "v={v} mid={mid}");
        }
    }

    #[test]
    fn quantiles_of_a_uniform_spread() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [(0.5, 5_000_000.0), (0.99, 9_900_000.0), (1.0, 10_000_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.04, "q={q} got={got}");
        }
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn window_forgets_old_samples() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10), t0);
        w.record(100, t0);
        let mut h = Histogram::default();
        w.merge_into(&mut h, t0 + Duration::from_secs(6));
        assert_eq!(h.count(), 1, "kept for at least half a window");
        let mut h = Histogram::default();
        w.merge_into(&mut h, t0 + Duration::from_secs(12));
        assert_eq!(h.count(), 0, "gone after a whole window");
    }
}
