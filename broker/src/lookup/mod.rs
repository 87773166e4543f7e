//! Registration with knsq-lookupds, so consumers find this broker through them exactly as
//! through nsqlookupd.
//!
//! One task per lookupd ([`peer`]) keeps a gRPC `Register` stream open: `Identify`, wait for
//! `Identified`, a `Snapshot` of every topic and channel (ephemeral ones included, as nsqd
//! registers them), then the changes as they happen and a `Heartbeat` every
//! `--lookupd-heartbeat-interval`; on any error it reconnects with backoff and jitter.
//!
//! The event path: every create or delete of a topic or channel in the broker calls
//! [`Lookup::changed`] with the topic's name. Each lookupd task owns a coalescing set of
//! changed topic names (at most one entry per topic, so its size is bounded by the number of
//! topics; the caller never waits). The task drains the set, compares each topic as the broker
//! has it now with what it last told its lookupd, and sends the difference ([`sync::diff`]).
//! Nothing can arrive out of order or be lost, however slow or absent a lookupd is; a
//! reconnect starts again from a snapshot.
//!
//! Pre-creation: before a client's command creates a topic, [`Lookup::topic_channels`] asks
//! every registered lookupd for the channels it knows (`TopicChannels`, one second at most in
//! all), and the broker creates the non-ephemeral ones with the topic.
//!
//! With `--lookupd-tls` (or any `--lookupd-tls-*` file) every connection is gRPC over TLS
//! ([`server_kit::tls::client`]), mutual when the broker has a client certificate.

mod backoff;
mod peer;
mod sync;

use crate::broker::{Broker, Cluster};
use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use proto::cluster::v1::TopicChannelsRequest;
use proto::cluster::v1::registry_client::RegistryClient;
use server_kit::tls::client::GrpcClientTls;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

/// The longest a topic's creation waits for the lookupds' `TopicChannels` answers, in all.
const TOPIC_CHANNELS_TIMEOUT: Duration = Duration::from_secs(1);

/// The broker's registrations with its lookupds.
#[derive(Debug)]
pub(crate) struct Lookup {
    heartbeat: Duration,
    metrics: LookupMetrics,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// How many lookupds this broker is registered with right now.
    registered: Arc<AtomicUsize>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// `--lookupd-grpc-address`, as given or as last set by `PUT /config/nsqlookupd_tcp_addresses`.
    addresses: Vec<String>,
    /// One task per distinct address.
    peers: BTreeMap<String, Peer>,
    /// Set by [`Lookup::start`]; tasks started later (runtime changes) need it.
    broker: Option<Weak<Broker>>,
    /// TLS from the `--lookupd-tls*` files, read when the flags were checked.
    tls: peer::Transport,
}

#[derive(Debug)]
struct Peer {
    stop: CancellationToken,
    link: Arc<Link>,
}

/// What the broker shares with one lookupd's task.
#[derive(Debug)]
struct Link {
    address: String,
    /// Topics changed since the task last looked (coalescing: a set, not a queue).
    changed: Mutex<HashSet<String>>,
    wake: Notify,
    /// The lookupd's client while registered, for `TopicChannels`.
    client: Mutex<Option<RegistryClient<Channel>>>,
}

impl Link {
    fn mark(&self, topic: &str) {
        let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        if !changed.contains(topic) {
            changed.insert(topic.to_string());
        }
        drop(changed);
        self.wake.notify_one();
    }

    fn take_changed(&self) -> HashSet<String> {
        std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn set_client(&self, client: Option<RegistryClient<Channel>>) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = client;
    }

    fn client(&self) -> Option<RegistryClient<Channel>> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Lookup {
    /// Registrations with `addresses`, started later by [`Lookup::start`]; the tasks end when
    /// `shutdown` is cancelled.
    pub(crate) fn new(
        addresses: Vec<String>,
        tls: Option<GrpcClientTls>,
        heartbeat: Duration,
        metrics: LookupMetrics,
        shutdown: CancellationToken,
    ) -> Lookup {
        Lookup {
            heartbeat,
            metrics,
            shutdown,
            tasks: TaskTracker::new(),
            registered: Arc::new(AtomicUsize::new(0)),
            state: Mutex::new(State {
                addresses,
                broker: None,
                peers: BTreeMap::new(),
                tls: match tls {
                    None => peer::Transport::Plain,
                    Some(tls) => peer::Transport::Tls(Arc::new(tls)),
                },
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one registration task per configured lookupd.
    pub(crate) fn start(&self, broker: &Arc<Broker>) {
        let mut state = self.lock();
        state.broker = Some(Arc::downgrade(broker));
        let addresses = state.addresses.clone();
        self.sync_peers(&mut state, &addresses);
    }

    /// The lookupd addresses, as `GET /config/nsqlookupd_tcp_addresses` shows them.
    pub(crate) fn addresses(&self) -> Vec<String> {
        self.lock().addresses.clone()
    }

    /// Replaces the lookupd list at runtime: registers with new lookupds and leaves the ones
    /// no longer listed (their stream ends, so they drop this broker at once).
    pub(crate) fn set_addresses(&self, addresses: Vec<String>) {
        let mut state = self.lock();
        tracing::info!(?addresses, "lookupd addresses changed");
        state.addresses = addresses.clone();
        self.sync_peers(&mut state, &addresses);
    }

    fn sync_peers(&self, state: &mut State, addresses: &[String]) {
        let wanted: BTreeSet<&str> = addresses.iter().map(|a| a.trim()).collect();
        state.peers.retain(|address, peer| {
            let keep = wanted.contains(address.as_str());
            if !keep {
                peer.stop.cancel();
                self.metrics.forget(address);
            }
            keep
        });
        let Some(broker) = state.broker.as_ref().and_then(Weak::upgrade) else {
            return;
        };
        for address in wanted {
            if address.is_empty() || state.peers.contains_key(address) {
                continue;
            }
            let link = Arc::new(Link {
                address: address.to_string(),
                changed: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                client: Mutex::new(None),
            });
            let stop = self.shutdown.child_token();
            let task = peer::PeerTask {
                link: link.clone(),
                broker: broker.clone(),
                heartbeat: self.heartbeat,
                tls: state.tls.clone(),
                metrics: self.metrics.clone(),
                registered: self.registered.clone(),
            };
            self.tasks.spawn(task.run(stop.clone()));
            state.peers.insert(address.to_string(), Peer { stop, link });
        }
    }

    /// Called after a topic, or one of its channels, was created or deleted. Never blocks
    /// on a lookupd.
    pub(crate) fn changed(&self, topic: &str) {
        let state = self.lock();
        for peer in state.peers.values() {
            peer.link.mark(topic);
        }
    }

    /// Whether this broker is registered with any lookupd right now (one atomic load).
    pub(crate) fn any_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed) > 0
    }

    /// The non-ephemeral channels the registered lookupds know for `topic`, asked of all of
    /// them at once and waited for at most [`TOPIC_CHANNELS_TIMEOUT`] in all; a lookupd that
    /// fails or is late is left out.
    pub(crate) async fn topic_channels(&self, topic: &str) -> Vec<String> {
        let clients: Vec<(String, RegistryClient<Channel>)> = {
            let state = self.lock();
            state
                .peers
                .values()
                .filter_map(|p| Some((p.link.address.clone(), p.link.client()?)))
                .collect()
        };
        if clients.is_empty() {
            return Vec::new();
        }
        let mut asks = tokio::task::JoinSet::new();
        for (address, mut client) in clients {
            let request = TopicChannelsRequest {
                topic: topic.to_string(),
            };
            asks.spawn(async move { (address, client.topic_channels(request).await) });
        }
        let mut channels = BTreeSet::new();
        let gathered = tokio::time::timeout(TOPIC_CHANNELS_TIMEOUT, async {
            while let Some(joined) = asks.join_next().await {
                match joined {
                    Ok((_, Ok(response))) => channels.extend(response.into_inner().channels),
                    Ok((lookupd, Err(status))) => {
                        tracing::warn!(%lookupd, %topic, %status, "TopicChannels failed");
                    }
                    Err(e) => tracing::warn!(%topic, error = %e, "TopicChannels task failed"),
                }
            }
        })
        .await;
        if gathered.is_err() {
            tracing::warn!(%topic, timeout = ?TOPIC_CHANNELS_TIMEOUT, "TopicChannels: some lookupds did not answer in time");
        }
        channels
            .into_iter()
            .filter(|c| {
                proto::wire::names::is_valid_channel_name(c.as_bytes())
                    && !proto::wire::names::is_ephemeral(c)
            })
            .collect()
    }

    /// Waits (at most `grace`) for the registration tasks to end after shutdown.
    pub(crate) async fn stopped(&self, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("lookupd registrations did not end in time");
        }
    }
}

impl Cluster for Lookup {
    fn topic_changed(&self, topic: &str) {
        self.changed(topic);
    }

    fn knows_channels(&self) -> bool {
        self.any_registered()
    }

    fn topic_channels<'a>(
        &'a self,
        topic: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Vec<String>> + Send + 'a>> {
        Box::pin(Lookup::topic_channels(self, topic))
    }
}

/// `knsq_lookupd_connected{address}` and `knsq_lookupd_reconnects_total{address}`.
#[derive(Debug, Clone)]
pub(crate) struct LookupMetrics {
    connected: IntGaugeVec,
    reconnects: IntCounterVec,
}

impl LookupMetrics {
    pub(crate) fn new() -> Result<LookupMetrics, prometheus::Error> {
        Ok(LookupMetrics {
            connected: IntGaugeVec::new(
                Opts::new(
                    "knsq_lookupd_connected",
                    "1 while this broker is registered with the lookupd at address, else 0",
                ),
                &["address"],
            )?,
            reconnects: IntCounterVec::new(
                Opts::new(
                    "knsq_lookupd_reconnects_total",
                    "Attempts to register again with a lookupd after a failure or a lost stream",
                ),
                &["address"],
            )?,
        })
    }

    pub(crate) fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.connected.clone()),
            Box::new(self.reconnects.clone()),
        ]
    }

    fn set_connected(&self, address: &str, up: bool) {
        self.connected
            .with_label_values(&[address])
            .set(i64::from(up));
    }

    fn reconnecting(&self, address: &str) {
        self.reconnects.with_label_values(&[address]).inc();
    }

    /// A lookupd removed from the list no longer shows.
    fn forget(&self, address: &str) {
        let _ = self.connected.remove_label_values(&[address]);
        let _ = self.reconnects.remove_label_values(&[address]);
    }
}
