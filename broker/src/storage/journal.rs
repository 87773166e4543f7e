//! The progress journal: what consumers were handed and finished since the last snapshot
//! (`meta`), so that a restart after a crash hands out again only what was not finished, and
//! marks what was handed out before as delivered once more.
//!
//! Each snapshot has a generation; the entries that continue it go to
//! `<name>.diskqueue.journal.<generation % 2>`, which is emptied when the snapshot is begun. The
//! other file still continues the previous snapshot until the new one is durable, so a crash
//! while a snapshot is written finds the old snapshot with its journal intact, followed by the
//! new snapshot's journal (what happened while it was being written): recovery replays both.
//! Snapshots prepared while one of the same generation is still being written share its
//! journal, which goes on rather than starting again empty.
//!
//! Entries are appended with one `pwrite` each and never fsynced: they reach the page cache
//! before the records they describe reach a consumer, which is what survives a process crash;
//! after a machine crash the snapshot alone counts (more records are handed out again, none is
//! lost). An entry is
//!
//! | size | field |
//! |---|---|
//! | 4 | `len`: bytes after this 8-byte prefix |
//! | 4 | CRC-32 (IEEE) of those bytes |
//! | 8 | generation of the snapshot it continues |
//! | varint × 2 | popped position (segment, offset): every record before it was handed out |
//! | varint | `n` |
//! | varint × 2n | positions of records finished |
//!
//! Replay stops at the first entry that is incomplete, fails its checksum or belongs to
//! another generation. Every entry states facts that only grow (handed out up to, finished), so
//! replaying one twice, or on a later snapshot, changes nothing.

use super::file::{FaultSwitch, Names, QueueFile};
use super::{Pos, StorageError};
use std::io;

const PREFIX_LEN: usize = 8;
/// Larger entries than this are damage, not entries.
const MAX_ENTRY: u32 = 64 << 20;

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Entry {
    pub(super) popped: Pos,
    pub(super) finished: Vec<Pos>,
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_pos(out: &mut Vec<u8>, pos: Pos) {
    put_varint(out, pos.segment);
    put_varint(out, pos.offset);
}

fn take_pos(bytes: &mut &[u8]) -> Option<Pos> {
    Some(Pos {
        segment: take_varint(bytes)?,
        offset: take_varint(bytes)?,
    })
}

/// Appends the encoding of `entry` for `generation` to `out`.
fn encode(out: &mut Vec<u8>, generation: u64, popped: Pos, finished: &[Pos]) {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX_LEN]);
    out.extend_from_slice(&generation.to_be_bytes());
    put_pos(out, popped);
    put_varint(out, finished.len() as u64);
    for &pos in finished {
        put_pos(out, pos);
    }
    let len = (out.len() - start - PREFIX_LEN) as u32;
    let crc = crc32fast::hash(&out[start + PREFIX_LEN..]);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// The entries of `generation` at the front of `bytes`, up to the first that is not one.
fn decode_all(mut bytes: &[u8], generation: u64) -> Vec<Entry> {
    let mut entries = Vec::new();
    while let Some((prefix, rest)) = bytes.split_first_chunk::<PREFIX_LEN>() {
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let crc = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        if len > MAX_ENTRY || rest.len() < len as usize {
            break;
        }
        let (body, rest) = rest.split_at(len as usize);
        if crc32fast::hash(body) != crc {
            break;
        }
        let Some(entry) = decode_body(body, generation) else {
            break;
        };
        entries.push(entry);
        bytes = rest;
    }
    entries
}

fn decode_body(body: &[u8], generation: u64) -> Option<Entry> {
    let (gen_bytes, mut rest) = body.split_first_chunk::<8>()?;
    if u64::from_be_bytes(*gen_bytes) != generation {
        return None;
    }
    let popped = take_pos(&mut rest)?;
    let count = take_varint(&mut rest)?;
    // Each position takes at least two bytes: a count beyond that is damage.
    if count > rest.len() as u64 / 2 {
        return None;
    }
    let finished = (0..count)
        .map(|_| take_pos(&mut rest))
        .collect::<Option<Vec<Pos>>>()?;
    rest.is_empty().then_some(Entry { popped, finished })
}

/// The entries continuing the snapshot of `generation`, in the order they were written.
pub(super) fn replay(names: &Names, generation: u64) -> Result<Vec<Entry>, StorageError> {
    let path = names.journal(generation);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(decode_all(&bytes, generation)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(StorageError::Read { path, source }),
    }
}

/// The journal being written: the file continuing the newest snapshot begun.
#[derive(Debug)]
pub(super) struct Journal {
    file: Option<QueueFile>,
    generation: u64,
    len: u64,
    buf: Vec<u8>,
    /// The last append failed (logged once until one succeeds).
    failing: bool,
}

impl Journal {
    /// A journal with no file yet; [`Journal::begin`] opens one.
    pub(super) fn new() -> Journal {
        Journal {
            file: None,
            generation: 0,
            len: 0,
            buf: Vec::new(),
            failing: false,
        }
    }

    pub(super) fn is_started(&self) -> bool {
        self.file.is_some()
    }

    /// Starts the file continuing the snapshot of `generation`, emptying it. Entries written
    /// before go on counting for the previous snapshot, in the other file. When the journal
    /// already continues `generation` (a snapshot of it was begun and is not on disk yet, or
    /// failed), it goes on: what it holds is still needed if this snapshot does not land
    /// either.
    pub(super) fn begin(&mut self, names: &Names, generation: u64, faults: &FaultSwitch) {
        if self.file.is_some() && self.generation == generation {
            return;
        }
        self.generation = generation;
        self.len = 0;
        self.file = match QueueFile::open_write(names.journal(generation), true, faults) {
            Ok(file) => Some(file),
            Err(error) => {
                // Only progress since the snapshot is at stake: handed out again after a crash.
                tracing::warn!(%error, "disk queue: cannot start a progress journal");
                None
            }
        };
    }

    /// Appends one entry; a failure is logged, and costs only redeliveries after a crash.
    pub(super) fn append(&mut self, popped: Pos, finished: &[Pos]) {
        let Some(file) = &self.file else { return };
        self.buf.clear();
        encode(&mut self.buf, self.generation, popped, finished);
        match file.write_all_at(&self.buf, self.len) {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                self.failing = false;
            }
            Err(error) => {
                if !self.failing {
                    tracing::warn!(%error, "disk queue: cannot append to the progress journal");
                }
                self.failing = true;
            }
        }
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(segment: u64, offset: u64) -> Pos {
        Pos { segment, offset }
    }

    #[test]
    fn entries_round_trip_and_stop_at_damage() {
        let mut bytes = Vec::new();
        encode(&mut bytes, 7, pos(3, 900), &[pos(2, 8), pos(3, 300_000)]);
        let first_len = bytes.len();
        encode(&mut bytes, 7, pos(4, 8), &[]);
        assert_eq!(&bytes[..4], &(first_len as u32 - 8).to_be_bytes());
        let entries = decode_all(&bytes, 7);
        assert_eq!(
            entries,
            vec![
                Entry {
                    popped: pos(3, 900),
                    finished: vec![pos(2, 8), pos(3, 300_000)]
                },
                Entry {
                    popped: pos(4, 8),
                    finished: vec![]
                },
            ]
        );
        // Another generation's entries are not this snapshot's.
        assert!(decode_all(&bytes, 8).is_empty());
        // A torn or damaged entry ends the replay there.
        assert_eq!(decode_all(&bytes[..bytes.len() - 1], 7).len(), 1);
        for i in 0..first_len {
            let mut bad = bytes.clone();
            bad[i] ^= 0x21;
            assert!(decode_all(&bad, 7).is_empty(), "flipped byte {i}");
        }
        bytes.extend_from_slice(&[0; 40]);
        assert_eq!(decode_all(&bytes, 7).len(), 2);
    }

    #[test]
    fn varints_cover_every_width() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut slice = &out[..];
            assert_eq!(take_varint(&mut slice), Some(value));
            assert!(slice.is_empty());
        }
        assert_eq!(take_varint(&mut &[0x80u8; 11][..]), None);
    }
}
