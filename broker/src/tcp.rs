//! The NSQ TCP accept loop.

use crate::accept::AcceptFailures;
use crate::broker::Broker;
use crate::protocol;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts clients on an already-bound listener until `shutdown`; each connection runs as a
/// task in `connections`, so shutdown can wait for them.
pub(crate) async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let mut failures = AcceptFailures::new("TCP");
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                failures.accepted();
                connections.spawn(protocol::serve(stream, broker.clone(), shutdown.clone()));
            }
            // Usually out of file descriptors: back off instead of spinning.
            Err(e) => failures.failed(&e).await,
        }
    }
}
