//! A client's outgoing frames, and the socket they go to.
//!
//! Whoever produces a frame (the connection's reader for responses, a channel delivering
//! messages from a publisher's task) appends it under the outbox lock and, when it is due,
//! writes it to the socket right there with a non-blocking write. So a PUB's `OK` leaves
//! without waking any other task. Only when the socket is full does the connection's writer
//! task take over, waiting for it to drain; it also runs the heartbeat and flush timers.
//! Every write happens under the lock from the front of the buffer, so frames keep their
//! order whoever writes them. After a TLS or compression upgrade the frames pass through the
//! connection's [`Layers`] on their way, still under the lock.

use super::transport::Layers;
use crate::tls::TlsSummary;
use bytes::{Buf, BytesMut};
use proto::wire::compression::Compressor;
use rustls::ServerConnection;
use std::io::ErrorKind;
use std::net::Shutdown;
use std::sync::{Mutex, MutexGuard};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    socket: OwnedWriteHalf,
    stalled: Notify,
    /// Wakes the writer task to run its flush timer: messages wait in the buffer.
    buffered: Notify,
    closed: CancellationToken,
}

#[derive(Debug)]
struct State {
    buf: BytesMut,
    /// Bytes buffered before a write is due (the client's output_buffer_size).
    buffer_size: usize,
    /// The socket refused bytes; the writer task is waiting for it to drain.
    stalled: bool,
    /// Messages wait for the output buffer timeout; the writer's flush timer runs only then,
    /// so idle connections cost no timer wakeups.
    waiting: bool,
    /// TLS and compression, once IDENTIFY negotiated them.
    layers: Option<Box<Layers>>,
}

impl Outbox {
    pub(crate) fn new(
        socket: OwnedWriteHalf,
        buffer_size: usize,
        closed: CancellationToken,
    ) -> Self {
        Outbox {
            state: Mutex::new(State {
                buf: BytesMut::new(),
                buffer_size,
                stalled: false,
                waiting: false,
                layers: None,
            }),
            socket,
            stalled: Notify::new(),
            buffered: Notify::new(),
            closed,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends frames with `write`, then writes out what is buffered if `flush` is set or
    /// the buffer has reached the client's output buffer size.
    pub(crate) fn push<R>(&self, flush: bool, write: impl FnOnce(&mut BytesMut) -> R) -> R {
        let mut st = self.lock();
        let result = write(&mut st.buf);
        if flush || st.buf.len() >= st.buffer_size {
            self.send(&mut st);
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

    pub(crate) fn set_buffer_size(&self, size: usize) {
        self.lock().buffer_size = size.max(1);
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

    /// Resolves when the socket may take more bytes.
    pub(crate) async fn writable(&self) -> std::io::Result<()> {
        self.socket.writable().await
    }

    /// Ends the stream cleanly: the peer reads an orderly end of stream.
    pub(crate) fn shutdown(&self) {
        let _ = socket2::SockRef::from(self.socket.as_ref()).shutdown(Shutdown::Write);
    }

    /// The layers to install a new one into: frames already queued leave as the layers in
    /// place before it had them (in clear before TLS, uncompressed before compression).
    fn layers_for_upgrade<'a>(&self, st: &'a mut State) -> &'a mut Layers {
        if let Some(layers) = &mut st.layers
            && !st.buf.is_empty()
            && let Err(e) = layers.encode(&st.buf)
        {
            tracing::debug!(error = %e, "encoding for client failed; closing");
            self.closed.cancel();
        }
        let queued = std::mem::take(&mut st.buf);
        st.layers
            .get_or_insert_with(|| Box::new(Layers::with_queued(queued)))
    }

    /// Starts TLS: frames pushed from now on are encrypted.
    pub(crate) fn start_tls(&self, conn: ServerConnection) {
        let mut st = self.lock();
        self.layers_for_upgrade(&mut st).start_tls(conn);
    }

    /// Starts compression: frames pushed from now on are compressed (then encrypted).
    pub(crate) fn start_compression(&self, compressor: Compressor) {
        let mut st = self.lock();
        self.layers_for_upgrade(&mut st)
            .start_compression(compressor);
    }

    /// Decrypts socket bytes (consuming `raw`) into `plain`, sending what the TLS session
    /// answers. `Ok(false)` once the client closed the session.
    pub(crate) fn decrypt(
        &self,
        raw: &mut BytesMut,
        plain: &mut BytesMut,
    ) -> std::io::Result<bool> {
        let mut st = self.lock();
        let result = match &mut st.layers {
            Some(layers) => layers.decrypt(raw, plain),
            None => Err(std::io::Error::other("no TLS session")),
        };
        self.send(&mut st);
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

    /// Ends a TLS session with its close_notify.
    pub(crate) fn close_tls(&self) {
        let mut st = self.lock();
        if let Some(layers) = &mut st.layers {
            layers.close();
        }
        self.send(&mut st);
    }

    fn send(&self, st: &mut State) {
        let State { buf, layers, .. } = st;
        let out = match layers {
            None => buf,
            Some(layers) => {
                if !buf.is_empty() {
                    let encoded = layers.encode(buf);
                    buf.clear();
                    if let Err(e) = encoded {
                        tracing::debug!(error = %e, "encoding for client failed; closing");
                        layers.wire.clear();
                        self.closed.cancel();
                        return;
                    }
                }
                &mut layers.wire
            }
        };
        while !out.is_empty() {
            match self.socket.try_write(out) {
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !st.stalled {
                        st.stalled = true;
                        self.stalled.notify_one();
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "write to client failed; closing");
                    out.clear();
                    self.closed.cancel();
                    return;
                }
            }
        }
        st.stalled = false;
        st.waiting = false;
    }
}
