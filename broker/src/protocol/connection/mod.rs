//! One client connection: the magic, then commands read, checked and executed in order.
//!
//! The reader runs here; a [`writer`](super::writer) task owns the socket's write half.
//! Consecutive FINs in one read are applied together under a single channel lock. The TLS
//! and compression upgrades IDENTIFY agrees on, and reading through them, are in [`upgrade`].

mod upgrade;

use super::client::{AuthSummary, Client, Identity, STATE_CLOSING, STATE_INIT, STATE_SUBSCRIBED};
use super::identify::{IdentifyRequest, Negotiated};
use super::transport::Inbound;
use super::writer;
use crate::auth::{AuthError, AuthState, Permission, Query};
use crate::broker::Broker;
use crate::config::TlsRequired;
use crate::queue::{Channel, PublishError, SubscribeError, Topic};
use bytes::{Bytes, BytesMut};
use proto::wire::frame::{write_error, write_response};
use proto::wire::{
    Command, CommandName, Decoder, ErrorCode, MAGIC_V2, MessageId, Precheck, ProtocolError,
};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// nsqd's client timeout: the wait for the magic, and twice the default heartbeat.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The read buffer starts small (idle connections stay cheap) and doubles up to this size
/// while reads keep filling it.
const MIN_READ: usize = 1024;
const MAX_READ: usize = 64 * 1024;

pub(crate) async fn serve(stream: TcpStream, broker: Arc<Broker>, shutdown: CancellationToken) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let (mut reader, mut write_half) = stream.into_split();
    let mut magic = [0u8; 4];
    match timeout(CLIENT_TIMEOUT, reader.read_exact(&mut magic)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    if &magic != MAGIC_V2 {
        tracing::warn!(%peer, magic = ?String::from_utf8_lossy(&magic), "bad protocol magic");
        let mut buf = BytesMut::new();
        write_error(&mut buf, &ProtocolError::new(ErrorCode::BadProtocol, ""));
        let _ = write_half.write_all(&buf).await;
        let _ = write_half.shutdown().await;
        return;
    }

    let o = &broker.options;
    let host = peer.ip().to_string();
    let identity = Identity {
        client_id: host.clone(),
        hostname: host,
        user_agent: String::new(),
        heartbeat_interval: Some(CLIENT_TIMEOUT / 2),
        output_buffer_size: 16 * 1024,
        output_buffer_timeout: o.output_buffer_timeout,
        msg_timeout: o.msg_timeout,
        sample_rate: 0,
    };
    let client = Arc::new(Client::new(
        broker.next_client_id(),
        peer,
        identity,
        write_half,
        shutdown.child_token(),
    ));
    broker.add_client(client.clone());
    broker.metrics.connection_opened();
    tracing::debug!(client = client.id, %peer, "new client");
    let writer = tokio::spawn(writer::run(client.clone()));

    let mut conn = Connection {
        decoder: Decoder::new(o.wire_limits()),
        broker: broker.clone(),
        client: client.clone(),
        read_buf: BytesMut::with_capacity(MIN_READ),
        read_size: MIN_READ,
        subscription: None,
        fins: Vec::new(),
        last_topic: None,
        heartbeat: client.identity().heartbeat_interval,
        held: None,
        awaiting_topic: None,
        auth: None,
        secret: Bytes::new(),
        awaiting_auth: None,
        upgrade: None,
        inbound: Inbound::default(),
        peer_closed: false,
        tls_required: broker.tls.is_some() && broker.options.tls.required() != TlsRequired::No,
        common_name: String::new(),
    };
    conn.read_loop(&mut reader).await;
    conn.leave();
    client.close();
    let _ = writer.await;
    broker.remove_client(client.id);
    broker.metrics.connection_closed();
    tracing::debug!(client = client.id, %peer, "client gone");
}

struct Connection {
    broker: Arc<Broker>,
    client: Arc<Client>,
    decoder: Decoder,
    read_buf: BytesMut,
    read_size: usize,
    subscription: Option<(Arc<Topic>, Arc<Channel>)>,
    /// FINs read but not applied yet.
    fins: Vec<MessageId>,
    /// The topic last published to, saving a registry lookup per PUB.
    last_topic: Option<Arc<Topic>>,
    /// The client's heartbeat interval (`None`: disabled), kept here so reading a command
    /// needs no look at the shared identity.
    heartbeat: Option<Duration>,
    /// With `--sync-publish`: responses held back until the publishes before them are fsynced.
    held: Option<Held>,
    /// Lookupd hook: a command that creates a topic, run once the channels the lookupds know
    /// for it exist (see `Broker::prepare_topic`).
    awaiting_topic: Option<(String, Command)>,
    /// What the auth server granted this client's secret (with `--auth-http-address`).
    auth: Option<AuthState>,
    /// The secret of the client's AUTH, sent again when the authorizations expire.
    secret: Bytes,
    /// Auth hook: an AUTH, or a command whose check found the authorizations expired, run
    /// once the auth server has answered.
    awaiting_auth: Option<Command>,
    /// IDENTIFY agreed on TLS or compression: set up before anything else is read.
    upgrade: Option<Negotiated>,
    /// TLS and decompression of what the client sends, once upgraded.
    inbound: Inbound,
    /// The client ended its TLS session: what was read is processed, then the connection ends.
    peer_closed: bool,
    /// `--tls-required` applies to TCP: only IDENTIFY until the connection is TLS.
    tls_required: bool,
    /// The subject common name of the client's TLS certificate, for the auth server.
    common_name: String,
}

/// What happens after a command was started.
enum Next {
    Continue,
    /// Set aside until `read_loop` has awaited what it needs.
    Wait,
    Close,
}

struct Held {
    /// Covers every publish held so far.
    ticket: u64,
    frames: Vec<HeldFrame>,
}

enum HeldFrame {
    /// `OK` once durable; the publish's error if the fsync failed.
    Published(CommandName),
    Encoded(BytesMut),
}

impl Connection {
    async fn read_loop(&mut self, reader: &mut OwnedReadHalf) {
        loop {
            let open = self.process_buffered();
            if self.awaiting_auth.is_some() || self.awaiting_topic.is_some() {
                if !self.run_set_aside().await {
                    return;
                }
                continue;
            }
            if !self.release_held().await || !open {
                return;
            }
            if let Some(agreed) = self.upgrade.take() {
                let upgraded = self.upgrade(reader, agreed).await;
                self.client.outbox.set_upgrading(false);
                if !upgraded {
                    return;
                }
                continue;
            }
            let layered = self.inbound.is_layered();
            if layered {
                match self.inbound.decompress(&mut self.read_buf) {
                    // Decompressed input goes to the decoder before the socket is read again.
                    Ok(n) if n > 0 => continue,
                    Ok(_) if self.peer_closed => return,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::info!(client = self.client.id, error = %e, "bad stream from client; closing");
                        return;
                    }
                }
            }
            // An upgraded connection's bytes go through its layers before the decoder.
            let buf = if layered {
                &mut self.inbound.raw
            } else {
                &mut self.read_buf
            };
            if buf.capacity() - buf.len() < self.read_size / 2 {
                buf.reserve(self.read_size);
            }
            let before = buf.len();
            let Some(n) = read_some(reader, buf, self.heartbeat, &self.client).await else {
                return;
            };
            // Grow the buffer while reads fill it: a busy publisher gets big reads.
            if before + n >= buf.capacity() && self.read_size < MAX_READ {
                self.read_size *= 2;
            }
            if layered && !self.take_layered_input() {
                return;
            }
        }
    }

    /// Runs the command set aside (and any it leads to: an authorized publish may still need
    /// its topic prepared) before anything read after it. False when the connection must close.
    async fn run_set_aside(&mut self) -> bool {
        loop {
            if let Some(command) = self.awaiting_auth.take() {
                // Answers held for earlier publishes go first, in order.
                if !self.release_held().await {
                    return false;
                }
                if let Command::Auth(secret) = &command {
                    self.secret = secret.clone();
                }
                let broker = self.broker.clone();
                let Some(servers) = broker.auth.as_ref() else {
                    return false;
                };
                let query = Query {
                    remote_ip: self.client.remote_address.ip(),
                    tls: self.inbound.tls,
                    secret: &self.secret,
                    common_name: &self.common_name,
                };
                let answer = tokio::select! {
                    _ = self.client.closed.cancelled() => return false,
                    answer = servers.query(query) => answer,
                };
                if !self.authorized(command, answer) {
                    return false;
                }
                continue;
            }
            if let Some((topic, command)) = self.awaiting_topic.take() {
                if !self.release_held().await {
                    return false;
                }
                tokio::select! {
                    _ = self.client.closed.cancelled() => return false,
                    () = self.broker.prepare_topic(&topic) => {}
                }
                if !self.run(command) {
                    return false;
                }
                continue;
            }
            return true;
        }
    }

    /// Takes the auth server's answer for an AUTH (answering it) or for a command that found
    /// its authorizations expired (then checking and starting it). False when the connection
    /// must close.
    fn authorized(&mut self, command: Command, answer: Result<AuthState, AuthError>) -> bool {
        let state = match answer {
            Ok(state) => state,
            Err(e) => {
                // The details stay in the log: clients are not told about the auth servers.
                tracing::warn!(client = self.client.id, error = %e, "AUTH failed");
                self.send_error(&ProtocolError::new(ErrorCode::AuthFailed, "AUTH failed"));
                return false;
            }
        };
        let count = state.permission_count();
        self.client.set_auth(AuthSummary {
            authed: count > 0,
            identity: state.identity.clone(),
            identity_url: state.identity_url.clone(),
        });
        tracing::debug!(
            client = self.client.id,
            identity = %state.identity,
            permissions = count,
            "authorized"
        );
        let response = matches!(command, Command::Auth(_)).then(|| {
            serde_json::json!({
                "identity": state.identity,
                "identity_url": state.identity_url,
                "permission_count": count,
            })
        });
        self.auth = Some(state);
        let Some(response) = response else {
            return !matches!(self.start(command, false), Next::Close);
        };
        if count == 0 {
            self.send_error(&ProtocolError::new(
                ErrorCode::Unauthorized,
                "AUTH no authorizations found",
            ));
            return false;
        }
        self.send_response(response.to_string().as_bytes());
        true
    }

    /// Executes every whole command in the read buffer. Returns false when the connection
    /// must close.
    fn process_buffered(&mut self) -> bool {
        loop {
            let state = self.client.state();
            let heartbeats = self.heartbeat.is_some();
            let tls_missing = self.tls_required && !self.inbound.tls;
            let auth = self.broker.auth.is_some().then_some(&self.auth);
            let decoded = self.decoder.decode_with(
                &mut self.read_buf,
                |name| check_state(name, state, heartbeats, tls_missing),
                |topic| check_mpub_auth(auth, topic),
            );
            let command = match decoded {
                Ok(Some(command)) => command,
                Ok(None) => break,
                Err(e) => {
                    self.apply_fins();
                    self.send_error(&e);
                    return false;
                }
            };
            if let Command::Fin(id) = command {
                self.fins.push(id);
                continue;
            }
            self.apply_fins();
            match self.start(command, true) {
                // After an IDENTIFY that upgrades, the rest of the buffer is the new stream.
                Next::Continue if self.upgrade.is_some() => return true,
                Next::Continue => {}
                Next::Wait => return true,
                Next::Close => return false,
            }
        }
        self.apply_fins();
        true
    }

    /// Checks a command's authorization, then runs it, or sets it aside when the auth server
    /// must be asked first (`may_query`: not again right after it answered) or its topic
    /// prepared.
    fn start(&mut self, command: Command, may_query: bool) -> Next {
        match self.check_auth(&command, may_query) {
            Ok(false) => {}
            Ok(true) => {
                self.awaiting_auth = Some(command);
                return Next::Wait;
            }
            Err(e) => {
                self.send_error(&e);
                return Next::Close;
            }
        }
        if let Some(topic) = self.new_topic(&command) {
            // Lookupd hook: read_loop creates the topic with its known channels first.
            self.awaiting_topic = Some((topic, command));
            return Next::Wait;
        }
        if self.run(command) {
            Next::Continue
        } else {
            Next::Close
        }
    }

    /// With auth on: whether the auth server must be asked before `command` runs (an AUTH, or
    /// a SUB or publish whose authorizations expired), or the error that refuses it.
    fn check_auth(&self, command: &Command, may_query: bool) -> Result<bool, ProtocolError> {
        if self.broker.auth.is_none() {
            return Ok(false);
        }
        let (name, topic, channel, permission) = match command {
            // Once authorized, execute() answers `AUTH already set`.
            Command::Auth(_) => return Ok(self.auth.is_none()),
            Command::Sub { topic, channel } => (
                CommandName::Sub,
                topic.as_str(),
                channel.as_str(),
                Permission::Subscribe,
            ),
            Command::Pub { topic, .. } => {
                (CommandName::Pub, topic.as_str(), "", Permission::Publish)
            }
            Command::Mpub { topic, .. } => {
                (CommandName::Mpub, topic.as_str(), "", Permission::Publish)
            }
            Command::Dpub { topic, .. } => {
                (CommandName::Dpub, topic.as_str(), "", Permission::Publish)
            }
            _ => return Ok(false),
        };
        let Some(state) = &self.auth else {
            return Err(auth_first(name));
        };
        if may_query && state.is_expired(Instant::now()) {
            return Ok(true);
        }
        if state.is_allowed(topic, channel, permission) {
            return Ok(false);
        }
        Err(unauthorized(name, topic, channel))
    }

    /// Executes a command and reports its error; false when the connection must close.
    fn run(&mut self, command: Command) -> bool {
        if let Err(e) = self.execute(command) {
            self.send_error(&e);
            if e.is_fatal() {
                return false;
            }
        }
        true
    }

    /// The topic a PUB, MPUB, DPUB or SUB would create, when lookupds should be asked for its
    /// channels first. The topic last published to is known to exist: the PUB path stays a
    /// name comparison.
    fn new_topic(&self, command: &Command) -> Option<String> {
        let topic = match command {
            Command::Pub { topic, .. }
            | Command::Mpub { topic, .. }
            | Command::Dpub { topic, .. }
            | Command::Sub { topic, .. } => topic.as_str(),
            _ => return None,
        };
        if self.last_topic.as_ref().is_some_and(|t| t.name == topic) {
            return None;
        }
        self.broker.needs_prepare(topic).then(|| topic.to_string())
    }

    fn execute(&mut self, command: Command) -> Result<(), ProtocolError> {
        match command {
            Command::Nop => Ok(()),
            Command::Identify(body) => self.identify(&body),
            // An AUTH to ask the auth server about never gets here (see `check_auth`).
            Command::Auth(_) if self.broker.auth.is_none() => {
                Err(ProtocolError::new(ErrorCode::AuthDisabled, "AUTH disabled"))
            }
            Command::Auth(_) => Err(ProtocolError::invalid("AUTH already set")),
            Command::Sub { topic, channel } => self.subscribe(topic.as_str(), channel.as_str()),
            Command::Pub { topic, body } => {
                self.publish(CommandName::Pub, topic.as_str(), &[body], Duration::ZERO)
            }
            Command::Mpub { topic, bodies } => {
                self.publish(CommandName::Mpub, topic.as_str(), &bodies, Duration::ZERO)
            }
            Command::Dpub {
                topic,
                defer_ms,
                body,
            } => self.publish(
                CommandName::Dpub,
                topic.as_str(),
                &[body],
                Duration::from_millis(defer_ms),
            ),
            Command::Rdy(count) => {
                if self.client.state() == STATE_SUBSCRIBED
                    && let Some((_, channel)) = &self.subscription
                {
                    channel.set_ready(self.client.id, count);
                }
                Ok(())
            }
            Command::Fin(id) => {
                self.fins.push(id);
                self.apply_fins();
                Ok(())
            }
            Command::Req { id, timeout_ms } => {
                let max = self.broker.options.max_req_timeout;
                let delay = Duration::from_millis(timeout_ms).min(max);
                self.channel(CommandName::Req)?
                    .requeue(self.client.id, &id, delay)
                    .map_err(|e| {
                        ProtocolError::new(
                            ErrorCode::ReqFailed,
                            format!("REQ {id} failed {}", e.as_str()),
                        )
                    })
            }
            Command::Touch(id) => self
                .channel(CommandName::Touch)?
                .touch(self.client.id, &id)
                .map_err(|e| {
                    ProtocolError::new(
                        ErrorCode::TouchFailed,
                        format!("TOUCH {id} failed {}", e.as_str()),
                    )
                }),
            Command::Cls => {
                self.client.state.store(STATE_CLOSING, Relaxed);
                self.channel(CommandName::Cls)?.start_close(self.client.id);
                self.send_response(proto::wire::CLOSE_WAIT);
                Ok(())
            }
        }
    }

    fn identify(&mut self, body: &[u8]) -> Result<(), ProtocolError> {
        let request = IdentifyRequest::parse(body)?;
        let options = &self.broker.options;
        let applied = request.apply(&self.client.identity(), options)?;
        let agreed = request.negotiate(options, self.broker.tls.is_some())?;
        let upgrades = agreed.tls || agreed.snappy || agreed.deflate;
        if upgrades && self.inbound.is_layered() {
            return Err(ProtocolError::new(
                ErrorCode::IdentifyFailed,
                "IDENTIFY cannot upgrade a connection twice",
            ));
        }
        let response = request.response(&applied, &agreed, options);
        self.heartbeat = applied.heartbeat_interval;
        self.client.set_identity(applied);
        self.client.settings_changed.notify_one();
        if upgrades {
            // Until the upgrades' OKs are out, no heartbeat may slip in.
            self.client.outbox.set_upgrading(true);
            self.upgrade = Some(agreed);
        }
        self.send_response(&response);
        Ok(())
    }

    fn subscribe(&mut self, topic_name: &str, channel_name: &str) -> Result<(), ProtocolError> {
        let failed = |text: String| ProtocolError::new(ErrorCode::SubFailed, text);
        // A topic being deleted at this moment is replaced on the second try, as nsqd retries.
        for attempt in 0..2 {
            match self
                .broker
                .subscribe(topic_name, channel_name, &self.client)
            {
                Ok(subscription) => {
                    self.client.state.store(STATE_SUBSCRIBED, Relaxed);
                    self.subscription = Some(subscription);
                    self.send_response(proto::wire::OK);
                    return Ok(());
                }
                Err(SubscribeError::Exiting) if attempt == 0 => continue,
                Err(SubscribeError::Exiting) => break,
                Err(e) => return Err(failed(format!("SUB failed {e}"))),
            }
        }
        Err(failed("SUB failed to deleted topic/channel".into()))
    }

    fn publish(
        &mut self,
        command: CommandName,
        topic_name: &str,
        bodies: &[Bytes],
        defer: Duration,
    ) -> Result<(), ProtocolError> {
        let code = publish_error_code(command);
        let cached = self
            .last_topic
            .take()
            .filter(|t| t.name == topic_name)
            .map(|t| t.publish(bodies, defer).map(|()| t));
        let result = match cached {
            // A cached topic that was deleted since: look it up again.
            None | Some(Err(PublishError::Exiting)) => {
                self.broker.publish(topic_name, bodies, defer)
            }
            Some(result) => result,
        };
        match result {
            Ok(topic) => {
                self.last_topic = Some(topic);
                self.client.count_published(topic_name, bodies.len() as u64);
                if self.broker.settings.sync_publish {
                    let ticket = self.broker.settings.commits.ticket();
                    let held = self.held.get_or_insert_with(|| Held {
                        ticket,
                        frames: Vec::new(),
                    });
                    held.ticket = ticket;
                    held.frames.push(HeldFrame::Published(command));
                } else {
                    self.send_response(proto::wire::OK);
                }
                Ok(())
            }
            Err(e) => Err(ProtocolError::new(
                code,
                format!("{} failed {e}", command.as_str()),
            )),
        }
    }

    /// The subscribed channel. The state checks admit FIN, REQ, TOUCH and CLS only after SUB,
    /// so the error is a safety net, not an expected path.
    fn channel(&self, command: CommandName) -> Result<&Arc<Channel>, ProtocolError> {
        match &self.subscription {
            Some((_, channel)) => Ok(channel),
            None => Err(ProtocolError::invalid(format!(
                "cannot {} in current state",
                command.as_str()
            ))),
        }
    }

    fn apply_fins(&mut self) {
        if self.fins.is_empty() {
            return;
        }
        let fins = std::mem::take(&mut self.fins);
        let mut failures = Vec::new();
        match self.channel(CommandName::Fin) {
            Ok(channel) => channel.finish(self.client.id, &fins, |id, e| failures.push((id, e))),
            Err(e) => self.send_error(&e),
        }
        for (id, e) in failures {
            self.send_error(&ProtocolError::new(
                ErrorCode::FinFailed,
                format!("FIN {id} failed {}", e.as_str()),
            ));
        }
        self.fins = fins;
        self.fins.clear();
    }

    fn send_response(&mut self, data: &[u8]) {
        self.send_frame(|buf| write_response(buf, data));
    }

    fn send_error(&mut self, err: &ProtocolError) {
        if err.is_fatal() {
            tracing::info!(client = self.client.id, error = %err, "closing client after error");
        }
        self.send_frame(|buf| write_error(buf, err));
    }

    /// Writes a response or error frame now, or behind held publishes.
    fn send_frame(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        match &mut self.held {
            Some(held) => {
                let mut frame = BytesMut::new();
                encode(&mut frame);
                held.frames.push(HeldFrame::Encoded(frame));
            }
            None => self.client.outbox.push(true, encode),
        }
    }

    /// Waits for the fsync covering held publishes, then sends what was held: `OK`s, or the
    /// publish error (fatal) if the fsync failed. False when the connection must close.
    async fn release_held(&mut self) -> bool {
        let Some(held) = self.held.take() else {
            return true;
        };
        let durable = tokio::select! {
            durable = self.broker.settings.commits.wait(held.ticket) => durable,
            _ = self.client.closed.cancelled() => return false,
        };
        for frame in held.frames {
            match frame {
                HeldFrame::Encoded(bytes) => {
                    self.client
                        .outbox
                        .push(true, |buf| buf.extend_from_slice(&bytes));
                }
                HeldFrame::Published(_) if durable => self.send_response(proto::wire::OK),
                HeldFrame::Published(command) => {
                    let text = format!("{} failed fsync failed", command.as_str());
                    self.send_error(&ProtocolError::new(publish_error_code(command), text));
                    return false;
                }
            }
        }
        true
    }

    /// Leaves the channel; an ephemeral channel (and topic) without consumers goes away.
    fn leave(&mut self) {
        if let Some((topic, channel)) = self.subscription.take() {
            let left = channel.unsubscribe(self.client.id);
            if left == 0 && channel.ephemeral {
                self.broker.consumer_left(&topic, &channel.name);
            }
        }
    }
}

/// Reads what the socket has into `buf`, waiting at most two heartbeats (nsqd's read
/// deadline). `None` when the connection is over: end of stream, a failed read, the deadline
/// passed, or the client is being closed.
async fn read_some(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    heartbeat: Option<Duration>,
    client: &Client,
) -> Option<usize> {
    let read = async {
        match heartbeat {
            Some(hb) => timeout(hb * 2, reader.read_buf(buf)).await,
            None => Ok(reader.read_buf(buf).await),
        }
    };
    let result = tokio::select! {
        _ = client.closed.cancelled() => return None,
        r = read => r,
    };
    match result {
        Ok(Ok(0)) => None,
        Ok(Ok(n)) => Some(n),
        Ok(Err(e)) => {
            tracing::debug!(client = client.id, error = %e, "read failed");
            None
        }
        Err(_) => {
            tracing::info!(
                client = client.id,
                "no command within two heartbeats; closing"
            );
            None
        }
    }
}

fn publish_error_code(command: CommandName) -> ErrorCode {
    match command {
        CommandName::Mpub => ErrorCode::MpubFailed,
        CommandName::Dpub => ErrorCode::DpubFailed,
        _ => ErrorCode::PubFailed,
    }
}

/// An MPUB's authorization, checked before its body is read as nsqd does (`auth`: the
/// client's authorizations when auth is on). Expired ones let the body in: the auth server
/// is asked once the command is whole.
fn check_mpub_auth(auth: Option<&Option<AuthState>>, topic: &str) -> Result<(), ProtocolError> {
    let Some(auth) = auth else {
        return Ok(());
    };
    let Some(state) = auth else {
        return Err(auth_first(CommandName::Mpub));
    };
    if state.is_expired(Instant::now()) || state.is_allowed(topic, "", Permission::Publish) {
        return Ok(());
    }
    Err(unauthorized(CommandName::Mpub, topic, ""))
}

/// `E_UNAUTHORIZED` for a command the authorizations do not cover.
fn unauthorized(name: CommandName, topic: &str, channel: &str) -> ProtocolError {
    // Names are validated ASCII, so plain quotes read as Go's %q.
    ProtocolError::new(
        ErrorCode::Unauthorized,
        format!(
            "AUTH failed for {} on \"{topic}\" \"{channel}\"",
            name.as_str()
        ),
    )
}

/// `E_AUTH_FIRST`: auth is on and the client has not authenticated.
fn auth_first(name: CommandName) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::AuthFirst,
        format!("AUTH required before {}", name.as_str()),
    )
}

/// The rules nsqd applies before reading a command's parameters and body: TLS first when it
/// is required and missing, then the state.
fn check_state(
    name: CommandName,
    state: i32,
    heartbeats: bool,
    tls_missing: bool,
) -> Result<Precheck, ProtocolError> {
    let cannot = || ProtocolError::invalid(format!("cannot {} in current state", name.as_str()));
    if tls_missing && name != CommandName::Identify {
        return Err(ProtocolError::invalid(format!(
            "cannot {} in current state (TLS required)",
            name.as_str()
        )));
    }
    match name {
        // nsqd ignores RDY from a closing client before even parsing its count.
        CommandName::Rdy if state == STATE_CLOSING => Ok(Precheck::Skip),
        CommandName::Identify | CommandName::Auth if state != STATE_INIT => Err(cannot()),
        CommandName::Sub if state != STATE_INIT => Err(cannot()),
        CommandName::Sub if !heartbeats => Err(ProtocolError::invalid(
            "cannot SUB with heartbeats disabled",
        )),
        CommandName::Rdy if state != STATE_SUBSCRIBED && state != STATE_CLOSING => Err(cannot()),
        CommandName::Fin | CommandName::Req | CommandName::Touch
            if state != STATE_SUBSCRIBED && state != STATE_CLOSING =>
        {
            Err(cannot())
        }
        CommandName::Cls if state != STATE_SUBSCRIBED => Err(cannot()),
        _ => Ok(Precheck::Parse),
    }
}
