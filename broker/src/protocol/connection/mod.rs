//! One client connection: the magic, then commands read, checked and run in order.
//!
//! A connection is a state machine in two enums. [`ClientState`] is where the client is in
//! nsqd's protocol (what `/stats` shows), and owns the subscription once there is one;
//! [`Step`] is what the read loop does next: read and run commands, upgrade the stream, or
//! wait for the auth server or the lookupds before running a command, which it owns
//! meanwhile. Each family of commands has its file, as mini-redis's `cmd/`: [`identify`],
//! [`auth`], [`publish`] and [`consume`]; the TLS and compression upgrades, and reading
//! through them, are in [`upgrade`]. How a read waits: [`spin`] (a publisher's next command
//! without parking) and [`silence`] (nsqd's read deadline of two heartbeats).
//!
//! The connection is generic over the socket's halves, so its unit tests (`tests.rs`) drive it
//! over `tokio::io::duplex`. The reader runs here; what the client is sent goes through its
//! [`Outbox`](super::outbox::Outbox), and a [`writer`](super::writer) task keeps the timers.
//! Consecutive FINs in one read are applied together under a single channel lock.

mod auth;
mod consume;
mod identify;
mod publish;
mod silence;
mod spin;
mod state;
#[cfg(test)]
mod tests;
mod upgrade;

use self::auth::Auth;
use self::publish::Held;
use self::silence::Silence;
use self::spin::{ReadNow, Spin};
use self::state::ClientState;
use super::Shared;
use super::client::{Client, Identity};
use super::identify::Negotiated;
use super::transport::Inbound;
use super::writer;
use crate::queue::{self, Topic};
use bytes::BytesMut;
use proto::wire::frame::{write_error, write_response};
use proto::wire::{Command, Decoder, ErrorCode, MAGIC_V2, MessageId, ProtocolError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// nsqd's client timeout: the wait for the magic, and twice the default heartbeat.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The read buffer starts small (idle connections stay cheap) and doubles up to this size
/// while reads keep filling it.
const MIN_READ: usize = 1024;
const MAX_READ: usize = 64 * 1024;

/// Serves one client over the halves of its socket until either side ends the connection or
/// `shutdown` is cancelled. Every log line of the connection carries its client id.
pub(crate) async fn serve<R, W>(
    mut reader: R,
    mut writer: W,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + ReadNow + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut magic = [0u8; 4];
    match timeout(CLIENT_TIMEOUT, reader.read_exact(&mut magic)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    if &magic != MAGIC_V2 {
        tracing::warn!(%peer, magic = ?String::from_utf8_lossy(&magic), "bad protocol magic");
        let mut buf = BytesMut::new();
        write_error(&mut buf, &ProtocolError::new(ErrorCode::BadProtocol, ""));
        let _ = writer.write_all(&buf).await;
        let _ = writer.shutdown().await;
        return;
    }

    let o = &shared.broker.options;
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
        topology_region: String::new(),
        topology_zone: String::new(),
    };
    let client = Arc::new(Client::new(
        shared.clients.next_id(),
        peer,
        identity,
        Box::new(writer),
        shutdown.child_token(),
    ));
    let span = tracing::info_span!("client", id = client.id, %peer);
    async move {
        shared.clients.add(client.clone());
        shared.metrics.opened();
        tracing::debug!("new client");
        let writer = tokio::spawn(writer::run(client.clone()).in_current_span());
        let mut conn = Connection::new(reader, shared.clone(), client.clone());
        queue::flush_when_done(conn.run()).await;
        conn.leave();
        client.close();
        let _ = writer.await;
        shared.clients.remove(client.id);
        shared.metrics.closed();
        tracing::debug!("client gone");
    }
    .instrument(span)
    .await
}

pub(super) struct Connection<R> {
    shared: Arc<Shared>,
    client: Arc<Client>,
    input: Input<R>,
    state: ClientState,
    step: Step,
    auth: Auth,
    /// With `--sync-publish`: responses held back until the publishes before them are fsynced.
    held: Option<Held>,
    /// FINs read but not applied yet.
    fins: Vec<MessageId>,
    /// The topic last published to, saving a registry lookup per PUB.
    last_topic: Option<Arc<Topic>>,
}

/// What the read loop does next.
#[derive(Debug)]
enum Step {
    /// Run the commands read, then read more.
    Read,
    /// IDENTIFY agreed on TLS or compression: set it up before anything else is read.
    Upgrade(Negotiated),
    /// Ask the auth server, then run the command: an AUTH, or a command that found its
    /// authorizations expired.
    Authorize(Command),
    /// A command would create a topic: create it first with the channels the lookupds know
    /// for it (see `Broker::prepare_topic`), then run the command.
    PrepareTopic { topic: String, command: Command },
    /// End the connection (after the answers held for publishes).
    Close,
}

/// The read side: the socket, what was read from it, and the layers it passes through.
struct Input<R> {
    reader: R,
    /// Bytes for the decoder: as read, or decrypted and decompressed once upgraded.
    buf: BytesMut,
    /// How much a read asks for; grows while reads fill it.
    read_size: usize,
    decoder: Decoder,
    /// TLS and decompression of what the client sends, once upgraded.
    layers: Inbound,
    /// The client ended its TLS session: what was read is run, then the connection ends.
    peer_closed: bool,
    /// The client's heartbeat interval (`None`: disabled): reads wait two of them at most.
    heartbeat: Option<Duration>,
    /// How long the client has been silent, against that limit.
    silence: Silence,
    /// The subject common name of the client's TLS certificate, for the auth server.
    common_name: String,
    /// Whether a publisher's next command is waited for without parking first.
    spin: Spin,
    /// The last read filled the buffer: more was probably waiting.
    last_read_full: bool,
}

impl<R: AsyncRead + ReadNow + Unpin + Send> Connection<R> {
    fn new(reader: R, shared: Arc<Shared>, client: Arc<Client>) -> Connection<R> {
        let input = Input {
            reader,
            buf: BytesMut::with_capacity(MIN_READ),
            read_size: MIN_READ,
            decoder: Decoder::new(shared.broker.options.wire_limits()),
            layers: Inbound::default(),
            peer_closed: false,
            heartbeat: client.identity().heartbeat_interval,
            silence: Silence::new(),
            common_name: String::new(),
            spin: Spin::default(),
            last_read_full: false,
        };
        let auth = match shared.auth {
            Some(_) => Auth::Required,
            None => Auth::Off,
        };
        Connection {
            shared,
            client,
            input,
            state: ClientState::Init,
            step: Step::Read,
            auth,
            held: None,
            fins: Vec::new(),
            last_topic: None,
        }
    }

    /// Reads and runs commands until the connection is over.
    async fn run(&mut self) {
        loop {
            if matches!(self.step, Step::Read) {
                self.run_buffered();
            }
            // Whatever comes next, the answers held for earlier publishes go out first.
            // Everything read has been handled: what it delivered to consumers goes out now.
            queue::flush_delivered();
            if !self.release_held().await {
                return;
            }
            match std::mem::replace(&mut self.step, Step::Read) {
                Step::Read => {
                    if !self.read_more().await {
                        return;
                    }
                }
                Step::Upgrade(agreed) => {
                    let upgraded = self.upgrade(agreed).await;
                    self.client.outbox.set_upgrading(false);
                    if !upgraded {
                        return;
                    }
                }
                Step::Authorize(command) => {
                    if !self.authorize(command).await {
                        return;
                    }
                }
                Step::PrepareTopic { topic, command } => {
                    tokio::select! {
                        _ = self.client.closed.cancelled() => return,
                        () = self.shared.broker.prepare_topic(&topic) => {}
                    }
                    self.run_command(command);
                }
                Step::Close => return,
            }
        }
    }

    /// Runs every whole command read, until one needs the read loop (an upgrade, a wait, the
    /// end of the connection).
    fn run_buffered(&mut self) {
        loop {
            let heartbeats = self.input.heartbeat.is_some();
            let tls_missing = self.tls_missing();
            let (state, auth) = (&self.state, &self.auth);
            let Input { decoder, buf, .. } = &mut self.input;
            let decoded = decoder.decode_with(
                buf,
                |name| state.check(name, heartbeats, tls_missing),
                |topic| auth.check_mpub(topic),
            );
            let command = match decoded {
                Ok(Some(command)) => command,
                Ok(None) => break,
                Err(e) => {
                    self.apply_fins();
                    self.send_error(&e);
                    self.step = Step::Close;
                    return;
                }
            };
            if let Command::Fin(id) = command {
                self.fins.push(id);
                continue;
            }
            self.apply_fins();
            self.start(command, true);
            // After an IDENTIFY that upgrades, the rest of the buffer is the new stream.
            if !matches!(self.step, Step::Read) {
                return;
            }
        }
        self.apply_fins();
    }

    /// Checks a command's authorization, then runs it, or sets it aside when the auth server
    /// must be asked first (`may_query`: not again right after it answered) or its topic
    /// prepared.
    fn start(&mut self, command: Command, may_query: bool) {
        match self.auth.check(&command, may_query) {
            Ok(false) => {}
            Ok(true) => {
                self.step = Step::Authorize(command);
                return;
            }
            Err(e) => {
                self.send_error(&e);
                self.step = Step::Close;
                return;
            }
        }
        if let Some(topic) = self.new_topic(&command) {
            self.step = Step::PrepareTopic { topic, command };
            return;
        }
        self.run_command(command);
    }

    /// Runs a command and reports its error; a fatal one ends the connection.
    fn run_command(&mut self, command: Command) {
        if let Err(e) = self.execute(command) {
            self.send_error(&e);
            if e.is_fatal() {
                self.step = Step::Close;
            }
        }
    }

    fn execute(&mut self, command: Command) -> Result<(), ProtocolError> {
        match command {
            Command::Nop => Ok(()),
            Command::Identify(body) => self.identify(&body),
            // An AUTH to ask the auth server about never gets here (see `Auth::check`).
            Command::Auth(_) => Err(self.auth.refuse_again()),
            Command::Sub { topic, channel } => self.subscribe(topic.as_str(), channel.as_str()),
            Command::Pub { topic, body } => self.publish_one(topic.as_str(), body),
            Command::Mpub { topic, bodies } => self.publish_many(topic.as_str(), &bodies),
            Command::Dpub {
                topic,
                defer_ms,
                body,
            } => self.publish_deferred(topic.as_str(), body, defer_ms),
            Command::Rdy(count) => {
                self.ready(count);
                Ok(())
            }
            Command::Fin(id) => {
                self.fins.push(id);
                self.apply_fins();
                Ok(())
            }
            Command::Req { id, timeout_ms } => self.requeue(&id, timeout_ms),
            Command::Touch(id) => self.touch(&id),
            Command::Cls => self.start_close(),
        }
    }

    /// Whether `--tls-required` still refuses everything but IDENTIFY.
    fn tls_missing(&self) -> bool {
        self.shared.tls_required && !self.input.layers.tls
    }

    /// Reads more of the stream, through its layers once upgraded. False when the connection
    /// is over: end of stream, a failed or late read, a bad stream, or the client is closed.
    async fn read_more(&mut self) -> bool {
        let layered = self.input.layers.is_layered();
        if layered {
            match self.input.layers.decompress(&mut self.input.buf) {
                // Decompressed input goes to the decoder before the socket is read again.
                Ok(n) if n > 0 => return true,
                Ok(_) if self.input.peer_closed => return false,
                Ok(_) => {}
                Err(e) => {
                    tracing::info!(error = %e, "bad stream from client; closing");
                    return false;
                }
            }
        }
        let Input {
            reader,
            buf,
            layers,
            read_size,
            heartbeat,
            silence,
            spin,
            last_read_full,
            ..
        } = &mut self.input;
        // An upgraded connection's bytes go through its layers before the decoder.
        let buf = if layered { &mut layers.raw } else { buf };
        if buf.capacity() - buf.len() < *read_size / 2 {
            buf.reserve(*read_size);
        }
        let before = buf.len();
        let consumer = matches!(
            self.state,
            ClientState::Subscribed(_) | ClientState::Closing(_)
        );
        // A connection that is to end reads nothing more (the reads below would take bytes
        // that are there before they look at anything else).
        if self.client.closed.is_cancelled() {
            return false;
        }
        if !consumer && self.client.leave_when_idle.is_cancelled() {
            log_leaving();
            return false;
        }
        // The next command of a publisher that waits for each answer (its last read took
        // everything there was), if it comes at once. Publishers that pipeline fill their
        // reads and find their next bytes there anyway.
        let waits_for_answers = !consumer && !*last_read_full;
        let want = (buf.capacity() - before).min(*read_size);
        let spun = spin.read(waits_for_answers, reader, buf, want);
        let got = match spun {
            Some(result) => bytes_read(result),
            None => {
                let limit = heartbeat.map(|hb| hb * 2);
                read_some(reader, buf, limit, silence, &self.client, !consumer).await
            }
        };
        let Some(n) = got else {
            return false;
        };
        silence.heard();
        // Grow the buffer while reads fill it: a busy publisher gets big reads.
        *last_read_full = before + n >= buf.capacity();
        if *last_read_full && *read_size < MAX_READ {
            *read_size *= 2;
        }
        !layered || self.take_layered_input()
    }

    /// Moves the client to another state, which `/stats` shows.
    fn set_state(&mut self, state: ClientState) {
        self.client.set_state(state.number());
        self.state = state;
    }

    fn send_response(&mut self, data: &[u8]) {
        self.send_frame(|buf| write_response(buf, data));
    }

    fn send_error(&mut self, err: &ProtocolError) {
        if err.is_fatal() {
            tracing::info!(error = %err, "closing client after error");
        }
        self.send_frame(|buf| write_error(buf, err));
    }

    /// Writes a response or error frame now, or behind held publishes.
    fn send_frame(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        match &mut self.held {
            Some(held) => held.push_frame(encode),
            None => self.client.outbox.push(true, encode),
        }
    }
}

/// Reads what the socket has into `buf`, waiting at most until the client was silent for
/// `limit` (nsqd's read deadline, two heartbeats). `None` when the connection is over: end of
/// stream, a failed read, the deadline passed, or the client is being closed.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    limit: Option<Duration>,
    silence: &mut Silence,
    client: &Client,
    may_leave: bool,
) -> Option<usize> {
    let leave = async {
        if may_leave {
            client.leave_when_idle.cancelled().await
        } else {
            std::future::pending().await
        }
    };
    let silent = async {
        match limit {
            Some(limit) => silence.longer_than(limit).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        // The read first: when bytes are there, nothing else is polled, so a busy connection
        // registers no waiter and arms no timer for its reads.
        biased;
        r = reader.read_buf(buf) => r,
        _ = client.closed.cancelled() => return None,
        () = leave => {
            log_leaving();
            return None;
        }
        () = silent => {
            tracing::info!("no command within two heartbeats; closing");
            return None;
        }
    };
    bytes_read(result)
}

/// How many bytes a read brought; `None` at the end of the stream or when it failed.
fn bytes_read(result: std::io::Result<usize>) -> Option<usize> {
    match result {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(error = %e, "read failed");
            None
        }
    }
}

fn log_leaving() {
    tracing::info!("broker draining: closing a connection that is not a consumer");
}
