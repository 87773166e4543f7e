//! The in-memory queue of a channel (and of a topic while it holds messages), and the compact
//! form of a published batch in it.
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
use std::ops::Range;
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
enum Item<T> {
    One(T),
    /// Messages `next..end` of a batch.
    Run {
        batch: Arc<Batch>,
        next: u32,
        end: u32,
    },
}

/// What a queue holds one by one: a message, or a message with what the queue keeps beside it
/// (a topic keeps its due time). A message of a batch is one of these when it leaves the queue.
pub(crate) trait Queued: From<Msg> + Clone {}

impl<T: From<Msg> + Clone> Queued for T {}

/// What [`MemQueue::pop_item`] takes from the front: one message, or a run of a batch whole.
#[derive(Debug)]
pub(crate) enum Popped<T> {
    One(T),
    Run(Arc<Batch>, Range<usize>),
}

/// A first-in, first-out queue of messages, single or in runs of a batch.
#[derive(Debug)]
pub(crate) struct MemQueue<T = Msg> {
    items: VecDeque<Item<T>>,
    len: usize,
}

impl<T> Default for MemQueue<T> {
    fn default() -> Self {
        MemQueue {
            items: VecDeque::new(),
            len: 0,
        }
    }
}

/// Below this many slots a drained queue keeps its room; above it, room for a burst that
/// has passed is given back.
const KEEP_SLOTS: usize = 1024;

impl<T: Queued> MemQueue<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push_back(&mut self, msg: T) {
        self.len += 1;
        self.items.push_back(Item::One(msg));
    }

    pub(crate) fn push_front(&mut self, msg: T) {
        self.len += 1;
        self.items.push_front(Item::One(msg));
    }

    pub(crate) fn extend(&mut self, msgs: impl IntoIterator<Item = T>) {
        for msg in msgs {
            self.push_back(msg);
        }
    }

    /// Queues messages `range` of `batch`.
    pub(crate) fn push_run(&mut self, batch: &Arc<Batch>, range: Range<usize>) {
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

    pub(crate) fn pop_front(&mut self) -> Option<T> {
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
                T::from(msg)
            }
        };
        self.taken(1);
        Some(msg)
    }

    /// Takes the first message, or the first run of a batch whole (for moving runs on to
    /// other queues without making a message of each).
    pub(crate) fn pop_item(&mut self) -> Option<Popped<T>> {
        let popped = match self.items.pop_front()? {
            Item::One(msg) => Popped::One(msg),
            Item::Run { batch, next, end } => Popped::Run(batch, next as usize..end as usize),
        };
        self.taken(match &popped {
            Popped::One(_) => 1,
            Popped::Run(_, range) => range.len(),
        });
        Some(popped)
    }

    /// Puts back in front what [`MemQueue::pop_item`] took.
    pub(crate) fn push_front_item(&mut self, popped: Popped<T>) {
        match popped {
            Popped::One(msg) => self.push_front(msg),
            Popped::Run(batch, range) if !range.is_empty() => {
                self.len += range.len();
                self.items.push_front(Item::Run {
                    batch,
                    next: range.start as u32,
                    end: range.end as u32,
                });
            }
            Popped::Run(..) => {}
        }
    }

    fn taken(&mut self, n: usize) {
        self.len -= n;
        if self.len == 0 {
            self.release_room();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.len = 0;
        self.release_room();
    }

    /// Takes up to `n` messages from the front, oldest first.
    pub(crate) fn drain_front(&mut self, n: usize) -> DrainFront<'_, T> {
        DrainFront {
            queue: self,
            left: n,
        }
    }

    /// The first `max` messages, without taking them.
    pub(crate) fn peek(&self, max: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(max.min(self.len));
        for item in &self.items {
            let left = max - out.len();
            match item {
                _ if left == 0 => break,
                Item::One(msg) => out.push(msg.clone()),
                Item::Run { batch, next, end } => {
                    let upto = (*end as usize).min(*next as usize + left);
                    out.extend((*next as usize..upto).map(|i| T::from(batch.get(i))));
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
pub(crate) struct DrainFront<'a, T> {
    queue: &'a mut MemQueue<T>,
    left: usize,
}

impl<T: Queued> Iterator for DrainFront<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
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
        let mut q: MemQueue = MemQueue::default();
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
    fn items_come_off_whole_and_go_back_in_front() {
        let mut q: MemQueue = MemQueue::default();
        let single = |n| Msg::new(MessageId::from_u64(n), 0, Bytes::new());
        q.push_run(&batch(10, 4), 1..4);
        q.push_back(single(1));
        let Some(Popped::Run(run, range)) = q.pop_item() else {
            panic!("the run comes off first, whole");
        };
        assert_eq!((run.len(), range.clone(), q.len()), (4, 1..4, 1));
        q.push_front_item(Popped::Run(run, range));
        assert_eq!(q.len(), 4);
        let ids: Vec<_> = q.drain_front(10).map(|m| m.id).collect();
        assert_eq!(ids, [11, 12, 13, 1].map(MessageId::from_u64));
        assert!(q.pop_item().is_none());
    }

    #[test]
    fn a_queued_message_takes_no_more_room_than_before() {
        // A single message sits in the queue as it did in a `VecDeque<Msg>`.
        assert_eq!(std::mem::size_of::<Item<Msg>>(), std::mem::size_of::<Msg>());
    }

    #[test]
    fn a_drained_queue_gives_its_room_back() {
        let mut q: MemQueue = MemQueue::default();
        for n in 0..5000 {
            q.push_back(Msg::new(MessageId::from_u64(n), 0, Bytes::new()));
        }
        assert!(q.items.capacity() >= 5000);
        while q.pop_front().is_some() {}
        assert_eq!(q.items.capacity(), 0);
    }
}
