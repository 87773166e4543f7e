//! A client's outgoing frames, and the socket they go to.
//!
//! Whoever produces a frame (the connection's reader for responses, a channel delivering
//! messages from a publisher's task) appends it under the outbox lock and, when it is due,
//! writes it to the socket right there with a non-blocking write. So a PUB's `OK` leaves
//! without waking any other task. Only when the socket is full does the connection's writer
//! task take over, waiting for it to drain; it also runs the heartbeat and flush timers.
//! Every write happens under the lock from the front of the buffer, so frames keep their
//! order whoever writes them.

use bytes::{Buf, BytesMut};
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

    fn send(&self, st: &mut State) {
        while !st.buf.is_empty() {
            match self.socket.try_write(&st.buf) {
                Ok(n) => st.buf.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !st.stalled {
                        st.stalled = true;
                        self.stalled.notify_one();
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "write to client failed; closing");
                    st.buf.clear();
                    self.closed.cancel();
                    return;
                }
            }
        }
        st.stalled = false;
        st.waiting = false;
    }
}
