//! The broker's shared state: its topics, and what every server reads.
//!
//! Creating, deleting and pausing topics and channels goes through here, so the metadata file
//! is rewritten after every such change, and the [`Cluster`] around the broker hears of it.

use crate::config::{NSQ_COMPAT_VERSION, Options};
use crate::persist::{Metadata, PersistError};
use crate::queue::dead_letter::{RedriveError, check_topic};
use crate::queue::{
    Channel, DeadLetterConfig, DeadLetterSink, DeadLetterTopics, Origin, PublishError,
    QueueSettings, SubscribeError, Subscriber, Topic,
};
use crate::stats::{ClientStats, MemoryStats, NodeStats};
pub(crate) use crate::stats::{DrainState, DrainStatus};
use crate::storage::StorageError;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Dead letters moved back per step of a redrive without a rate.
const REDRIVE_BATCH: usize = 1024;

/// What the broker tells, and asks of, the brokers around it: the lookupd registrations
/// implement it, so this core knows nothing of lookupds.
pub(crate) trait Cluster: Send + Sync + fmt::Debug {
    /// A topic, or one of its channels, was created or deleted. Never blocks.
    fn topic_changed(&self, topic: &str);

    /// Whether the cluster can be asked for topics' channels now (one atomic load).
    fn knows_channels(&self) -> bool;

    /// The non-ephemeral channels other brokers have for `topic`, as far as the cluster
    /// knows within its time limit.
    fn topic_channels<'a>(
        &'a self,
        topic: &'a str,
    ) -> Pin<Box<dyn Future<Output = Vec<String>> + Send + 'a>>;
}

/// Why a broker did not store messages a peer handed off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoffRefused {
    #[error("draining")]
    Draining,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The cluster of a broker on its own (tests, and the offline handoff of a data directory).
#[derive(Debug)]
pub(crate) struct Alone;

impl Cluster for Alone {
    fn topic_changed(&self, _: &str) {}

    fn knows_channels(&self) -> bool {
        false
    }

    fn topic_channels<'a>(
        &'a self,
        _: &'a str,
    ) -> Pin<Box<dyn Future<Output = Vec<String>> + Send + 'a>> {
        Box::pin(std::future::ready(Vec::new()))
    }
}

#[derive(Debug)]
pub(crate) struct Broker {
    pub(crate) options: Options,
    pub(crate) settings: Arc<QueueSettings>,
    pub(crate) start_time: i64,
    pub(crate) tcp_address: SocketAddr,
    pub(crate) http_address: SocketAddr,
    /// The handoff port peers are told (0 when the broker serves no handoff).
    pub(crate) handoff_port: u16,
    /// Whether the broker takes new work, and how a drain goes.
    lifecycle: Lifecycle,
    /// Told of every topic and channel change (the lookupd registrations).
    cluster: Arc<dyn Cluster>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes rewrites of the metadata file.
    metadata: Mutex<()>,
    /// Something the metadata records changed without a rewrite (dead-letter counts); the
    /// syncer's next full pass rewrites it.
    metadata_stale: AtomicBool,
}

/// Where the broker is between serving and leaving.
#[derive(Debug, Default)]
struct Lifecycle {
    /// A stop was asked for (SIGTERM): not ready any more.
    stopping: std::sync::atomic::AtomicBool,
    drain: Mutex<DrainStatus>,
    /// Wakes the drain task when a drain starts.
    drain_started: tokio::sync::Notify,
}

impl Broker {
    pub(crate) fn new(
        options: Options,
        settings: QueueSettings,
        tcp_address: SocketAddr,
        http_address: SocketAddr,
        handoff_port: u16,
        cluster: Arc<dyn Cluster>,
    ) -> Broker {
        Broker {
            settings: Arc::new(settings),
            options,
            start_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            tcp_address,
            http_address,
            handoff_port,
            lifecycle: Lifecycle::default(),
            cluster,
            topics: RwLock::new(BTreeMap::new()),
            metadata: Mutex::new(()),
            metadata_stale: AtomicBool::new(false),
        }
    }

    // --- lifecycle: ready, stopping, draining --------------------------------------------------

    /// Whether the broker takes new clients: not stopping and not draining (`/readyz`).
    pub(crate) fn is_ready(&self) -> bool {
        !self.is_draining()
            && !self
                .lifecycle
                .stopping
                .load(std::sync::atomic::Ordering::Acquire)
    }

    /// A stop was asked for: from now on the broker reports not ready.
    pub(crate) fn set_stopping(&self) {
        self.lifecycle
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.settings.is_draining()
    }

    /// Starts draining (idempotent; a drain cannot be undone): publishes and new topics and
    /// channels are refused from now on, and the drain task takes over. False when the broker
    /// was draining already.
    pub(crate) fn start_drain(&self) -> bool {
        let mut status = self.lock_drain();
        if self.is_draining() {
            return false;
        }
        self.settings.start_draining();
        status.state = DrainState::Draining;
        drop(status);
        tracing::info!("draining: publishes and new topics and channels are refused from now on");
        // Every waiter (the drain task, the one sending producers away) hears of it.
        self.lifecycle.drain_started.notify_waiters();
        true
    }

    /// Waits until a drain starts.
    pub(crate) async fn drain_started(&self) {
        loop {
            let started = self.lifecycle.drain_started.notified();
            if self.is_draining() {
                return;
            }
            started.await;
        }
    }

    fn lock_drain(&self) -> std::sync::MutexGuard<'_, DrainStatus> {
        self.lifecycle
            .drain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn drain_status(&self) -> DrainStatus {
        self.lock_drain().clone()
    }

    pub(crate) fn set_drain_status(&self, status: DrainStatus) {
        *self.lock_drain() = status;
    }

    /// Stores messages a peer handed off, in the same topic and channel (`channel` empty: the
    /// topic's own queue), creating them as needed.
    pub(crate) fn receive_handed(
        &self,
        topic: &str,
        channel: &str,
        handed: &[crate::queue::Handed],
    ) -> Result<(), HandoffRefused> {
        if self.is_draining() {
            return Err(HandoffRefused::Draining);
        }
        let t = self.topic(topic)?;
        if channel.is_empty() {
            t.store_handed(handed)?;
        } else if let Some(c) = self.create_channel(&t, channel)? {
            c.store_handed(handed)?;
        }
        Ok(())
    }

    /// Messages the broker still holds, over every topic and channel that is not ephemeral.
    pub(crate) fn messages_held(&self) -> u64 {
        self.topics()
            .iter()
            .filter(|t| !t.ephemeral)
            .map(|t| {
                t.holds()
                    + t.channels()
                        .iter()
                        .filter(|c| !c.ephemeral)
                        .map(|c| c.holds())
                        .sum::<u64>()
            })
            .sum()
    }

    /// A broker on `options.data_path` with no lookupds, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(options: Options) -> Broker {
        let counter = |name: &str| {
            prometheus::IntCounter::new(name, "test").unwrap_or_else(|e| panic!("{e}"))
        };
        let healthy =
            prometheus::IntGauge::new("healthy", "test").unwrap_or_else(|e| panic!("{e}"));
        let health = crate::health::Health::new(healthy, counter("write_errors"));
        let damage = crate::queue::DamageCounters {
            records: counter("damaged_records"),
            bytes: counter("damaged_bytes"),
        };
        let disk = crate::storage::DiskQueueOptions::default();
        let settings = QueueSettings::new(&options, disk, health, damage);
        let address = SocketAddr::from(([127, 0, 0, 1], 0));
        Broker::new(options, settings, address, address, 0, Arc::new(Alone))
    }

    /// Lets channels store dead letters in this broker's topics; once, at start.
    pub(crate) fn connect_dead_letters(self: &Arc<Self>) {
        let topics: std::sync::Weak<Broker> = Arc::downgrade(self);
        self.settings.dead_letters.connect(topics);
    }

    /// Recreates the topics and channels of the metadata file, with their paused flags and
    /// whatever their disk queues hold.
    pub(crate) fn restore(&self) -> Result<(), PersistError> {
        let meta = Metadata::load(&self.options.data_path)?;
        for t in &meta.topics {
            if !proto::wire::names::is_valid_topic_name(t.name.as_bytes()) {
                tracing::warn!(topic = %t.name, "skipping invalid topic name in metadata");
                continue;
            }
            let topic = self.open_topic(&t.name)?;
            topic.set_paused(t.paused);
            for c in &t.channels {
                if !proto::wire::names::is_valid_channel_name(c.name.as_bytes()) {
                    continue;
                }
                if let Some((channel, _)) = topic.channel(&c.name)? {
                    channel.set_paused(c.paused);
                    let mut config = DeadLetterConfig {
                        max_attempts: c.max_attempts,
                        topic: c.dead_letter_topic.clone(),
                    };
                    if let Some(Err(e)) = config.topic.as_ref().map(|d| check_topic(d, &t.name)) {
                        tracing::warn!(topic = %t.name, channel = %c.name, dead_letter_topic = ?config.topic, error = %e, "ignoring an invalid dead-letter topic in metadata");
                        config.topic = None;
                    }
                    channel.restore_dead_letters(config, c.dead_lettered);
                }
            }
        }
        if !meta.topics.is_empty() {
            let (mut messages, mut deferred, mut channels) = (0u64, 0u64, 0usize);
            for topic in self
                .topics
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                let stats = topic.stats(None, false, None);
                messages += u64::try_from(stats.depth).unwrap_or(0);
                for c in &stats.channels {
                    channels += 1;
                    messages += u64::try_from(c.depth).unwrap_or(0);
                    deferred += c.deferred_count as u64;
                }
            }
            tracing::info!(
                topics = meta.topics.len(),
                channels,
                messages,
                deferred,
                "restored topics and channels from metadata: {messages} queued messages and \
                 {deferred} deferred recovered"
            );
        }
        Ok(())
    }

    /// The topic, created (and recorded in the metadata) if needed.
    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>, StorageError> {
        if let Some(t) = self.existing_topic(name) {
            return Ok(t);
        }
        let topic = self.open_topic(name)?;
        self.save_metadata();
        Ok(topic)
    }

    fn open_topic(&self, name: &str) -> Result<Arc<Topic>, StorageError> {
        self.open_topic_with(name, &[])
    }

    /// The topic, created with `channels` before anyone can publish to it if it is new.
    fn open_topic_with(&self, name: &str, channels: &[String]) -> Result<Arc<Topic>, StorageError> {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        let topic = Topic::open(name, self.settings.clone())?;
        for channel in channels {
            topic.channel(channel)?;
        }
        topics.insert(name.to_string(), topic.clone());
        drop(topics);
        tracing::info!(topic = %name, "new topic");
        self.cluster.topic_changed(name);
        Ok(topic)
    }

    // --- lookupd hooks (issue 4) -------------------------------------------------------------

    /// Before a client's command creates a topic this broker does not have: creates it with the
    /// non-ephemeral channels the lookupds know for it, so no message published here is lost
    /// for a channel that exists on other brokers (nsqd's GetTopic does the same). Returns at
    /// once when the topic exists or no lookupd is registered.
    pub(crate) async fn prepare_topic(&self, name: &str) {
        if !self.needs_prepare(name) {
            return;
        }
        let channels = self.cluster.topic_channels(name).await;
        if channels.is_empty() || self.existing_topic(name).is_some() {
            return;
        }
        tracing::info!(topic = %name, ?channels, "creating the topic with the channels the lookupds know");
        match self.open_topic_with(name, &channels) {
            Ok(_) => self.save_metadata(),
            Err(e) => {
                tracing::warn!(topic = %name, error = %e, "creating the topic with its known channels failed")
            }
        }
    }

    /// Whether creating `name` should wait for [`Broker::prepare_topic`] first.
    pub(crate) fn needs_prepare(&self, name: &str) -> bool {
        !self.is_draining() && self.cluster.knows_channels() && self.existing_topic(name).is_none()
    }

    /// Every topic with its channels, as registered with lookupds.
    pub(crate) fn registrations(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.topics()
            .iter()
            .map(|t| (t.name.clone(), t.channel_names()))
            .collect()
    }

    /// One topic's channels; `None` when there is no such topic.
    pub(crate) fn registration(&self, name: &str) -> Option<BTreeSet<String>> {
        self.existing_topic(name).map(|t| t.channel_names())
    }

    // ------------------------------------------------------------------------------------------

    pub(crate) fn existing_topic(&self, name: &str) -> Option<Arc<Topic>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.get(name).cloned()
    }

    pub(crate) fn topics(&self) -> Vec<Arc<Topic>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.values().cloned().collect()
    }

    /// Publishes to a topic, creating it if needed; retries once if the topic was being
    /// deleted meanwhile, so a publish never lands in a deleted topic.
    pub(crate) fn publish(
        &self,
        topic: &str,
        bodies: &[Bytes],
        defer: Duration,
    ) -> Result<Arc<Topic>, PublishError> {
        // Refused before the topic would be created.
        if self.is_draining() {
            return Err(PublishError::Draining);
        }
        let mut t = self.topic(topic)?;
        match t.publish(bodies, defer) {
            Err(PublishError::Exiting) => {
                t = self.topic(topic)?;
                t.publish(bodies, defer)?;
            }
            other => other?,
        }
        Ok(t)
    }

    /// Subscribes a consumer, creating the topic and channel as needed.
    pub(crate) fn subscribe(
        &self,
        topic: &str,
        channel: &str,
        subscriber: &Subscriber,
    ) -> Result<(Arc<Topic>, Arc<Channel>), SubscribeError> {
        if self.is_draining()
            && self
                .existing_topic(topic)
                .and_then(|t| t.existing_channel(channel))
                .is_none()
        {
            return Err(SubscribeError::Draining);
        }
        let t = self.topic(topic)?;
        let (c, created) = t.subscribe(channel, subscriber)?;
        if created {
            self.save_metadata();
            self.cluster.topic_changed(topic);
        }
        Ok((t, c))
    }

    /// Creates a channel of an existing topic; `None` when the topic is being deleted.
    pub(crate) fn create_channel(
        &self,
        topic: &Topic,
        channel: &str,
    ) -> Result<Option<Arc<Channel>>, StorageError> {
        let created = topic.channel(channel)?;
        if created.as_ref().is_some_and(|(_, new)| *new) {
            self.save_metadata();
            self.cluster.topic_changed(&topic.name);
        }
        Ok(created.map(|(c, _)| c))
    }

    pub(crate) fn delete_topic(&self, name: &str) -> bool {
        let removed = {
            let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
            topics.remove(name)
        };
        let Some(topic) = removed else {
            return false;
        };
        topic.delete();
        tracing::info!(topic = %name, "deleted topic");
        self.save_metadata();
        self.cluster.topic_changed(name);
        true
    }

    /// Deletes a channel; an ephemeral topic goes with its last channel, as in nsqd.
    pub(crate) fn delete_channel(&self, topic: &Arc<Topic>, channel: &str) -> bool {
        let deleted = topic.delete_channel(channel);
        if deleted {
            self.delete_topic_if_unused_ephemeral(topic);
            self.save_metadata();
            self.cluster.topic_changed(&topic.name);
        }
        deleted
    }

    pub(crate) fn set_topic_paused(&self, topic: &Topic, paused: bool) {
        topic.set_paused(paused);
        self.save_metadata();
    }

    /// Sets a channel's own dead-letter settings (checked by the caller) and records them.
    pub(crate) fn configure_dead_letters(&self, channel: &Channel, config: DeadLetterConfig) {
        channel.configure_dead_letters(config);
        self.save_metadata();
    }

    /// Moves up to `count` dead letters (by default, as many as are queued now) from the front
    /// of `channel` back into the channels they came from, at most `rate` a second. Returns
    /// how many were moved; on an error, also how many were moved before it.
    pub(crate) async fn redrive(
        &self,
        channel: &Channel,
        count: Option<u64>,
        rate: Option<u32>,
    ) -> Result<u64, (u64, RedriveError)> {
        let limit = count.unwrap_or_else(|| channel.depth());
        let batch = rate.map_or(REDRIVE_BATCH, |r| (r as usize / 10).clamp(1, REDRIVE_BATCH));
        let started = tokio::time::Instant::now();
        let mut moved = 0;
        while moved < limit {
            let want = batch.min(usize::try_from(limit - moved).unwrap_or(usize::MAX));
            let find = |origin: &Origin| {
                self.existing_topic(&origin.topic)?
                    .existing_channel(&origin.channel)
            };
            let n = channel.redrive(want, find).map_err(|e| (moved, e))?;
            if n == 0 {
                break;
            }
            moved += n as u64;
            match rate {
                Some(rate) => {
                    let due = Duration::from_secs_f64(moved as f64 / f64::from(rate));
                    tokio::time::sleep_until(started + due).await;
                }
                None => tokio::task::yield_now().await,
            }
        }
        if moved > 0 {
            tracing::info!(topic = %channel.topic_name, channel = %channel.name, moved, "dead letters redriven");
        }
        Ok(moved)
    }

    pub(crate) fn set_channel_paused(&self, topic: &Topic, channel: &str, paused: bool) -> bool {
        let found = topic.set_channel_paused(channel, paused);
        if found {
            self.save_metadata();
        }
        found
    }

    /// After a consumer of an ephemeral channel left: deletes the channel if it is unused,
    /// then its topic if that was ephemeral and lost its last channel.
    pub(crate) fn consumer_left(&self, topic: &Arc<Topic>, channel: &str) {
        topic.delete_channel_if_unused(channel);
        self.delete_topic_if_unused_ephemeral(topic);
        self.cluster.topic_changed(&topic.name);
    }

    /// Deletes an ephemeral topic that has lost its last channel (if it is still registered:
    /// a new one of the same name may have replaced it).
    fn delete_topic_if_unused_ephemeral(&self, topic: &Arc<Topic>) {
        if !topic.is_unused_ephemeral() {
            return;
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let same = topics
            .get(&topic.name)
            .is_some_and(|t| Arc::ptr_eq(t, topic));
        if same && topic.is_unused_ephemeral() {
            topics.remove(&topic.name);
            drop(topics);
            topic.delete();
            tracing::info!(topic = %topic.name, "deleted ephemeral topic");
        }
    }

    /// Rewrites the metadata file; a failure is logged and marks the broker unhealthy, the
    /// next change tries again.
    pub(crate) fn save_metadata(&self) {
        let _guard = self.metadata.lock().unwrap_or_else(|e| e.into_inner());
        self.metadata_stale.store(false, Relaxed);
        let meta = Metadata {
            topics: self.topics().iter().filter_map(|t| t.meta()).collect(),
            version: NSQ_COMPAT_VERSION.to_string(),
        };
        match meta.save(&self.options.data_path) {
            Ok(()) => self.settings.health.write_succeeded(),
            Err(e) => self.settings.health.write_failed(&e),
        }
    }

    /// Clean shutdown: every topic's and channel's memory to disk, synced; then the metadata.
    /// Moves of dead letters stop first, so none lands in a queue already stored.
    pub(crate) fn persist(&self) {
        self.settings.dead_letters.close();
        for topic in self.topics() {
            if let Err(e) = topic.persist() {
                tracing::error!(topic = %topic.name, error = %e, "writing queues to disk at shutdown failed");
            }
        }
        self.save_metadata();
    }

    /// Deletes every topic (their disk queues with them) and the metadata file and lock: what
    /// is left of a data directory after an offline handoff. Only files knsq made go.
    pub(crate) fn delete_everything(&self) -> Result<(), PersistError> {
        for topic in self.topics() {
            self.delete_topic(&topic.name);
        }
        let dir = &self.options.data_path;
        for file in [Metadata::path(dir), dir.join("knsq-broker.lock")] {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(PersistError::io("remove", &file)(e)),
            }
        }
        Ok(())
    }

    /// Fsyncs every disk queue that changed; false when any fsync failed. `full` also stores
    /// read positions and deletes consumed segments (see `QueueSettings::sync`).
    pub(crate) fn sync_disks(&self, full: bool) -> bool {
        let passes = &self.settings.disk.passes;
        let pass = passes.begin();
        let mut ok = true;
        for topic in self.topics() {
            ok &= topic.sync(full);
        }
        if ok {
            passes.completed_ok(pass);
        }
        if full && self.metadata_stale.load(Relaxed) {
            self.save_metadata();
        }
        ok
    }

    /// In `--sync-publish` mode, waits until what was just published is fsynced; false when
    /// that fsync failed. Returns at once otherwise.
    pub(crate) async fn published_durably(&self) -> bool {
        if !self.settings.sync_publish {
            return true;
        }
        let ticket = self.settings.commits.ticket();
        self.settings.commits.wait(ticket).await
    }

    /// `/stats`: filtered like nsqd's (an unknown topic gives `null` topics). `producers`
    /// lists the clients that published (to `topic`, when given).
    pub(crate) fn stats(
        &self,
        topic: Option<&str>,
        channel: Option<&str>,
        include_clients: bool,
        include_mem: bool,
        producers: impl FnOnce(Option<&str>) -> Option<Vec<ClientStats>>,
    ) -> NodeStats {
        let topics = match topic {
            None => Some(self.topics()),
            Some(name) => self.existing_topic(name).map(|t| vec![t]),
        };
        let found = topics.is_some();
        let topics = topics.map(|ts| {
            ts.iter()
                .filter(|t| channel.is_none_or(|c| t.existing_channel(c).is_some()))
                .map(|t| t.stats(channel, include_clients, topic))
                .collect()
        });
        NodeStats {
            version: NSQ_COMPAT_VERSION,
            health: self.settings.health.status(),
            start_time: self.start_time,
            topics,
            memory: include_mem.then(MemoryStats::current),
            // nsqd returns before listing producers when the topic filter matches nothing.
            producers: (include_clients && found)
                .then(|| producers(topic))
                .flatten(),
            drain: self.is_draining().then(|| self.drain_status()),
        }
    }
}

/// Channels reach the broker's topics through this to store dead letters.
impl DeadLetterTopics for Broker {
    fn dead_letter_topic(&self, name: &str) -> Result<Arc<dyn DeadLetterSink>, StorageError> {
        // Channels only name topics that were checked; still, never make an invalid one.
        if !proto::wire::names::is_valid_topic_name(name.as_bytes()) {
            return Err(StorageError::InvalidName {
                name: name.to_string(),
            });
        }
        Ok(self.topic(name)?)
    }

    fn dead_letters_counted(&self) {
        self.metadata_stale.store(true, Relaxed);
    }
}
