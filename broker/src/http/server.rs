//! Serving the HTTP API over connections from a listener (plain or TLS): hyper's HTTP/1.1
//! with a header-read timeout that also closes keep-alive connections left idle, a limit on
//! the size of request headers, and a cap on connections that makes room for a new client by
//! closing the longest-idle one — so slow or silent clients can neither hold the broker's file
//! descriptors nor keep `/ping` from being answered.

use super::Router;
use axum::body::Body;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use server_kit::listen::AcceptFailures;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long an in-flight request may take to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A new connection is not closed to make room before it had this long to send its request:
/// a well-behaved client does so at once, while slow ones cannot push it out, and clients
/// that reconnect as soon as they are closed cannot make the broker do nothing but close them.
const NEW_CONNECTION_GRACE: Duration = Duration::from_millis(200);

/// Limits on HTTP clients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpLimits {
    /// Time a client has to send a request's headers, counted from the connection being
    /// opened or going idle after a response: also the keep-alive idle timeout.
    pub(crate) header_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub(crate) max_header_bytes: usize,
    /// Connections open at once.
    pub(crate) max_connections: usize,
}

/// The plain HTTP listener: accept failures (out of file descriptors) back off and are
/// logged once per interval.
#[derive(Debug)]
pub(crate) struct PlainListener {
    listener: TcpListener,
    failures: AcceptFailures,
}

impl PlainListener {
    pub(crate) fn new(listener: TcpListener) -> PlainListener {
        PlainListener {
            listener,
            failures: AcceptFailures::new("HTTP"),
        }
    }
}

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.failures.accepted();
                    return accepted;
                }
                Err(e) => self.failures.failed(&e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// The open connections, oldest first, and whether each is in the middle of a request.
#[derive(Debug)]
struct OpenConnections {
    max: usize,
    state: Mutex<Open>,
    /// A connection ended.
    ended: Notify,
}

#[derive(Debug, Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, Conn>,
}

#[derive(Debug)]
struct Conn {
    opened: Instant,
    /// Requests being answered on it.
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

/// A connection's place among the open ones; it gives the place back when dropped.
struct Registered {
    id: u64,
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
    open: Arc<OpenConnections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.open.lock().by_age.remove(&self.id);
        self.open.ended.notify_one();
    }
}

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until one more connection fits: at the cap, the longest-open idle connection past
    /// its grace period is told to close (and stops counting at once, so the accept loop keeps
    /// up with a flood of clients that never finish a request); otherwise waits for one to end
    /// or to come out of its grace period.
    async fn make_room(&self) {
        loop {
            let ended = self.ended.notified();
            let grace_over = {
                let mut open = self.lock();
                if open.by_age.len() < self.max {
                    return;
                }
                let now = Instant::now();
                let idle: Vec<(u64, Instant)> = open
                    .by_age
                    .iter()
                    .filter(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                    .map(|(&id, c)| (id, c.opened + NEW_CONNECTION_GRACE))
                    .collect();
                let evictable = idle.iter().find(|(_, free_at)| now >= *free_at);
                if let Some(conn) = evictable.and_then(|(id, _)| open.by_age.remove(id)) {
                    conn.close.notify_one();
                    return;
                }
                idle.iter().map(|(_, free_at)| *free_at).min()
            };
            match grace_over {
                Some(at) => {
                    tokio::select! {
                        _ = ended => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => ended.await,
            }
        }
    }

    fn register(self: &Arc<Self>) -> Registered {
        let busy = Arc::new(AtomicUsize::new(0));
        let close = Arc::new(Notify::new());
        let mut open = self.lock();
        let id = open.next;
        open.next += 1;
        open.by_age.insert(
            id,
            Conn {
                opened: Instant::now(),
                busy: busy.clone(),
                close: close.clone(),
            },
        );
        Registered {
            id,
            busy,
            close,
            open: self.clone(),
        }
    }
}

/// Counts a request as in flight while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(busy: &Arc<AtomicUsize>) -> InFlight {
        busy.fetch_add(1, Ordering::AcqRel);
        InFlight(busy.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `app` on the connections `listener` yields until `shutdown`, then lets requests in
/// flight finish (for a few seconds at most).
pub(crate) async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    L: Listener,
{
    let open = Arc::new(OpenConnections {
        max: limits.max_connections.max(1),
        state: Mutex::default(),
        ended: Notify::new(),
    });
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = open.make_room() => {}
        }
        let (io, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let registered = open.register();
        connections.spawn(serve_connection(
            io,
            app.clone(),
            limits,
            registered,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection<I>(
    io: I,
    app: Router,
    limits: HttpLimits,
    registered: Registered,
    shutdown: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let busy = registered.busy.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_flight = InFlight::new(&busy);
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            drop(in_flight);
            response
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP connection ended");
            }
        }
        // Room was needed for a new client and this one was idle: closing it is all.
        _ = registered.close.notified() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
    }
}
