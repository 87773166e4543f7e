//! Group commit for `--sync-publish`: a publish is answered only after an fsync that covers it.
//!
//! A publisher writes its messages, then takes a ticket and waits. The syncer runs one pass over
//! every changed disk queue at a time; a pass started after a ticket was taken covers that
//! ticket's writes. Publishers arriving while a pass runs share the next one, so concurrent
//! publishers pay for one fsync together.

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Notify, watch};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Passes {
    /// Every ticket up to this one is covered by a finished pass.
    covered: u64,
    /// The tickets of the last failed pass: `(from, to]`.
    failed: (u64, u64),
}

#[derive(Debug)]
pub(crate) struct Commits {
    taken: AtomicU64,
    passes: watch::Sender<Passes>,
    /// Wakes the syncer.
    pub(crate) wanted: Notify,
}

impl Default for Commits {
    fn default() -> Self {
        Commits {
            taken: AtomicU64::new(0),
            passes: watch::channel(Passes::default()).0,
            wanted: Notify::new(),
        }
    }
}

impl Commits {
    /// A ticket for writes already made; the syncer is woken.
    pub(crate) fn ticket(&self) -> u64 {
        let ticket = self.taken.fetch_add(1, Ordering::AcqRel) + 1;
        self.wanted.notify_one();
        ticket
    }

    /// The newest ticket, read by the syncer just before a pass.
    pub(crate) fn newest(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
    }

    /// The syncer finished a pass started after `newest` was read.
    pub(crate) fn pass_done(&self, newest: u64, ok: bool) {
        self.passes.send_modify(|p| {
            if !ok {
                p.failed = (p.covered, newest);
            }
            p.covered = p.covered.max(newest);
        });
    }

    /// Waits until a pass covered `ticket`; false when that pass failed.
    pub(crate) async fn wait(&self, ticket: u64) -> bool {
        let mut passes = self.passes.subscribe();
        match passes.wait_for(|p| p.covered >= ticket).await {
            Ok(p) => !(p.failed.0 < ticket && ticket <= p.failed.1),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tickets_wait_for_a_covering_pass_and_see_its_outcome() {
        let commits = std::sync::Arc::new(Commits::default());
        let first = commits.ticket();
        let second = commits.ticket();
        let waiter = tokio::spawn({
            let commits = commits.clone();
            async move { commits.wait(second).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let newest = commits.newest();
        commits.pass_done(newest, true);
        assert!(waiter.await.unwrap());
        assert!(commits.wait(first).await);

        let third = commits.ticket();
        commits.pass_done(commits.newest(), false);
        assert!(!commits.wait(third).await);
        let fourth = commits.ticket();
        commits.pass_done(commits.newest(), true);
        assert!(commits.wait(fourth).await);
    }
}
