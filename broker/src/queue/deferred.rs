//! Messages waiting for a due time (DPUB, REQ with a delay), earliest first.

use super::message::Msg;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use tokio::time::Instant;

#[derive(Debug, Default)]
pub(crate) struct Deferred {
    heap: BinaryHeap<Reverse<Item>>,
    /// Ties on the due time keep insertion order.
    seq: u64,
}

#[derive(Debug)]
struct Item {
    due: Instant,
    seq: u64,
    msg: Msg,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

impl Deferred {
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    pub(crate) fn push(&mut self, msg: Msg, due: Instant) {
        self.seq += 1;
        self.heap.push(Reverse(Item {
            due,
            seq: self.seq,
            msg,
        }));
    }

    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(item)| item.due)
    }

    /// Removes and returns the earliest message if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Msg> {
        if self.next_due()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(item)| item.msg)
    }

    /// The earliest message, due or not, with its due time.
    pub(crate) fn pop_earliest(&mut self) -> Option<(Instant, Msg)> {
        self.heap.pop().map(|Reverse(item)| (item.due, item.msg))
    }

    pub(crate) fn clear(&mut self) {
        self.heap.clear();
    }

    /// Removes everything, with due times, in no particular order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (Instant, Msg)> + '_ {
        self.heap.drain().map(|Reverse(item)| (item.due, item.msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proto::wire::MessageId;
    use std::time::Duration;

    fn msg(n: u64) -> Msg {
        let mut msg = Msg::new(MessageId::from_u64(n), 0, Bytes::new());
        msg.attempts = 0;
        msg
    }

    #[test]
    fn releases_in_due_order_then_insertion_order() {
        let t0 = Instant::now();
        let mut d = Deferred::default();
        d.push(msg(1), t0 + Duration::from_secs(2));
        d.push(msg(2), t0 + Duration::from_secs(1));
        d.push(msg(3), t0 + Duration::from_secs(1));
        assert_eq!(d.next_due(), Some(t0 + Duration::from_secs(1)));
        assert!(d.pop_due(t0).is_none());
        let due: Vec<_> = std::iter::from_fn(|| d.pop_due(t0 + Duration::from_secs(5)))
            .map(|m| m.id)
            .collect();
        assert_eq!(
            due,
            [
                MessageId::from_u64(2),
                MessageId::from_u64(3),
                MessageId::from_u64(1)
            ]
        );
        assert_eq!(d.len(), 0);
    }
}
