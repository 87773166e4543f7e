//! The HTTPS listener: TLS handshakes on `--https-address`, done off the accept loop and handed
//! to axum as finished streams.
//!
//! A handshake waits on the client, so doing it inside `Listener::accept` would let one slow or
//! silent client stop every other one; here each handshake is its own task with a deadline.

use crate::listen::AcceptFailures;
use rustls::ServerConfig;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its handshake. nsqd sets none; without one a client
/// that connects and says nothing holds a task and a socket for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once. Past this the accept loop waits for one to finish, which
/// bounds the tasks and sockets a flood of silent clients can hold to this many for
/// [`HANDSHAKE_TIMEOUT`].
const MAX_HANDSHAKES: usize = 1024;

/// Finished handshakes not yet taken by axum. axum takes each at once and spawns it, so a
/// small buffer is enough; when it is full the handshake tasks wait, not the accept loop.
const READY_CAPACITY: usize = 64;

/// The client TLS config with ALPN set for HTTP/1.1, the only HTTP version we serve.
pub fn https_config(client_tls: &ServerConfig) -> Arc<ServerConfig> {
    let mut config = client_tls.clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// An `axum::serve` listener yielding connections whose TLS handshake has finished.
///
/// Dropping it (axum does once shutdown begins) stops the accept loop, closes the socket and
/// ends the handshakes still in progress.
#[derive(Debug)]
pub struct HttpsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl HttpsListener {
    /// Starts accepting on an already-bound listener whose address is `local`.
    pub fn new(
        listener: TcpListener,
        local: SocketAddr,
        config: Arc<ServerConfig>,
    ) -> HttpsListener {
        let (tx, ready) = mpsc::channel(READY_CAPACITY);
        tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        HttpsListener { local, ready }
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop only ends once this listener is dropped (or if it panicked):
            // there is nothing more to accept, and axum's shutdown signal ends the wait.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

type Ready = mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>;

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, ready: Ready) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut failures = AcceptFailures::new("HTTPS");
    loop {
        let permit = tokio::select! {
            _ = ready.closed() => return,
            permit = handshakes.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else {
            return; // the semaphore is never closed
        };
        let accepted = tokio::select! {
            _ = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                failures.accepted();
                let acceptor = acceptor.clone();
                let ready = ready.clone();
                tokio::spawn(async move {
                    let tls = handshake(&acceptor, tcp, peer, &ready).await;
                    drop(permit);
                    if let Some(tls) = tls {
                        // Fails only when the listener is gone: the stream is just closed.
                        let _ = ready.send((tls, peer)).await;
                    }
                });
            }
            Err(e) => failures.failed(&e).await,
        }
    }
}

/// The client's handshake, or `None` if it failed, took too long, or the listener was dropped.
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    ready: &Ready,
) -> Option<TlsStream<TcpStream>> {
    let result = tokio::select! {
        _ = ready.closed() => return None,
        result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => result,
    };
    match result {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTPS: TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "HTTPS: no TLS handshake in time");
            None
        }
    }
}
