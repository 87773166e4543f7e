//! The receiving side of a handoff: the `Handoff` gRPC service every broker serves on
//! `--handoff-address`. Each batch is stored in the same topic and channel (on disk, and
//! fsynced first in `--sync-publish` mode) before it is acknowledged; messages already stored
//! for the same sender are dropped as duplicates.

use crate::broker::{Broker, HandoffRefused};
use crate::queue::Handed;
use proto::cluster::v1::handoff_server::{Handoff, HandoffServer};
use proto::cluster::v1::{HandoffAck, HandoffBatch};
use proto::wire::MessageId;
use proto::wire::names::{is_valid_channel_name, is_valid_topic_name};
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// Acks waiting to go out: the sender has few batches in flight, so a small buffer is enough.
const ACK_BUFFER: usize = 16;
/// Message IDs remembered per sender to drop duplicates. Past this the memory is given back
/// (later duplicates are stored twice; nothing is lost).
const SEEN_PER_SENDER: usize = 2_000_000;
/// Largest batch taken, as a gRPC message.
pub(crate) const MAX_BATCH_BYTES: usize = 64 << 20;

/// A message as the receiver remembers it: its queue (hashed) and its ID.
type SeenKey = (u64, [u8; 16]);

#[derive(Debug)]
struct Receiver {
    broker: Arc<Broker>,
    seen: Mutex<HashMap<String, HashSet<SeenKey>>>,
    hasher: foldhash::fast::FixedState,
}

/// Serves `Handoff` on an already-bound listener until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let receiver = Receiver {
        broker,
        seen: Mutex::default(),
        hasher: foldhash::fast::FixedState::default(),
    };
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(
            HandoffServer::new(Service(Arc::new(receiver)))
                .max_decoding_message_size(MAX_BATCH_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}

impl Receiver {
    fn key(&self, topic: &str, channel: &str, id: &MessageId) -> SeenKey {
        (self.hasher.hash_one((topic, channel)), *id.as_bytes())
    }

    /// Stores one batch; returns how many of its messages were duplicates.
    async fn store(&self, batch: HandoffBatch) -> Result<u32, Status> {
        if self.broker.is_draining() {
            return Err(Status::unavailable("draining: hand off to another broker"));
        }
        let (topic, channel) = (batch.topic, batch.channel);
        if !is_valid_topic_name(topic.as_bytes()) {
            return Err(Status::invalid_argument(format!(
                "invalid topic name {topic:?}"
            )));
        }
        if !channel.is_empty() && !is_valid_channel_name(channel.as_bytes()) {
            return Err(Status::invalid_argument(format!(
                "invalid channel name {channel:?}"
            )));
        }
        let mut messages = Vec::with_capacity(batch.messages.len());
        for m in batch.messages {
            let id: [u8; 16] = m.id[..].try_into().map_err(|_| {
                Status::invalid_argument(format!("message id of {} bytes, not 16", m.id.len()))
            })?;
            let attempts = u16::try_from(m.attempts)
                .map_err(|_| Status::invalid_argument(format!("attempts {}", m.attempts)))?;
            messages.push(Handed::new(
                MessageId(id),
                m.timestamp,
                attempts,
                m.due_unix_ms.max(0),
                m.body,
                m.dead_letter,
            ));
        }
        let before = messages.len();
        {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(set) = seen.get(&batch.sender) {
                messages.retain(|h| !set.contains(&self.key(&topic, &channel, h.id())));
            }
        }
        let duplicates = (before - messages.len()) as u32;
        if !messages.is_empty() {
            self.broker
                .receive_handed(&topic, &channel, &messages)
                .map_err(|e| match e {
                    HandoffRefused::Draining => Status::unavailable("draining"),
                    HandoffRefused::Storage(e) => {
                        Status::resource_exhausted(format!("cannot store the batch: {e}"))
                    }
                })?;
            if !self.broker.published_durably().await {
                return Err(Status::resource_exhausted("fsync of the batch failed"));
            }
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let set = seen.entry(batch.sender).or_default();
            if set.len() + messages.len() > SEEN_PER_SENDER {
                set.clear();
                set.shrink_to_fit();
            }
            set.extend(messages.iter().map(|h| self.key(&topic, &channel, h.id())));
        }
        Ok(duplicates)
    }
}

/// The service: every stream is served by a task of its own, one batch after the other, so
/// acks go out in order.
#[derive(Debug)]
struct Service(Arc<Receiver>);

#[tonic::async_trait]
impl Handoff for Service {
    type TransferStream = ReceiverStream<Result<HandoffAck, Status>>;

    async fn transfer(
        &self,
        request: Request<Streaming<HandoffBatch>>,
    ) -> Result<Response<Self::TransferStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut batches = request.into_inner();
        let (acks, rx) = mpsc::channel(ACK_BUFFER);
        let receiver = self.0.clone();
        tokio::spawn(async move {
            loop {
                let batch = match batches.message().await {
                    Ok(Some(batch)) => batch,
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(%peer, %status, "handoff stream ended");
                        return;
                    }
                };
                let sequence = batch.sequence;
                let (topic, channel, count) = (
                    batch.topic.clone(),
                    batch.channel.clone(),
                    batch.messages.len(),
                );
                let answer = match receiver.store(batch).await {
                    Ok(duplicates) => {
                        tracing::debug!(%peer, %topic, %channel, count, duplicates, "handoff batch stored");
                        Ok(HandoffAck {
                            sequence,
                            duplicates,
                        })
                    }
                    Err(status) => {
                        tracing::warn!(%peer, %topic, %channel, %status, "handoff batch refused");
                        Err(status)
                    }
                };
                let refused = answer.is_err();
                if acks.send(answer).await.is_err() || refused {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
