//! How knsq's binaries stop: SIGTERM or SIGINT starts a clean shutdown, a second one ends the
//! process at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGTERM or SIGINT; exits the process on the second.
///
/// The handlers are installed before this returns, so a signal sent the moment the process
/// says it is listening starts a clean shutdown instead of killing it; run the returned future
/// on a task.
pub fn watch_signals(shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
    let handlers = signal(SignalKind::terminate()).and_then(|term| {
        let int = signal(SignalKind::interrupt())?;
        Ok((term, int))
    });
    async move {
        let Ok((mut term, mut int)) = handlers else {
            tracing::error!("cannot listen for signals; stop the process with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; shutting down (send another to exit at once)");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal; exiting now");
        std::process::exit(1);
    }
}
