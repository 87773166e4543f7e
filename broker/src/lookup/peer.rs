//! One lookupd: connect, register, keep it up to date, heartbeat; reconnect on any failure.

use super::backoff::Backoff;
use super::sync::{self, Registrations};
use super::{Link, LookupMetrics};
use crate::broker::Broker;
use crate::config::LOOKUPD_TLS_FLAG;
use proto::cluster::v1::registry_client::RegistryClient;
use proto::cluster::v1::{BrokerMessage, Heartbeat, Identify, LookupdMessage, lookupd_message};
use server_kit::tls::client::{GrpcClientTls, grpc_endpoint};
use server_kit::with_sources;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{MissedTickBehavior, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

/// How long the lookupd may take to answer `Identify`.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting to go out on the stream. The task itself is the only sender and never
/// holds a publisher up; a small buffer is enough to keep the HTTP/2 stream busy while a burst
/// of topic changes is being sent, and a full buffer just makes the task wait (reading acks).
const OUTBOUND: usize = 64;

/// How a broker talks to its lookupds.
#[derive(Debug, Clone)]
pub(super) enum Transport {
    Plain,
    Tls(Arc<GrpcClientTls>),
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("bad lookupd address: {0}")]
    Address(String),
    // tonic's transport errors say only "transport error" themselves; the reason, such as
    // a TLS handshake failure, is in their sources.
    #[error("cannot connect: {}", with_sources(.0))]
    Connect(#[source] tonic::transport::Error),
    #[error("{}", describe_status(.0))]
    Status(#[from] Status),
    /// A failure before registering that TLS on one side only, or a refused client
    /// certificate, would explain.
    #[error("{error}; {hint}")]
    Explained {
        error: Box<SessionError>,
        hint: &'static str,
    },
    #[error("the lookupd ended the stream")]
    Ended,
    #[error("no Identified answer within {0:?}")]
    IdentifyTimeout(Duration),
    #[error("expected Identified, got {0}")]
    Unexpected(String),
}

fn describe_status(status: &Status) -> String {
    let why = match status.code() {
        Code::Aborted => "another stream took over this broker's identity",
        Code::Unavailable => "lookupd unavailable or shutting down",
        Code::InvalidArgument => "lookupd refused a message",
        _ => "stream failed",
    };
    match status.source() {
        // A connection refused during the TLS handshake (say, a lookupd requiring a client
        // certificate) surfaces on the first call, its reason only in the sources.
        Some(source) => format!(
            "{why}: {:?} {}: {}",
            status.code(),
            status.message(),
            with_sources(source)
        ),
        None => format!("{why}: {:?} {}", status.code(), status.message()),
    }
}

/// What a failure to open the stream likely means. A TLS handshake with the wrong partner
/// fails in a way that names no cause: a TLS lookupd closes a plain connection, and one that
/// refuses a broker's client certificate (or its lack of one) closes the connection right
/// after the handshake (TLS 1.3 checks it last), so the first call fails with a closed
/// connection instead of the lookupd's alert.
fn explain(error: SessionError, tls: Option<&Arc<GrpcClientTls>>) -> SessionError {
    let transport = match &error {
        SessionError::Connect(e) => with_sources(e),
        SessionError::Status(status) => status.source().map(with_sources).unwrap_or_default(),
        _ => String::new(),
    };
    let hint = match tls {
        _ if transport.is_empty() || transport.contains("alert") => None,
        None if matches!(error, SessionError::Status(_)) => {
            Some("the lookupd may require TLS: see --lookupd-tls")
        }
        Some(_) if transport.contains("InvalidContentType") => {
            Some("the lookupd does not seem to speak TLS (its --grpc-tls-cert)")
        }
        Some(tls) if matches!(error, SessionError::Status(_)) => Some(if tls.has_identity() {
            "the lookupd may have refused the client certificate of --lookupd-tls-cert"
        } else {
            "the lookupd may require a client certificate: see --lookupd-tls-cert and --lookupd-tls-key"
        }),
        _ => None,
    };
    match hint {
        Some(hint) => SessionError::Explained {
            error: Box::new(error),
            hint,
        },
        None => error,
    }
}

pub(super) struct PeerTask {
    pub(super) link: Arc<Link>,
    pub(super) broker: Arc<Broker>,
    pub(super) heartbeat: Duration,
    pub(super) tls: Transport,
    pub(super) metrics: LookupMetrics,
    pub(super) registered: Arc<AtomicUsize>,
}

impl PeerTask {
    /// Registers with the lookupd until `stop`, reconnecting with backoff.
    pub(super) async fn run(self, stop: CancellationToken) {
        let address = self.link.address.clone();
        let mut backoff = Backoff::new();
        let mut failures = 0u32;
        self.metrics.set_connected(&address, false);
        tracing::info!(lookupd = %address, "registering with lookupd");
        loop {
            let mut registered = false;
            let result = tokio::select! {
                _ = stop.cancelled() => None,
                result = self.session(&mut registered) => Some(result),
            };
            self.link.set_client(None);
            if registered {
                self.registered.fetch_sub(1, Ordering::Relaxed);
            }
            let Some(result) = result else {
                tracing::info!(lookupd = %address, "left lookupd");
                return;
            };
            self.metrics.set_connected(&address, false);
            if registered {
                backoff.reset();
                failures = 0;
            }
            failures += 1;
            let delay = backoff.next_delay();
            let error = match result {
                Ok(()) => "the stream ended".to_string(),
                Err(e) => e.to_string(),
            };
            // A lost registration is news; repeated failures to connect are not.
            if registered || failures == 1 || failures.is_multiple_of(20) {
                tracing::warn!(lookupd = %address, %error, failures, retry_in = ?delay, "lookupd registration lost or failed; retrying");
            } else {
                tracing::debug!(lookupd = %address, %error, failures, retry_in = ?delay, "lookupd registration failed; retrying");
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    tracing::info!(lookupd = %address, "left lookupd");
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
            self.metrics.reconnecting(&address);
        }
    }

    fn identify(&self) -> Identify {
        let b = &self.broker;
        let o = &b.options;
        let port = |configured: u16, listening: u16| {
            u32::from(if configured == 0 {
                listening
            } else {
                configured
            })
        };
        Identify {
            broadcast_address: o.broadcast_address.clone(),
            tcp_port: port(o.broadcast_tcp_port, b.tcp_address.port()),
            http_port: port(o.broadcast_http_port, b.http_address.port()),
            version: server_kit::NSQ_COMPAT_VERSION.to_string(),
            node_id: u32::from(o.node_id),
            hostname: server_kit::flags::default_hostname(),
            topology_zone: o.topology_zone.clone(),
            topology_region: o.topology_region.clone(),
            handoff_port: u32::from(b.handoff_port),
        }
    }

    /// One registration stream, from connecting to its end (`Ok` when the lookupd closed it
    /// cleanly). Sets `registered` once the lookupd has answered `Identify`.
    async fn session(&self, registered: &mut bool) -> Result<(), SessionError> {
        let link = &self.link;
        let tls = match &self.tls {
            Transport::Plain => None,
            Transport::Tls(tls) => Some(tls),
        };
        // Runtime address changes are not validated as flags are: a mismatch shows here.
        let endpoint = grpc_endpoint(&link.address, tls.map(|t| &**t), LOOKUPD_TLS_FLAG)
            .map_err(SessionError::Address)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| explain(SessionError::Connect(e), tls))?;
        let mut client = RegistryClient::new(channel);
        let (outbound, rx) = mpsc::channel(OUTBOUND);
        // Queued before the call, so the lookupd has it as soon as the stream opens.
        let _ = outbound.send(self.identify().into()).await;
        let opened = timeout(IDENTIFY_TIMEOUT, async {
            let mut inbound = client.register(ReceiverStream::new(rx)).await?.into_inner();
            let reply = inbound.message().await?;
            Ok::<_, Status>((inbound, reply))
        })
        .await
        .map_err(|_| SessionError::IdentifyTimeout(IDENTIFY_TIMEOUT))?;
        let (inbound, reply) = opened.map_err(|status| explain(status.into(), tls))?;
        let identified = match reply.and_then(|m| m.kind) {
            Some(lookupd_message::Kind::Identified(identified)) => identified,
            Some(other) => return Err(SessionError::Unexpected(format!("{other:?}"))),
            None => return Err(SessionError::Ended),
        };
        let mut stream = Stream { outbound, inbound };

        link.set_client(Some(client));
        *registered = true;
        self.registered.fetch_add(1, Ordering::Relaxed);
        self.metrics.set_connected(&link.address, true);
        // Changes from here on are sent after the snapshot; earlier ones are in it.
        link.take_changed();
        let mut told: Registrations = self.broker.registrations();
        let topics = told.len();
        stream.send(sync::snapshot(&told).into()).await?;
        tracing::info!(
            lookupd = %link.address,
            lookupd_broadcast_address = %identified.broadcast_address,
            lookupd_version = %identified.version,
            topics,
            "registered with lookupd"
        );

        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.reset();
        loop {
            tokio::select! {
                _ = link.wake.notified() => {
                    let mut changed: Vec<String> = link.take_changed().into_iter().collect();
                    changed.sort();
                    for topic in changed {
                        let now = self.broker.registration(&topic);
                        for kind in sync::diff(&topic, now, &mut told) {
                            tracing::debug!(lookupd = %link.address, message = ?kind, "lookupd update");
                            stream.send(BrokerMessage { kind: Some(kind) }).await?;
                        }
                    }
                }
                _ = heartbeat.tick() => stream.send(Heartbeat {}.into()).await?,
                reply = stream.inbound.message() => Stream::check(reply)?,
            }
        }
    }
}

/// Both directions of a registration stream.
struct Stream {
    outbound: mpsc::Sender<BrokerMessage>,
    inbound: Streaming<LookupdMessage>,
}

impl Stream {
    /// Sends a message, reading the lookupd's acks meanwhile (so neither side can wait on the
    /// other with full buffers).
    async fn send(&mut self, message: BrokerMessage) -> Result<(), SessionError> {
        loop {
            tokio::select! {
                permit = self.outbound.reserve() => {
                    permit.map_err(|_| SessionError::Ended)?.send(message);
                    return Ok(());
                }
                reply = self.inbound.message() => Stream::check(reply)?,
            }
        }
    }

    /// Acks need nothing; the stream's end or an error ends the session.
    fn check(reply: Result<Option<LookupdMessage>, Status>) -> Result<(), SessionError> {
        match reply? {
            Some(_) => Ok(()),
            None => Err(SessionError::Ended),
        }
    }
}
