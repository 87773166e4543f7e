//! The `knsq.cluster.v1.Registry` gRPC service on `--grpc-address`: brokers register over
//! one stream each, and ask which channels a topic has. Over TLS when `--grpc-tls-cert` is
//! given.

mod validate;

use crate::directory::Directory;
use crate::registry::{PeerInfo, RegistryError, SessionId};
use proto::cluster::v1::registry_server::{Registry, RegistryServer};
use proto::cluster::v1::{
    Ack, BrokerAddress, BrokerMessage, BrokersRequest, BrokersResponse, Identified, LookupdMessage,
    TopicChannelsRequest, TopicChannelsResponse, lookupd_message,
};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;
use validate::{Event, InvalidMessage};

/// Replies waiting for a broker to read them. Each message gets exactly one small reply and
/// a broker reads them as they come, so a few dozen is plenty; when full, the stream stops
/// reading the broker's messages until it catches up (backpressure, not loss).
const REPLY_BUFFER: usize = 32;

/// Room for the snapshot of a broker with tens of thousands of topics and channels (names
/// are at most 64 bytes); tonic's default is 4 MiB.
const MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct RegistryService {
    directory: Arc<Directory>,
    shutdown: CancellationToken,
}

/// The gRPC server as the options configure it: plain, TLS or mutual TLS. Built before the
/// lookupd says it listens, so a TLS setup that fails ends the start.
pub(crate) fn server(config: &crate::Config) -> Result<Server, crate::LookupdError> {
    let server = Server::builder();
    match config.grpc_tls.clone() {
        Some(tls) => {
            let mutual = if config.options.grpc_tls_client_ca_file.is_some() {
                "required"
            } else {
                "not asked for"
            };
            tracing::info!("GRPC: TLS on, broker certificates {mutual}");
            Ok(server.tls_config(tls)?)
        }
        None => Ok(server),
    }
}

/// Serves the registry on an already-bound listener until `shutdown`; open streams are ended
/// with `UNAVAILABLE` so brokers reconnect elsewhere or later.
pub(crate) async fn serve(
    server: Server,
    listener: TcpListener,
    directory: Arc<Directory>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let service = RegistryService {
        directory,
        shutdown: shutdown.clone(),
    };
    server
        // A broker whose connection vanished without a FIN or RST (a partition, a dead node)
        // stops answering pings; its stream then ends and its registrations go, well before
        // --inactive-producer-timeout would hide it.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(RegistryServer::new(service).max_decoding_message_size(MAX_MESSAGE_SIZE))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}

#[tonic::async_trait]
impl Registry for RegistryService {
    type RegisterStream = ReceiverStream<Result<LookupdMessage, Status>>;

    async fn register(
        &self,
        request: Request<Streaming<BrokerMessage>>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (session, taken_over) = self.directory.open_stream();
        let (replies, rx) = mpsc::channel(REPLY_BUFFER);
        let stream = Session {
            directory: self.directory.clone(),
            id: session,
            remote,
            identified: false,
            sequence: 0,
            replies,
        };
        let span = tracing::info_span!("stream", session, remote = %stream.remote);
        tokio::spawn(
            stream
                .run(request.into_inner(), self.shutdown.clone(), taken_over)
                .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn topic_channels(
        &self,
        request: Request<TopicChannelsRequest>,
    ) -> Result<Response<TopicChannelsResponse>, Status> {
        let started = Instant::now();
        let result = validate::topic("topic", request.into_inner().topic)
            .map_err(|e| Status::invalid_argument(e.to_string()))
            .map(|topic| {
                let channels = self.directory.read(|r| {
                    r.channels(&topic)
                        .into_iter()
                        .map(String::from)
                        .collect::<Vec<_>>()
                });
                Response::new(TopicChannelsResponse { channels })
            });
        let metrics = &self.directory.metrics;
        metrics.grpc_latency("TopicChannels", started.elapsed());
        metrics.grpc_call(
            "TopicChannels",
            result.as_ref().map_or_else(Status::code, |_| Code::Ok),
        );
        result
    }

    async fn brokers(
        &self,
        _request: Request<BrokersRequest>,
    ) -> Result<Response<BrokersResponse>, Status> {
        let started = Instant::now();
        let now = SystemTime::now();
        let brokers = self.directory.read(|r| {
            r.nodes(now)
                .into_iter()
                .map(|node| BrokerAddress {
                    broadcast_address: node.info.broadcast_address.clone(),
                    tcp_port: u32::from(node.info.tcp_port),
                    http_port: u32::from(node.info.http_port),
                    handoff_port: u32::from(node.info.handoff_port),
                })
                .collect()
        });
        let metrics = &self.directory.metrics;
        metrics.grpc_latency("Brokers", started.elapsed());
        metrics.grpc_call("Brokers", Code::Ok);
        Ok(Response::new(BrokersResponse { brokers }))
    }
}

/// One broker's registration stream.
struct Session {
    directory: Arc<Directory>,
    id: SessionId,
    remote: String,
    identified: bool,
    sequence: u64,
    replies: mpsc::Sender<Result<LookupdMessage, Status>>,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<BrokerMessage>,
        shutdown: CancellationToken,
        taken_over: CancellationToken,
    ) {
        let end: Result<(), Status> = loop {
            // Each branch is cancel-safe: `Streaming::message` keeps partial frames in the
            // stream itself.
            let message = tokio::select! {
                _ = shutdown.cancelled() => break Err(Status::unavailable("lookupd is shutting down")),
                _ = taken_over.cancelled() => break Err(superseded()),
                // The broker went away (killed, connection reset) and its reply stream with it.
                _ = self.replies.closed() => break Err(gone()),
                message = inbound.message() => message,
            };
            let reply = match message {
                Ok(Some(message)) => self.apply(message),
                // The broker closed its side: it leaves.
                Ok(None) => break Ok(()),
                // The connection broke (broker killed, network gone).
                Err(status) => break Err(status),
            };
            let reply = match reply {
                Ok(reply) => reply,
                Err(status) => break Err(status),
            };
            tokio::select! {
                sent = self.replies.send(Ok(reply)) => if sent.is_err() { break Err(gone()) },
                _ = shutdown.cancelled() => break Err(Status::unavailable("lookupd is shutting down")),
                _ = taken_over.cancelled() => break Err(superseded()),
            }
        };
        let code = end.as_ref().map_or_else(Status::code, |_| Code::Ok);
        match &end {
            Err(status) if status.code() == Code::InvalidArgument => {
                tracing::warn!(error = status.message(), "refused a broker's message");
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), error = status.message(), "stream ended")
            }
            Ok(()) => tracing::debug!("stream closed by the broker"),
        }
        self.directory.close_stream(self.id, code);
        if let Err(status) = end {
            // The broker may be gone already; then there is nobody to tell.
            let _ = self.replies.try_send(Err(status));
        }
    }

    /// Applies one message; the reply to send, or the status that ends the stream.
    fn apply(&mut self, message: BrokerMessage) -> Result<LookupdMessage, Status> {
        let started = Instant::now();
        let event = validate::event(message, &self.remote).map_err(invalid)?;
        self.directory.metrics.grpc_message(event.kind());
        self.sequence += 1;
        let reply = self.apply_event(event, SystemTime::now());
        self.directory
            .metrics
            .grpc_latency("Register", started.elapsed());
        reply.map(|kind| LookupdMessage { kind: Some(kind) })
    }

    fn apply_event(
        &mut self,
        event: Event,
        now: SystemTime,
    ) -> Result<lookupd_message::Kind, Status> {
        let session = self.id;
        let kind = event.kind();
        let applied = match event {
            Event::Identify(_) if self.identified => {
                return Err(invalid(InvalidMessage::AlreadyIdentified));
            }
            Event::Identify(peer) => return Ok(self.identify(peer, now)),
            _ if !self.identified => return Err(invalid(InvalidMessage::NotIdentified(kind))),
            Event::Snapshot(topics) => self.directory.update(|r| r.snapshot(session, &topics, now)),
            Event::RegisterTopic(topic) => self
                .directory
                .update(|r| r.register_topic(session, &topic, now)),
            Event::UnregisterTopic(topic) => self
                .directory
                .update(|r| r.unregister_topic(session, &topic, now)),
            Event::RegisterChannel(topic, channel) => self
                .directory
                .update(|r| r.register_channel(session, &topic, &channel, now)),
            Event::UnregisterChannel(topic, channel) => self
                .directory
                .update(|r| r.unregister_channel(session, &topic, &channel, now)),
            Event::Heartbeat => self.directory.update(|r| r.heartbeat(session, now)),
        };
        applied.map_err(|RegistryError::UnknownSession(_)| superseded())?;
        Ok(lookupd_message::Kind::Ack(Ack {
            sequence: self.sequence,
        }))
    }

    fn identify(&mut self, peer: PeerInfo, now: SystemTime) -> lookupd_message::Kind {
        tracing::info!(
            broker = %peer.id(),
            node_id = peer.node_id,
            version = %peer.version,
            "broker registered"
        );
        let session = self.id;
        if let Some(old) = self.directory.update(|r| r.identify(session, peer, now)) {
            tracing::info!(
                old_session = old,
                "a newer stream of this broker takes over"
            );
            self.directory.end_stream(old);
        }
        self.identified = true;
        let info = &self.directory.info;
        lookupd_message::Kind::Identified(Identified {
            broadcast_address: info.broadcast_address.clone(),
            hostname: info.hostname.clone(),
            grpc_port: info.grpc_port.into(),
            http_port: info.http_port.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }
}

fn invalid(e: InvalidMessage) -> Status {
    Status::invalid_argument(e.to_string())
}

fn gone() -> Status {
    Status::cancelled("the broker went away")
}

fn superseded() -> Status {
    Status::aborted("superseded by a newer stream of the same broker")
}
