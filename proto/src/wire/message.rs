//! The NSQ message: `[8B timestamp ns][2B attempts][16B ASCII-hex id][body]`, all big-endian.
//! The same layout is used on the wire and on disk.

use bytes::{Buf, BufMut, Bytes};
use std::fmt;

/// Length of a message ID: 16 ASCII hex characters.
pub const MSG_ID_LEN: usize = 16;
/// Bytes before the body: timestamp, attempts and id.
pub const MSG_HEADER_LEN: usize = 8 + 2 + MSG_ID_LEN;

/// A message ID as it travels: 16 ASCII hex bytes, treated as opaque by clients.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; MSG_ID_LEN]);

impl MessageId {
    /// The ID of a 64-bit value: its 16 lowercase hex digits.
    pub fn from_u64(value: u64) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; MSG_ID_LEN];
        for (i, byte) in value.to_be_bytes().iter().enumerate() {
            out[2 * i] = HEX[usize::from(byte >> 4)];
            out[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        MessageId(out)
    }

    /// The ID in `bytes`, or `None` unless it is exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; MSG_ID_LEN]>::try_from(bytes).ok().map(MessageId)
    }

    pub fn as_bytes(&self) -> &[u8; MSG_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// One message as delivered to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Publish time in nanoseconds since the Unix epoch; kept across requeues.
    pub timestamp: i64,
    /// Deliveries so far, counting this one.
    pub attempts: u16,
    pub id: MessageId,
    pub body: Bytes,
}

impl Message {
    /// Bytes this message takes when encoded.
    pub fn encoded_len(&self) -> usize {
        MSG_HEADER_LEN + self.body.len()
    }

    /// Appends the encoded message to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        encode_message(dst, self.timestamp, self.attempts, &self.id, &self.body);
    }

    /// Decodes a whole encoded message; `None` when shorter than the header.
    pub fn decode(mut src: Bytes) -> Option<Message> {
        if src.len() < MSG_HEADER_LEN {
            return None;
        }
        let timestamp = src.get_i64();
        let attempts = src.get_u16();
        let id = MessageId::from_slice(&src[..MSG_ID_LEN])?;
        src.advance(MSG_ID_LEN);
        Some(Message {
            timestamp,
            attempts,
            id,
            body: src,
        })
    }
}

/// Appends an encoded message built from its parts, so callers need not assemble a [`Message`].
pub fn encode_message(
    dst: &mut impl BufMut,
    timestamp: i64,
    attempts: u16,
    id: &MessageId,
    body: &[u8],
) {
    dst.put_i64(timestamp);
    dst.put_u16(attempts);
    dst.put_slice(&id.0);
    dst.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn id_is_sixteen_lowercase_hex_digits() {
        assert_eq!(
            MessageId::from_u64(0x0123_4567_89ab_cdef).to_string(),
            "0123456789abcdef"
        );
        assert_eq!(MessageId::from_u64(0).to_string(), "0000000000000000");
    }

    #[test]
    fn message_bytes_are_exact() {
        let msg = Message {
            timestamp: 0x0102_0304_0506_0708,
            attempts: 3,
            id: MessageId(*b"0123456789abcdef"),
            body: Bytes::from_static(b"hi"),
        };
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        assert_eq!(
            &buf[..],
            b"\x01\x02\x03\x04\x05\x06\x07\x08\x00\x030123456789abcdefhi"
        );
        assert_eq!(msg.encoded_len(), buf.len());
        assert_eq!(Message::decode(buf.freeze()), Some(msg));
    }

    #[test]
    fn short_message_does_not_decode() {
        assert_eq!(Message::decode(Bytes::from_static(&[0; 25])), None);
    }
}
