//! A channel: its queue, its consumers and the messages in flight and deferred.
//!
//! All state sits behind one mutex. Delivery happens under it, straight into each consumer's
//! outbox (which writes to the consumer's socket when a flush is due), a chunk of messages
//! per lock of the outbox. A timer task per channel sleeps until the next in-flight deadline or deferred due
//! time and is woken only when an earlier one appears. Messages beyond the memory queue wait in
//! the channel's disk queue and are read back as consumers have room for them. Messages that
//! reached the channel's maximum of attempts leave for its dead-letter topic (see
//! [`dead_letters`]).

mod dead_letters;

use super::consumer::{self, Consumer as ConsumerHandle, Flush, Subscriber};
use super::deferred::Deferred;
use super::e2e::{Histogram, LatencyWindow};
use super::envelope::Failure;
use super::in_flight::{InFlight, InFlightError};
use super::memory::{Batch, MemQueue};
use super::message::Msg;
use super::{Handed, QueueSettings, due_instant, due_unix_ms, unix_nanos};
use crate::stats::{ChannelStats, E2eStats};
use crate::storage::{DiskQueue, DiskRecord, StorageError, Ticket};
use dead_letters::{DeadState, Dying};
use proto::wire::MessageId;
use proto::wire::frame::write_message;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Messages handed to one consumer per lock of its outbox; small enough to interleave
/// consumers fairly, large enough to amortise the lock.
const DISPATCH_CHUNK: u64 = 64;
/// How long a message waits when another with its ID is in flight (they can meet only in a
/// dead-letter topic that several channels share).
const ID_BUSY_RETRY: Duration = Duration::from_secs(1);

/// Why SUB cannot join a channel; texts as nsqd's.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubscribeError {
    #[error("consumers for {topic}:{channel} exceeds limit of {limit}")]
    TooManyConsumers {
        topic: String,
        channel: String,
        limit: usize,
    },
    #[error("channel is exiting")]
    Exiting,
    /// New topics and channels are refused while the broker drains.
    #[error("broker is draining: no new topics or channels")]
    Draining,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug)]
pub(crate) struct Channel {
    pub(crate) topic_name: String,
    pub(crate) name: String,
    pub(crate) ephemeral: bool,
    settings: Arc<QueueSettings>,
    state: Mutex<State>,
    timer: Notify,
    message_count: AtomicU64,
    requeue_count: AtomicU64,
    timeout_count: AtomicU64,
    /// Kept across restarts in the metadata.
    dead_lettered_count: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// Messages in memory, all older than those on disk.
    queue: MemQueue,
    /// The rest, for channels that are not ephemeral.
    disk: Option<DiskQueue>,
    /// Reused buffer for records read from disk.
    read: Vec<(DiskRecord, Ticket)>,
    in_flight: InFlight,
    deferred: Deferred,
    consumers: Vec<Consumer>,
    cursor: usize,
    paused: bool,
    deleted: bool,
    /// When the timer task wakes next; `None` while it waits without a deadline.
    timer_at: Option<Instant>,
    e2e: Option<LatencyWindow>,
    /// The maximum of attempts and the messages on their way to the dead-letter topic.
    dead: DeadState,
}

#[derive(Debug)]
struct Consumer {
    id: u64,
    client: Arc<dyn ConsumerHandle>,
    rdy: u64,
    in_flight: u64,
    closing: bool,
    msg_timeout: Duration,
    sample_rate: u64,
    rng: u64,
}

impl Consumer {
    fn free(&self) -> u64 {
        if self.closing {
            0
        } else {
            self.rdy.saturating_sub(self.in_flight)
        }
    }

    /// xorshift64: sampling needs speed, not quality.
    fn next_percent(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % 100
    }

    fn publish_counts(&self) {
        let c = self.client.counters();
        c.ready_count.store(self.rdy, Relaxed);
        c.in_flight_count.store(self.in_flight, Relaxed);
    }
}

impl Channel {
    /// A channel with its disk queue opened (none when ephemeral); the caller starts its
    /// timer task with [`Channel::run_timers`].
    pub(crate) fn open(
        topic_name: &str,
        name: &str,
        settings: Arc<QueueSettings>,
    ) -> Result<Arc<Self>, StorageError> {
        let now = Instant::now();
        let e2e = (!settings.e2e_quantiles.is_empty())
            .then(|| LatencyWindow::new(settings.e2e_window, now));
        let ephemeral = proto::wire::names::is_ephemeral(name);
        let disk = match ephemeral {
            true => None,
            false => Some(settings.open_disk(&format!("{topic_name}:{name}"))?),
        };
        Ok(Arc::new(Channel {
            topic_name: topic_name.to_string(),
            name: name.to_string(),
            ephemeral,
            state: Mutex::new(State {
                queue: MemQueue::default(),
                disk,
                read: Vec::new(),
                in_flight: InFlight::default(),
                deferred: Deferred::default(),
                consumers: Vec::new(),
                cursor: 0,
                paused: false,
                deleted: false,
                timer_at: None,
                e2e,
                dead: DeadState::new(settings.max_attempts),
            }),
            settings,
            timer: Notify::new(),
            message_count: AtomicU64::new(0),
            requeue_count: AtomicU64::new(0),
            timeout_count: AtomicU64::new(0),
            dead_lettered_count: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queues half-updated in a way that
        // matters more than stopping delivery would, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requeues timed-out messages, releases due deferred ones and moves dead letters to their
    /// topic, until the channel is deleted.
    pub(crate) async fn run_timers(self: Arc<Self>) {
        loop {
            let (next, dying) = {
                let mut st = self.lock();
                if st.deleted {
                    return;
                }
                let now = Instant::now();
                self.expire(&mut st, now);
                let dying = self.start_dead_letters(&mut st, now);
                let next = st.next_deadline();
                st.timer_at = next;
                (next, dying)
            };
            if let Some(batch) = dying {
                // Outside the lock: storing them takes other topics' and channels' locks.
                self.dead_letter(batch);
                continue;
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.timer.notified() => {}
                    }
                }
                None => self.timer.notified().await,
            }
        }
    }

    fn expire(&self, st: &mut State, now: Instant) {
        let mut timed_out = 0;
        while let Some(entry) = st.in_flight.pop_expired(now) {
            timed_out += 1;
            if let Some(c) = st.consumer_mut(entry.client_id) {
                c.in_flight = c.in_flight.saturating_sub(1);
                c.publish_counts();
            }
            self.put_back(st, entry.msg, Duration::ZERO, now, Failure::TimedOut);
        }
        if timed_out > 0 {
            self.timeout_count.fetch_add(timed_out, Relaxed);
        }
        while let Some(msg) = st.deferred.pop_due(now) {
            st.queue.push_back(msg);
        }
        self.dispatch(st, now);
    }

    /// Adds published messages: deferred ones wait in memory (on disk with --sync-publish);
    /// the others fill the memory queue and go to disk beyond it. Fails, storing nothing, when
    /// the disk write fails; false when the channel was deleted, which drops them.
    pub(crate) fn put(&self, msgs: &[Msg], due: Option<Instant>) -> Result<bool, StorageError> {
        let mut st = self.lock();
        if st.deleted {
            return Ok(false);
        }
        let mut added = msgs.len();
        // With --sync-publish deferred messages are stored too, to survive a crash.
        let deferred_on_disk = self.settings.sync_publish && st.disk.is_some();
        match due {
            Some(at) if !deferred_on_disk => {
                for msg in msgs {
                    st.deferred.push(msg.clone(), at);
                }
                self.wake_timer_if_earlier(&mut st);
            }
            _ => {
                let room = self
                    .settings
                    .memory_room(st.queue.len(), st.disk.as_ref(), msgs.len());
                let (memory, spill) = msgs.split_at(room);
                match st.disk.as_mut() {
                    Some(disk) if !spill.is_empty() => {
                        let due_ms = due.map_or(0, |d| due_unix_ms(d, Instant::now()));
                        let records: Vec<DiskRecord> =
                            spill.iter().map(|m| m.to_record(due_ms)).collect();
                        self.settings.append(disk, &records)?;
                    }
                    // Ephemeral: what does not fit is dropped, as in nsqd.
                    _ => added = memory.len(),
                }
                st.queue.extend(memory.iter().cloned());
            }
        }
        self.message_count.fetch_add(added as u64, Relaxed);
        self.dispatch(&mut st, Instant::now());
        Ok(true)
    }

    /// [`Channel::put`] for messages `range` of a batch published together and due at once,
    /// which the channel queues as they are, shared with the topic's other channels.
    pub(crate) fn put_batch(
        &self,
        batch: &Arc<Batch>,
        range: Range<usize>,
    ) -> Result<bool, StorageError> {
        let mut st = self.lock();
        if st.deleted {
            return Ok(false);
        }
        let n = range.len();
        let room = self
            .settings
            .memory_room(st.queue.len(), st.disk.as_ref(), n);
        let in_memory = range.start..range.start + room;
        let mut added = n;
        match st.disk.as_mut() {
            Some(disk) if room < n => {
                let records: Vec<DiskRecord> = (in_memory.end..range.end)
                    .map(|i| batch.get(i).to_record(0))
                    .collect();
                self.settings.append(disk, &records)?;
            }
            // Ephemeral: what does not fit is dropped, as in nsqd.
            _ => added = room,
        }
        st.queue.push_run(batch, in_memory);
        self.message_count.fetch_add(added as u64, Relaxed);
        self.dispatch(&mut st, Instant::now());
        Ok(true)
    }

    /// Moves records from disk into memory for delivery: up to `want`, deferred ones to the
    /// deferred queue until due. Each stays on disk until finished, so a crash hands out
    /// again what was not. Returns how many were moved.
    fn read_disk(&self, st: &mut State, want: usize, now: Instant) -> usize {
        let State {
            disk,
            read,
            queue,
            deferred,
            ..
        } = st;
        let Some(disk) = disk.as_mut().filter(|d| d.has_unread()) else {
            return 0;
        };
        self.settings.pop(disk, &self.name, want, read);
        let count = read.len();
        for (record, ticket) in read.drain(..) {
            let (msg, due) = Msg::from_record(record, ticket);
            match due_instant(due, now) {
                Some(at) => deferred.push(msg, at),
                None => queue.push_back(msg),
            }
        }
        count
    }

    /// A message back from a consumer (REQ, timeout): into memory while the memory queue has
    /// room (as in nsqd), otherwise to the back of the disk queue, so memory stays within
    /// `--mem-queue-size`. A delayed one read from disk (or in `--sync-publish` mode) goes back
    /// to disk with its due time, so that its segment can go and a crash keeps it; other
    /// delayed ones wait in memory, as in nsqd. Ephemeral channels drop what does not fit.
    /// One that reached the maximum of attempts leaves for the dead-letter topic instead.
    fn put_back(&self, st: &mut State, mut msg: Msg, delay: Duration, now: Instant, why: Failure) {
        if st.dead.over_limit(&msg) {
            st.dead.dying.push(Dying::new(msg, why));
            self.timer.notify_one();
            return;
        }
        let room = self.settings.mem_queue_size > st.queue.len()
            && !(self.settings.sync_publish && st.disk.is_some());
        let to_disk = if delay.is_zero() {
            !room
        } else {
            st.disk.is_some() && (msg.ticket().is_some() || self.settings.sync_publish)
        };
        if to_disk && let Some(disk) = st.disk.as_mut() {
            let due_ms = if delay.is_zero() {
                0
            } else {
                due_unix_ms(now + delay, now)
            };
            match self.settings.append(disk, &[msg.to_record(due_ms)]) {
                Ok(()) => {
                    self.settings.finish(&mut st.disk, &mut msg, true);
                    return;
                }
                Err(error) => tracing::warn!(
                    topic = %self.topic_name,
                    channel = %self.name,
                    %error,
                    "cannot store a requeued message on disk; keeping it in memory",
                ),
            }
        }
        if delay.is_zero() {
            if st.disk.is_none() && !room {
                // Ephemeral and full: dropped, as nsqd drops it.
                return;
            }
            st.queue.push_back(msg);
        } else {
            st.deferred.push(msg, now + delay);
            self.wake_timer_if_earlier(st);
        }
    }

    /// Adds a consumer with RDY 0.
    pub(crate) fn subscribe(&self, subscriber: &Subscriber) -> Result<(), SubscribeError> {
        let mut st = self.lock();
        if st.deleted {
            return Err(SubscribeError::Exiting);
        }
        let limit = self.settings.max_channel_consumers;
        if limit > 0 && st.consumers.len() >= limit {
            return Err(SubscribeError::TooManyConsumers {
                topic: self.topic_name.clone(),
                channel: self.name.clone(),
                limit,
            });
        }
        st.consumers.push(Consumer {
            id: subscriber.id,
            client: subscriber.consumer.clone(),
            rdy: 0,
            in_flight: 0,
            closing: false,
            msg_timeout: subscriber.msg_timeout,
            sample_rate: u64::from(subscriber.sample_rate),
            rng: subscriber.id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        });
        Ok(())
    }

    /// Removes a consumer; its messages in flight stay so until they time out, as in nsqd.
    /// Returns how many consumers are left.
    pub(crate) fn unsubscribe(&self, client_id: u64) -> usize {
        let mut st = self.lock();
        st.consumers.retain(|c| c.id != client_id);
        st.consumers.len()
    }

    pub(crate) fn consumer_count(&self) -> usize {
        self.lock().consumers.len()
    }

    /// Messages queued, in memory and on disk (not in flight, not deferred).
    pub(crate) fn depth(&self) -> u64 {
        let st = self.lock();
        st.queue.len() as u64 + st.disk.as_ref().map_or(0, DiskQueue::depth)
    }

    pub(crate) fn set_ready(&self, client_id: u64, count: u64) {
        let mut st = self.lock();
        if let Some(c) = st.consumer_mut(client_id) {
            c.rdy = count;
            c.publish_counts();
            // nsqd flushes a client's buffered messages as soon as it can take no more.
            if c.free() == 0 {
                c.client.flush_messages();
            }
        }
        self.dispatch(&mut st, Instant::now());
    }

    /// CLS: the consumer gets no more messages but may still finish what it holds.
    pub(crate) fn start_close(&self, client_id: u64) {
        let mut st = self.lock();
        if let Some(c) = st.consumer_mut(client_id) {
            c.closing = true;
            c.rdy = 0;
            c.publish_counts();
            c.client.flush_messages();
        }
    }

    /// FIN for a batch of IDs; `failed` hears of each one that was not in flight for this
    /// client.
    pub(crate) fn finish(
        &self,
        client_id: u64,
        ids: &[MessageId],
        mut failed: impl FnMut(MessageId, InFlightError),
    ) {
        let mut st = self.lock();
        let now_ns = unix_nanos();
        let now = Instant::now();
        let mut done = 0;
        for id in ids {
            match st.in_flight.remove(id, client_id) {
                Ok(mut entry) => {
                    done += 1;
                    self.settings.finish(&mut st.disk, &mut entry.msg, false);
                    if let Some(e2e) = st.e2e.as_mut() {
                        let latency = now_ns.saturating_sub(entry.msg.timestamp).max(0);
                        e2e.record(latency as u64, now);
                    }
                }
                Err(e) => failed(*id, e),
            }
        }
        if done > 0 {
            if let Some(c) = st.consumer_mut(client_id) {
                c.in_flight = c.in_flight.saturating_sub(done);
                c.publish_counts();
                c.client.counters().finish_count.fetch_add(done, Relaxed);
            }
            self.dispatch(&mut st, now);
        }
    }

    /// REQ: back to the queue now, or after `delay`.
    pub(crate) fn requeue(
        &self,
        client_id: u64,
        id: &MessageId,
        delay: Duration,
    ) -> Result<(), InFlightError> {
        let mut st = self.lock();
        let entry = st.in_flight.remove(id, client_id)?;
        self.requeue_count.fetch_add(1, Relaxed);
        if let Some(c) = st.consumer_mut(client_id) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.publish_counts();
            c.client.counters().requeue_count.fetch_add(1, Relaxed);
        }
        let now = Instant::now();
        self.put_back(&mut st, entry.msg, delay, now, Failure::Requeued);
        self.dispatch(&mut st, now);
        Ok(())
    }

    /// TOUCH: the message gets the client's msg_timeout again, capped at --max-msg-timeout
    /// since delivery.
    pub(crate) fn touch(&self, client_id: u64, id: &MessageId) -> Result<(), InFlightError> {
        let mut st = self.lock();
        let timeout = st
            .consumer_mut(client_id)
            .map(|c| c.msg_timeout)
            .ok_or(InFlightError::NotOwner)?;
        st.in_flight.touch(
            id,
            client_id,
            timeout,
            self.settings.max_msg_timeout,
            Instant::now(),
        )
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        let mut st = self.lock();
        st.paused = paused;
        if paused {
            // Paused consumers are not ready: what they have buffered goes out now.
            for c in &st.consumers {
                c.client.flush_messages();
            }
        } else {
            self.dispatch(&mut st, Instant::now());
        }
    }

    /// Drops every queued, in-flight and deferred message; consumers' in-flight counts reset.
    pub(crate) fn empty(&self) -> Result<(), StorageError> {
        let mut st = self.lock();
        if let Some(disk) = st.disk.as_mut() {
            disk.empty()?;
        }
        st.queue.clear();
        st.deferred.clear();
        st.in_flight.drain().for_each(drop);
        st.dead.clear();
        for c in &mut st.consumers {
            c.in_flight = 0;
            c.publish_counts();
        }
        self.dispatch(&mut st, Instant::now());
        Ok(())
    }

    /// Deletes the channel: its consumers' connections are closed and its messages dropped.
    pub(crate) fn delete(&self) {
        let mut st = self.lock();
        st.deleted = true;
        st.queue.clear();
        st.deferred.clear();
        st.in_flight.drain().for_each(drop);
        st.dead.clear();
        for c in st.consumers.drain(..) {
            c.client.close();
        }
        let disk = st.disk.take();
        drop(st);
        self.timer.notify_one();
        if let Some(disk) = disk
            && let Err(e) = disk.delete()
        {
            tracing::error!(topic = %self.topic_name, channel = %self.name, error = %e, "deleting the disk queue failed");
        }
    }

    /// Clean shutdown: every message in memory (queued, in flight, deferred with its due
    /// time, on its way to the dead-letter topic) goes to the disk queue, which is then synced.
    /// In-flight messages are delivered again after the restart; dead letters are moved then.
    pub(crate) fn persist(&self) -> Result<(), StorageError> {
        let mut st = self.lock();
        let now = Instant::now();
        let State {
            disk,
            queue,
            in_flight,
            deferred,
            dead,
            ..
        } = &mut *st;
        let Some(disk) = disk.as_mut() else {
            return Ok(());
        };
        let mut records: Vec<DiskRecord> = in_flight.drain().map(|e| e.msg.to_record(0)).collect();
        records.extend(dead.drain().map(|m| m.to_record(0)));
        records.extend(queue.drain_front(usize::MAX).map(|m| m.to_record(0)));
        records.extend(
            deferred
                .drain()
                .map(|(due, m)| m.to_record(due_unix_ms(due, now))),
        );
        if !records.is_empty() {
            self.settings.append(disk, &records)?;
        }
        // What was just stored again replaces what the disk held for it.
        disk.finish_all();
        disk.sync()
    }

    // --- handoff (a draining broker moves what its consumers did not take to peers) -------

    /// Takes up to `max` messages no consumer holds, oldest first: the memory queue, then the
    /// deferred ones (with their due time), then the disk queue. Each stays on disk (if it was
    /// read from there) until [`Channel::handed_off`] or [`Channel::return_handed`].
    pub(crate) fn take_for_handoff(&self, max: usize) -> Vec<Handed> {
        let mut st = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        while out.len() < max {
            if let Some(msg) = st.queue.pop_front() {
                out.push(Handed {
                    msg,
                    due_unix_ms: 0,
                });
            } else if let Some((due, msg)) = st.deferred.pop_earliest() {
                out.push(Handed {
                    msg,
                    due_unix_ms: due_unix_ms(due, now),
                });
            } else if st.disk.as_ref().is_some_and(DiskQueue::has_unread) {
                let want = max - out.len();
                self.read_disk(&mut st, want, now);
                if st.queue.is_empty() && st.deferred.len() == 0 {
                    break;
                }
            } else {
                break;
            }
        }
        out
    }

    /// A peer stored these: they are done with here.
    pub(crate) fn handed_off(&self, handed: Vec<Handed>) {
        let mut st = self.lock();
        self.settings.finish_handed(&mut st.disk, handed);
    }

    /// The handoff failed: the messages go back, in front of the queue (or deferred again).
    pub(crate) fn return_handed(&self, handed: Vec<Handed>) {
        let mut st = self.lock();
        let now = Instant::now();
        for h in handed.into_iter().rev() {
            match due_instant(h.due_unix_ms, now) {
                Some(at) if h.due_unix_ms != 0 => st.deferred.push(h.msg, at),
                _ => st.queue.push_front(h.msg),
            }
        }
        self.wake_timer_if_earlier(&mut st);
        self.dispatch(&mut st, now);
    }

    /// Stores messages a peer handed off: on disk (so that the ack the peer gets means a
    /// crash here loses none of them), behind what is queued; deferred ones keep their due
    /// time. An ephemeral channel keeps them in memory.
    pub(crate) fn store_handed(&self, handed: &[Handed]) -> Result<(), StorageError> {
        let mut st = self.lock();
        if st.deleted {
            return Ok(());
        }
        let now = Instant::now();
        match st.disk.as_mut() {
            Some(disk) => {
                let records: Vec<DiskRecord> = handed
                    .iter()
                    .map(|h| h.msg.to_record(h.due_unix_ms))
                    .collect();
                self.settings.append(disk, &records)?;
            }
            None => {
                for h in handed {
                    match due_instant(h.due_unix_ms, now) {
                        Some(at) if h.due_unix_ms != 0 => st.deferred.push(h.msg.clone(), at),
                        _ => st.queue.push_back(h.msg.clone()),
                    }
                }
                self.wake_timer_if_earlier(&mut st);
            }
        }
        self.message_count.fetch_add(handed.len() as u64, Relaxed);
        self.dispatch(&mut st, now);
        Ok(())
    }

    /// The drain timed out: consumers are disconnected and what they held goes back to the
    /// queue at once (attempts kept), to be handed off.
    pub(crate) fn evict_consumers(&self) {
        let mut st = self.lock();
        for c in st.consumers.iter_mut() {
            c.closing = true;
            c.rdy = 0;
            c.in_flight = 0;
            c.client.close();
        }
        let State {
            in_flight, queue, ..
        } = &mut *st;
        let mut returned: Vec<Msg> = in_flight.drain().map(|e| e.msg).collect();
        returned.reverse();
        for msg in returned {
            queue.push_front(msg);
        }
    }

    /// Messages the channel still has: queued (memory and disk), in flight, deferred and on
    /// their way to the dead-letter topic.
    pub(crate) fn holds(&self) -> u64 {
        let st = self.lock();
        let on_disk = st.disk.as_ref().map_or(0, DiskQueue::depth);
        let held = st.queue.len() + st.in_flight.len() + st.deferred.len() + st.dead.len();
        held as u64 + on_disk
    }

    /// Fsyncs the disk queue (the syncer calls this off the async runtime) without holding
    /// the channel's lock meanwhile; false when the fsync failed. See [`QueueSettings::sync`]
    /// for `full`.
    pub(crate) fn sync(&self, full: bool) -> bool {
        self.settings
            .sync(&self.name, &self.state, |st| st.disk.as_mut(), full)
    }

    /// Adds this channel's e2e latency samples to `into`.
    pub(crate) fn merge_e2e(&self, into: &mut Histogram) {
        if let Some(e2e) = self.lock().e2e.as_mut() {
            e2e.merge_into(into, Instant::now());
        }
    }

    pub(crate) fn stats(&self, include_clients: bool, pub_topic: Option<&str>) -> ChannelStats {
        let mut st = self.lock();
        let mut e2e = Histogram::default();
        if let Some(w) = st.e2e.as_mut() {
            w.merge_into(&mut e2e, Instant::now());
        }
        let on_disk = st.disk.as_ref().map_or(0, DiskQueue::depth) as i64;
        let damage = st.disk.as_ref().map(DiskQueue::damage).unwrap_or_default();
        ChannelStats {
            channel_name: self.name.clone(),
            depth: st.queue.len() as i64 + on_disk,
            backend_depth: on_disk,
            in_flight_count: st.in_flight.len(),
            deferred_count: st.deferred.len(),
            message_count: self.message_count.load(Relaxed),
            requeue_count: self.requeue_count.load(Relaxed),
            timeout_count: self.timeout_count.load(Relaxed),
            client_count: st.consumers.len(),
            clients: include_clients.then(|| {
                st.consumers
                    .iter()
                    .map(|c| c.client.stats(pub_topic))
                    .collect()
            }),
            paused: st.paused,
            e2e_processing_latency: E2eStats::new(&self.settings.e2e_quantiles, &e2e),
            disk_damaged_records: damage.records,
            disk_damaged_bytes: damage.bytes,
            dead_letter: self.dead_letter_stats(&st),
        }
    }

    /// Hands queued messages to ready consumers in turn.
    fn dispatch(&self, st: &mut State, now: Instant) {
        if st.paused || st.consumers.is_empty() {
            return;
        }
        let n = st.consumers.len();
        let mut idle = 0;
        while idle < n {
            if st.queue.is_empty() {
                if st.consumers.iter().all(|c| c.free() == 0) {
                    break;
                }
                self.read_disk(st, DISPATCH_CHUNK as usize, now);
                if st.queue.is_empty() {
                    break;
                }
            }
            let State {
                queue,
                in_flight,
                consumers,
                cursor,
                dead,
                ..
            } = &mut *st;
            let c = &mut consumers[*cursor % n];
            *cursor = cursor.wrapping_add(1);
            let take = c.free().min(queue.len() as u64).min(DISPATCH_CHUNK);
            if take == 0 {
                idle += 1;
                continue;
            }
            idle = 0;
            let client = c.client.clone();
            // nsqd flushes as soon as a client can take no more.
            let flush = if take >= c.free() {
                Flush::Now
            } else {
                consumer::flush_for(&client)
            };
            let mut sampled_out: Vec<Msg> = Vec::new();
            let mut over_limit: Vec<Msg> = Vec::new();
            let mut id_busy: Vec<Msg> = Vec::new();
            let mut sent = 0;
            client.push_messages(flush, &mut |buf| {
                for mut msg in queue.drain_front(take as usize) {
                    if c.sample_rate > 0 && c.next_percent() > c.sample_rate {
                        // nsqd drops what a client samples out.
                        sampled_out.push(msg);
                        continue;
                    }
                    if dead.over_limit(&msg) {
                        over_limit.push(msg);
                        continue;
                    }
                    let attempts = msg.attempts;
                    msg.attempts = attempts.saturating_add(1);
                    match in_flight.insert(msg, c.id, c.msg_timeout, now) {
                        Ok(msg) => {
                            write_message(buf, msg.timestamp, msg.attempts, &msg.id, msg.payload());
                            sent += 1;
                        }
                        Err(mut msg) => {
                            msg.attempts = attempts;
                            id_busy.push(msg);
                        }
                    }
                }
            });
            c.in_flight += sent;
            client.counters().message_count.fetch_add(sent, Relaxed);
            c.publish_counts();
            for mut msg in sampled_out {
                self.settings.finish(&mut st.disk, &mut msg, false);
            }
            if !over_limit.is_empty() {
                let dying = over_limit
                    .into_iter()
                    .map(|m| Dying::new(m, Failure::OverLimit));
                st.dead.dying.extend(dying);
                self.timer.notify_one();
            }
            for msg in id_busy {
                st.deferred.push(msg, now + ID_BUSY_RETRY);
            }
        }
        self.wake_timer_if_earlier(st);
    }

    fn wake_timer_if_earlier(&self, st: &mut State) {
        let Some(next) = st.next_deadline() else {
            return;
        };
        if st.timer_at.is_none_or(|at| next < at) {
            st.timer_at = Some(next);
            self.timer.notify_one();
        }
    }
}

impl State {
    fn consumer_mut(&mut self, client_id: u64) -> Option<&mut Consumer> {
        self.consumers.iter_mut().find(|c| c.id == client_id)
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.in_flight.next_deadline(),
            self.deferred.next_due(),
            self.dead.retry_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
