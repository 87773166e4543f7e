//! Message IDs in nsqd's format: a 64-bit snowflake shown as 16 hex digits.
//!
//! `(ms_tick - epoch) << 22 | node_id << 12 | sequence`, where a tick is `unix_ns >> 20`
//! (about 1.05 ms). When 4096 IDs are used up within one tick, the generator moves on to the
//! next tick instead of sleeping as nsqd does: IDs stay unique and increasing, and a burst of
//! publishes never waits.

use proto::wire::MessageId;

const EPOCH_TICK: i64 = 1_288_834_974_288;
const SEQUENCE_BITS: u32 = 12;
const NODE_BITS: u32 = 10;
const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;

#[derive(Debug)]
pub(crate) struct IdGenerator {
    node_id: u64,
    last_tick: i64,
    sequence: u64,
}

impl IdGenerator {
    pub(crate) fn new(node_id: u16) -> Self {
        IdGenerator {
            node_id: u64::from(node_id) & ((1 << NODE_BITS) - 1),
            last_tick: i64::MIN,
            sequence: 0,
        }
    }

    /// The next ID, for a message published at `unix_ns`.
    pub(crate) fn next(&mut self, unix_ns: i64) -> MessageId {
        MessageId::from_u64(self.next_raw(unix_ns))
    }

    /// [`IdGenerator::next`] as its 64-bit value.
    pub(crate) fn next_raw(&mut self, unix_ns: i64) -> u64 {
        let tick = (unix_ns >> 20) - EPOCH_TICK;
        if tick > self.last_tick {
            self.last_tick = tick;
            self.sequence = 0;
        } else {
            self.sequence = (self.sequence + 1) & SEQUENCE_MASK;
            if self.sequence == 0 {
                self.last_tick += 1;
            }
        }
        ((self.last_tick as u64) << (SEQUENCE_BITS + NODE_BITS))
            | (self.node_id << SEQUENCE_BITS)
            | self.sequence
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: MessageId) -> u64 {
        u64::from_str_radix(&id.to_string(), 16).unwrap()
    }

    #[test]
    fn layout_is_nsqds() {
        let mut g = IdGenerator::new(5);
        let ns = (EPOCH_TICK + 1000) << 20;
        let id = raw(g.next(ns));
        assert_eq!(id >> 22, 1000);
        assert_eq!((id >> 12) & 0x3ff, 5);
        assert_eq!(id & 0xfff, 0);
        assert_eq!(raw(g.next(ns)) & 0xfff, 1);
    }

    #[test]
    fn ids_stay_unique_and_increasing_past_4096_per_tick_and_clock_steps_back() {
        let mut g = IdGenerator::new(1023);
        let ns = (EPOCH_TICK + 7) << 20;
        let mut last = 0;
        for i in 0..10_000 {
            let t = if i == 5000 { ns - (50 << 20) } else { ns };
            let id = raw(g.next(t));
            assert!(id > last, "id {i} not increasing");
            last = id;
        }
    }
}
