//! The broker's shared state: its topics, its clients, and what every server reads.

use crate::config::{NSQ_COMPAT_VERSION, Options};
use crate::metrics::ServerMetrics;
use crate::protocol::Client;
use crate::queue::{PublishError, QueueSettings, Topic};
use crate::stats::{ClientStats, MemoryStats, NodeStats};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

#[derive(Debug)]
pub(crate) struct Broker {
    pub(crate) options: Options,
    pub(crate) settings: Arc<QueueSettings>,
    pub(crate) start_time: i64,
    pub(crate) tcp_address: SocketAddr,
    pub(crate) http_address: SocketAddr,
    pub(crate) metrics: ServerMetrics,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    next_client_id: AtomicU64,
}

impl Broker {
    pub(crate) fn new(
        options: Options,
        tcp_address: SocketAddr,
        http_address: SocketAddr,
        metrics: ServerMetrics,
    ) -> Broker {
        Broker {
            settings: Arc::new(QueueSettings::from_options(&options)),
            options,
            start_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            tcp_address,
            http_address,
            metrics,
            topics: RwLock::new(BTreeMap::new()),
            clients: Mutex::new(HashMap::new()),
            next_client_id: AtomicU64::new(1),
        }
    }

    /// The topic, created if needed.
    pub(crate) fn topic(&self, name: &str) -> Arc<Topic> {
        if let Some(t) = self.existing_topic(name) {
            return t;
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        topics
            .entry(name.to_string())
            .or_insert_with(|| {
                tracing::info!(topic = %name, "new topic");
                Topic::new(name, self.settings.clone())
            })
            .clone()
    }

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
        let mut t = self.topic(topic);
        match t.publish(bodies, defer) {
            Err(PublishError::Exiting) => {
                t = self.topic(topic);
                t.publish(bodies, defer)?;
            }
            other => other?,
        }
        Ok(t)
    }

    pub(crate) fn delete_topic(&self, name: &str) -> bool {
        let removed = {
            let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
            topics.remove(name)
        };
        match removed {
            Some(topic) => {
                topic.delete();
                tracing::info!(topic = %name, "deleted topic");
                true
            }
            None => false,
        }
    }

    /// After a consumer of an ephemeral channel left: deletes the channel if it is unused,
    /// then its topic if that was ephemeral and lost its last channel.
    pub(crate) fn consumer_left(&self, topic: &Arc<Topic>, channel: &str) {
        topic.delete_channel_if_unused(channel);
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

    pub(crate) fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Relaxed)
    }

    pub(crate) fn add_client(&self, client: Arc<Client>) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.insert(client.id, client);
    }

    pub(crate) fn remove_client(&self, id: u64) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.remove(&id);
    }

    /// Closes every client connection (shutdown).
    pub(crate) fn close_clients(&self) {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for client in clients.values() {
            client.close();
        }
    }

    /// TCP clients that have published; `None` when there are none, as nsqd's nil list.
    fn producers(&self, topic: Option<&str>) -> Option<Vec<ClientStats>> {
        let clients: Vec<Arc<Client>> = {
            let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            clients.values().cloned().collect()
        };
        let mut producers: Vec<ClientStats> = clients
            .iter()
            .filter(|c| c.has_published())
            .map(|c| c.stats(topic))
            .collect();
        producers.sort_by(|a, b| a.remote_address.cmp(&b.remote_address));
        (!producers.is_empty()).then_some(producers)
    }

    /// `/stats`: filtered like nsqd's (an unknown topic gives `null` topics).
    pub(crate) fn stats(
        &self,
        topic: Option<&str>,
        channel: Option<&str>,
        include_clients: bool,
        include_mem: bool,
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
            health: "OK".into(),
            start_time: self.start_time,
            topics,
            memory: include_mem.then(MemoryStats::current),
            // nsqd returns before listing producers when the topic filter matches nothing.
            producers: (include_clients && found)
                .then(|| self.producers(topic))
                .flatten(),
        }
    }
}
