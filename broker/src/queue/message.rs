//! A queued message: one per channel, sharing its body with every other channel's copy.

use super::envelope::{Origin, payload_start};
use crate::storage::{DiskRecord, Ticket};
use bytes::Bytes;
use proto::wire::MessageId;
use serde::Serialize;

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
    /// `body` starts with a dead-letter envelope, which consumers never see (see
    /// [`super::envelope`]). It fits in the last byte of padding.
    pub(crate) dead_letter: bool,
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
            dead_letter: false,
            body,
        }
    }

    /// What consumers get: the body without its dead-letter envelope.
    pub(crate) fn payload(&self) -> &[u8] {
        if self.dead_letter {
            &self.body[payload_start(&self.body)..]
        } else {
            &self.body
        }
    }

    /// The message as the disk queue stores it; `due_unix_ms` is 0 unless deferred.
    pub(crate) fn to_record(&self, due_unix_ms: i64) -> DiskRecord {
        DiskRecord {
            id: self.id,
            timestamp: self.timestamp,
            attempts: self.attempts,
            due_unix_ms,
            dead_letter: self.dead_letter,
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
            dead_letter: record.dead_letter,
            body: record.body,
        };
        (msg, record.due_unix_ms)
    }

    /// The copy of this message that its dead-letter topic stores: same ID, timestamp and
    /// body, behind an envelope saying where it came from; no delivery yet.
    pub(crate) fn dead_lettered(&self, origin: &Origin) -> Msg {
        let mut copy = Msg::new(self.id, self.timestamp, origin.wrap(self.payload()));
        copy.dead_letter = true;
        copy
    }

    /// Where a dead letter came from; `None` for any other message.
    pub(crate) fn origin(&self) -> Option<Origin> {
        self.dead_letter.then(|| Origin::read(&self.body)).flatten()
    }

    /// A dead letter as it goes back to the channel it came from: same ID, timestamp and
    /// body, no envelope, its attempts reset.
    pub(crate) fn redriven(&self) -> Msg {
        let start = if self.dead_letter {
            payload_start(&self.body)
        } else {
            0
        };
        Msg::new(self.id, self.timestamp, self.body.slice(start..))
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

/// A queued message as `/topic/peek` and `/channel/peek` show it.
#[derive(Debug, Serialize)]
pub(crate) struct QueuedMessage {
    pub(crate) id: String,
    /// Publish time, ns since the Unix epoch.
    pub(crate) timestamp: i64,
    pub(crate) attempts: u16,
    /// The body consumers get, base64 (standard alphabet, padded).
    pub(crate) body: String,
    /// Where a dead letter came from; `null` for other messages.
    pub(crate) dead_letter: Option<Origin>,
}

impl QueuedMessage {
    pub(crate) fn of(msg: &Msg) -> QueuedMessage {
        use base64::Engine;
        QueuedMessage {
            id: msg.id.to_string(),
            timestamp: msg.timestamp,
            attempts: msg.attempts,
            body: base64::engine::general_purpose::STANDARD.encode(msg.payload()),
            dead_letter: msg.origin(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_stays_64_bytes() {
        assert_eq!(std::mem::size_of::<Msg>(), 64);
    }

    #[test]
    fn a_dead_letter_keeps_id_timestamp_and_body_and_goes_back_without_its_envelope() {
        let origin = Origin {
            topic: "orders".into(),
            channel: "billing".into(),
            attempts: 5,
            failure: super::super::envelope::Failure::Requeued,
            failed_at: 1,
        };
        let mut msg = Msg::new(MessageId::from_u64(7), 42, Bytes::from_static(b"hi"));
        msg.attempts = 5;
        let dead = msg.dead_lettered(&origin);
        assert_eq!(dead.payload(), b"hi");
        assert_eq!((dead.id, dead.timestamp, dead.attempts), (msg.id, 42, 0));
        assert!(dead.dead_letter && msg.origin().is_none());
        assert_eq!(dead.origin(), Some(origin));
        assert!(dead.to_record(0).dead_letter);
        let back = dead.redriven();
        assert_eq!(&back.body[..], b"hi");
        assert!(!back.dead_letter && back.origin().is_none());
        assert_eq!((back.id, back.timestamp, back.attempts), (msg.id, 42, 0));
    }
}
