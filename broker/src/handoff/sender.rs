//! The sending side of a handoff: finding peer brokers (the `--handoff-peer` list, or the
//! brokers registered with the lookupds), keeping one `Transfer` stream open to each, and
//! sending batches round-robin so that the load is spread; a peer that refuses or fails is
//! left alone for a while and the next one is tried.

use crate::config::LOOKUPD_TLS_FLAG;
use crate::queue::Handed;
use proto::cluster::v1::handoff_client::HandoffClient;
use proto::cluster::v1::registry_client::RegistryClient;
use proto::cluster::v1::{BrokersRequest, HandedMessage, HandoffAck, HandoffBatch};
use server_kit::tls::client::{GrpcClientTls, grpc_endpoint};
use server_kit::with_sources;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// How long a peer has to store a batch and acknowledge it.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// A peer that failed is not tried again for this long.
const FAILED_PEER_PAUSE: Duration = Duration::from_secs(5);
/// How long asking a lookupd for the brokers may take.
const BROKERS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the peers found at the lookupds are used before asking them again: asking for
/// every batch would cost a connection per lookupd per batch.
const PEERS_REFRESH: Duration = Duration::from_secs(1);

/// Where peers come from.
#[derive(Debug, Clone)]
pub(crate) enum PeerSource {
    /// `--handoff-peer`.
    Listed(Vec<String>),
    /// The brokers the lookupds know, but this one (`myself`: broadcast address and TCP port).
    Lookupds {
        lookupds: Vec<String>,
        myself: (String, u16),
    },
}

/// The peers of one handoff and the streams open to them.
#[derive(Debug)]
pub(crate) struct Peers {
    source: PeerSource,
    /// TLS to peers and lookupds (`--lookupd-tls*`).
    tls: Option<Arc<GrpcClientTls>>,
    /// Who sends, the same across restarts: the receivers drop duplicates by it.
    sender: String,
    links: BTreeMap<String, Link>,
    /// Where the round-robin goes next.
    turn: usize,
    /// The peers last found, and when; forgotten when none of them took a batch.
    found: Option<(Instant, BTreeSet<String>)>,
}

#[derive(Debug, Default)]
struct Link {
    open: Option<OpenStream>,
    /// Not tried again before this, after a failure.
    paused_until: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Debug)]
struct OpenStream {
    batches: mpsc::Sender<HandoffBatch>,
    acks: Streaming<HandoffAck>,
    next_sequence: u64,
}

/// A batch stored by a peer.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) peer: String,
    pub(crate) duplicates: u32,
}

impl Peers {
    pub(crate) fn new(source: PeerSource, tls: Option<GrpcClientTls>, sender: String) -> Peers {
        Peers {
            source,
            tls: tls.map(Arc::new),
            sender,
            links: BTreeMap::new(),
            turn: 0,
            found: None,
        }
    }

    /// The peers' handoff addresses, asked again once [`PEERS_REFRESH`] has passed (or when
    /// none was found or none took the last batch).
    async fn current_addresses(&mut self) -> Result<BTreeSet<String>, String> {
        if let Some((at, found)) = &self.found
            && at.elapsed() < PEERS_REFRESH
        {
            return Ok(found.clone());
        }
        let found = self.addresses().await?;
        if !found.is_empty() {
            self.found = Some((Instant::now(), found.clone()));
        }
        Ok(found)
    }

    /// The peers' handoff addresses as of now.
    async fn addresses(&self) -> Result<BTreeSet<String>, String> {
        match &self.source {
            PeerSource::Listed(peers) => Ok(peers.iter().map(|p| p.trim().to_string()).collect()),
            PeerSource::Lookupds { lookupds, myself } => {
                let mut found = BTreeSet::new();
                let mut problems = Vec::new();
                for lookupd in lookupds {
                    match self.brokers_of(lookupd).await {
                        Ok(brokers) => found.extend(
                            brokers
                                .into_iter()
                                .filter(|b| {
                                    b.handoff_port != 0
                                        && (b.broadcast_address.as_str(), b.tcp_port)
                                            != (myself.0.as_str(), u32::from(myself.1))
                                })
                                .map(|b| format!("{}:{}", b.broadcast_address, b.handoff_port)),
                        ),
                        Err(e) => problems.push(format!("lookupd {lookupd}: {e}")),
                    }
                }
                if found.is_empty() && !problems.is_empty() {
                    return Err(problems.join("; "));
                }
                Ok(found)
            }
        }
    }

    async fn brokers_of(
        &self,
        lookupd: &str,
    ) -> Result<Vec<proto::cluster::v1::BrokerAddress>, String> {
        let endpoint = grpc_endpoint(lookupd, self.tls.as_deref(), LOOKUPD_TLS_FLAG)?;
        let asked = timeout(BROKERS_TIMEOUT, async {
            let channel = endpoint.connect().await.map_err(|e| with_sources(&e))?;
            let response = RegistryClient::new(channel)
                .brokers(BrokersRequest {})
                .await
                .map_err(|s| s.message().to_string())?;
            Ok::<_, String>(response.into_inner().brokers)
        })
        .await;
        asked.unwrap_or_else(|_| Err("no answer in time".into()))
    }

    /// Sends one batch to a peer and waits until it stored it: the peers are tried in turn
    /// from where the last batch went, skipping those that failed lately. The error says
    /// why no peer took it.
    pub(crate) async fn send(
        &mut self,
        topic: &str,
        channel: &str,
        batch: &[Handed],
    ) -> Result<Stored, String> {
        let addresses = self.current_addresses().await?;
        if addresses.is_empty() {
            return Err(match self.source {
                PeerSource::Listed(_) => "no --handoff-peer".into(),
                PeerSource::Lookupds { .. } => {
                    "no peer: no other broker with a handoff port is registered with the lookupds"
                        .into()
                }
            });
        }
        self.links.retain(|a, _| addresses.contains(a));
        let order: Vec<String> = addresses.into_iter().collect();
        let now = Instant::now();
        let mut problems = Vec::new();
        for i in 0..order.len() {
            let peer = &order[(self.turn + i) % order.len()];
            let link = self.links.entry(peer.clone()).or_default();
            if link.paused_until.is_some_and(|until| until > now) {
                problems.push(format!(
                    "{peer}: {}",
                    link.last_error.as_deref().unwrap_or("failed lately")
                ));
                continue;
            }
            match self.send_to(peer, topic, channel, batch).await {
                Ok(duplicates) => {
                    self.turn = (self.turn + i + 1) % order.len();
                    let link = self.links.entry(peer.clone()).or_default();
                    link.paused_until = None;
                    link.last_error = None;
                    return Ok(Stored {
                        peer: peer.clone(),
                        duplicates,
                    });
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "handoff to a peer failed; trying another");
                    let link = self.links.entry(peer.clone()).or_default();
                    link.open = None;
                    link.paused_until = Some(Instant::now() + FAILED_PEER_PAUSE);
                    link.last_error = Some(error.clone());
                    problems.push(format!("{peer}: {error}"));
                }
            }
        }
        self.found = None;
        Err(format!(
            "no peer can take the messages: {}",
            problems.join("; ")
        ))
    }

    async fn send_to(
        &mut self,
        peer: &str,
        topic: &str,
        channel: &str,
        batch: &[Handed],
    ) -> Result<u32, String> {
        if self.links.get(peer).is_none_or(|l| l.open.is_none()) {
            let open = self.open(peer).await?;
            self.links.entry(peer.to_string()).or_default().open = Some(open);
        }
        let Some(stream) = self.links.get_mut(peer).and_then(|l| l.open.as_mut()) else {
            return Err("no stream".into());
        };
        let sequence = stream.next_sequence;
        stream.next_sequence += 1;
        let messages = batch
            .iter()
            .map(|h| HandedMessage {
                id: bytes::Bytes::copy_from_slice(h.id().as_bytes()),
                timestamp: h.timestamp(),
                attempts: u32::from(h.attempts()),
                due_unix_ms: h.due_unix_ms,
                body: h.body().clone(),
                dead_letter: h.dead_letter(),
            })
            .collect();
        let message = HandoffBatch {
            sequence,
            sender: self.sender.clone(),
            topic: topic.to_string(),
            channel: channel.to_string(),
            messages,
        };
        stream
            .batches
            .send(message)
            .await
            .map_err(|_| "the stream closed".to_string())?;
        let ack = timeout(ACK_TIMEOUT, stream.acks.message())
            .await
            .map_err(|_| format!("no ack within {ACK_TIMEOUT:?}"))?
            .map_err(|status| format!("{}: {}", status.code(), status.message()))?
            .ok_or_else(|| "the peer ended the stream".to_string())?;
        if ack.sequence != sequence {
            return Err(format!(
                "ack for batch {}, expected {sequence}",
                ack.sequence
            ));
        }
        Ok(ack.duplicates)
    }

    async fn open(&self, peer: &str) -> Result<OpenStream, String> {
        let endpoint = grpc_endpoint(peer, self.tls.as_deref(), LOOKUPD_TLS_FLAG)?;
        let channel = endpoint.connect().await.map_err(|e| with_sources(&e))?;
        let mut client = HandoffClient::new(channel)
            .max_decoding_message_size(super::receiver::MAX_BATCH_BYTES)
            .max_encoding_message_size(super::receiver::MAX_BATCH_BYTES);
        // One batch in flight per peer: a small buffer suffices.
        let (batches, rx) = mpsc::channel(4);
        let acks = client
            .transfer(ReceiverStream::new(rx))
            .await
            .map_err(|status| format!("{}: {}", status.code(), status.message()))?
            .into_inner();
        Ok(OpenStream {
            batches,
            acks,
            next_sequence: 1,
        })
    }
}
