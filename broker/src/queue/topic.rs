//! A topic: where publishes land and are fanned out to every channel.
//!
//! Fan-out happens on the publisher's task, under the topic lock, a batch at a time: no pump
//! task, no per-message hand-off. Messages wait in the topic itself (memory, then its disk
//! queue) while it has no channel or is paused, and go to the channels existing when they are
//! released, as in nsqd.

use super::channel::{Channel, SubscribeError};
use super::consumer::Subscriber;
use super::dead_letter::{DeadLetterError, DeadLetterSink};
use super::e2e::Histogram;
use super::guid::IdGenerator;
use super::memory::{Batch, MemQueue, Popped};
use super::message::{Msg, QueuedMessage};
use super::{Handed, QueueSettings, due_instant, due_unix_ms, unix_nanos};
use crate::persist::TopicMeta;
use crate::stats::{E2eStats, TopicStats};
use crate::storage::{DiskQueue, DiskRecord, StorageError};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Records moved from the topic's disk queue to its channels per step.
const RELEASE_BATCH: usize = 1024;

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("exiting")]
    Exiting,
    /// The broker is leaving the cluster: publish to another one.
    #[error("draining")]
    Draining,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) name: String,
    pub(crate) ephemeral: bool,
    settings: Arc<QueueSettings>,
    state: Mutex<State>,
    message_count: AtomicU64,
    message_bytes: AtomicU64,
}

#[derive(Debug)]
struct State {
    channels: BTreeMap<String, Arc<Channel>>,
    /// Messages waiting for a channel or for the topic to be unpaused, an MPUB as one run of
    /// its batch; older than those in `disk`.
    pending: MemQueue<Pending>,
    disk: Option<DiskQueue>,
    paused: bool,
    deleted: bool,
    ids: IdGenerator,
}

#[derive(Debug, Clone)]
struct Pending {
    msg: Msg,
    due: Option<Instant>,
}

/// A message of a batch: due at once.
impl From<Msg> for Pending {
    fn from(msg: Msg) -> Pending {
        Pending { msg, due: None }
    }
}

impl State {
    fn on_disk(&self) -> u64 {
        self.disk.as_ref().map_or(0, DiskQueue::depth)
    }

    fn disk_waiting(&self) -> bool {
        self.disk.as_ref().is_some_and(DiskQueue::has_unread)
    }

    fn holds_messages(&self) -> bool {
        !self.pending.is_empty() || self.disk_waiting()
    }
}

impl Topic {
    /// A topic with its disk queue opened (none when ephemeral).
    pub(crate) fn open(
        name: &str,
        settings: Arc<QueueSettings>,
    ) -> Result<Arc<Topic>, StorageError> {
        let ephemeral = proto::wire::names::is_ephemeral(name);
        let disk = match ephemeral {
            true => None,
            false => Some(settings.open_disk(name)?),
        };
        Ok(Arc::new(Topic {
            name: name.to_string(),
            ephemeral,
            state: Mutex::new(State {
                channels: BTreeMap::new(),
                pending: MemQueue::default(),
                disk,
                paused: false,
                deleted: false,
                ids: IdGenerator::new(settings.node_id),
            }),
            settings,
            message_count: AtomicU64::new(0),
            message_bytes: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a batch. `defer` delays delivery. When a disk write fails, the publish fails;
    /// channels that took the batch before the failure keep it (at least once, never lost).
    pub(crate) fn publish(&self, bodies: &[Bytes], defer: Duration) -> Result<(), PublishError> {
        if self.settings.is_draining() {
            return Err(PublishError::Draining);
        }
        let mut st = self.lock();
        if st.deleted {
            return Err(PublishError::Exiting);
        }
        let now_ns = unix_nanos();
        let due = (!defer.is_zero()).then(|| Instant::now() + defer);
        let bytes: usize = bodies.iter().map(Bytes::len).sum();
        if bodies.len() > 1 && due.is_none() {
            // An MPUB is one compact batch, which the channels share or the topic holds.
            let ids = bodies.iter().map(|_| st.ids.next_raw(now_ns)).collect();
            let batch = Arc::new(Batch::new(now_ns, ids, bodies));
            self.release(&mut st);
            if st.paused || st.channels.is_empty() || st.holds_messages() {
                self.hold_batch(&mut st, &batch)?;
            } else {
                for channel in st.channels.values() {
                    channel.put_batch(&batch, 0..batch.len())?;
                }
            }
            self.count(bodies.len(), bytes);
            return Ok(());
        }
        let msgs: Vec<Msg> = bodies
            .iter()
            .map(|body| new_msg(&mut st.ids, now_ns, body))
            .collect();
        self.accept(&mut st, msgs, due)?;
        self.count(bodies.len(), bytes);
        Ok(())
    }

    /// New messages: to the channels, or held while the topic has none, is paused or still
    /// holds older ones.
    fn accept(
        &self,
        st: &mut State,
        msgs: Vec<Msg>,
        due: Option<Instant>,
    ) -> Result<(), StorageError> {
        self.release(st);
        if st.paused || st.channels.is_empty() || st.holds_messages() {
            self.hold(st, msgs, due)?;
        } else {
            for channel in st.channels.values() {
                channel.put(&msgs, due)?;
            }
        }
        Ok(())
    }

    fn count(&self, messages: usize, bytes: usize) {
        self.message_count.fetch_add(messages as u64, Relaxed);
        self.message_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Keeps messages in the topic: in memory while it has room and nothing waits on disk,
    /// else on disk (ephemeral topics drop what does not fit).
    fn hold(
        &self,
        st: &mut State,
        msgs: Vec<Msg>,
        due: Option<Instant>,
    ) -> Result<(), StorageError> {
        let room = self
            .settings
            .memory_room(st.pending.len(), st.disk.as_ref(), msgs.len());
        if let Some(disk) = st.disk.as_mut()
            && room < msgs.len()
        {
            let due_ms = due.map_or(0, |d| due_unix_ms(d, Instant::now()));
            let records: Vec<DiskRecord> =
                msgs[room..].iter().map(|m| m.to_record(due_ms)).collect();
            self.settings.append(disk, &records)?;
        }
        let held = msgs.into_iter().take(room).map(|msg| Pending { msg, due });
        st.pending.extend(held);
        Ok(())
    }

    /// [`Topic::hold`] for an MPUB's batch, which waits in memory as one run.
    fn hold_batch(&self, st: &mut State, batch: &Arc<Batch>) -> Result<(), StorageError> {
        let n = batch.len();
        let room = self
            .settings
            .memory_room(st.pending.len(), st.disk.as_ref(), n);
        if let Some(disk) = st.disk.as_mut()
            && room < n
        {
            let records: Vec<DiskRecord> = (room..n).map(|i| batch.get(i).to_record(0)).collect();
            self.settings.append(disk, &records)?;
        }
        st.pending.push_run(batch, 0..room);
        Ok(())
    }

    /// Moves waiting messages to the channels: memory first, then disk. A record read from
    /// the topic's disk queue is finished there once the channels have it (and, in
    /// `--sync-publish` mode, once their copies are durable).
    fn release(&self, st: &mut State) {
        if st.paused || st.channels.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut singles = Vec::new();
        loop {
            if st.pending.is_empty() && !self.read_disk(st, RELEASE_BATCH, now) {
                return;
            }
            // Single messages go on a step at a time, runs of a batch whole.
            let run = loop {
                match st.pending.pop_item() {
                    Some(Popped::One(p)) if singles.len() < RELEASE_BATCH => singles.push(p),
                    item => break item,
                }
            };
            let delivered = deliver(&st.channels, &singles).and_then(|()| match &run {
                Some(Popped::Run(batch, range)) => st
                    .channels
                    .values()
                    .try_for_each(|c| c.put_batch(batch, range.clone()).map(drop)),
                _ => Ok(()),
            });
            if let Err(e) = delivered {
                tracing::error!(topic = %self.name, error = %e, "moving messages to channels failed; will retry");
                if let Some(item) = run {
                    st.pending.push_front_item(item);
                }
                for p in singles.drain(..).rev() {
                    st.pending.push_front(p);
                }
                return;
            }
            if let Some(Popped::One(p)) = run {
                // The step was full: this one starts the next.
                st.pending.push_front(p);
            }
            for mut p in singles.drain(..) {
                self.settings.finish(&mut st.disk, &mut p.msg, true);
            }
        }
    }

    /// Reads up to `max` records from the disk queue to the back of `pending` (each stays on
    /// disk until it is finished there); false when none was read.
    fn read_disk(&self, st: &mut State, max: usize, now: Instant) -> bool {
        let State { disk, pending, .. } = st;
        let Some(disk) = disk.as_mut().filter(|d| d.has_unread()) else {
            return false;
        };
        let mut read = Vec::with_capacity(max);
        self.settings.pop(disk, &self.name, max, &mut read);
        let any = !read.is_empty();
        pending.extend(read.into_iter().map(|(record, ticket)| {
            let (msg, due) = Msg::from_record(record, ticket);
            Pending {
                msg,
                due: due_instant(due, now),
            }
        }));
        any
    }

    /// The channel, created (with its timer task) if needed, and whether it was created.
    /// `None` when the topic is being deleted.
    pub(crate) fn channel(&self, name: &str) -> Result<Option<(Arc<Channel>, bool)>, StorageError> {
        let mut st = self.lock();
        if st.deleted {
            return Ok(None);
        }
        self.channel_locked(&mut st, name).map(Some)
    }

    fn channel_locked(
        &self,
        st: &mut State,
        name: &str,
    ) -> Result<(Arc<Channel>, bool), StorageError> {
        if let Some(c) = st.channels.get(name) {
            return Ok((c.clone(), false));
        }
        let channel = Channel::open(&self.name, name, self.settings.clone())?;
        tokio::spawn(channel.clone().run_timers());
        st.channels.insert(name.to_string(), channel.clone());
        tracing::info!(topic = %self.name, channel = %name, "new channel");
        self.release(st);
        Ok((channel, true))
    }

    /// Subscribes a consumer to the channel `name`, creating it if needed; says whether it
    /// was created.
    pub(crate) fn subscribe(
        &self,
        name: &str,
        subscriber: &Subscriber,
    ) -> Result<(Arc<Channel>, bool), SubscribeError> {
        let mut st = self.lock();
        if st.deleted {
            return Err(SubscribeError::Exiting);
        }
        let (channel, created) = self.channel_locked(&mut st, name)?;
        channel.subscribe(subscriber)?;
        Ok((channel, created))
    }

    // --- handoff (a draining broker moves what its consumers did not take to peers) -------

    /// The topic's channels.
    pub(crate) fn channels(&self) -> Vec<Arc<Channel>> {
        self.lock().channels.values().cloned().collect()
    }

    /// Messages waiting in the topic itself (it has no channel, or is paused).
    pub(crate) fn holds(&self) -> u64 {
        let st = self.lock();
        st.pending.len() as u64 + st.on_disk()
    }

    /// Takes up to `max` of the messages waiting in the topic itself, oldest first; each stays
    /// on disk (if it was read from there) until [`Topic::handed_off`] or
    /// [`Topic::return_handed`].
    pub(crate) fn take_for_handoff(&self, max: usize) -> Vec<Handed> {
        let mut st = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        while out.len() < max {
            if let Some(p) = st.pending.pop_front() {
                out.push(Handed {
                    due_unix_ms: p.due.map_or(0, |d| due_unix_ms(d, now)),
                    msg: p.msg,
                });
                continue;
            }
            let Some(disk) = st.disk.as_mut().filter(|d| d.has_unread()) else {
                break;
            };
            let mut read = Vec::new();
            self.settings
                .pop(disk, &self.name, max - out.len(), &mut read);
            if read.is_empty() {
                break;
            }
            out.extend(read.into_iter().map(|(record, ticket)| {
                let (msg, due_unix_ms) = Msg::from_record(record, ticket);
                Handed { msg, due_unix_ms }
            }));
        }
        out
    }

    /// A peer stored these: they are done with here.
    pub(crate) fn handed_off(&self, handed: Vec<Handed>) {
        let mut st = self.lock();
        self.settings.finish_handed(&mut st.disk, handed);
    }

    /// The handoff failed: the messages wait in the topic again, in front.
    pub(crate) fn return_handed(&self, handed: Vec<Handed>) {
        let mut st = self.lock();
        let now = Instant::now();
        for h in handed.into_iter().rev() {
            let due = due_instant(h.due_unix_ms, now).filter(|_| h.due_unix_ms != 0);
            st.pending.push_front(Pending { msg: h.msg, due });
        }
    }

    /// Stores messages a peer handed off from its topic's own queue: into every channel, or
    /// onto the topic's disk while it has none (see [`Channel::store_handed`]).
    pub(crate) fn store_handed(&self, handed: &[Handed]) -> Result<(), StorageError> {
        let mut st = self.lock();
        if st.deleted {
            return Ok(());
        }
        self.release(&mut st);
        if st.paused || st.channels.is_empty() || st.holds_messages() {
            match st.disk.as_mut() {
                Some(disk) => {
                    let records: Vec<DiskRecord> = handed
                        .iter()
                        .map(|h| h.msg.to_record(h.due_unix_ms))
                        .collect();
                    self.settings.append(disk, &records)?;
                }
                None => {
                    let now = Instant::now();
                    st.pending.extend(handed.iter().map(|h| Pending {
                        msg: h.msg.clone(),
                        due: due_instant(h.due_unix_ms, now).filter(|_| h.due_unix_ms != 0),
                    }));
                }
            }
        } else {
            for channel in st.channels.values() {
                channel.store_handed(handed)?;
            }
        }
        self.message_count.fetch_add(handed.len() as u64, Relaxed);
        Ok(())
    }

    /// The names of the topic's channels (what lookupds are told).
    pub(crate) fn channel_names(&self) -> std::collections::BTreeSet<String> {
        self.lock().channels.keys().cloned().collect()
    }

    pub(crate) fn existing_channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.lock().channels.get(name).cloned()
    }

    /// Deletes a channel. Returns false when there is no such channel.
    pub(crate) fn delete_channel(&self, name: &str) -> bool {
        let removed = self.lock().channels.remove(name);
        match removed {
            Some(channel) => {
                channel.delete();
                tracing::info!(topic = %self.name, channel = %name, "deleted channel");
                true
            }
            None => false,
        }
    }

    /// Deletes an ephemeral channel if it still has no consumer (a new one may have joined
    /// since its last consumer left).
    pub(crate) fn delete_channel_if_unused(&self, name: &str) {
        let mut st = self.lock();
        let unused = st
            .channels
            .get(name)
            .is_some_and(|c| c.ephemeral && c.consumer_count() == 0);
        if unused && let Some(channel) = st.channels.remove(name) {
            channel.delete();
            tracing::info!(topic = %self.name, channel = %name, "deleted ephemeral channel");
        }
    }

    /// Whether an ephemeral topic has lost its last channel and should go.
    pub(crate) fn is_unused_ephemeral(&self) -> bool {
        self.ephemeral && self.lock().channels.is_empty()
    }

    /// Marks the topic deleted, deletes its channels and its disk queue.
    pub(crate) fn delete(&self) {
        let (channels, disk) = {
            let mut st = self.lock();
            st.deleted = true;
            st.pending.clear();
            (std::mem::take(&mut st.channels), st.disk.take())
        };
        for channel in channels.values() {
            channel.delete();
        }
        if let Some(disk) = disk
            && let Err(e) = disk.delete()
        {
            tracing::error!(topic = %self.name, error = %e, "deleting the disk queue failed");
        }
    }

    /// Drops the messages waiting in the topic (not those already in its channels).
    pub(crate) fn empty(&self) -> Result<(), StorageError> {
        let mut st = self.lock();
        st.pending.clear();
        match st.disk.as_mut() {
            Some(disk) => disk.empty(),
            None => Ok(()),
        }
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        let mut st = self.lock();
        st.paused = paused;
        self.release(&mut st);
    }

    /// Sets the channel's paused flag; false when there is no such channel.
    pub(crate) fn set_channel_paused(&self, name: &str, paused: bool) -> bool {
        match self.existing_channel(name) {
            Some(channel) => {
                channel.set_paused(paused);
                true
            }
            None => false,
        }
    }

    /// Clean shutdown: writes the channels' and then the topic's memory to their disk queues.
    /// Channels first, so that records the topic moved to them are on their disks before the
    /// topic's disk forgets them.
    pub(crate) fn persist(&self) -> Result<(), StorageError> {
        let channels: Vec<Arc<Channel>> = self.lock().channels.values().cloned().collect();
        channels.iter().try_for_each(|c| c.persist())?;
        let mut st = self.lock();
        let now = Instant::now();
        let State { pending, disk, .. } = &mut *st;
        let Some(disk) = disk.as_mut() else {
            return Ok(());
        };
        let records: Vec<DiskRecord> = pending
            .drain_front(pending.len())
            .map(|p| p.msg.to_record(p.due.map_or(0, |d| due_unix_ms(d, now))))
            .collect();
        if !records.is_empty() {
            self.settings.append(disk, &records)?;
        }
        // What was just stored again, or is in the channels now, replaces what the disk held.
        disk.finish_all();
        disk.sync()
    }

    /// Fsyncs the topic's and its channels' disk queues, without holding their locks while
    /// the fsyncs run; false when any fsync failed.
    pub(crate) fn sync(&self, full: bool) -> bool {
        let mut ok = self
            .settings
            .sync(&self.name, &self.state, |st| st.disk.as_mut(), full);
        let channels: Vec<Arc<Channel>> = self.lock().channels.values().cloned().collect();
        for channel in channels {
            ok &= channel.sync(full);
        }
        ok
    }

    /// What the metadata file records of this topic; `None` for an ephemeral one.
    pub(crate) fn meta(&self) -> Option<TopicMeta> {
        if self.ephemeral {
            return None;
        }
        let st = self.lock();
        Some(TopicMeta {
            name: self.name.clone(),
            paused: st.paused,
            channels: st
                .channels
                .values()
                .filter(|c| !c.ephemeral)
                .map(|c| c.meta())
                .collect(),
        })
    }

    /// The first `max` messages the topic holds (while it has no channel or is paused), without
    /// taking them: those on disk are read into memory, where they stay in order and on disk
    /// until they reach the channels.
    pub(crate) fn peek(&self, max: usize) -> Vec<QueuedMessage> {
        let mut st = self.lock();
        let now = Instant::now();
        while st.pending.len() < max {
            let want = max - st.pending.len();
            if !self.read_disk(&mut st, want, now) {
                break;
            }
        }
        st.pending
            .peek(max)
            .iter()
            .map(|p| QueuedMessage::of(&p.msg))
            .collect()
    }

    /// `pub_topic` is the `/stats` topic filter, which decides the clients' `pub_counts`.
    pub(crate) fn stats(
        &self,
        channel_filter: Option<&str>,
        include_clients: bool,
        pub_topic: Option<&str>,
    ) -> TopicStats {
        let (channels, memory, on_disk, paused, damage) = {
            let st = self.lock();
            let channels: Vec<Arc<Channel>> = st
                .channels
                .values()
                .filter(|c| channel_filter.is_none_or(|f| f == c.name))
                .cloned()
                .collect();
            (
                channels,
                st.pending.len() as i64,
                st.on_disk() as i64,
                st.paused,
                st.disk.as_ref().map(DiskQueue::damage).unwrap_or_default(),
            )
        };
        let mut e2e = Histogram::default();
        let channels = channels
            .iter()
            .map(|c| {
                c.merge_e2e(&mut e2e);
                c.stats(include_clients, pub_topic)
            })
            .collect();
        TopicStats {
            topic_name: self.name.clone(),
            channels,
            depth: memory + on_disk,
            backend_depth: on_disk,
            message_count: self.message_count.load(Relaxed),
            message_bytes: self.message_bytes.load(Relaxed),
            paused,
            e2e_processing_latency: E2eStats::new(&self.settings.e2e_quantiles, &e2e),
            disk_damaged_records: damage.records,
            disk_damaged_bytes: damage.bytes,
        }
    }
}

/// Dead letters from channels land here like publishes, keeping their IDs (see
/// [`super::dead_letter`]).
impl DeadLetterSink for Topic {
    fn put_dead(&self, msgs: &[Msg]) -> Result<(), DeadLetterError> {
        let mut st = self.lock();
        if st.deleted {
            return Err(DeadLetterError::Gone);
        }
        self.accept(&mut st, msgs.to_vec(), None)?;
        self.count(msgs.len(), msgs.iter().map(|m| m.payload().len()).sum());
        Ok(())
    }
}

/// Puts released messages into every channel: the ready ones as a batch, deferred ones with
/// their due time.
fn deliver(
    channels: &BTreeMap<String, Arc<Channel>>,
    batch: &[Pending],
) -> Result<(), StorageError> {
    if batch.is_empty() {
        return Ok(());
    }
    let ready: Vec<Msg> = batch
        .iter()
        .filter(|p| p.due.is_none())
        .map(|p| p.msg.clone())
        .collect();
    for channel in channels.values() {
        channel.put(&ready, None)?;
        for p in batch.iter().filter(|p| p.due.is_some()) {
            channel.put(std::slice::from_ref(&p.msg), p.due)?;
        }
    }
    Ok(())
}

fn new_msg(ids: &mut IdGenerator, now_ns: i64, body: &Bytes) -> Msg {
    Msg::new(ids.next(now_ns), now_ns, body.clone())
}
