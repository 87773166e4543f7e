//! The in-memory queue of a channel, and the compact form of a published batch in it.
//!
//! An MPUB's messages share their publish time and differ only in ID and body, so a
//! [`Batch`] keeps them as one body buffer, the end of each body in it and the 64-bit IDs:
//! 212 bytes for a 200-byte message, against a [`Msg`] (64 bytes) beside a body slice of the
//! read buffer it came in (204 bytes, and whatever of that buffer nothing else used). Every
//! channel of the topic queues the same batch, so fan-out copies nothing per message. A
//! [`Msg`] is made only when a message leaves the queue.

use super::message::Msg;
use bytes::{Bytes, BytesMut};
use proto::wire::MessageId;
use std::collections::VecDeque;
use std::sync::Arc;

/// Messages published together (one MPUB), as they wait in memory.
#[derive(Debug)]
pub(crate) struct Batch {
    timestamp: i64,
    ids: Box<[u64]>,
    /// Where each body ends in `bodies`; body `i` starts where body `i - 1` ends.
    ends: Box<[u32]>,
    bodies: Bytes,
}

impl Batch {
    /// The batch of `bodies` with IDs `ids`, published at `timestamp`. The bodies are copied
    /// into one buffer, which lets the connection reuse the buffer they were read into.
    pub(crate) fn new(timestamp: i64, ids: Box<[u64]>, bodies: &[Bytes]) -> Batch {
        debug_assert_eq!(ids.len(), bodies.len());
        let total: usize = bodies.iter().map(Bytes::len).sum();
        let mut buf = BytesMut::with_capacity(total);
        let ends = bodies
            .iter()
            .map(|body| {
                buf.extend_from_slice(body);
                // An MPUB body is at most --max-body-size, far below 4 GiB.
                u32::try_from(buf.len()).unwrap_or(u32::MAX)
            })
            .collect();
        Batch {
            timestamp,
            ids,
            ends,
            bodies: buf.freeze(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Message `i`, as it is handed out: never delivered yet.
    pub(crate) fn get(&self, i: usize) -> Msg {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let body = self.bodies.slice(start..self.ends[i] as usize);
        Msg::new(MessageId::from_u64(self.ids[i]), self.timestamp, body)
    }
}

#[derive(Debug)]
enum Item {
    One(Msg),
    /// Messages `next..end` of a batch.
    Run {
        batch: Arc<Batch>,
        next: u32,
        end: u32,
    },
}

/// A first-in, first-out queue of messages, single or in runs of a batch.
#[derive(Debug, Default)]
pub(crate) struct MemQueue {
    items: VecDeque<Item>,
    len: usize,
}

/// Below this many slots a drained queue keeps its room; above it, room for a burst that
/// has passed is given back.
const KEEP_SLOTS: usize = 1024;

impl MemQueue {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push_back(&mut self, msg: Msg) {
        self.len += 1;
        self.items.push_back(Item::One(msg));
    }

    pub(crate) fn push_front(&mut self, msg: Msg) {
        self.len += 1;
        self.items.push_front(Item::One(msg));
    }

    pub(crate) fn extend(&mut self, msgs: impl IntoIterator<Item = Msg>) {
        for msg in msgs {
            self.push_back(msg);
        }
    }

    /// Queues messages `range` of `batch`.
    pub(crate) fn push_run(&mut self, batch: &Arc<Batch>, range: std::ops::Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.len += range.len();
        // Batch lengths are bounded by the MPUB body size, far below 4 billion.
        self.items.push_back(Item::Run {
            batch: batch.clone(),
            next: range.start as u32,
            end: range.end as u32,
        });
    }

    pub(crate) fn pop_front(&mut self) -> Option<Msg> {
        let msg = match self.items.front_mut()? {
            Item::One(_) => match self.items.pop_front() {
                Some(Item::One(msg)) => msg,
                _ => return None,
            },
            Item::Run { batch, next, end } => {
                let msg = batch.get(*next as usize);
                *next += 1;
                if next == end {
                    self.items.pop_front();
                }
                msg
            }
        };
        self.len -= 1;
        if self.len == 0 {
            self.release_room();
        }
        Some(msg)
    }

    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.len = 0;
        self.release_room();
    }

    /// Takes up to `n` messages from the front, oldest first.
    pub(crate) fn drain_front(&mut self, n: usize) -> DrainFront<'_> {
        DrainFront {
            queue: self,
            left: n,
        }
    }

    /// The first `max` messages, without taking them.
    pub(crate) fn peek(&self, max: usize) -> Vec<Msg> {
        let mut out = Vec::with_capacity(max.min(self.len));
        for item in &self.items {
            let left = max - out.len();
            match item {
                _ if left == 0 => break,
                Item::One(msg) => out.push(msg.clone()),
                Item::Run { batch, next, end } => {
                    let upto = (*end as usize).min(*next as usize + left);
                    out.extend((*next as usize..upto).map(|i| batch.get(i)));
                }
            }
        }
        out
    }

    /// An empty queue gives back the room a burst made it take.
    fn release_room(&mut self) {
        if self.items.capacity() > KEEP_SLOTS {
            self.items = VecDeque::new();
        }
    }
}

/// The messages [`MemQueue::drain_front`] takes; those not iterated stay queued.
pub(crate) struct DrainFront<'a> {
    queue: &'a mut MemQueue,
    left: usize,
}

impl Iterator for DrainFront<'_> {
    type Item = Msg;

    fn next(&mut self) -> Option<Msg> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.queue.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first: u64, n: usize) -> Arc<Batch> {
        let ids: Box<[u64]> = (first..first + n as u64).collect();
        let bodies: Vec<Bytes> = (0..n).map(|i| Bytes::from(vec![b'a'; i + 1])).collect();
        Arc::new(Batch::new(42, ids, &bodies))
    }

    #[test]
    fn batch_hands_out_each_message_whole() {
        let b = batch(7, 3);
        assert_eq!(b.len(), 3);
        for i in 0..3 {
            let msg = b.get(i);
            assert_eq!(msg.id, MessageId::from_u64(7 + i as u64));
            assert_eq!(msg.timestamp, 42);
            assert_eq!(msg.attempts, 0);
            assert!(msg.ticket().is_none());
            assert_eq!(&msg.body[..], &vec![b'a'; i + 1][..]);
        }
    }

    #[test]
    fn runs_and_single_messages_keep_their_order() {
        let mut q = MemQueue::default();
        let single = |n| Msg::new(MessageId::from_u64(n), 0, Bytes::new());
        q.push_back(single(1));
        q.push_run(&batch(10, 4), 1..3);
        q.push_run(&batch(20, 2), 0..0);
        q.push_back(single(2));
        q.push_front(single(0));
        assert_eq!(q.len(), 5);
        let want: Vec<_> = [0, 1, 11, 12, 2].map(MessageId::from_u64).into();
        let peeked: Vec<_> = q.peek(10).into_iter().map(|m| m.id).collect();
        assert_eq!(peeked, want);
        let first: Vec<_> = q.peek(3).into_iter().map(|m| m.id).collect();
        assert_eq!(first, want[..3]);
        let ids: Vec<_> = q.drain_front(4).map(|m| m.id).collect();
        assert_eq!(ids, want[..4]);
        assert_eq!(q.len(), 1);
        let rest: Vec<_> = q.drain_front(10).map(|m| m.id).collect();
        assert_eq!(rest, want[4..]);
        assert!(q.is_empty() && q.pop_front().is_none());
    }

    #[test]
    fn a_queued_message_takes_no_more_room_than_before() {
        // A single message sits in the queue as it did in a `VecDeque<Msg>`.
        assert_eq!(std::mem::size_of::<Item>(), std::mem::size_of::<Msg>());
    }

    #[test]
    fn a_drained_queue_gives_its_room_back() {
        let mut q = MemQueue::default();
        for n in 0..5000 {
            q.push_back(Msg::new(MessageId::from_u64(n), 0, Bytes::new()));
        }
        assert!(q.items.capacity() >= 5000);
        while q.pop_front().is_some() {}
        assert_eq!(q.items.capacity(), 0);
    }
}
