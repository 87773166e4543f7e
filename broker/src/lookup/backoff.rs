//! Reconnect delays: exponential, capped, with jitter so brokers restarted together do not
//! hammer a lookupd in lock step.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The first retry waits about this long.
pub(super) const MIN_DELAY: Duration = Duration::from_millis(100);
/// Retries are never further apart than this.
pub(super) const MAX_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff { next: MIN_DELAY }
    }

    /// After a successful registration the next failure retries quickly again.
    pub(super) fn reset(&mut self) {
        self.next = MIN_DELAY;
    }

    /// The delay before the next attempt: the current step with "equal jitter" (between half
    /// of it and all of it); the step doubles up to [`MAX_DELAY`].
    pub(super) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        let half = step / 2;
        let spread = half.as_nanos() as u64 + 1;
        half + Duration::from_nanos(random() % spread)
    }
}

/// A random number from the standard library's per-process random hash keys: plenty for
/// jitter, and no extra dependency.
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new();
        let mut step = MIN_DELAY;
        for _ in 0..12 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for step {step:?}"
            );
            step = (step * 2).min(MAX_DELAY);
        }
        assert_eq!(step, MAX_DELAY);
        backoff.reset();
        assert!(backoff.next_delay() <= MIN_DELAY);
    }

    #[test]
    fn jitter_spreads_delays() {
        let delays: std::collections::HashSet<Duration> =
            (0..20).map(|_| Backoff::new().next_delay()).collect();
        assert!(delays.len() > 1, "every delay was the same: {delays:?}");
    }
}
