//! The record and segment formats: encoding, validation, decoding and resynchronisation.
//!
//! Every segment starts with an 8-byte header: magic `KQDS`, the format version (u16) and two
//! reserved zero bytes. Version 2 is written; version 1 segments (from earlier knsq releases)
//! are still read. All integers are big-endian. A version 2 record is
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | `marker`: `D7 1E`, where every record starts |
//! | 2 | 4 | `len`: bytes after this 10-byte prefix (flags to end of body) |
//! | 6 | 4 | `crc`: CRC-32 (IEEE) of bytes 2..6 followed by bytes 10..10+len |
//! | 10 | 1 | `flags`: bit 0 batch end, bit 1 deferred, bit 2 raw id, bit 3 dead letter; other bits 0 |
//! | 11 | 8 | `timestamp` (i64, ns since the Unix epoch) |
//! | 19 | 2 | `attempts` (u16) |
//! | 21 | 8 or 16 | `id`: the 16 lowercase hex digits as a u64, or the 16 raw bytes when `raw id` |
//! | … | 0 or 8 | `due_unix_ms` (i64), present only when `deferred` |
//! | … | rest | body |
//!
//! `dead letter` says that the body starts with the envelope recording where a dead-lettered
//! message came from (its layout is the queues' business: `queue::dead_letter`); the disk queue
//! stores it like any body. A version 1 record is the same without the marker. A 200-byte body with an nsqd-style id
//! and no due time takes 10 + 11 + 8 + 200 = 229 bytes.
//!
//! `batch end` marks the last record of one [`DiskQueue::append`](super::DiskQueue::append):
//! recovery keeps only whole batches at the end of what was written. The marker makes damage
//! cheap to step over: after a record that fails its checks, [`resync_in`] looks for the next
//! offset holding the marker, a plausible length and a matching checksum, so a flipped byte
//! costs the record it is in and no more.

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
    /// The body starts with a dead-letter envelope.
    pub(crate) dead_letter: bool,
    pub(crate) body: Bytes,
}

pub(super) const SEGMENT_HEADER_LEN: u64 = 8;
const SEGMENT_MAGIC: [u8; 4] = *b"KQDS";

/// The record layout of a segment, told by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// No marker: written by knsq before records had one.
    V1,
    /// Every record starts with [`MARKER`].
    V2,
}

impl Format {
    /// The header of a segment of this format.
    pub(super) fn header(self) -> [u8; 8] {
        let version: u8 = match self {
            Format::V1 => 1,
            Format::V2 => 2,
        };
        let m = SEGMENT_MAGIC;
        [m[0], m[1], m[2], m[3], 0, version, 0, 0]
    }

    /// The format a segment header names; `None` when it is not a valid header.
    pub(super) fn of_header(header: &[u8]) -> Option<Format> {
        [Format::V2, Format::V1]
            .into_iter()
            .find(|f| header == f.header())
    }

    fn prefix_len(self) -> usize {
        match self {
            Format::V1 => 8,
            Format::V2 => 10,
        }
    }
}

/// What new segments are written in.
pub(super) const WRITE_FORMAT: Format = Format::V2;

/// Starts every version 2 record.
const MARKER: [u8; 2] = [0xD7, 0x1E];

/// flags, timestamp, attempts.
const FIXED_LEN: usize = 1 + 8 + 2;
const COMPACT_ID_LEN: usize = 8;
const RAW_ID_LEN: usize = 16;
const DUE_LEN: usize = 8;

const BATCH_END: u8 = 1;
const DEFERRED: u8 = 1 << 1;
const RAW_ID: u8 = 1 << 2;
const DEAD_LETTER: u8 = 1 << 3;
const KNOWN_FLAGS: u8 = BATCH_END | DEFERRED | RAW_ID | DEAD_LETTER;

/// Bytes on disk for a record with this body, id and due time, as written now.
#[cfg(test)]
pub(super) fn encoded_len(record: &DiskRecord) -> usize {
    WRITE_FORMAT.prefix_len() + payload_len(record, compact_id(&record.id).is_some())
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

/// Appends `record` to `buf` in [`WRITE_FORMAT`] and returns where it starts. The body must
/// already have been checked against the size limit (and so fit the u32 length).
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
    if record.dead_letter {
        flags |= DEAD_LETTER;
    }
    buf.reserve(WRITE_FORMAT.prefix_len() + len);
    buf.extend_from_slice(&MARKER);
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
    seal(&mut buf[start..], WRITE_FORMAT);
    start
}

/// Sets the batch-end flag of the record at `buf[start..]` and its checksum again.
pub(super) fn mark_batch_end(buf: &mut [u8], start: usize) {
    buf[start + WRITE_FORMAT.prefix_len()] |= BATCH_END;
    seal(&mut buf[start..], WRITE_FORMAT);
}

/// Where the length and checksum sit in a record of `format`.
fn len_at(format: Format) -> usize {
    format.prefix_len() - 8
}

/// Writes the checksum of the whole record at its place in the prefix.
fn seal(record: &mut [u8], format: Format) {
    let crc = checksum(record, format);
    let at = len_at(format) + 4;
    record[at..at + 4].copy_from_slice(&crc.to_be_bytes());
}

fn checksum(record: &[u8], format: Format) -> u32 {
    let at = len_at(format);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[at..at + 4]);
    hasher.update(&record[format.prefix_len()..]);
    hasher.finalize()
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Corruption {
    /// The bytes where a record should start are not [`MARKER`].
    Marker,
    /// A length outside what any record with a body up to the size limit can have.
    Length(u32),
    Checksum,
    Flags(u8),
    /// The record is cut short by the end of its segment.
    Truncated,
    /// A segment does not start with a valid header.
    SegmentHeader,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Marker => f.write_str("no record marker"),
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

/// Validates the record at the front of `buf`: its marker, its length against `max_body`, its
/// checksum, its flags and its layout.
pub(super) fn parse(buf: &[u8], format: Format, max_body: u64) -> Parsed {
    let prefix_len = format.prefix_len();
    let Some(prefix) = buf.get(..prefix_len) else {
        // A wrong marker is known from its first bytes.
        if format == Format::V2 && !buf.is_empty() && !MARKER.starts_with(&buf[..buf.len().min(2)])
        {
            return Parsed::Corrupt(Corruption::Marker);
        }
        return Parsed::Incomplete { needed: prefix_len };
    };
    if format == Format::V2 && prefix[..2] != MARKER {
        return Parsed::Corrupt(Corruption::Marker);
    }
    let at = len_at(format);
    let len = u32::from_be_bytes([prefix[at], prefix[at + 1], prefix[at + 2], prefix[at + 3]]);
    let max_len = (FIXED_LEN + RAW_ID_LEN + DUE_LEN) as u64 + max_body;
    if (len as usize) < FIXED_LEN + COMPACT_ID_LEN || u64::from(len) > max_len {
        return Parsed::Corrupt(Corruption::Length(len));
    }
    let total = prefix_len + len as usize;
    let Some(record) = buf.get(..total) else {
        return Parsed::Incomplete { needed: total };
    };
    let crc = u32::from_be_bytes([
        prefix[at + 4],
        prefix[at + 5],
        prefix[at + 6],
        prefix[at + 7],
    ]);
    if checksum(record, format) != crc {
        return Parsed::Corrupt(Corruption::Checksum);
    }
    let flags = record[prefix_len];
    if flags & !KNOWN_FLAGS != 0 {
        return Parsed::Corrupt(Corruption::Flags(flags));
    }
    let header = header_len(flags, format);
    if total < header || (total - header) as u64 > max_body {
        return Parsed::Corrupt(Corruption::Length(len));
    }
    Parsed::Record {
        len: total,
        batch_end: flags & BATCH_END != 0,
    }
}

/// The largest record a segment of `format` can hold with bodies up to `max_body`.
pub(super) fn max_record_len(format: Format, max_body: u64) -> u64 {
    (format.prefix_len() + FIXED_LEN + RAW_ID_LEN + DUE_LEN) as u64 + max_body
}

/// Bytes before the body, prefix included, for a record with these flags.
fn header_len(flags: u8, format: Format) -> usize {
    format.prefix_len()
        + FIXED_LEN
        + if flags & RAW_ID != 0 {
            RAW_ID_LEN
        } else {
            COMPACT_ID_LEN
        }
        + if flags & DEFERRED != 0 { DUE_LEN } else { 0 }
}

/// What [`resync_in`] found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resync {
    /// A valid record starts at this offset.
    Found(usize),
    /// No record starts before this offset; what follows needs more bytes to tell.
    NotBefore(usize),
}

/// Looks for the first offset from `from` in `buf` where a valid record starts. `complete`
/// says that `buf` runs to the end of the segment, so a record cut short there is no record.
pub(super) fn resync_in(
    buf: &[u8],
    from: usize,
    format: Format,
    max_body: u64,
    complete: bool,
) -> Resync {
    let mut at = from;
    while at < buf.len() {
        if format == Format::V2 {
            // Jump to the next marker candidate: most damaged bytes are not one.
            match buf[at..].iter().position(|&b| b == MARKER[0]) {
                Some(skip) => at += skip,
                None => return Resync::NotBefore(buf.len()),
            }
        }
        match parse(&buf[at..], format, max_body) {
            Parsed::Record { .. } => return Resync::Found(at),
            Parsed::Incomplete { .. } if !complete => return Resync::NotBefore(at),
            _ => at += 1,
        }
    }
    Resync::NotBefore(buf.len())
}

/// An estimate of the records a damaged stretch held: the record starts found in it, at
/// least one.
pub(super) fn records_in_damage(damaged: &[u8], format: Format) -> u64 {
    let markers = match format {
        Format::V2 => damaged.windows(2).filter(|w| *w == MARKER).count() as u64,
        Format::V1 => 0,
    };
    markers.max(1)
}

/// Decodes a record that [`parse`] accepted; the body shares `record`'s memory.
pub(super) fn decode(record: Bytes, format: Format) -> DiskRecord {
    let prefix_len = format.prefix_len();
    let flags = record[prefix_len];
    let at = |offset: usize| -> [u8; 8] {
        let mut word = [0; 8];
        word.copy_from_slice(&record[offset..offset + 8]);
        word
    };
    let mut offset = prefix_len + 1;
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
        dead_letter: flags & DEAD_LETTER != 0,
        body: record.slice(offset..),
    }
}

/// Encodes `record` in the version 1 layout, for tests of reading old segments.
#[cfg(test)]
pub(super) fn encode_v1(buf: &mut Vec<u8>, record: &DiskRecord, batch_end: bool) {
    let mut v2 = Vec::new();
    encode(&mut v2, record);
    let start = buf.len();
    buf.extend_from_slice(&v2[MARKER.len()..]);
    if batch_end {
        buf[start + Format::V1.prefix_len()] |= BATCH_END;
    }
    seal(&mut buf[start..], Format::V1);
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
            dead_letter: false,
            body: Bytes::from_static(body),
        }
    }

    fn round_trip(r: &DiskRecord) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = encode(&mut buf, r);
        assert_eq!(start, 0);
        assert_eq!(buf.len(), encoded_len(r));
        assert_eq!(
            parse(&buf, Format::V2, 1024),
            Parsed::Record {
                len: buf.len(),
                batch_end: false
            }
        );
        assert_eq!(&decode(Bytes::from(buf.clone()), Format::V2), r);
        buf
    }

    #[test]
    fn hex_id_record_bytes_are_exact() {
        let r = record(b"00000000000000ff", 0, b"hi");
        let buf = round_trip(&r);
        let crc = checksum(&buf, Format::V2).to_be_bytes();
        let mut expected = vec![0xD7, 0x1E, 0, 0, 0, 21, crc[0], crc[1], crc[2], crc[3], 0];
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0xff]);
        expected.extend_from_slice(b"hi");
        assert_eq!(buf, expected);
    }

    #[test]
    fn segment_headers_name_their_format() {
        assert_eq!(&Format::V2.header(), b"KQDS\x00\x02\x00\x00");
        assert_eq!(&Format::V1.header(), b"KQDS\x00\x01\x00\x00");
        assert_eq!(Format::of_header(b"KQDS\x00\x02\x00\x00"), Some(Format::V2));
        assert_eq!(Format::of_header(b"KQDS\x00\x01\x00\x00"), Some(Format::V1));
        assert_eq!(Format::of_header(b"KQDS\x00\x03\x00\x00"), None);
    }

    #[test]
    fn version_1_records_are_still_read() {
        let r = record(b"00000000000000ff", 0, b"old");
        let mut buf = Vec::new();
        encode_v1(&mut buf, &r, true);
        // The layout before the marker existed: length first.
        assert_eq!(&buf[..4], &[0, 0, 0, 22]);
        assert_eq!(
            parse(&buf, Format::V1, 100),
            Parsed::Record {
                len: buf.len(),
                batch_end: true
            }
        );
        assert_eq!(decode(Bytes::from(buf), Format::V1), r);
    }

    #[test]
    fn raw_id_and_due_time_are_kept() {
        let r = record(b"0123456789ABCDEF", 1_700_000_000_123, b"body");
        let buf = round_trip(&r);
        assert_eq!(buf[10], RAW_ID | DEFERRED);
        assert_eq!(buf.len(), 10 + FIXED_LEN + 16 + 8 + 4);
        let r = record(b"not hex at all!!", 0, b"");
        round_trip(&r);
    }

    #[test]
    fn the_dead_letter_flag_is_kept() {
        let mut r = record(b"00000000000000ff", 0, b"enveloped");
        r.dead_letter = true;
        let buf = round_trip(&r);
        assert_eq!(buf[10], DEAD_LETTER);
    }

    #[test]
    fn two_hundred_byte_message_takes_229_bytes() {
        let body: &'static [u8] = &[7; 200];
        let r = record(b"0123456789abcdef", 0, body);
        assert_eq!(encoded_len(&r), 229);
    }

    #[test]
    fn batch_end_is_covered_by_the_checksum() {
        let r = record(b"0123456789abcdef", 0, b"x");
        let mut buf = Vec::new();
        encode(&mut buf, &r);
        mark_batch_end(&mut buf, 0);
        assert!(matches!(
            parse(&buf, Format::V2, 10),
            Parsed::Record {
                batch_end: true,
                ..
            }
        ));
        buf[10] &= !BATCH_END;
        assert_eq!(
            parse(&buf, Format::V2, 10),
            Parsed::Corrupt(Corruption::Checksum)
        );
    }

    #[test]
    fn damage_is_detected() {
        let r = record(b"0123456789abcdef", 0, b"some body");
        let mut buf = Vec::new();
        encode(&mut buf, &r);
        for cut in 0..buf.len() {
            assert!(matches!(
                parse(&buf[..cut], Format::V2, 100),
                Parsed::Incomplete { .. }
            ));
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(
                    parse(&bad, Format::V2, 100),
                    Parsed::Corrupt(_) | Parsed::Incomplete { .. }
                ),
                "flipped byte {i} went unnoticed"
            );
        }
        // A body over the limit is a length error even with a matching checksum.
        assert_eq!(
            parse(&buf, Format::V2, 8),
            Parsed::Corrupt(Corruption::Length(buf.len() as u32 - 10))
        );
        assert_eq!(
            parse(&[0xD7, 0x1E, 0, 0, 0, 3, 0, 0, 0, 0], Format::V2, 100),
            Parsed::Corrupt(Corruption::Length(3))
        );
        assert_eq!(
            parse(&[0, 0, 0, 30], Format::V2, 100),
            Parsed::Corrupt(Corruption::Marker)
        );
    }

    #[test]
    fn resync_finds_the_next_record_after_damage() {
        let mut buf = Vec::new();
        for i in 0..5u8 {
            let body: &'static [u8] = &[0xD7; 40];
            let mut r = record(b"0123456789abcdef", 0, body);
            r.attempts = u16::from(i);
            encode(&mut buf, &r);
        }
        let len = buf.len() / 5;
        buf[len + 20] ^= 0xff; // the second record's body
        assert!(matches!(
            parse(&buf[len..], Format::V2, 100),
            Parsed::Corrupt(_)
        ));
        assert_eq!(
            resync_in(&buf, len + 1, Format::V2, 100, true),
            Resync::Found(2 * len)
        );
        // Without the rest of the buffer, it cannot tell yet.
        assert_eq!(
            resync_in(&buf[..2 * len + 5], len + 1, Format::V2, 100, false),
            Resync::NotBefore(2 * len)
        );
        assert_eq!(
            resync_in(&buf[..2 * len + 5], len + 1, Format::V2, 100, true),
            Resync::NotBefore(2 * len + 5)
        );
        assert_eq!(records_in_damage(&buf[len..2 * len], Format::V2), 1);
        assert!(records_in_damage(&buf[len..4 * len], Format::V2) >= 3);
    }
}
