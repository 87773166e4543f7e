//! The directory of brokers, topics and channels: nsqlookupd's registration DB, with no I/O.
//!
//! Brokers are registered through sessions (one per gRPC stream) and known by their
//! identity, `broadcast_address:tcp_port`, so a broker that reconnects before its old stream
//! is noticed dead takes its registrations over instead of being listed twice. Topic and
//! channel keys outlive their producers (nsqlookupd keeps them until deleted through the HTTP
//! API), except ephemeral ones, which go with their last producer.
//!
//! Time is always passed in, so expiry is tested without waiting: a producer silent for longer
//! than the inactivity timeout is hidden from lookups, and a tombstoned one is hidden from
//! `/lookup` of that topic for the tombstone lifetime.

mod view;

pub use view::{DebugEntry, DebugProducer, Lookup, Node};

use proto::wire::names::is_ephemeral;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime};

/// One registration stream of one broker.
pub type SessionId = u64;

/// What a broker tells about itself when it identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The address the broker's stream comes from, as the lookupd sees it.
    pub remote_address: String,
    pub hostname: String,
    pub broadcast_address: String,
    pub tcp_port: u16,
    pub http_port: u16,
    pub version: String,
    pub node_id: u16,
    pub topology_zone: String,
    pub topology_region: String,
    /// The broker's Handoff port; 0 when it serves none.
    pub handoff_port: u16,
}

impl PeerInfo {
    pub fn id(&self) -> BrokerId {
        BrokerId {
            broadcast_address: self.broadcast_address.clone(),
            tcp_port: self.tcp_port,
        }
    }

    /// How `/topic/tombstone` names a node: `<broadcast_address>:<http_port>`.
    pub fn http_node(&self) -> String {
        format!("{}:{}", self.broadcast_address, self.http_port)
    }
}

/// A broker's identity: where clients reach it over NSQ TCP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BrokerId {
    pub broadcast_address: String,
    pub tcp_port: u16,
}

impl fmt::Display for BrokerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.broadcast_address, self.tcp_port)
    }
}

/// The two timeouts of nsqlookupd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// `--inactive-producer-timeout`: a producer silent this long is hidden.
    pub inactive_producer_timeout: Duration,
    /// `--tombstone-lifetime`: how long a tombstoned producer is hidden from `/lookup`.
    pub tombstone_lifetime: Duration,
}

impl Default for Lifetimes {
    fn default() -> Lifetimes {
        Lifetimes {
            inactive_producer_timeout: Duration::from_secs(300),
            tombstone_lifetime: Duration::from_secs(45),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The session never identified, was taken over by a newer one, or has ended.
    #[error("session {0} is not registered (not identified, superseded or ended)")]
    UnknownSession(SessionId),
}

/// The counts `/metrics` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub brokers: usize,
    pub topics: usize,
    pub channels: usize,
}

#[derive(Debug)]
struct Producer {
    session: SessionId,
    info: PeerInfo,
    last_update: SystemTime,
}

/// A producer's registration of one topic.
#[derive(Debug, Clone, Copy, Default)]
struct TopicProducer {
    tombstoned_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct TopicEntry {
    producers: BTreeMap<BrokerId, TopicProducer>,
    channels: BTreeMap<String, BTreeSet<BrokerId>>,
}

#[derive(Debug, Default)]
pub struct Registry {
    lifetimes: Lifetimes,
    producers: BTreeMap<BrokerId, Producer>,
    sessions: HashMap<SessionId, BrokerId>,
    topics: BTreeMap<String, TopicEntry>,
}

impl Registry {
    pub fn new(lifetimes: Lifetimes) -> Registry {
        Registry {
            lifetimes,
            ..Registry::default()
        }
    }

    pub fn lifetimes(&self) -> Lifetimes {
        self.lifetimes
    }

    /// Registers the broker of `session`. A broker already registered under the same
    /// identity by another session is taken over, its topics and channels kept until the new
    /// session's snapshot; the older session is returned so its stream can be ended.
    pub fn identify(
        &mut self,
        session: SessionId,
        info: PeerInfo,
        now: SystemTime,
    ) -> Option<SessionId> {
        let id = info.id();
        let producer = Producer {
            session,
            info,
            last_update: now,
        };
        let superseded = self
            .producers
            .insert(id.clone(), producer)
            .map(|old| old.session)
            .filter(|&old| old != session);
        if let Some(old) = superseded {
            self.sessions.remove(&old);
        }
        self.sessions.insert(session, id);
        superseded
    }

    /// Marks the session's broker alive.
    pub fn heartbeat(&mut self, session: SessionId, now: SystemTime) -> Result<(), RegistryError> {
        self.touch(session, now).map(|_| ())
    }

    /// Replaces everything the session's broker registered with `topics` and their channels.
    /// Tombstones of topics it keeps are kept.
    pub fn snapshot(
        &mut self,
        session: SessionId,
        topics: &[(String, Vec<String>)],
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        let id = self.touch(session, now)?;
        let wanted: BTreeMap<&str, BTreeSet<&str>> = topics
            .iter()
            .map(|(topic, channels)| (topic.as_str(), channels.iter().map(String::as_str)))
            .fold(BTreeMap::new(), |mut wanted, (topic, channels)| {
                wanted.entry(topic).or_default().extend(channels);
                wanted
            });
        let registered: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, entry)| entry.producers.contains_key(&id))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in &registered {
            match wanted.get(topic.as_str()) {
                None => self.remove_topic_producer(topic, &id),
                Some(channels) => {
                    let stale: Vec<String> = self.topics[topic]
                        .channels
                        .iter()
                        .filter(|(c, ps)| ps.contains(&id) && !channels.contains(c.as_str()))
                        .map(|(c, _)| c.clone())
                        .collect();
                    for channel in stale {
                        self.remove_channel_producer(topic, &channel, &id);
                    }
                }
            }
        }
        for (topic, channels) in wanted {
            self.add_topic_producer(topic, &id);
            for channel in channels {
                self.add_channel_producer(topic, channel, &id);
            }
        }
        Ok(())
    }

    pub fn register_topic(
        &mut self,
        session: SessionId,
        topic: &str,
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        let id = self.touch(session, now)?;
        self.add_topic_producer(topic, &id);
        Ok(())
    }

    /// Also unregisters the broker's channels of the topic, as nsqlookupd does.
    pub fn unregister_topic(
        &mut self,
        session: SessionId,
        topic: &str,
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        let id = self.touch(session, now)?;
        self.remove_topic_producer(topic, &id);
        Ok(())
    }

    /// Also registers the topic, as nsqlookupd does.
    pub fn register_channel(
        &mut self,
        session: SessionId,
        topic: &str,
        channel: &str,
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        let id = self.touch(session, now)?;
        self.add_topic_producer(topic, &id);
        self.add_channel_producer(topic, channel, &id);
        Ok(())
    }

    pub fn unregister_channel(
        &mut self,
        session: SessionId,
        topic: &str,
        channel: &str,
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        let id = self.touch(session, now)?;
        self.remove_channel_producer(topic, channel, &id);
        Ok(())
    }

    /// Ends a session: its broker and all its registrations go at once. Returns the broker,
    /// or `None` when the session was not (or no longer) the broker's current one.
    pub fn remove_session(&mut self, session: SessionId) -> Option<PeerInfo> {
        let id = self.sessions.remove(&session)?;
        let topics: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, entry)| {
                entry.producers.contains_key(&id)
                    || entry.channels.values().any(|ps| ps.contains(&id))
            })
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in topics {
            self.remove_topic_producer(&topic, &id);
        }
        self.producers.remove(&id).map(|p| p.info)
    }

    /// `POST /topic/create`: a topic key without producers.
    pub fn create_topic(&mut self, topic: &str) {
        self.topics.entry(topic.to_string()).or_default();
    }

    /// `POST /topic/delete`: the topic key and its channel keys, whoever produces them.
    pub fn delete_topic(&mut self, topic: &str) {
        self.topics.remove(topic);
    }

    /// `POST /channel/create`: the channel key and its topic key.
    pub fn create_channel(&mut self, topic: &str, channel: &str) {
        self.topics
            .entry(topic.to_string())
            .or_default()
            .channels
            .entry(channel.to_string())
            .or_default();
    }

    /// `POST /channel/delete`: false when there was no such channel key.
    pub fn delete_channel(&mut self, topic: &str, channel: &str) -> bool {
        self.topics
            .get_mut(topic)
            .is_some_and(|entry| entry.channels.remove(channel).is_some())
    }

    /// `POST /topic/tombstone`: tombstones, for `topic`, the producers whose
    /// `broadcast_address:http_port` is `node`. Returns how many there were.
    pub fn tombstone(&mut self, topic: &str, node: &str, now: SystemTime) -> usize {
        let Some(entry) = self.topics.get_mut(topic) else {
            return 0;
        };
        let mut count = 0;
        for (id, registration) in &mut entry.producers {
            if self
                .producers
                .get(id)
                .is_some_and(|p| p.info.http_node() == node)
            {
                registration.tombstoned_at = Some(now);
                count += 1;
            }
        }
        count
    }

    pub fn counts(&self) -> Counts {
        Counts {
            brokers: self.producers.len(),
            topics: self.topics.len(),
            channels: self.topics.values().map(|e| e.channels.len()).sum(),
        }
    }

    /// The broker registered by `session`, if the session is current.
    pub fn session_broker(&self, session: SessionId) -> Option<&PeerInfo> {
        let id = self.sessions.get(&session)?;
        self.producers.get(id).map(|p| &p.info)
    }

    fn touch(&mut self, session: SessionId, now: SystemTime) -> Result<BrokerId, RegistryError> {
        let id = self
            .sessions
            .get(&session)
            .ok_or(RegistryError::UnknownSession(session))?;
        if let Some(producer) = self.producers.get_mut(id) {
            producer.last_update = now;
        }
        Ok(id.clone())
    }

    fn add_topic_producer(&mut self, topic: &str, id: &BrokerId) {
        self.topics
            .entry(topic.to_string())
            .or_default()
            .producers
            .entry(id.clone())
            .or_default();
    }

    fn add_channel_producer(&mut self, topic: &str, channel: &str, id: &BrokerId) {
        self.topics
            .entry(topic.to_string())
            .or_default()
            .channels
            .entry(channel.to_string())
            .or_default()
            .insert(id.clone());
    }

    /// Drops the producer from the topic and its channels; ephemeral keys left without
    /// producers go too.
    fn remove_topic_producer(&mut self, topic: &str, id: &BrokerId) {
        let Some(entry) = self.topics.get_mut(topic) else {
            return;
        };
        entry.producers.remove(id);
        for producers in entry.channels.values_mut() {
            producers.remove(id);
        }
        entry
            .channels
            .retain(|channel, producers| !(producers.is_empty() && is_ephemeral(channel)));
        if entry.producers.is_empty() && is_ephemeral(topic) {
            self.topics.remove(topic);
        }
    }

    fn remove_channel_producer(&mut self, topic: &str, channel: &str, id: &BrokerId) {
        let Some(producers) = self
            .topics
            .get_mut(topic)
            .and_then(|entry| entry.channels.get_mut(channel))
        else {
            return;
        };
        producers.remove(id);
        if producers.is_empty()
            && is_ephemeral(channel)
            && let Some(entry) = self.topics.get_mut(topic)
        {
            entry.channels.remove(channel);
        }
    }

    fn is_active(&self, producer: &Producer, now: SystemTime) -> bool {
        elapsed(producer.last_update, now) <= self.lifetimes.inactive_producer_timeout
    }

    fn is_tombstoned(&self, registration: &TopicProducer, now: SystemTime) -> bool {
        registration
            .tombstoned_at
            .is_some_and(|at| elapsed(at, now) < self.lifetimes.tombstone_lifetime)
    }
}

/// Time from `since` to `now`; zero if the clock went back.
fn elapsed(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests;
