//! Walking a segment file record by record without handing anything out: for recovery (what is
//! there, where the last whole batch ends, what is damaged) and for stepping over damage.

use super::file::QueueFile;
use super::record::{self, Corruption, Format, Parsed, Resync, SEGMENT_HEADER_LEN};
use super::{Pos, StorageError};

/// Bytes read at a time when scanning.
const SCAN_CHUNK: usize = 1 << 20;

/// A stretch of a segment that holds no valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Damage {
    pub(super) from: u64,
    pub(super) to: u64,
    pub(super) problem: Corruption,
    /// Records it is estimated to have held.
    pub(super) records: u64,
}

/// What scanning a segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SegmentScan {
    /// Bytes scanned up to: the file length, or the limit given.
    pub(super) len: u64,
    pub(super) format: Format,
    /// Valid records from the start offset.
    pub(super) records: u64,
    /// The same, counting only up to the last record that closes a batch, and the offset just
    /// past that record (the start offset, or the end of the header, when none does).
    pub(super) commit_records: u64,
    pub(super) commit_end: u64,
    /// Damaged stretches, in order.
    pub(super) damage: Vec<Damage>,
}

/// A view of a file's bytes from some offset on, read in large chunks as needed.
struct Window<'a> {
    file: &'a QueueFile,
    len: u64,
    base: u64,
    buf: &'a mut Vec<u8>,
}

impl Window<'_> {
    /// The bytes from `pos` on that are read so far, at least `want` of them unless the data
    /// ends first, and whether they run to the end of the data.
    fn at(&mut self, pos: u64, want: usize) -> Result<(&[u8], bool), StorageError> {
        let filled = self.base + self.buf.len() as u64;
        if pos < self.base || pos > filled {
            self.buf.clear();
            self.base = pos;
        } else if filled < self.len && filled - pos < want as u64 {
            self.buf.drain(..(pos - self.base) as usize);
            self.base = pos;
            let have = self.buf.len();
            let more = (self.len - filled).min(SCAN_CHUNK.max(want - have) as u64) as usize;
            self.buf.resize(have + more, 0);
            let got = self.file.read_at(&mut self.buf[have..], filled)?;
            self.buf.truncate(have + got);
            if got < more {
                // The file is shorter than the limit: scan what is there.
                self.len = filled + got as u64;
            }
        }
        let start = (pos - self.base) as usize;
        let bytes = &self.buf[start.min(self.buf.len())..];
        let complete = self.base + self.buf.len() as u64 >= self.len;
        Ok((bytes, complete))
    }
}

/// The format of the segment in `file`, from its header, or — when the header is damaged —
/// from the first record after it. `None` when the file is shorter than a header.
pub(super) fn segment_format(
    file: &QueueFile,
    max_body: u64,
) -> Result<Option<(Format, bool)>, StorageError> {
    let mut head = vec![0u8; SEGMENT_HEADER_LEN as usize + 64];
    let got = file.read_at(&mut head, 0)?;
    if (got as u64) < SEGMENT_HEADER_LEN {
        return Ok(None);
    }
    head.truncate(got);
    if let Some(format) = Format::of_header(&head[..SEGMENT_HEADER_LEN as usize]) {
        return Ok(Some((format, true)));
    }
    let after = &head[SEGMENT_HEADER_LEN as usize..];
    let format = [Format::V2, Format::V1]
        .into_iter()
        .find(|&f| !matches!(record::parse(after, f, max_body), Parsed::Corrupt(_)))
        .unwrap_or(Format::V2);
    Ok(Some((format, false)))
}

/// The offset of the first valid record at or after `from` and before `end`, or `end` when
/// there is none.
pub(super) fn next_record(
    file: &QueueFile,
    from: u64,
    end: u64,
    format: Format,
    max_body: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, StorageError> {
    let mut window = Window {
        file,
        len: end,
        base: from,
        buf,
    };
    window.buf.clear();
    resync(&mut window, from, format, max_body)
}

fn resync(
    window: &mut Window<'_>,
    mut from: u64,
    format: Format,
    max_body: u64,
) -> Result<u64, StorageError> {
    let want = record::max_record_len(format, max_body) as usize;
    loop {
        let (bytes, complete) = window.at(from, want)?;
        if bytes.is_empty() {
            return Ok(window.len.min(from.max(window.base)));
        }
        match record::resync_in(bytes, 0, format, max_body, complete) {
            Resync::Found(at) => return Ok(from + at as u64),
            Resync::NotBefore(at) if complete => return Ok(from + at as u64),
            // The candidate at `at` needs more bytes: look again with it at the front.
            Resync::NotBefore(at) => from += at as u64,
        }
    }
}

/// Scans the records of `file` from `start` (0: the segment header first) up to `limit`, or
/// the end of the file, stepping over damaged stretches; `visit` gets the offset of every
/// valid record.
pub(super) fn scan_segment(
    file: &QueueFile,
    start: u64,
    limit: Option<u64>,
    max_body: u64,
    buf: &mut Vec<u8>,
    mut visit: impl FnMut(u64),
) -> Result<SegmentScan, StorageError> {
    let len = match limit {
        Some(limit) => limit,
        None => file.len()?,
    };
    let mut scan = SegmentScan {
        len,
        format: record::WRITE_FORMAT,
        records: 0,
        commit_records: 0,
        commit_end: start.max(SEGMENT_HEADER_LEN).min(len),
        damage: Vec::new(),
    };
    if len == 0 {
        scan.commit_end = 0;
        return Ok(scan);
    }
    let Some((format, header_ok)) = segment_format(file, max_body)? else {
        scan.commit_end = 0;
        scan.damage.push(Damage {
            from: 0,
            to: len,
            problem: Corruption::Truncated,
            records: 0,
        });
        return Ok(scan);
    };
    scan.format = format;
    let mut pos = start.max(SEGMENT_HEADER_LEN);
    let mut window = Window {
        file,
        len,
        base: pos,
        buf,
    };
    window.buf.clear();
    if start < SEGMENT_HEADER_LEN && !header_ok {
        let to = match record::parse(window.at(pos, 64)?.0, format, max_body) {
            Parsed::Record { .. } => pos,
            _ => resync(&mut window, pos, format, max_body)?,
        };
        scan.damage.push(Damage {
            from: 0,
            to,
            problem: Corruption::SegmentHeader,
            records: if to > pos { 1 } else { 0 },
        });
        pos = to;
    }
    loop {
        let (bytes, complete) = window.at(pos, 64)?;
        if bytes.is_empty() {
            break;
        }
        let parsed = match record::parse(bytes, format, max_body) {
            Parsed::Incomplete { needed } if !complete => {
                let (bytes, _) = window.at(pos, needed)?;
                record::parse(bytes, format, max_body)
            }
            parsed => parsed,
        };
        match parsed {
            Parsed::Record { len: n, batch_end } => {
                visit(pos);
                pos += n as u64;
                scan.records += 1;
                if batch_end {
                    scan.commit_records = scan.records;
                    scan.commit_end = pos;
                }
            }
            Parsed::Incomplete { .. } => {
                // Cut short by the end of the data.
                let to = window.len;
                scan.damage.push(Damage {
                    from: pos,
                    to,
                    problem: Corruption::Truncated,
                    records: 1,
                });
                break;
            }
            Parsed::Corrupt(problem) => {
                let to = resync(&mut window, pos + 1, format, max_body)?;
                let (damaged, _) = window.at(pos, (to - pos) as usize)?;
                let records = record::records_in_damage(
                    &damaged[..damaged.len().min((to - pos) as usize)],
                    format,
                );
                scan.damage.push(Damage {
                    from: pos,
                    to,
                    problem,
                    records,
                });
                pos = to;
            }
        }
    }
    scan.len = window.len;
    Ok(scan)
}

/// Calls `visit` with the position of every valid record from `from` up to (not including)
/// `until`, across segments; stops early at a missing segment.
pub(super) fn records_between(
    open: impl Fn(u64) -> Result<Option<QueueFile>, StorageError>,
    from: Pos,
    until: Pos,
    max_body: u64,
    buf: &mut Vec<u8>,
    mut visit: impl FnMut(Pos),
) -> Result<(), StorageError> {
    for segment in from.segment..=until.segment {
        let Some(file) = open(segment)? else {
            return Ok(());
        };
        let start = if segment == from.segment {
            from.offset
        } else {
            0
        };
        let limit = (segment == until.segment).then_some(until.offset);
        scan_segment(&file, start, limit, max_body, buf, |offset| {
            visit(Pos { segment, offset })
        })?;
    }
    Ok(())
}
