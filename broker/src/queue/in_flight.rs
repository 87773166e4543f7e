//! Messages delivered and not yet finished, with their deadlines.
//!
//! Every consumer with the same msg_timeout produces deadlines in delivery order, so entries
//! live in one time-ordered list ("lane") per timeout: delivery appends, FIN unlinks in O(1),
//! and the earliest deadline is at the head of one of a few lanes. No heap, no lazy deletion,
//! so memory follows the number of messages in flight, not the delivery rate.

use super::message::Msg;
use foldhash::fast::RandomState;
use proto::wire::MessageId;
use slab::Slab;
use std::collections::{HashMap, hash_map};
use std::time::Duration;
use tokio::time::Instant;

const NIL: usize = usize::MAX;

/// Why a FIN, REQ or TOUCH cannot act on a message; the texts are nsqd's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InFlightError {
    NotInFlight,
    NotOwner,
}

impl InFlightError {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            InFlightError::NotInFlight => "ID not in flight",
            InFlightError::NotOwner => "client does not own message",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) msg: Msg,
    pub(crate) client_id: u64,
    pub(crate) deadline: Instant,
    pub(crate) delivered: Instant,
    lane: usize,
    prev: usize,
    next: usize,
}

#[derive(Debug)]
struct Lane {
    timeout: Duration,
    head: usize,
    tail: usize,
}

#[derive(Debug, Default)]
pub(crate) struct InFlight {
    entries: Slab<Entry>,
    by_id: HashMap<MessageId, usize, RandomState>,
    lanes: Vec<Lane>,
}

impl InFlight {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Tracks a message delivered now to `client_id`, due back after `timeout`. A message whose
    /// ID is already in flight is handed back, since FIN names a message by its ID alone: two
    /// with one ID can meet in a dead-letter topic that several channels share.
    pub(crate) fn insert(
        &mut self,
        msg: Msg,
        client_id: u64,
        timeout: Duration,
        now: Instant,
    ) -> Result<&Msg, Msg> {
        let key = self.entries.vacant_key();
        match self.by_id.entry(msg.id) {
            hash_map::Entry::Occupied(_) => return Err(msg),
            hash_map::Entry::Vacant(slot) => {
                slot.insert(key);
            }
        }
        let lane = self.lane_for(timeout);
        self.entries.insert(Entry {
            msg,
            client_id,
            deadline: now + timeout,
            delivered: now,
            lane,
            prev: NIL,
            next: NIL,
        });
        self.push_back(lane, key);
        Ok(&self.entries[key].msg)
    }

    /// Removes a message that `client_id` owns.
    pub(crate) fn remove(
        &mut self,
        id: &MessageId,
        client_id: u64,
    ) -> Result<Entry, InFlightError> {
        let key = self.owned_key(id, client_id)?;
        self.by_id.remove(id);
        self.unlink(key);
        Ok(self.entries.remove(key))
    }

    /// Resets a message's deadline to `now + timeout`, but never past `delivered + max`.
    pub(crate) fn touch(
        &mut self,
        id: &MessageId,
        client_id: u64,
        timeout: Duration,
        max: Duration,
        now: Instant,
    ) -> Result<(), InFlightError> {
        let key = self.owned_key(id, client_id)?;
        self.unlink(key);
        let entry = &mut self.entries[key];
        let capped = entry.delivered + max;
        entry.deadline = (now + timeout).min(capped);
        let lane = entry.lane;
        self.insert_ordered(lane, key);
        Ok(())
    }

    /// The earliest deadline, if anything is in flight.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter(|l| l.head != NIL)
            .map(|l| self.entries[l.head].deadline)
            .min()
    }

    /// Removes and returns one message whose deadline is not after `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<Entry> {
        let lane = self
            .lanes
            .iter()
            .filter(|l| l.head != NIL && self.entries[l.head].deadline <= now)
            .min_by_key(|l| self.entries[l.head].deadline)?;
        let key = lane.head;
        let id = self.entries[key].msg.id;
        self.by_id.remove(&id);
        self.unlink(key);
        Some(self.entries.remove(key))
    }

    /// Removes everything, in no particular order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Entry> + '_ {
        self.by_id.clear();
        self.lanes.clear();
        self.entries.drain()
    }

    fn owned_key(&self, id: &MessageId, client_id: u64) -> Result<usize, InFlightError> {
        let key = *self.by_id.get(id).ok_or(InFlightError::NotInFlight)?;
        if self.entries[key].client_id != client_id {
            return Err(InFlightError::NotOwner);
        }
        Ok(key)
    }

    /// The lane for `timeout`, reusing an empty lane so their number stays at most the number
    /// of distinct timeouts with messages in flight.
    fn lane_for(&mut self, timeout: Duration) -> usize {
        if let Some(i) = self.lanes.iter().position(|l| l.timeout == timeout) {
            return i;
        }
        let lane = Lane {
            timeout,
            head: NIL,
            tail: NIL,
        };
        if let Some(i) = self.lanes.iter().position(|l| l.head == NIL) {
            self.lanes[i] = lane;
            return i;
        }
        self.lanes.push(lane);
        self.lanes.len() - 1
    }

    fn push_back(&mut self, lane: usize, key: usize) {
        let tail = self.lanes[lane].tail;
        self.entries[key].prev = tail;
        self.entries[key].next = NIL;
        if tail == NIL {
            self.lanes[lane].head = key;
        } else {
            self.entries[tail].next = key;
        }
        self.lanes[lane].tail = key;
    }

    /// Links `key` into its lane by deadline, searching from the tail: a TOUCH usually lands
    /// at the tail, and only one capped by the max msg timeout lands earlier.
    fn insert_ordered(&mut self, lane: usize, key: usize) {
        let deadline = self.entries[key].deadline;
        let mut after = self.lanes[lane].tail;
        while after != NIL && self.entries[after].deadline > deadline {
            after = self.entries[after].prev;
        }
        if after == self.lanes[lane].tail {
            return self.push_back(lane, key);
        }
        let before = if after == NIL {
            self.lanes[lane].head
        } else {
            self.entries[after].next
        };
        self.entries[key].prev = after;
        self.entries[key].next = before;
        self.entries[before].prev = key;
        if after == NIL {
            self.lanes[lane].head = key;
        } else {
            self.entries[after].next = key;
        }
    }

    fn unlink(&mut self, key: usize) {
        let (lane, prev, next) = {
            let e = &self.entries[key];
            (e.lane, e.prev, e.next)
        };
        if prev == NIL {
            self.lanes[lane].head = next;
        } else {
            self.entries[prev].next = next;
        }
        if next == NIL {
            self.lanes[lane].tail = prev;
        } else {
            self.entries[next].prev = prev;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(n: u64) -> Msg {
        let mut msg = Msg::new(MessageId::from_u64(n), 0, Bytes::new());
        msg.attempts = 1;
        msg
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn drain_expired(f: &mut InFlight, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| f.pop_expired(now))
            .map(|e| u64::from_str_radix(&e.msg.id.to_string(), 16).unwrap())
            .collect()
    }

    #[test]
    fn expires_in_deadline_order_across_lanes() {
        let t0 = Instant::now();
        let mut f = InFlight::default();
        f.insert(msg(1), 1, secs(10), t0).unwrap();
        f.insert(msg(2), 2, secs(5), t0).unwrap();
        f.insert(msg(3), 1, secs(10), t0 + secs(1)).unwrap();
        f.insert(msg(4), 2, secs(5), t0 + secs(1)).unwrap();
        assert_eq!(f.next_deadline(), Some(t0 + secs(5)));
        assert_eq!(drain_expired(&mut f, t0 + secs(6)), [2, 4]);
        assert_eq!(drain_expired(&mut f, t0 + secs(20)), [1, 3]);
        assert_eq!(f.len(), 0);
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn a_second_message_with_an_id_in_flight_is_handed_back() {
        let t0 = Instant::now();
        let mut f = InFlight::default();
        f.insert(msg(1), 1, secs(10), t0).unwrap();
        let back = f.insert(msg(1), 2, secs(5), t0).unwrap_err();
        assert_eq!(back.id, MessageId::from_u64(1));
        assert_eq!(f.len(), 1);
        assert_eq!(f.next_deadline(), Some(t0 + secs(10)));
        assert_eq!(f.remove(&MessageId::from_u64(1), 1).unwrap().client_id, 1);
        f.insert(msg(1), 2, secs(5), t0).unwrap();
        assert_eq!(drain_expired(&mut f, t0 + secs(5)), [1]);
    }

    #[test]
    fn remove_checks_presence_and_owner() {
        let t0 = Instant::now();
        let mut f = InFlight::default();
        f.insert(msg(1), 7, secs(10), t0).unwrap();
        assert_eq!(
            f.remove(&MessageId::from_u64(1), 8).unwrap_err(),
            InFlightError::NotOwner
        );
        assert_eq!(
            f.remove(&MessageId::from_u64(2), 7).unwrap_err(),
            InFlightError::NotInFlight
        );
        assert_eq!(f.remove(&MessageId::from_u64(1), 7).unwrap().client_id, 7);
        assert_eq!(
            f.remove(&MessageId::from_u64(1), 7).unwrap_err(),
            InFlightError::NotInFlight
        );
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn touch_moves_the_deadline_and_respects_the_cap() {
        let t0 = Instant::now();
        let mut f = InFlight::default();
        f.insert(msg(1), 1, secs(10), t0).unwrap();
        f.insert(msg(2), 1, secs(10), t0 + secs(2)).unwrap();
        f.touch(&MessageId::from_u64(1), 1, secs(10), secs(60), t0 + secs(5))
            .unwrap();
        assert_eq!(f.next_deadline(), Some(t0 + secs(12)));
        // Capped at delivered + 11 s, which puts it before message 2.
        f.insert(msg(3), 1, secs(10), t0 + secs(3)).unwrap();
        f.touch(&MessageId::from_u64(3), 1, secs(10), secs(11), t0 + secs(9))
            .unwrap();
        assert_eq!(drain_expired(&mut f, t0 + secs(100)), [2, 3, 1]);
    }

    #[test]
    fn random_operations_match_a_simple_model() {
        let t0 = Instant::now();
        let mut f = InFlight::default();
        let mut model: Vec<(u64, Instant)> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = t0;
        for id in 0..2000u64 {
            now += Duration::from_millis(rand(3));
            match rand(4) {
                0 | 1 => {
                    let timeout = secs(1 + rand(3));
                    f.insert(msg(id), 1, timeout, now).unwrap();
                    model.push((id, now + timeout));
                }
                2 if !model.is_empty() => {
                    let (victim, _) = model.remove(rand(model.len() as u64) as usize);
                    f.remove(&MessageId::from_u64(victim), 1).unwrap();
                }
                _ => {
                    let expired = drain_expired(&mut f, now);
                    let mut want: Vec<_> =
                        model.iter().filter(|(_, d)| *d <= now).cloned().collect();
                    want.sort_by_key(|&(id, d)| (d, id));
                    model.retain(|(_, d)| *d > now);
                    let mut got = expired.clone();
                    got.sort();
                    let mut want_ids: Vec<u64> = want.iter().map(|w| w.0).collect();
                    want_ids.sort();
                    assert_eq!(got, want_ids);
                }
            }
            assert_eq!(f.len(), model.len());
            assert_eq!(f.next_deadline(), model.iter().map(|m| m.1).min());
        }
    }
}
