//! The record and segment formats: encoding, validation and decoding of one stored message.
//!
//! All integers are big-endian. A record is
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `len`: bytes after this 8-byte prefix (flags to end of body) |
//! | 4 | 4 | `crc`: CRC-32 (IEEE) of bytes 0..4 followed by bytes 8..8+len |
//! | 8 | 1 | `flags`: bit 0 batch end, bit 1 deferred, bit 2 raw id; other bits 0 |
//! | 9 | 8 | `timestamp` (i64, ns since the Unix epoch) |
//! | 17 | 2 | `attempts` (u16) |
//! | 19 | 8 or 16 | `id`: the 16 lowercase hex digits as a u64, or the 16 raw bytes when `raw id` |
//! | … | 0 or 8 | `due_unix_ms` (i64), present only when `deferred` |
//! | … | rest | body |
//!
//! A 200-byte body with an nsqd-style id and no due time takes 8 + 11 + 8 + 200 = 227 bytes.
//! `batch end` marks the last record of one [`DiskQueue::append`](super::DiskQueue::append):
//! recovery keeps only whole batches after the last synced position.

use bytes::Bytes;
use proto::wire::MessageId;
use std::fmt;

/// One message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskRecord {
    pub(crate) id: MessageId,
    /// Publish time, nanoseconds since the Unix epoch.
    pub(crate) timestamp: i64,
    /// Deliveries so far.
    pub(crate) attempts: u16,
    /// When a deferred message is due, ms since the Unix epoch; 0 when not deferred.
    pub(crate) due_unix_ms: i64,
    pub(crate) body: Bytes,
}

/// Every segment starts with these 8 bytes: magic `KQDS`, format version 1 (u16), reserved 0.
pub(super) const SEGMENT_HEADER: [u8; 8] = *b"KQDS\x00\x01\x00\x00";
pub(super) const SEGMENT_HEADER_LEN: u64 = SEGMENT_HEADER.len() as u64;

/// `len` and `crc`.
pub(super) const PREFIX_LEN: usize = 8;
/// flags, timestamp, attempts.
const FIXED_LEN: usize = 1 + 8 + 2;
const COMPACT_ID_LEN: usize = 8;
const RAW_ID_LEN: usize = 16;
const DUE_LEN: usize = 8;

const BATCH_END: u8 = 1;
const DEFERRED: u8 = 1 << 1;
const RAW_ID: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = BATCH_END | DEFERRED | RAW_ID;

/// Bytes on disk for a record with this body, id and due time.
#[cfg(test)]
pub(super) fn encoded_len(record: &DiskRecord) -> usize {
    PREFIX_LEN + payload_len(record, compact_id(&record.id).is_some())
}

fn payload_len(record: &DiskRecord, compact: bool) -> usize {
    FIXED_LEN
        + if compact { COMPACT_ID_LEN } else { RAW_ID_LEN }
        + if record.due_unix_ms != 0 { DUE_LEN } else { 0 }
        + record.body.len()
}

/// The id as a u64 when it is exactly what [`MessageId::from_u64`] makes of that value.
fn compact_id(id: &MessageId) -> Option<u64> {
    id.as_bytes().iter().try_fold(0u64, |value, &c| {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(value << 4 | u64::from(digit))
    })
}

/// Appends `record` to `buf` and returns where it starts. The body must already have been
/// checked against the size limit (and so fit the u32 length).
pub(super) fn encode(buf: &mut Vec<u8>, record: &DiskRecord) -> usize {
    let start = buf.len();
    let compact = compact_id(&record.id);
    let len = payload_len(record, compact.is_some());
    let mut flags = 0;
    if compact.is_none() {
        flags |= RAW_ID;
    }
    if record.due_unix_ms != 0 {
        flags |= DEFERRED;
    }
    buf.reserve(PREFIX_LEN + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(flags);
    buf.extend_from_slice(&record.timestamp.to_be_bytes());
    buf.extend_from_slice(&record.attempts.to_be_bytes());
    match compact {
        Some(value) => buf.extend_from_slice(&value.to_be_bytes()),
        None => buf.extend_from_slice(record.id.as_bytes()),
    }
    if record.due_unix_ms != 0 {
        buf.extend_from_slice(&record.due_unix_ms.to_be_bytes());
    }
    buf.extend_from_slice(&record.body);
    seal(&mut buf[start..]);
    start
}

/// Sets the batch-end flag of the record at `buf[start..]` and its checksum again.
pub(super) fn mark_batch_end(buf: &mut [u8], start: usize) {
    buf[start + PREFIX_LEN] |= BATCH_END;
    seal(&mut buf[start..]);
}

/// Writes the checksum of the whole record at the front of `record`.
fn seal(record: &mut [u8]) {
    let crc = checksum(record);
    record[4..8].copy_from_slice(&crc.to_be_bytes());
}

fn checksum(record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[..4]);
    hasher.update(&record[PREFIX_LEN..]);
    hasher.finalize()
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Corruption {
    /// A length outside what any record with a body up to the size limit can have.
    Length(u32),
    Checksum,
    Flags(u8),
    /// The record is cut short by the end of its segment.
    Truncated,
    /// A segment does not start with [`SEGMENT_HEADER`].
    SegmentHeader,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Length(len) => write!(f, "record length {len} out of range"),
            Corruption::Checksum => f.write_str("checksum mismatch"),
            Corruption::Flags(flags) => write!(f, "invalid record flags {flags:#04x}"),
            Corruption::Truncated => f.write_str("record cut short by the end of the segment"),
            Corruption::SegmentHeader => f.write_str("invalid segment header"),
        }
    }
}

/// What the front of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parsed {
    /// A valid record of `len` bytes in all; `batch_end` tells whether it closes a batch.
    Record {
        len: usize,
        batch_end: bool,
    },
    /// At least `needed` bytes are needed to tell.
    Incomplete {
        needed: usize,
    },
    Corrupt(Corruption),
}

/// Validates the record at the front of `buf`: its length against `max_body`, its checksum,
/// its flags and its layout.
pub(super) fn parse(buf: &[u8], max_body: u64) -> Parsed {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Parsed::Incomplete { needed: PREFIX_LEN };
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let max_len = (FIXED_LEN + RAW_ID_LEN + DUE_LEN) as u64 + max_body;
    if (len as usize) < FIXED_LEN + COMPACT_ID_LEN || u64::from(len) > max_len {
        return Parsed::Corrupt(Corruption::Length(len));
    }
    let total = PREFIX_LEN + len as usize;
    let Some(record) = buf.get(..total) else {
        return Parsed::Incomplete { needed: total };
    };
    let crc = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if checksum(record) != crc {
        return Parsed::Corrupt(Corruption::Checksum);
    }
    let flags = record[PREFIX_LEN];
    if flags & !KNOWN_FLAGS != 0 {
        return Parsed::Corrupt(Corruption::Flags(flags));
    }
    let header = header_len(flags);
    if total < header || (total - header) as u64 > max_body {
        return Parsed::Corrupt(Corruption::Length(len));
    }
    Parsed::Record {
        len: total,
        batch_end: flags & BATCH_END != 0,
    }
}

/// Bytes before the body, prefix included, for a record with these flags.
fn header_len(flags: u8) -> usize {
    PREFIX_LEN
        + FIXED_LEN
        + if flags & RAW_ID != 0 {
            RAW_ID_LEN
        } else {
            COMPACT_ID_LEN
        }
        + if flags & DEFERRED != 0 { DUE_LEN } else { 0 }
}

/// Decodes a record that [`parse`] accepted; the body shares `record`'s memory.
pub(super) fn decode(record: Bytes) -> DiskRecord {
    let flags = record[PREFIX_LEN];
    let at = |offset: usize| -> [u8; 8] {
        let mut word = [0; 8];
        word.copy_from_slice(&record[offset..offset + 8]);
        word
    };
    let mut offset = PREFIX_LEN + 1;
    let timestamp = i64::from_be_bytes(at(offset));
    offset += 8;
    let attempts = u16::from_be_bytes([record[offset], record[offset + 1]]);
    offset += 2;
    let id = if flags & RAW_ID != 0 {
        let mut raw = [0; RAW_ID_LEN];
        raw.copy_from_slice(&record[offset..offset + RAW_ID_LEN]);
        offset += RAW_ID_LEN;
        MessageId(raw)
    } else {
        let value = u64::from_be_bytes(at(offset));
        offset += COMPACT_ID_LEN;
        MessageId::from_u64(value)
    };
    let due_unix_ms = if flags & DEFERRED != 0 {
        let due = i64::from_be_bytes(at(offset));
        offset += DUE_LEN;
        due
    } else {
        0
    };
    DiskRecord {
        id,
        timestamp,
        attempts,
        due_unix_ms,
        body: record.slice(offset..),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &[u8; 16], due_unix_ms: i64, body: &'static [u8]) -> DiskRecord {
        DiskRecord {
            id: MessageId(*id),
            timestamp: 0x0102_0304_0506_0708,
            attempts: 3,
            due_unix_ms,
            body: Bytes::from_static(body),
        }
    }

    fn round_trip(r: &DiskRecord) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = encode(&mut buf, r);
        assert_eq!(start, 0);
        assert_eq!(buf.len(), encoded_len(r));
        assert_eq!(
            parse(&buf, 1024),
            Parsed::Record {
                len: buf.len(),
                batch_end: false
            }
        );
        assert_eq!(&decode(Bytes::from(buf.clone())), r);
        buf
    }

    #[test]
    fn hex_id_record_bytes_are_exact() {
        let r = record(b"00000000000000ff", 0, b"hi");
        let buf = round_trip(&r);
        let crc = checksum(&buf).to_be_bytes();
        let mut expected = vec![0, 0, 0, 21, crc[0], crc[1], crc[2], crc[3], 0];
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0xff]);
        expected.extend_from_slice(b"hi");
        assert_eq!(buf, expected);
    }

    #[test]
    fn raw_id_and_due_time_are_kept() {
        let r = record(b"0123456789ABCDEF", 1_700_000_000_123, b"body");
        let buf = round_trip(&r);
        assert_eq!(buf[PREFIX_LEN], RAW_ID | DEFERRED);
        assert_eq!(buf.len(), PREFIX_LEN + FIXED_LEN + 16 + 8 + 4);
        let r = record(b"not hex at all!!", 0, b"");
        round_trip(&r);
    }

    #[test]
    fn two_hundred_byte_message_takes_227_bytes() {
        let body: &'static [u8] = &[7; 200];
        let r = record(b"0123456789abcdef", 0, body);
        assert_eq!(encoded_len(&r), 227);
    }

    #[test]
    fn batch_end_is_covered_by_the_checksum() {
        let r = record(b"0123456789abcdef", 0, b"x");
        let mut buf = Vec::new();
        encode(&mut buf, &r);
        mark_batch_end(&mut buf, 0);
        assert!(matches!(
            parse(&buf, 10),
            Parsed::Record {
                batch_end: true,
                ..
            }
        ));
        buf[PREFIX_LEN] &= !BATCH_END;
        assert_eq!(parse(&buf, 10), Parsed::Corrupt(Corruption::Checksum));
    }

    #[test]
    fn damage_is_detected() {
        let r = record(b"0123456789abcdef", 0, b"some body");
        let mut buf = Vec::new();
        encode(&mut buf, &r);
        for cut in 0..buf.len() {
            assert!(matches!(parse(&buf[..cut], 100), Parsed::Incomplete { .. }));
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(
                    parse(&bad, 100),
                    Parsed::Corrupt(_) | Parsed::Incomplete { .. }
                ),
                "flipped byte {i} went unnoticed"
            );
        }
        // A body over the limit is a length error even with a matching checksum.
        assert_eq!(
            parse(&buf, 8),
            Parsed::Corrupt(Corruption::Length(buf.len() as u32 - 8))
        );
        assert_eq!(
            parse(&[0, 0, 0, 3, 0, 0, 0, 0], 100),
            Parsed::Corrupt(Corruption::Length(3))
        );
    }
}
