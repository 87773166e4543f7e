//! A queued message: one per channel, sharing its body with every other channel's copy.

use crate::storage::{DiskRecord, Ticket};
use bytes::Bytes;
use proto::wire::MessageId;

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) id: MessageId,
    /// Publish time, nanoseconds since the Unix epoch.
    pub(crate) timestamp: i64,
    /// Deliveries so far.
    pub(crate) attempts: u16,
    /// Read from the queue's disk queue, which keeps it until it is finished by this ticket.
    /// (Two fields rather than an `Option` so that they fit in padding: the struct stays 64
    /// bytes.)
    on_disk: bool,
    ticket: u32,
    pub(crate) body: Bytes,
}

impl Msg {
    /// A message that only memory holds.
    pub(crate) fn new(id: MessageId, timestamp: i64, body: Bytes) -> Msg {
        Msg {
            id,
            timestamp,
            attempts: 0,
            on_disk: false,
            ticket: 0,
            body,
        }
    }

    /// The message as the disk queue stores it; `due_unix_ms` is 0 unless deferred.
    pub(crate) fn to_record(&self, due_unix_ms: i64) -> DiskRecord {
        DiskRecord {
            id: self.id,
            timestamp: self.timestamp,
            attempts: self.attempts,
            due_unix_ms,
            body: self.body.clone(),
        }
    }

    /// A message read back from disk with the ticket its disk queue gave it, and its due time
    /// (0 when not deferred).
    pub(crate) fn from_record(record: DiskRecord, ticket: Ticket) -> (Msg, i64) {
        let msg = Msg {
            id: record.id,
            timestamp: record.timestamp,
            attempts: record.attempts,
            on_disk: true,
            ticket: ticket.0,
            body: record.body,
        };
        (msg, record.due_unix_ms)
    }

    /// The ticket that finishes its disk record, while one holds it.
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        self.on_disk.then_some(Ticket(self.ticket))
    }

    /// The disk record was finished (or the message stored again): it is memory's alone now.
    pub(crate) fn forget_ticket(&mut self) {
        self.on_disk = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_stays_64_bytes() {
        assert_eq!(std::mem::size_of::<Msg>(), 64);
    }
}
