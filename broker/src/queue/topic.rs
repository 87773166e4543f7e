//! A topic: where publishes land and are fanned out to every channel.
//!
//! Fan-out happens on the publisher's task, under the topic lock, a batch at a time: no pump
//! task, no per-message hand-off. Messages wait in the topic itself while it has no channel or
//! is paused, and go to the channels existing when they are released, as in nsqd.

use super::channel::{Channel, SubscribeError};
use super::e2e::Histogram;
use super::guid::IdGenerator;
use super::message::Msg;
use super::{QueueSettings, unix_nanos};
use crate::protocol::Client;
use crate::stats::{E2eStats, TopicStats};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Why a publish was refused. Nothing of a refused publish is stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("exiting")]
    Exiting,
    #[error("memory queue of {name} is full ({limit} messages)")]
    QueueFull { name: String, limit: usize },
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
    /// Messages waiting for a channel or for the topic to be unpaused.
    pending: VecDeque<Pending>,
    paused: bool,
    deleted: bool,
    ids: IdGenerator,
}

#[derive(Debug)]
struct Pending {
    msg: Msg,
    due: Option<Instant>,
}

impl Topic {
    pub(crate) fn new(name: &str, settings: Arc<QueueSettings>) -> Arc<Topic> {
        Arc::new(Topic {
            name: name.to_string(),
            ephemeral: proto::wire::names::is_ephemeral(name),
            state: Mutex::new(State {
                channels: BTreeMap::new(),
                pending: VecDeque::new(),
                paused: false,
                deleted: false,
                ids: IdGenerator::new(settings.node_id),
            }),
            settings,
            message_count: AtomicU64::new(0),
            message_bytes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a batch atomically: all of it is accepted, or none. `defer` delays delivery.
    pub(crate) fn publish(&self, bodies: &[Bytes], defer: Duration) -> Result<(), PublishError> {
        let mut st = self.lock();
        if st.deleted {
            return Err(PublishError::Exiting);
        }
        self.release_pending(&mut st);
        let now_ns = unix_nanos();
        let due = (!defer.is_zero()).then(|| Instant::now() + defer);
        let n = bodies.len();
        if st.paused || st.channels.is_empty() || !st.pending.is_empty() {
            let limit = self.settings.mem_queue_size;
            if st.pending.len() + n > limit && !self.ephemeral {
                return Err(PublishError::QueueFull {
                    name: self.name.clone(),
                    limit,
                });
            }
            let room = limit.saturating_sub(st.pending.len());
            for body in bodies.iter().take(room) {
                let msg = new_msg(&mut st.ids, now_ns, body);
                st.pending.push_back(Pending { msg, due });
            }
        } else {
            if let Some(full) = st.channels.values().find(|c| c.room() < n) {
                return Err(PublishError::QueueFull {
                    name: format!("{}:{}", self.name, full.name),
                    limit: self.settings.mem_queue_size,
                });
            }
            let msgs: Vec<Msg> = bodies
                .iter()
                .map(|body| new_msg(&mut st.ids, now_ns, body))
                .collect();
            for channel in st.channels.values() {
                channel.put(&msgs, due);
            }
        }
        self.message_count.fetch_add(n as u64, Relaxed);
        let bytes: usize = bodies.iter().map(Bytes::len).sum();
        self.message_bytes.fetch_add(bytes as u64, Relaxed);
        Ok(())
    }

    /// Moves waiting messages to the channels, as many as all of them have room for.
    fn release_pending(&self, st: &mut State) {
        if st.paused || st.channels.is_empty() || st.pending.is_empty() {
            return;
        }
        let room = st.channels.values().map(|c| c.room()).min().unwrap_or(0);
        let take = room.min(st.pending.len());
        if take == 0 {
            return;
        }
        let released: Vec<Pending> = st.pending.drain(..take).collect();
        let now = Instant::now();
        for channel in st.channels.values() {
            let (ready, later): (Vec<&Pending>, Vec<&Pending>) = released
                .iter()
                .partition(|p| p.due.is_none_or(|d| d <= now));
            let ready: Vec<Msg> = ready.into_iter().map(|p| p.msg.clone()).collect();
            channel.put(&ready, None);
            for p in later {
                channel.put(std::slice::from_ref(&p.msg), p.due);
            }
        }
    }

    /// The channel, created (with its timer task) if needed. `None` when the topic is being
    /// deleted.
    pub(crate) fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        let mut st = self.lock();
        if st.deleted {
            return None;
        }
        Some(self.channel_locked(&mut st, name))
    }

    fn channel_locked(&self, st: &mut State, name: &str) -> Arc<Channel> {
        if let Some(c) = st.channels.get(name) {
            return c.clone();
        }
        let channel = Channel::new(&self.name, name, self.settings.clone());
        tokio::spawn(channel.clone().run_timers());
        st.channels.insert(name.to_string(), channel.clone());
        tracing::info!(topic = %self.name, channel = %name, "new channel");
        self.release_pending(st);
        channel
    }

    /// Subscribes `client` to the channel `name`, creating it if needed.
    pub(crate) fn subscribe(
        &self,
        name: &str,
        client: &Arc<Client>,
    ) -> Result<Arc<Channel>, SubscribeError> {
        let mut st = self.lock();
        if st.deleted {
            return Err(SubscribeError::Exiting);
        }
        let channel = self.channel_locked(&mut st, name);
        channel.subscribe(client)?;
        Ok(channel)
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

    /// Marks the topic deleted and deletes its channels.
    pub(crate) fn delete(&self) {
        let channels = {
            let mut st = self.lock();
            st.deleted = true;
            st.pending.clear();
            std::mem::take(&mut st.channels)
        };
        for channel in channels.values() {
            channel.delete();
        }
    }

    /// Drops the messages waiting in the topic (not those already in its channels).
    pub(crate) fn empty(&self) {
        self.lock().pending.clear();
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        let mut st = self.lock();
        st.paused = paused;
        self.release_pending(&mut st);
    }

    /// `pub_topic` is the `/stats` topic filter, which decides the clients' `pub_counts`.
    pub(crate) fn stats(
        &self,
        channel_filter: Option<&str>,
        include_clients: bool,
        pub_topic: Option<&str>,
    ) -> TopicStats {
        let (channels, depth, paused) = {
            let st = self.lock();
            let channels: Vec<Arc<Channel>> = st
                .channels
                .values()
                .filter(|c| channel_filter.is_none_or(|f| f == c.name))
                .cloned()
                .collect();
            (channels, st.pending.len() as i64, st.paused)
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
            depth,
            backend_depth: 0,
            message_count: self.message_count.load(Relaxed),
            message_bytes: self.message_bytes.load(Relaxed),
            paused,
            e2e_processing_latency: E2eStats::new(&self.settings.e2e_quantiles, &e2e),
        }
    }
}

fn new_msg(ids: &mut IdGenerator, now_ns: i64, body: &Bytes) -> Msg {
    Msg {
        id: ids.next(now_ns),
        timestamp: now_ns,
        attempts: 0,
        body: body.clone(),
    }
}
