//! The metadata file `<name>.diskqueue.meta`: a snapshot of where the queue stands, written at
//! every full sync. Big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KQDM` |
//! | 4 | 2 | format version, 2 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 8 | generation: which progress journal continues this snapshot (see `journal`) |
//! | 16 | 8 | depth: records still to hand out from the read position |
//! | 24 | 16 | read position (segment, offset): the first record not yet finished |
//! | 40 | 16 | popped position: every record before it was handed out |
//! | 56 | 16 | write position: the end of the data fsynced before this file was written |
//! | 72 | 4 | `n`: records handed out before the popped position and not finished |
//! | 76 | 16 × n | their positions, ascending |
//! | … | 4 | CRC-32 (IEEE) of everything before it |
//!
//! Records between the read and the popped position that are not listed were finished: after a
//! restart they are skipped, and the listed ones are handed out again (they were delivered at
//! least once). Version 1 files (52 bytes: depth, read and write positions, no generation) are
//! still read.
//!
//! It is replaced atomically: written to `<name>.diskqueue.meta.tmp`, fsynced, renamed over the
//! old one, and the directory fsynced. A failed write removes the temporary file.

use super::file::{FaultSwitch, Names, QueueFile, remove_if_present, rename, sync_dir};
use super::{Pos, StorageError};
use std::io;

const MAGIC: [u8; 4] = *b"KQDM";
const VERSION: u16 = 2;
const HEADER_LEN: usize = 76;
const V1_LEN: usize = 52;

/// A snapshot of the queue's positions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Meta {
    pub(super) generation: u64,
    pub(super) depth: u64,
    /// The first record not finished (where reading starts again after a restart).
    pub(super) read: Pos,
    /// Every record before this was handed out; those after `read` not in `unfinished` were
    /// finished.
    pub(super) popped: Pos,
    pub(super) write: Pos,
    /// Positions in `read..popped` handed out and not finished, ascending.
    pub(super) unfinished: Vec<Pos>,
}

/// What was found at the metadata path.
#[derive(Debug)]
pub(super) enum Loaded {
    Missing,
    /// Present but not a valid metadata file (wrong size, magic, version or checksum).
    Corrupt,
    Valid(Meta),
}

fn put_pos(out: &mut Vec<u8>, pos: Pos) {
    out.extend_from_slice(&pos.segment.to_be_bytes());
    out.extend_from_slice(&pos.offset.to_be_bytes());
}

/// Reads big-endian words off the front of a slice.
struct Words<'a>(&'a [u8]);

impl Words<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (word, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*word))
    }

    fn u32(&mut self) -> Option<u32> {
        let (word, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*word))
    }

    fn pos(&mut self) -> Option<Pos> {
        Some(Pos {
            segment: self.u64()?,
            offset: self.u64()?,
        })
    }
}

impl Meta {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 16 * self.unfinished.len() + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.depth.to_be_bytes());
        put_pos(&mut out, self.read);
        put_pos(&mut out, self.popped);
        put_pos(&mut out, self.write);
        out.extend_from_slice(&(self.unfinished.len() as u32).to_be_bytes());
        for &pos in &self.unfinished {
            put_pos(&mut out, pos);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Meta> {
        if bytes.len() == V1_LEN {
            return decode_v1(bytes);
        }
        let (body, crc) = bytes.split_last_chunk::<4>()?;
        if crc32fast::hash(body) != u32::from_be_bytes(*crc)
            || body.len() < HEADER_LEN
            || body[0..4] != MAGIC
            || u16::from_be_bytes([body[4], body[5]]) != VERSION
        {
            return None;
        }
        let mut words = Words(&body[8..]);
        let mut meta = Meta {
            generation: words.u64()?,
            depth: words.u64()?,
            read: words.pos()?,
            popped: words.pos()?,
            write: words.pos()?,
            unfinished: Vec::new(),
        };
        let count = words.u32()? as usize;
        if words.0.len() != 16 * count {
            return None;
        }
        meta.unfinished = (0..count).map(|_| words.pos()).collect::<Option<_>>()?;
        let ascending = meta.unfinished.windows(2).all(|w| w[0] < w[1]);
        let inside = meta
            .unfinished
            .iter()
            .all(|p| meta.read <= *p && *p < meta.popped);
        (ascending && inside && meta.read <= meta.popped).then_some(meta)
    }

    pub(super) fn load(names: &Names) -> Result<Loaded, StorageError> {
        let path = names.meta();
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Meta::decode(&bytes).map_or(Loaded::Corrupt, Loaded::Valid)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Loaded::Missing),
            Err(source) => Err(StorageError::Read { path, source }),
        }
    }

    /// Replaces the metadata file atomically and durably; on failure no temporary file stays.
    pub(super) fn store(&self, names: &Names, faults: &FaultSwitch) -> Result<(), StorageError> {
        let temp = names.meta_temp();
        let written = (|| {
            let file = QueueFile::open_write(temp.clone(), true, faults)?;
            file.write_all_at(&self.encode(), 0)?;
            file.sync()?;
            drop(file);
            rename(&temp, &names.meta())
        })();
        if let Err(e) = written {
            if let Err(error) = remove_if_present(&temp) {
                tracing::warn!(%error, "disk queue: cannot remove a temporary metadata file");
            }
            return Err(e);
        }
        sync_dir(names.dir(), faults)
    }
}

/// A version 1 file: read and write positions and depth, nothing handed out pending.
fn decode_v1(bytes: &[u8]) -> Option<Meta> {
    let crc = u32::from_be_bytes([bytes[48], bytes[49], bytes[50], bytes[51]]);
    if bytes[0..4] != MAGIC
        || u16::from_be_bytes([bytes[4], bytes[5]]) != 1
        || crc32fast::hash(&bytes[..48]) != crc
    {
        return None;
    }
    let mut words = Words(&bytes[8..48]);
    let depth = words.u64()?;
    let read = words.pos()?;
    let write = words.pos()?;
    Some(Meta {
        generation: 0,
        depth,
        read,
        popped: read,
        write,
        unfinished: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(segment: u64, offset: u64) -> Pos {
        Pos { segment, offset }
    }

    #[test]
    fn metadata_bytes_are_exact_and_checked() {
        let meta = Meta {
            generation: 9,
            depth: 5,
            read: pos(1, 8),
            popped: pos(2, 300),
            write: pos(2, 0x0102),
            unfinished: vec![pos(1, 8), pos(2, 40)],
        };
        let bytes = meta.encode();
        assert_eq!(bytes.len(), 76 + 32 + 4);
        assert_eq!(&bytes[..8], b"KQDM\x00\x02\x00\x00");
        assert_eq!(&bytes[8..16], &[0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(&bytes[16..24], &[0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&bytes[64..72], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&bytes[72..76], &[0, 0, 0, 2]);
        assert_eq!(Meta::decode(&bytes), Some(meta.clone()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(Meta::decode(&bad), None, "flipped byte {i}");
        }
        assert_eq!(Meta::decode(&bytes[..bytes.len() - 1]), None);
        // Positions outside read..popped are refused even with a valid checksum.
        let outside = Meta {
            unfinished: vec![pos(2, 300)],
            ..meta
        };
        assert_eq!(Meta::decode(&outside.encode()), None);
    }

    #[test]
    fn version_1_files_are_still_read() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"KQDM\x00\x01\x00\x00");
        for word in [5u64, 1, 8, 2, 0x0102] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(
            Meta::decode(&bytes),
            Some(Meta {
                generation: 0,
                depth: 5,
                read: pos(1, 8),
                popped: pos(1, 8),
                write: pos(2, 0x0102),
                unfinished: Vec::new(),
            })
        );
        bytes[20] ^= 1;
        assert_eq!(Meta::decode(&bytes), None);
    }
}
