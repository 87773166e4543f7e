//! A queued message: one per channel, sharing its body with every other channel's copy.

use bytes::Bytes;
use proto::wire::MessageId;

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) id: MessageId,
    /// Publish time, nanoseconds since the Unix epoch.
    pub(crate) timestamp: i64,
    /// Deliveries so far.
    pub(crate) attempts: u16,
    pub(crate) body: Bytes,
}
