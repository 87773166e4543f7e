//! Topics, channels and the queues inside them.
//!
//! A [`Topic`] fans every published message out to all its channels; the body is one
//! `Bytes` shared by every copy. A [`Channel`] hands its messages to its consumers by their
//! RDY counts and tracks what is in flight, deferred and queued. Each topic and channel keeps
//! up to `--mem-queue-size` messages in memory and the rest in its disk queue; whenever the
//! disk queue holds anything, new messages go behind it, so a queue stays first in, first out.
//! Ephemeral topics and channels have no disk queue and drop what does not fit, as in nsqd.
//! Consumers are known only through the [`Consumer`] handle defined here, and the broker's
//! other topics (where dead letters go) through the [`DeadLetterTopics`] handle.

mod channel;
mod commits;
mod consumer;
pub(crate) mod dead_letter;
mod deferred;
pub(crate) mod e2e;
mod envelope;
mod guid;
mod in_flight;
mod memory;
mod message;
mod topic;

use message::Msg;

pub(crate) use channel::{Channel, SubscribeError};
pub(crate) use commits::Commits;
pub(crate) use consumer::{
    Consumer, ConsumerCounters, Flush, Subscriber, flush_delivered, flush_when_done,
};
pub(crate) use dead_letter::{DeadLetterConfig, DeadLetterSink, DeadLetterTopics};
pub(crate) use envelope::{ENVELOPE_MAX, Origin};
pub(crate) use topic::{PublishError, Topic};

use crate::health::Health;
use crate::storage::{DiskQueue, DiskQueueOptions, DiskRecord, StorageError, Ticket};
use bytes::Bytes;
use prometheus::IntCounter;
use proto::wire::MessageId;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Records and bytes lost to damaged disk records, over every queue.
#[derive(Debug, Clone)]
pub(crate) struct DamageCounters {
    pub(crate) records: IntCounter,
    pub(crate) bytes: IntCounter,
}

/// A message on its way to or from another broker (handoff): what the wire carries of it,
/// and on the sending side the disk record it still is until the peer stored it.
#[derive(Debug, Clone)]
pub(crate) struct Handed {
    msg: Msg,
    /// When a deferred message is due, ms since the Unix epoch; 0 when it is not deferred.
    pub(crate) due_unix_ms: i64,
}

impl Handed {
    /// A message received from a peer.
    pub(crate) fn new(
        id: MessageId,
        timestamp: i64,
        attempts: u16,
        due_unix_ms: i64,
        body: Bytes,
        dead_letter: bool,
    ) -> Handed {
        let mut msg = Msg::new(id, timestamp, body);
        msg.attempts = attempts;
        msg.dead_letter = dead_letter;
        Handed { msg, due_unix_ms }
    }

    pub(crate) fn id(&self) -> &MessageId {
        &self.msg.id
    }

    pub(crate) fn timestamp(&self) -> i64 {
        self.msg.timestamp
    }

    pub(crate) fn attempts(&self) -> u16 {
        self.msg.attempts
    }

    /// The body as stored: a dead letter's starts with its envelope.
    pub(crate) fn body(&self) -> &Bytes {
        &self.msg.body
    }

    pub(crate) fn dead_letter(&self) -> bool {
        self.msg.dead_letter
    }
}

/// What every topic and channel reads and reports to.
#[derive(Debug)]
pub(crate) struct QueueSettings {
    pub(crate) node_id: u16,
    pub(crate) mem_queue_size: usize,
    pub(crate) max_msg_timeout: Duration,
    pub(crate) max_channel_consumers: usize,
    /// `--max-attempts`: channels without their own maximum follow it (0: none).
    pub(crate) max_attempts: u16,
    /// Quantiles to report for e2e latency; none disables its tracking.
    pub(crate) e2e_quantiles: Vec<f64>,
    pub(crate) e2e_window: Duration,
    pub(crate) data_path: PathBuf,
    pub(crate) disk: DiskQueueOptions,
    pub(crate) health: Health,
    /// Damaged disk records stepped over.
    pub(crate) damage: DamageCounters,
    /// `--sync-publish`: every message goes through disk, and publishes wait for an fsync.
    pub(crate) sync_publish: bool,
    /// The broker drains: publishes are refused.
    draining: AtomicBool,
    /// Publishers waiting for fsyncs; also wakes the syncer at `--sync-every` operations.
    pub(crate) commits: Commits,
    /// Where channels send what reached their maximum of attempts.
    pub(crate) dead_letters: dead_letter::DeadLetters,
}

impl QueueSettings {
    pub(crate) fn new(
        o: &crate::config::Options,
        disk: DiskQueueOptions,
        health: Health,
        damage: DamageCounters,
    ) -> Self {
        QueueSettings {
            node_id: o.node_id,
            mem_queue_size: usize::try_from(o.mem_queue_size).unwrap_or(usize::MAX),
            max_msg_timeout: o.max_msg_timeout,
            max_channel_consumers: usize::try_from(o.max_channel_consumers).unwrap_or(usize::MAX),
            max_attempts: o.max_attempts,
            e2e_quantiles: o.e2e_quantiles(),
            e2e_window: o.e2e_processing_latency_window_time,
            data_path: o.data_path.clone(),
            disk,
            health,
            damage,
            sync_publish: o.sync_publish,
            draining: AtomicBool::new(false),
            commits: Commits::default(),
            dead_letters: dead_letter::DeadLetters::default(),
        }
    }

    /// The broker starts draining: from now on publishes are refused. It cannot be undone.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Opens (or creates) the disk queue `name`, logging what it repaired.
    fn open_disk(&self, name: &str) -> Result<DiskQueue, StorageError> {
        let (disk, report) = DiskQueue::open(&self.data_path, name, self.disk.clone())?;
        if disk.depth() > 0 {
            tracing::info!(queue = %name, depth = disk.depth(), ?report, "disk queue opened");
        }
        Ok(disk)
    }

    /// Appends records to a disk queue, keeping health and the fsync schedule up to date.
    fn append(&self, disk: &mut DiskQueue, records: &[DiskRecord]) -> Result<(), StorageError> {
        match disk.append(records) {
            Ok(()) => {
                self.health.write_succeeded();
                self.note_ops(disk);
                Ok(())
            }
            Err(e) => {
                self.health.write_failed(&e);
                Err(e)
            }
        }
    }

    /// Takes up to `max` records off the front of a disk queue, each with the ticket that
    /// finishes it, counting damaged records it stepped over. A read error is logged and
    /// leaves the queue as it was.
    fn pop(
        &self,
        disk: &mut DiskQueue,
        name: &str,
        max: usize,
        out: &mut Vec<(DiskRecord, Ticket)>,
    ) {
        let before = disk.damage();
        if let Err(e) = disk.pop(max, out) {
            tracing::error!(queue = %name, error = %e, "reading the disk queue failed");
        }
        let after = disk.damage();
        if after != before {
            self.damage.records.inc_by(after.records - before.records);
            self.damage.bytes.inc_by(after.bytes - before.bytes);
        }
        self.note_ops(disk);
    }

    /// Asks the syncer for a pass once the queue has done `--sync-every` operations or has a
    /// consumed segment to delete.
    fn note_ops(&self, disk: &DiskQueue) {
        if disk.sync_due() {
            self.commits.wanted.notify_one();
        }
    }

    /// A message read from disk is done with there: finished by its consumer, dropped, or
    /// stored again elsewhere. A copy stored again must be durable first in `--sync-publish`
    /// mode, where nothing acknowledged may be lost even by a machine crash.
    fn finish(&self, disk: &mut Option<DiskQueue>, msg: &mut Msg, stored_again: bool) {
        let (Some(ticket), Some(disk)) = (msg.ticket(), disk.as_mut()) else {
            return;
        };
        msg.forget_ticket();
        if stored_again && self.sync_publish {
            disk.finish_when_durable(ticket);
        } else {
            disk.finish(ticket);
        }
        self.note_ops(disk);
    }

    /// A peer stored these (it acknowledges only what it keeps): they are done with here.
    fn finish_handed(&self, disk: &mut Option<DiskQueue>, handed: Vec<Handed>) {
        for mut h in handed {
            self.finish(disk, &mut h.msg, false);
        }
    }

    /// Fsyncs the disk queue that `disk` finds behind `lock` without holding the lock while
    /// the fsyncs run; false when they failed. A full sync (or one `--sync-every` asks for)
    /// also writes a snapshot and deletes consumed segments; otherwise only what was written
    /// is made durable (enough for a publish to be acknowledged).
    fn sync<S>(
        &self,
        name: &str,
        lock: &Mutex<S>,
        disk: impl Fn(&mut S) -> Option<&mut DiskQueue>,
        full: bool,
    ) -> bool {
        let relock = || lock.lock().unwrap_or_else(|e| e.into_inner());
        let job = {
            let mut st: MutexGuard<'_, S> = relock();
            disk(&mut st).and_then(|d| {
                let full = full || d.sync_due();
                d.prepare_sync(full)
            })
        };
        let Some(mut job) = job else {
            return true;
        };
        let result = job.run();
        if let Some(d) = disk(&mut relock()) {
            d.complete_sync(job, &result);
        }
        match result {
            Ok(()) => {
                self.health.write_succeeded();
                true
            }
            Err(e) => {
                tracing::error!(queue = %name, error = %e, "disk queue sync failed");
                self.health.write_failed(&e);
                false
            }
        }
    }

    /// Messages that may stay in memory when `in_memory` are queued: none while records wait
    /// on the queue's `disk` (a queue stays first in, first out), and none in `--sync-publish`
    /// mode, where every message goes through disk. A queue without a disk (ephemeral) has
    /// `--mem-queue-size`, and drops what does not fit.
    fn memory_room(&self, in_memory: usize, disk: Option<&DiskQueue>, wanted: usize) -> usize {
        if disk.is_some_and(|d| self.sync_publish || d.has_unread()) {
            return 0;
        }
        self.mem_queue_size.saturating_sub(in_memory).min(wanted)
    }
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A due time as the disk stores it: milliseconds since the Unix epoch, rounded up, so a
/// deferred message is never delivered before it is due.
fn due_unix_ms(due: Instant, now: Instant) -> i64 {
    let due_ns = unix_nanos() + due.saturating_duration_since(now).as_nanos() as i64;
    (due_ns + 999_999).div_euclid(1_000_000)
}

/// A stored due time as an instant; `None` when it has passed.
fn due_instant(due_unix_ms: i64, now: Instant) -> Option<Instant> {
    let left_ns = due_unix_ms.saturating_mul(1_000_000) - unix_nanos();
    (left_ns > 0).then(|| now + Duration::from_nanos(left_ns as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_due_times_never_come_back_early() {
        for delay_us in [0u64, 1, 999, 1000, 1001, 1_500_000] {
            let now = Instant::now();
            let due = now + Duration::from_micros(delay_us);
            let stored = due_unix_ms(due, now);
            // Read back at once: the instant is not before the original one.
            if let Some(back) = due_instant(stored, now) {
                assert!(back >= due, "delay {delay_us} µs came back early");
            } else {
                assert!(delay_us < 1000, "delay {delay_us} µs was lost");
            }
        }
    }
}
