//! A client's outgoing frames, and the socket they go to.
//!
//! Whoever produces a frame (the connection's reader for responses, a channel delivering
//! messages from a publisher's task) appends it under the outbox lock and, when it is due,
//! writes it to the socket right there with a non-blocking write. So a PUB's `OK` leaves
//! without waking any other task. Only when the socket is full does the connection's writer
//! task take over, waiting for it to drain; it also runs the heartbeat and flush timers.
//! The socket is any `AsyncWrite` (a TCP write half, or a duplex stream in tests): a
//! non-blocking write is one poll of it, whose waker tells the writer task it may go on.
//! Every write happens under the lock from the front of the buffer, so frames keep their
//! order whoever writes them. After a TLS or compression upgrade the frames pass through the
//! connection's [`Layers`] on their way, still under the lock. Deflating a batch of messages
//! costs far more than writing it, so on deflate connections channels hand the write to the
//! connection's writer task instead of doing it while they hold their own lock.

use super::transport::Layers;
use crate::queue::Flush;
use bytes::{Buf, BytesMut};
use proto::wire::compression::Compressor;
use proto::wire::frame::write_response;
use rustls::ServerConnection;
use server_kit::tls::server::TlsSummary;
use std::io::{self, ErrorKind};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The socket frames go to.
pub(crate) type Socket = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Given to the socket's polls: the socket wakes it when it can take bytes it refused.
    waker: Waker,
    writable: Arc<Writable>,
    stalled: Notify,
    /// Wakes the writer task to run its flush timer: messages wait in the buffer.
    buffered: Notify,
    /// Wakes the writer task to write out what a channel queued on an upgraded connection.
    handed_off: Notify,
    closed: CancellationToken,
}

struct State {
    socket: Socket,
    buf: BytesMut,
    /// Bytes buffered before a write is due (the client's output_buffer_size).
    buffer_size: usize,
    /// The socket refused bytes; the writer task is waiting for it to drain.
    stalled: bool,
    /// Messages wait for the output buffer timeout; the writer's flush timer runs only then,
    /// so idle connections cost no timer wakeups.
    waiting: bool,
    /// The client has an output buffer timeout (not -1): messages may leave before it.
    timed: bool,
    /// Messages wait for the task that delivered them to be done ([`Flush::WhenDone`]).
    when_done: bool,
    /// TLS and compression, once IDENTIFY negotiated them.
    layers: Option<Box<Layers>>,
    /// Channels leave writing to the writer task (see [`Outbox::push_messages`]).
    hand_off: bool,
    /// IDENTIFY agreed on upgrades that are not all in place yet: no heartbeat may come
    /// between the response and the upgrades' `OK`s.
    upgrading: bool,
}

// By hand: the socket has no `Debug`.
impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("buffered", &self.buf.len())
            .field("stalled", &self.stalled)
            .finish_non_exhaustive()
    }
}

/// Wakes the writer task waiting for a full socket to drain.
#[derive(Debug, Default)]
struct Writable(Notify);

impl Wake for Writable {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// Writes what the socket takes now, without waiting: `WouldBlock` when it is full, and then
/// the socket wakes `waker` once it can take more.
fn try_write(socket: &mut Socket, waker: &Waker, bytes: &[u8]) -> io::Result<usize> {
    let mut cx = Context::from_waker(waker);
    // Outside the calling task's cooperative budget: a write the socket can take must not be
    // refused for fairness, or frames would wait for the writer task.
    let write = tokio::task::unconstrained(std::future::poll_fn(|cx| {
        Pin::new(&mut *socket).poll_write(cx, bytes)
    }));
    match pin!(write).poll(&mut cx) {
        Poll::Ready(Ok(0)) => Err(ErrorKind::WriteZero.into()),
        Poll::Ready(result) => result,
        Poll::Pending => Err(ErrorKind::WouldBlock.into()),
    }
}

impl Outbox {
    /// `timed`: the client has an output buffer timeout.
    pub(crate) fn new(
        socket: Socket,
        buffer_size: usize,
        timed: bool,
        closed: CancellationToken,
    ) -> Self {
        let writable = Arc::new(Writable::default());
        Outbox {
            state: Mutex::new(State {
                socket,
                buf: BytesMut::new(),
                buffer_size,
                stalled: false,
                waiting: false,
                timed,
                when_done: false,
                layers: None,
                hand_off: false,
                upgrading: false,
            }),
            waker: Waker::from(writable.clone()),
            writable,
            stalled: Notify::new(),
            buffered: Notify::new(),
            handed_off: Notify::new(),
            closed,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends frames with `write`, then writes out what is buffered if `flush` is set or
    /// the buffer has reached the client's output buffer size.
    pub(crate) fn push<R>(&self, flush: bool, write: impl FnOnce(&mut BytesMut) -> R) -> R {
        let flush = if flush { Flush::Now } else { Flush::Timer };
        self.queue(flush, write, Outbox::send)
    }

    /// [`Outbox::push`] for a channel delivering messages under its lock: on a deflate
    /// connection the writer task compresses and writes them instead.
    pub(crate) fn push_messages<R>(
        &self,
        flush: Flush,
        write: impl FnOnce(&mut BytesMut) -> R,
    ) -> R {
        self.queue(flush, write, Outbox::send_or_hand_off)
    }

    fn queue<R>(
        &self,
        flush: Flush,
        write: impl FnOnce(&mut BytesMut) -> R,
        send: fn(&Outbox, &mut State),
    ) -> R {
        let mut st = self.lock();
        let result = write(&mut st.buf);
        if flush == Flush::Now || st.buf.len() >= st.buffer_size {
            send(self, &mut st);
        } else if flush == Flush::WhenDone && st.timed {
            // The delivering task writes it out soon: no timer needed. (Without a timeout,
            // as in nsqd, messages wait for a full buffer, RDY or the next heartbeat.)
            st.when_done = true;
        } else if !st.waiting && !st.buf.is_empty() {
            st.waiting = true;
            self.buffered.notify_one();
        }
        result
    }

    /// Writes out whatever is buffered (the output buffer timeout fired).
    pub(crate) fn flush(&self) {
        let mut st = self.lock();
        self.send(&mut st);
    }

    /// [`Outbox::flush`] for a channel under its lock (see [`Outbox::push_messages`]).
    pub(crate) fn flush_messages(&self) {
        let mut st = self.lock();
        self.send_or_hand_off(&mut st);
    }

    /// Writes out the messages pushed with [`Flush::WhenDone`], if they are still buffered.
    pub(crate) fn flush_when_done(&self) {
        let mut st = self.lock();
        if st.when_done {
            self.send_or_hand_off(&mut st);
        }
    }

    fn send_or_hand_off(&self, st: &mut State) {
        if st.hand_off {
            self.handed_off.notify_one();
        } else {
            self.send(st);
        }
    }

    /// Resolves when a channel handed writing over (see [`Outbox::push_messages`]).
    pub(crate) async fn handed_off(&self) {
        self.handed_off.notified().await;
    }

    pub(crate) fn set_upgrading(&self, upgrading: bool) {
        self.lock().upgrading = upgrading;
    }

    /// A heartbeat, unless an upgrade is under way (it would come before the upgrade's `OK`,
    /// which clients expect first).
    pub(crate) fn heartbeat(&self) {
        let mut st = self.lock();
        if !st.upgrading {
            write_response(&mut st.buf, proto::wire::HEARTBEAT);
            self.send(&mut st);
        }
    }

    /// The client's output buffer size, and whether it has an output buffer timeout.
    pub(crate) fn set_buffering(&self, size: usize, timed: bool) {
        let mut st = self.lock();
        st.buffer_size = size.max(1);
        st.timed = timed;
    }

    pub(crate) fn is_stalled(&self) -> bool {
        self.lock().stalled
    }

    /// Whether buffered messages wait for the flush timer.
    pub(crate) fn is_waiting(&self) -> bool {
        self.lock().waiting
    }

    /// Resolves when messages start waiting in the buffer.
    pub(crate) async fn waiting(&self) {
        self.buffered.notified().await;
    }

    /// Resolves when a write found the socket full.
    pub(crate) async fn stall(&self) {
        self.stalled.notified().await;
    }

    /// Resolves when a socket that was full may take more bytes.
    pub(crate) async fn writable(&self) {
        self.writable.0.notified().await;
    }

    /// Ends the stream cleanly: the peer reads an orderly end of stream.
    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        let mut cx = Context::from_waker(&self.waker);
        // A TCP socket shuts down at once; a stream that would wait is dropped with the
        // connection instead.
        let _ = Pin::new(&mut st.socket).poll_shutdown(&mut cx);
    }

    /// The layers to install a new one into. Frames already queued leave as the layers in
    /// place before it had them (in clear before TLS, uncompressed before compression).
    fn layers_for_upgrade<'a>(&self, st: &'a mut State) -> &'a mut Layers {
        let queued = std::mem::take(&mut st.buf);
        if let Some(layers) = &mut st.layers
            && let Err(e) = layers.encode(&queued)
        {
            tracing::debug!(error = %e, "encoding for client failed; closing");
            self.closed.cancel();
        }
        // Without layers yet, the queued frames go out as they are.
        st.layers
            .get_or_insert_with(|| Box::new(Layers::with_queued(queued)))
    }

    /// Starts TLS: frames pushed from now on are encrypted.
    pub(crate) fn start_tls(&self, conn: ServerConnection) {
        let mut st = self.lock();
        self.layers_for_upgrade(&mut st).start_tls(conn);
    }

    /// Starts compression: frames pushed from now on are compressed (then encrypted).
    /// `hand_off`: compressing costs far more than writing (deflate), so channels leave it to
    /// the writer task rather than doing it while they hold their lock.
    pub(crate) fn start_compression(&self, compressor: Compressor, hand_off: bool) {
        let mut st = self.lock();
        st.hand_off = hand_off;
        self.layers_for_upgrade(&mut st)
            .start_compression(compressor);
    }

    /// Decrypts socket bytes (consuming `raw`), handing the plaintext to `deliver`, and
    /// writes what the TLS session answers; frames waiting in the buffer keep waiting.
    /// `Ok(false)` once the client closed the session.
    pub(crate) fn decrypt(
        &self,
        raw: &mut BytesMut,
        deliver: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<bool> {
        let mut st = self.lock();
        let Some(layers) = &mut st.layers else {
            return Err(std::io::Error::other("no TLS session"));
        };
        let result = layers.decrypt(raw, deliver);
        self.write(&mut st);
        result
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.lock()
            .layers
            .as_ref()
            .is_some_and(|l| l.is_handshaking())
    }

    pub(crate) fn tls_summary(&self) -> Option<TlsSummary> {
        let st = self.lock();
        st.layers.as_ref()?.tls().map(TlsSummary::of)
    }

    /// Writes out what is buffered, ending a TLS session with its close_notify after it.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        let State { buf, layers, .. } = &mut *st;
        if let Some(layers) = layers {
            let queued = std::mem::take(buf);
            if let Err(e) = layers.close(&queued) {
                tracing::debug!(error = %e, "ending the TLS session failed");
            }
        }
        self.send(&mut st);
    }

    /// Encodes what is buffered (on an upgraded connection) and writes it.
    fn send(&self, st: &mut State) {
        let State { buf, layers, .. } = st;
        if let Some(layers) = layers
            && !buf.is_empty()
        {
            let encoded = layers.encode(buf);
            buf.clear();
            if let Err(e) = encoded {
                tracing::debug!(error = %e, "encoding for client failed; closing");
                layers.wire.clear();
                self.closed.cancel();
                return;
            }
        }
        self.write(st);
    }

    /// Writes the bytes ready for the socket: the buffer itself on a plain connection, the
    /// encoded bytes on an upgraded one.
    fn write(&self, st: &mut State) {
        let State {
            socket,
            buf,
            layers,
            ..
        } = st;
        let out = match layers {
            None => buf,
            Some(layers) => &mut layers.wire,
        };
        while !out.is_empty() {
            match try_write(socket, &self.waker, out) {
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !st.stalled {
                        st.stalled = true;
                        self.stalled.notify_one();
                    }
                    return;
                }
                Err(e) => {
                    // Nothing will drain the socket: the writer task must not wait for it.
                    tracing::debug!(error = %e, "write to client failed; closing");
                    out.clear();
                    self.closed.cancel();
                    break;
                }
            }
        }
        st.stalled = false;
        if st.buf.is_empty() {
            st.waiting = false;
            st.when_done = false;
        }
    }
}
