//! The NSQ TCP protocol V2 server side: one connection's state machine ([`connection`]), its
//! outbox and writer task ([`outbox`], [`writer`]), IDENTIFY negotiation ([`identify`]), the
//! layers TLS and compression put on the stream ([`transport`]), and the clients as the rest
//! of the broker sees them ([`client`], [`clients`]).

mod client;
mod clients;
mod connection;
mod identify;
mod outbox;
mod transport;
mod writer;

pub(crate) use clients::Clients;

use crate::auth::AuthServers;
use crate::broker::Broker;
use prometheus::{IntCounter, IntGauge};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) broker: Arc<Broker>,
    pub(crate) clients: Arc<Clients>,
    /// The auth servers, when `--auth-http-address` turns authorization on.
    pub(crate) auth: Option<AuthServers>,
    /// TLS for clients, when `--tls-cert` and `--tls-key` are given.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// `--tls-required` covers TCP: only IDENTIFY until the connection is TLS.
    pub(crate) tls_required: bool,
    pub(crate) metrics: ConnectionMetrics,
}

/// `knsq_tcp_connections*`: connections as they come, go, and are refused.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionMetrics {
    pub(crate) open: IntGauge,
    pub(crate) accepted: IntCounter,
    /// Refused past `--max-connections`.
    pub(crate) refused: IntCounter,
}

impl ConnectionMetrics {
    fn opened(&self) {
        self.open.inc();
        self.accepted.inc();
    }

    fn closed(&self) {
        self.open.dec();
    }
}

/// Serves one TCP client until either side ends the connection or `shutdown` is cancelled.
pub(crate) async fn serve_tcp(stream: TcpStream, shared: Arc<Shared>, shutdown: CancellationToken) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    connection::serve(reader, writer, peer, shared, shutdown).await;
}
