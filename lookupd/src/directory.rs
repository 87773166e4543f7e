//! The state both servers share: the registry behind one lock, the open registration
//! streams, and the metrics.

use crate::metrics::Metrics;
use crate::registry::{Registry, SessionId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

/// Who this lookupd is, as told to brokers when they identify.
#[derive(Debug, Clone)]
pub(crate) struct LookupdInfo {
    pub(crate) broadcast_address: String,
    pub(crate) hostname: String,
    pub(crate) grpc_port: u16,
    pub(crate) http_port: u16,
}

#[derive(Debug)]
pub(crate) struct Directory {
    registry: Mutex<Registry>,
    /// Cancelling a session's token ends its stream (when a newer stream takes over).
    streams: Mutex<HashMap<SessionId, CancellationToken>>,
    next_session: AtomicU64,
    pub(crate) metrics: Metrics,
    pub(crate) info: LookupdInfo,
}

impl Directory {
    pub(crate) fn new(registry: Registry, metrics: Metrics, info: LookupdInfo) -> Directory {
        metrics.set_counts(registry.counts());
        Directory {
            registry: Mutex::new(registry),
            streams: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            metrics,
            info,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the registry.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the registry and updates the gauges of what it holds.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut registry = self.lock();
        let result = f(&mut registry);
        self.metrics.set_counts(registry.counts());
        result
    }

    /// A new stream: its session id and the token that ends it.
    pub(crate) fn open_stream(&self) -> (SessionId, CancellationToken) {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.streams_lock().insert(session, token.clone());
        self.metrics.stream_opened();
        (session, token)
    }

    /// Ends the stream of `session` from outside (it was taken over).
    pub(crate) fn end_stream(&self, session: SessionId) {
        if let Some(token) = self.streams_lock().get(&session) {
            token.cancel();
        }
    }

    /// The stream of `session` has ended: its broker's registrations go at once.
    pub(crate) fn close_stream(&self, session: SessionId, code: tonic::Code) {
        self.streams_lock().remove(&session);
        if let Some(peer) = self.update(|r| r.remove_session(session)) {
            tracing::info!(
                session,
                broker = %peer.id(),
                remote = %peer.remote_address,
                "broker unregistered: its stream ended"
            );
        }
        self.metrics.stream_closed(code);
    }

    fn streams_lock(&self) -> MutexGuard<'_, HashMap<SessionId, CancellationToken>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}
