//! Binding a server's listeners before it runs, so port 0 works and the real address can be
//! read back, with errors naming the flag of the address; and accepting on them when the
//! process runs out of file descriptors (or another accept error repeats): back off instead
//! of spinning, and log once per interval rather than per failure. And the descriptor
//! budget: the soft `RLIMIT_NOFILE` raised to the hard one at start (as Go does for nsqd),
//! with a share kept back from client connections for the server's own files.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::Instant;

/// The first pause after a failed accept; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this long about failing accepts.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --{flag} {address}: {source}")]
pub struct BindError {
    pub flag: &'static str,
    pub address: String,
    #[source]
    pub source: std::io::Error,
}

/// Binds `address`, the value of `--<flag>`.
pub async fn bind(flag: &'static str, address: &str) -> Result<TcpListener, BindError> {
    bind_reusing(address).await.map_err(|source| BindError {
        flag,
        address: address.to_string(),
        source,
    })
}

/// The address a listener bound for `--<flag>` listens on.
pub fn local_address(listener: &TcpListener, flag: &'static str) -> Result<SocketAddr, BindError> {
    listener.local_addr().map_err(|source| BindError {
        flag,
        address: String::new(),
        source,
    })
}

/// Binds a listener on `address` (`host:port`) with address reuse, so that a restarted broker
/// gets its ports back at once, and the system's largest accept backlog (as Go does), so that
/// a burst of connections is queued rather than refused while the accept loop catches up.
async fn bind_reusing(address: &str) -> io::Result<TcpListener> {
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let mut last_error = None;
    for addr in tokio::net::lookup_host(address).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// Errors about one connection that went away before it was accepted, not about the socket.
pub fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What an accept loop remembers of its failures.
#[derive(Debug)]
pub struct AcceptFailures {
    /// Which listener, for the log.
    listener: &'static str,
    backoff: Duration,
    last_log: Option<Instant>,
    /// Failures since the last log line.
    unlogged: u64,
}

impl AcceptFailures {
    pub fn new(listener: &'static str) -> AcceptFailures {
        AcceptFailures {
            listener,
            backoff: FIRST_BACKOFF,
            last_log: None,
            unlogged: 0,
        }
    }

    /// An accept succeeded: the next failure starts over with a short pause.
    pub fn accepted(&mut self) {
        if self.backoff != FIRST_BACKOFF {
            self.backoff = FIRST_BACKOFF;
            if self.unlogged > 0 {
                tracing::info!(
                    listener = self.listener,
                    failures = self.unlogged,
                    "accepting connections again",
                );
                self.unlogged = 0;
            }
        }
    }

    /// An accept failed: logs (at most once per interval, with how many failed since) and
    /// waits a little longer each time. Connection errors of a single client are ignored.
    pub async fn failed(&mut self, error: &io::Error) {
        if is_connection_error(error) {
            return;
        }
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            tracing::warn!(
                listener = self.listener,
                %error,
                failures = self.unlogged,
                pause = ?self.backoff,
                "accept failed (out of file descriptors?); backing off",
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// How many file descriptors the process may use, after raising the soft limit to the hard
/// one; `None` where the limit cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), max) = (limit.current, limit.maximum)
        && max.is_none_or(|max| max > current)
    {
        // Go raises it the same way for nsqd; an unlimited hard limit keeps the soft one.
        if let Some(max) = max {
            limit.current = Some(max);
            if let Err(error) = setrlimit(Resource::Nofile, limit) {
                tracing::debug!(%error, "cannot raise the file descriptor limit");
            }
        }
    }
    getrlimit(Resource::Nofile).current
}

/// File descriptors kept back from client connections, for segment files, journals,
/// metadata and outgoing connections: an eighth of the limit, at least 64.
pub fn reserved_fds(limit: u64) -> u64 {
    (limit / 8).max(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_log_once_per_interval() {
        let mut failures = AcceptFailures::new("test");
        let emfile = io::Error::from_raw_os_error(24);
        let start = Instant::now();
        for _ in 0..10 {
            failures.failed(&emfile).await;
        }
        // 5 + 10 + 20 + … ms, capped at a second.
        let waited = Instant::now() - start;
        assert!(waited >= Duration::from_millis(5 * 255), "{waited:?}");
        assert!(
            waited <= Duration::from_millis(5 * 255 + 2000),
            "{waited:?}"
        );
        assert_eq!(failures.backoff, MAX_BACKOFF);
        // Only the first failure was logged; the rest wait for the interval.
        assert_eq!(failures.unlogged, 9);
        failures.accepted();
        assert_eq!(failures.backoff, FIRST_BACKOFF);
        assert_eq!(failures.unlogged, 0);
        // A client that hung up is not an accept failure.
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        failures.failed(&reset).await;
        assert_eq!(failures.backoff, FIRST_BACKOFF);
    }

    #[test]
    fn a_share_of_descriptors_is_kept_back() {
        assert_eq!(reserved_fds(1024), 128);
        assert_eq!(reserved_fds(256), 64);
        assert_eq!(reserved_fds(1 << 20), 1 << 17);
        assert!(raise_fd_limit().is_some_and(|limit| limit >= 64));
    }
}
