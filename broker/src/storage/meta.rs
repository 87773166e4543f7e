//! The metadata file `<name>.diskqueue.meta`: where reading and writing stand, and the depth,
//! as of the last sync. 52 bytes, big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KQDM` |
//! | 4 | 2 | format version, 1 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 8 | depth: records between the read and the write position |
//! | 16 | 8 | read segment number |
//! | 24 | 8 | read offset in it: the next record to hand out |
//! | 32 | 8 | write segment number |
//! | 40 | 8 | write offset in it: the end of the data fsynced before this file was written |
//! | 48 | 4 | CRC-32 (IEEE) of bytes 0..48 |
//!
//! It is replaced atomically: written to `<name>.diskqueue.meta.tmp`, fsynced, renamed over the
//! old one, and the directory fsynced.

use super::StorageError;
use super::file::{FaultSwitch, Names, QueueFile, rename, sync_dir};
use std::io;

const MAGIC: [u8; 4] = *b"KQDM";
const VERSION: u16 = 1;
pub(super) const META_LEN: usize = 52;

/// Positions are (segment number, byte offset in that segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Meta {
    pub(super) depth: u64,
    pub(super) read_file: u64,
    pub(super) read_pos: u64,
    pub(super) write_file: u64,
    pub(super) write_pos: u64,
}

/// What was found at the metadata path.
#[derive(Debug)]
pub(super) enum Loaded {
    Missing,
    /// Present but not a valid metadata file (wrong size, magic, version or checksum).
    Corrupt,
    Valid(Meta),
}

impl Meta {
    pub(super) fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_be_bytes());
        let fields = [
            self.depth,
            self.read_file,
            self.read_pos,
            self.write_file,
            self.write_pos,
        ];
        for (i, field) in fields.iter().enumerate() {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&field.to_be_bytes());
        }
        let crc = crc32fast::hash(&out[..48]);
        out[48..].copy_from_slice(&crc.to_be_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Meta> {
        let bytes: &[u8; META_LEN] = bytes.try_into().ok()?;
        let crc = u32::from_be_bytes([bytes[48], bytes[49], bytes[50], bytes[51]]);
        if bytes[0..4] != MAGIC
            || u16::from_be_bytes([bytes[4], bytes[5]]) != VERSION
            || crc32fast::hash(&bytes[..48]) != crc
        {
            return None;
        }
        let field = |i: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&bytes[8 + 8 * i..16 + 8 * i]);
            u64::from_be_bytes(word)
        };
        Some(Meta {
            depth: field(0),
            read_file: field(1),
            read_pos: field(2),
            write_file: field(3),
            write_pos: field(4),
        })
    }

    pub(super) fn load(names: &Names) -> Result<Loaded, StorageError> {
        let path = names.meta();
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Meta::decode(&bytes).map_or(Loaded::Corrupt, Loaded::Valid)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Loaded::Missing),
            Err(source) => Err(StorageError::Read { path, source }),
        }
    }

    /// Replaces the metadata file atomically and durably.
    pub(super) fn store(&self, names: &Names, faults: &FaultSwitch) -> Result<(), StorageError> {
        let temp = names.meta_temp();
        let file = QueueFile::open_write(temp.clone(), true, faults)?;
        file.write_all_at(&self.encode(), 0)?;
        file.sync()?;
        drop(file);
        rename(&temp, &names.meta())?;
        sync_dir(names.dir(), faults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_bytes_are_exact_and_checked() {
        let meta = Meta {
            depth: 5,
            read_file: 1,
            read_pos: 8,
            write_file: 2,
            write_pos: 0x0102,
        };
        let bytes = meta.encode();
        assert_eq!(&bytes[..8], b"KQDM\x00\x01\x00\x00");
        assert_eq!(&bytes[8..16], &[0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&bytes[40..48], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(Meta::decode(&bytes), Some(meta));
        for i in 0..META_LEN {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert_eq!(Meta::decode(&bad), None, "flipped byte {i}");
        }
        assert_eq!(Meta::decode(&bytes[..51]), None);
    }
}
