//! What the rest of the broker sees of a TCP client: its identity, counters and outbox. The
//! queues see it only as a [`Consumer`].

use super::outbox::{Outbox, Socket};
use crate::queue::{Consumer, ConsumerCounters, Flush};
use crate::stats::{ClientStats, PubCount};
use bytes::BytesMut;
use server_kit::tls::server::TlsSummary;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Settings a client negotiates with IDENTIFY.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) client_id: String,
    pub(crate) hostname: String,
    pub(crate) user_agent: String,
    /// `None` when the client disabled heartbeats.
    pub(crate) heartbeat_interval: Option<Duration>,
    /// Bytes buffered before a flush; 1 means no buffering.
    pub(crate) output_buffer_size: usize,
    /// Longest time a message waits in the buffer; zero means no timed flush.
    pub(crate) output_buffer_timeout: Duration,
    pub(crate) msg_timeout: Duration,
    pub(crate) sample_rate: u8,
    /// Where the client says it runs (IDENTIFY's `topology_region`/`topology_zone`), shown in
    /// `/stats` as nsqd does.
    pub(crate) topology_region: String,
    pub(crate) topology_zone: String,
}

/// What `/stats` shows of a client's AUTH.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthSummary {
    /// The auth server granted at least one authorization.
    pub(crate) authed: bool,
    pub(crate) identity: String,
    pub(crate) identity_url: String,
}

/// What `/stats` shows of the layers IDENTIFY put on the connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct TransportSummary {
    pub(crate) tls: Option<TlsSummary>,
    pub(crate) snappy: bool,
    pub(crate) deflate: bool,
}

#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) id: u64,
    pub(crate) remote_address: SocketAddr,
    pub(crate) connect_ts: i64,
    pub(crate) outbox: Outbox,
    /// Cancelled to close the connection (channel deleted, broker shutting down).
    pub(crate) closed: CancellationToken,
    /// Cancelled when the broker starts draining: a connection that is not a consumer closes
    /// as soon as it has answered what it read, so its client reconnects to another broker.
    pub(crate) leave_when_idle: CancellationToken,
    /// IDENTIFY changed how the writer should buffer and beat.
    pub(crate) settings_changed: Notify,
    counters: ConsumerCounters,
    /// nsqd's number for the connection's state, for `/stats`.
    state: AtomicI32,
    identity: Mutex<Identity>,
    auth: Mutex<AuthSummary>,
    transport: Mutex<TransportSummary>,
    /// Messages published per topic; nsqd reports the first topic only.
    pub_counts: Mutex<Vec<PubCount>>,
}

impl Client {
    pub(crate) fn new(
        id: u64,
        remote_address: SocketAddr,
        identity: Identity,
        socket: Socket,
        closed: CancellationToken,
    ) -> Client {
        Client {
            id,
            remote_address,
            connect_ts: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            outbox: Outbox::new(
                socket,
                identity.output_buffer_size,
                !identity.output_buffer_timeout.is_zero(),
                closed.clone(),
            ),
            settings_changed: Notify::new(),
            closed,
            leave_when_idle: CancellationToken::new(),
            counters: ConsumerCounters::default(),
            state: AtomicI32::new(0),
            identity: Mutex::new(identity),
            auth: Mutex::new(AuthSummary::default()),
            transport: Mutex::new(TransportSummary::default()),
            pub_counts: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn identity(&self) -> Identity {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_identity(&self, identity: Identity) {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = identity;
    }

    pub(crate) fn set_auth(&self, auth: AuthSummary) {
        *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = auth;
    }

    pub(crate) fn transport(&self) -> TransportSummary {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_transport(&self, transport: TransportSummary) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = transport;
    }

    pub(crate) fn set_state(&self, number: i32) {
        self.state.store(number, Relaxed);
    }

    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    pub(crate) fn count_published(&self, topic: &str, n: u64) {
        let mut counts = self.pub_counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.iter_mut().find(|c| c.topic == topic) {
            Some(c) => c.count += n,
            None => counts.push(PubCount {
                topic: topic.to_string(),
                count: n,
            }),
        }
    }

    pub(crate) fn has_published(&self) -> bool {
        !self
            .pub_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// With a `/stats` topic filter, `pub_counts` holds that topic's count; without one, the
    /// first topic published to (nsqd's loop stops after one entry).
    pub(crate) fn stats(&self, topic: Option<&str>) -> ClientStats {
        let id = self.identity();
        let auth = self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let transport = self.transport();
        let tls = transport.tls.unwrap_or_default();
        let is_tls = !tls.version.is_empty();
        let c = &self.counters;
        let pub_counts: Vec<PubCount> = {
            let counts = self.pub_counts.lock().unwrap_or_else(|e| e.into_inner());
            match topic {
                Some(t) => counts.iter().filter(|p| p.topic == t).cloned().collect(),
                None => counts.iter().take(1).cloned().collect(),
            }
        };
        ClientStats {
            client_id: id.client_id,
            hostname: id.hostname,
            version: "V2",
            remote_address: self.remote_address.to_string(),
            state: self.state.load(Relaxed),
            ready_count: c.ready_count.load(Relaxed),
            in_flight_count: c.in_flight_count.load(Relaxed),
            message_count: c.message_count.load(Relaxed),
            finish_count: c.finish_count.load(Relaxed),
            requeue_count: c.requeue_count.load(Relaxed),
            connect_ts: self.connect_ts,
            sample_rate: i32::from(id.sample_rate),
            deflate: transport.deflate,
            snappy: transport.snappy,
            user_agent: id.user_agent,
            authed: auth.authed,
            auth_identity: auth.identity,
            auth_identity_url: auth.identity_url,
            topology_zone: id.topology_zone,
            topology_region: id.topology_region,
            pub_counts,
            tls: is_tls,
            tls_cipher_suite: tls.cipher_suite,
            tls_version: tls.version.to_string(),
            tls_negotiated_protocol: tls.negotiated_protocol,
            // Go reports true for every TLS session (the field is deprecated there).
            tls_negotiated_protocol_is_mutual: is_tls,
        }
    }
}

impl Consumer for Client {
    fn push_messages(&self, flush: Flush, write: &mut dyn FnMut(&mut BytesMut)) {
        self.outbox.push_messages(flush, write);
    }

    fn flush_messages(&self) {
        self.outbox.flush_messages();
    }

    fn flush_delivered(&self) {
        self.outbox.flush_when_done();
    }

    fn close(&self) {
        Client::close(self);
    }

    fn counters(&self) -> &ConsumerCounters {
        &self.counters
    }

    fn stats(&self, pub_topic: Option<&str>) -> ClientStats {
        Client::stats(self, pub_topic)
    }
}
