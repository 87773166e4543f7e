//! A queued message: one per channel, sharing its body with every other channel's copy.

use crate::storage::DiskRecord;
use bytes::Bytes;
use proto::wire::MessageId;

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) id: MessageId,
    /// Publish time, nanoseconds since the Unix epoch.
    pub(crate) timestamp: i64,
    /// Deliveries so far.
    pub(crate) attempts: u16,
    /// With `--sync-publish`, the disk segment holding this message until it is finished;
    /// [`NOT_HELD`] otherwise. (Fits in padding: the struct stays 64 bytes.)
    pub(crate) segment: u32,
    pub(crate) body: Bytes,
}

/// [`Msg::segment`] of a message no disk segment holds.
pub(crate) const NOT_HELD: u32 = u32::MAX;

impl Msg {
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

    /// A message read back from disk, with its due time (0 when not deferred).
    pub(crate) fn from_record(record: DiskRecord) -> (Msg, i64) {
        let msg = Msg {
            id: record.id,
            timestamp: record.timestamp,
            attempts: record.attempts,
            segment: NOT_HELD,
            body: record.body,
        };
        (msg, record.due_unix_ms)
    }
}
