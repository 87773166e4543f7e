//! How long a client has been silent: nsqd's read deadline of two heartbeats, kept without
//! timer work per read. A connection notes the time of every read; one timer per connection
//! is armed the first time a read has to wait and is moved on only when it fires early, so
//! the round trips of a busy publisher neither insert nor remove timers.

use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, Sleep, sleep_until};

#[derive(Debug)]
pub(super) struct Silence {
    /// When the client last sent anything.
    heard: Instant,
    /// Fires at or before `heard` + the limit; made when first waited on.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Silence {
    pub(super) fn new() -> Silence {
        Silence {
            heard: Instant::now(),
            timer: None,
        }
    }

    /// The client sent something now.
    pub(super) fn heard(&mut self) {
        self.heard = Instant::now();
    }

    /// Resolves once nothing was heard for `limit` (what was heard meanwhile counts only if
    /// [`heard`](Self::heard) is called, which the caller does between waits).
    pub(super) async fn longer_than(&mut self, limit: Duration) {
        loop {
            let due = self.heard + limit;
            let timer = self.timer.get_or_insert_with(|| Box::pin(sleep_until(due)));
            // Later than due only when the limit shrank (a new heartbeat interval).
            if timer.deadline() > due {
                timer.as_mut().reset(due);
            }
            timer.as_mut().await;
            if Instant::now() >= due {
                return;
            }
            // Fired at an older deadline: something was heard since.
            timer.as_mut().reset(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ends_only_after_the_limit_passes_without_a_word() {
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        let mut silence = Silence::new();
        // Heard at 6 s while waiting: the wait that began at 0 s ends at 16 s, not 10 s.
        tokio::select! {
            () = silence.longer_than(limit) => panic!("ended while the client spoke"),
            () = tokio::time::sleep(Duration::from_secs(6)) => {}
        }
        silence.heard();
        silence.longer_than(limit).await;
        assert_eq!(start.elapsed(), Duration::from_secs(16));
        // A shorter limit (new heartbeat interval) applies at once to the armed timer.
        silence.heard();
        silence.longer_than(Duration::from_secs(2)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(18));
    }
}
