//! Waiting for a publisher's next command without parking the worker thread.
//!
//! A producer that waits for each answer (PUB one at a time, or MPUB batch by batch) sends its
//! next command as soon as it has the previous `OK`. Parking the runtime worker in
//! `epoll_wait` between the two and being woken again costs more than the round trip itself on
//! a virtual machine whose idle CPUs halt: a halted virtual CPU takes tens of microseconds to
//! wake. So after answering, the connection first asks the socket directly for a short while,
//! as Go's scheduler spins before it parks. It spins only while that pays and harms no one:
//! only while no other such publisher read anything since this one's last read (with many of
//! them a worker has better things to do, and on a small machine their clients need the
//! CPUs; consumers' reads do not count: their messages wait for the publisher's round trips),
//! and a publisher whose next command did not come in time is asked less and less often
//! (exponential backoff), so paced or idle publishers cost little CPU for it.

use bytes::BytesMut;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::net::tcp::OwnedReadHalf;

/// How long to ask before parking: a loopback round trip of a client that answers at once,
/// with room for its own wake-up.
const BUDGET: Duration = Duration::from_micros(50);
/// The most reads a publisher that missed again and again waits before it is asked again.
const MAX_SKIP: u32 = 64;

/// Reads by every publisher of the process that waits for answers: one that sees it moved by
/// more than its own reads is not alone.
static READS: AtomicU64 = AtomicU64::new(0);

/// A reader that can tell whether bytes are there without waiting or registering a waker.
pub(crate) trait ReadNow {
    /// Reads what has already arrived into `buf`'s spare room: `None` when nothing has (or the
    /// reader cannot tell), `Some(Ok(0))` at the end of the stream.
    fn read_now(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>>;
}

impl ReadNow for OwnedReadHalf {
    fn read_now(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        // The socket is non-blocking (tokio made it so): a read with nothing there says
        // WouldBlock at once.
        let socket = socket2::SockRef::from(self.as_ref());
        match (&*socket).read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            result => Some(result),
        }
    }
}

/// In-memory streams (the connection's unit tests) always wait.
impl<T> ReadNow for tokio::io::ReadHalf<T> {
    fn read_now(&mut self, _buf: &mut [u8]) -> Option<io::Result<usize>> {
        None
    }
}

/// Whether the next read spins first.
#[derive(Debug)]
pub(super) struct Spin {
    /// Every waiting publisher's reads ([`READS`]; a counter of their own in unit tests).
    reads: &'static AtomicU64,
    /// Reads left to wait without spinning.
    skip: u32,
    /// Spins in a row that ran out of time.
    misses: u32,
    /// [`READS`] after this connection's last read.
    reads_seen: u64,
}

impl Default for Spin {
    fn default() -> Spin {
        Spin {
            reads: &READS,
            skip: 0,
            misses: 0,
            reads_seen: 0,
        }
    }
}

impl Spin {
    /// Called before every read of the connection: when it is `eligible` (a publisher waiting
    /// for each answer, not closing) and worth it, asks `reader` for bytes until some arrive or the
    /// budget is spent, appending them to `buf`; `None` when it did not spin or none came (the
    /// caller waits as usual).
    pub(super) fn read<R: ReadNow>(
        &mut self,
        eligible: bool,
        reader: &mut R,
        buf: &mut BytesMut,
        want: usize,
    ) -> Option<io::Result<usize>> {
        if !eligible {
            return None;
        }
        let before = self.reads.fetch_add(1, Relaxed);
        let alone = before == self.reads_seen;
        self.reads_seen = before + 1;
        if !alone {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        let start = buf.len();
        buf.resize(start + want, 0);
        let deadline = Instant::now() + BUDGET;
        let got = loop {
            if let Some(result) = reader.read_now(&mut buf[start..]) {
                break Some(result);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::hint::spin_loop();
        };
        let n = match &got {
            Some(Ok(n)) => *n,
            _ => 0,
        };
        buf.truncate(start + n);
        match got {
            Some(_) => self.misses = 0,
            None => {
                self.misses = (self.misses + 1).min(MAX_SKIP.trailing_zeros());
                self.skip = (1 << self.misses) - 1;
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Has bytes only from its `ready`-th question on.
    struct Late {
        asked: u32,
        ready: Option<u32>,
    }

    impl ReadNow for Late {
        fn read_now(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
            self.asked += 1;
            let ready = self.ready.is_some_and(|r| self.asked >= r);
            ready.then(|| {
                buf[..3].copy_from_slice(b"PUB");
                Ok(3)
            })
        }
    }

    /// A connection alone in a process of its own.
    fn alone() -> Spin {
        Spin {
            reads: Box::leak(Box::new(AtomicU64::new(0))),
            ..Spin::default()
        }
    }

    #[test]
    fn reads_what_arrives_while_spinning() {
        let mut spin = alone();
        let mut reader = Late {
            asked: 0,
            ready: Some(3),
        };
        let mut buf = BytesMut::from(&b"x"[..]);
        assert!(matches!(
            spin.read(true, &mut reader, &mut buf, 1024),
            Some(Ok(3))
        ));
        assert_eq!(&buf[..], b"xPUB");
    }

    #[test]
    fn a_publisher_that_keeps_missing_is_asked_less_and_less_often() {
        let mut spin = alone();
        let mut never = Late {
            asked: 0,
            ready: None,
        };
        let mut buf = BytesMut::new();
        // Which reads spun, over the first 40.
        let spun: Vec<usize> = (0..40)
            .filter(|_| {
                let before = never.asked;
                assert!(spin.read(true, &mut never, &mut buf, 64).is_none());
                never.asked > before
            })
            .collect();
        assert_eq!(spun, [0, 2, 6, 14, 30]);
        assert!(buf.is_empty());
        // One that answers in time is asked every time again.
        let mut soon = Late {
            asked: 0,
            ready: Some(1),
        };
        while spin.read(true, &mut soon, &mut buf, 64).is_none() {}
        assert!(spin.read(true, &mut soon, &mut buf, 64).is_some());
        assert!(spin.read(true, &mut soon, &mut buf, 64).is_some());
    }

    #[test]
    fn only_a_connection_alone_and_eligible_spins() {
        let mut spin = alone();
        let mut other = Spin {
            reads: spin.reads,
            ..Spin::default()
        };
        let mut reader = Late {
            asked: 0,
            ready: Some(1),
        };
        let mut buf = BytesMut::new();
        assert!(spin.read(true, &mut reader, &mut buf, 64).is_some());
        // A consumer read meanwhile: this one still spins.
        assert!(other.read(false, &mut reader, &mut buf, 64).is_none());
        assert!(spin.read(true, &mut reader, &mut buf, 64).is_some());
        // Another waiting publisher read meanwhile: this read waits, the next may spin again.
        let mut silent = Late {
            asked: 0,
            ready: None,
        };
        assert!(other.read(true, &mut silent, &mut buf, 64).is_none());
        assert!(spin.read(true, &mut reader, &mut buf, 64).is_none());
        assert!(spin.read(true, &mut reader, &mut buf, 64).is_some());
        // A consumer, or a connection that is ending, never spins.
        assert!(spin.read(false, &mut reader, &mut buf, 64).is_none());
        assert_eq!(reader.asked, 3);
    }

    #[tokio::test]
    async fn a_tcp_socket_tells_what_has_arrived_without_waiting() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut reader, _writer) = server.into_split();
        let mut buf = [0u8; 16];
        assert!(reader.read_now(&mut buf).is_none());
        client.write_all(b"PUB t").await.unwrap();
        let got = loop {
            if let Some(got) = reader.read_now(&mut buf) {
                break got.unwrap();
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(&buf[..got], b"PUB t");
        drop(client);
        let end = loop {
            if let Some(end) = reader.read_now(&mut buf) {
                break end.unwrap();
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(end, 0);
    }
}
