//! The NSQ TCP accept loop, and its cap on connections (`--max-connections`).

use crate::protocol::{self, Shared};
use bytes::BytesMut;
use proto::wire::ProtocolError;
use proto::wire::frame::write_error;
use server_kit::listen::AcceptFailures;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a refused client has to read why before its connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// At most one log line per this long about refused connections (the metric counts each).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Refusals being sent at once; past this, connections over the cap are closed at once, so a
/// flood of them holds no more than this many tasks and sockets for [`REFUSAL_LINGER`].
const MAX_REFUSING: usize = 64;

/// Accepts clients on an already-bound listener until `shutdown`; each connection runs as a
/// task in `connections`, so shutdown can wait for them. Past `max_connections` open at once,
/// a new client is told `E_INVALID` and closed. Accept failures (out of file descriptors)
/// back off and are logged once per interval.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let open = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut failures = AcceptFailures::new("TCP");
    let mut last_warned: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                failures.accepted();
                stream
            }
            // Usually out of file descriptors: back off instead of spinning.
            Err(e) => {
                failures.failed(&e).await;
                continue;
            }
        };
        match open.clone().try_acquire_owned() {
            Ok(permit) => {
                let serving = protocol::serve_tcp(stream, shared.clone(), shutdown.clone());
                connections.spawn(async move {
                    serving.await;
                    drop(permit);
                });
            }
            Err(_) => {
                shared.metrics.refused.inc();
                let now = Instant::now();
                if last_warned.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                    let refused = shared.metrics.refused.get();
                    tracing::warn!(
                        max_connections,
                        refused,
                        "too many connections; refusing clients"
                    );
                    last_warned = Some(now);
                }
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    connections.spawn(async move {
                        refuse(stream, max_connections).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// Tells a client over the cap why, then closes its connection once it has read that (or
/// after [`REFUSAL_LINGER`]): closing with its magic unread would reset the connection and
/// lose the error.
async fn refuse(mut stream: TcpStream, max_connections: usize) {
    let mut frame = BytesMut::new();
    let text = format!("too many connections (at most {max_connections})");
    write_error(&mut frame, &ProtocolError::invalid(text));
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
