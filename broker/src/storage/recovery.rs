//! Opening a queue: finding where reading and writing stand from the metadata and the segments
//! present, and repairing what a crash or a damaged disk left behind.
//!
//! - Metadata valid and consistent with the files: the synced state is trusted, and only what
//!   lies after the synced write position is scanned. Whole batches found there are kept; a torn
//!   or incomplete batch at the end of a segment is cut off.
//! - Metadata missing, damaged, or pointing at files that are not there: every segment from the
//!   read position (or the first segment present) is scanned and the depth counted. A bad
//!   record in a segment other than the last moves the rest of that segment aside as `.bad`; the
//!   last segment's bad tail is cut as torn.
//! - Segments before the read position (consumed, but not yet deleted when the process died)
//!   are removed, and so are left-over metadata temp files.

use super::file::{FileKind, Names, QueueFile, remove_if_present, rename};
use super::meta::{Loaded, Meta};
use super::record::{self, Corruption, Parsed, SEGMENT_HEADER, SEGMENT_HEADER_LEN};
use super::{DiskQueueOptions, MetadataState, OpenReport, StorageError};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Bytes read at a time when scanning a segment.
const SCAN_CHUNK: usize = 1 << 20;

/// The state a queue opens with.
pub(super) struct Recovered {
    /// Read and write positions and depth.
    pub(super) state: Meta,
    pub(super) report: OpenReport,
    /// Files changed by repairs, to fsync before the new metadata is written.
    pub(super) repaired: Vec<QueueFile>,
    /// Whether the metadata on disk already says `state`.
    pub(super) metadata_current: bool,
}

/// What scanning a segment found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SegmentScan {
    /// Bytes scanned up to: the file length, or the limit given.
    pub(super) len: u64,
    /// Valid records from the start offset, and the offset just past the last of them.
    pub(super) records: u64,
    pub(super) valid_end: u64,
    /// The same, counting only up to the last record that closes a batch.
    pub(super) commit_records: u64,
    pub(super) commit_end: u64,
    /// Why scanning stopped before `len`.
    pub(super) problem: Option<Corruption>,
}

/// Scans the records of `file` from `start` (0: the segment header first) up to `limit`, or
/// the end of the file, stopping at the first invalid one.
pub(super) fn scan_segment(
    file: &QueueFile,
    start: u64,
    limit: Option<u64>,
    max_body: u64,
    buf: &mut Vec<u8>,
) -> Result<SegmentScan, StorageError> {
    let mut len = match limit {
        Some(limit) => limit,
        None => file.len()?,
    };
    let mut scan = SegmentScan {
        len,
        records: 0,
        valid_end: start,
        commit_records: 0,
        commit_end: start,
        problem: None,
    };
    let mut pos = start;
    if pos < SEGMENT_HEADER_LEN {
        if len == 0 {
            return Ok(scan);
        }
        let mut header = [0u8; SEGMENT_HEADER.len()];
        let got = file.read_at(&mut header, 0)?;
        if len < SEGMENT_HEADER_LEN || (got as u64) < SEGMENT_HEADER_LEN {
            scan.problem = Some(Corruption::Truncated);
            return Ok(scan);
        }
        if header != SEGMENT_HEADER {
            scan.problem = Some(Corruption::SegmentHeader);
            return Ok(scan);
        }
        pos = SEGMENT_HEADER_LEN;
        scan.valid_end = pos;
        scan.commit_end = pos;
    }
    // `buf` holds the file's bytes from `base`; `at` is `pos` within it.
    buf.clear();
    let mut base = pos;
    loop {
        let at = (pos - base) as usize;
        match record::parse(&buf[at..], max_body) {
            Parsed::Record { len: n, batch_end } => {
                pos += n as u64;
                scan.records += 1;
                scan.valid_end = pos;
                if batch_end {
                    scan.commit_records = scan.records;
                    scan.commit_end = pos;
                }
            }
            Parsed::Corrupt(problem) => {
                scan.problem = Some(problem);
                return Ok(scan);
            }
            Parsed::Incomplete { needed } => {
                let filled = base + buf.len() as u64;
                if filled >= len {
                    if pos < len {
                        scan.problem = Some(Corruption::Truncated);
                    }
                    return Ok(scan);
                }
                buf.drain(..at);
                base = pos;
                let want = (len - filled).min(SCAN_CHUNK.max(needed) as u64) as usize;
                let old = buf.len();
                buf.resize(old + want, 0);
                let got = file.read_at(&mut buf[old..], filled)?;
                buf.truncate(old + got);
                if got < want {
                    // The file is shorter than the limit: scan what is there.
                    len = filled + got as u64;
                    scan.len = len;
                }
            }
        }
    }
}

/// Moves bytes `from..len` of segment `n` aside to a `.bad` file. Returns the `.bad` path and
/// the segment file when it is kept (truncated to `from`), or `None` when nothing valid was in
/// it and the whole file was renamed.
pub(super) fn move_aside(
    names: &Names,
    n: u64,
    from: u64,
    options: &DiskQueueOptions,
) -> Result<(PathBuf, Option<QueueFile>), StorageError> {
    let path = names.segment(n);
    let bad = names.bad(n);
    if from <= SEGMENT_HEADER_LEN {
        rename(&path, &bad)?;
        return Ok((bad, None));
    }
    let segment = QueueFile::open_write(path, false, &options.faults)?;
    let len = segment.len()?;
    let out = QueueFile::open_write(bad.clone(), true, &options.faults)?;
    let mut chunk = vec![0u8; SCAN_CHUNK.min((len - from) as usize)];
    let mut offset = from;
    while offset < len {
        let got = segment.read_at(&mut chunk, offset)?;
        if got == 0 {
            break;
        }
        out.write_all_at(&chunk[..got], offset - from)?;
        offset += got as u64;
    }
    out.sync()?;
    segment.truncate(from)?;
    Ok((bad, Some(segment)))
}

/// Reads the metadata and the directory, repairs what needs it and tells where the queue
/// stands.
pub(super) fn recover(
    names: &Names,
    options: &DiskQueueOptions,
) -> Result<Recovered, StorageError> {
    let mut segments = BTreeSet::new();
    let dir = names.dir();
    let entries = std::fs::read_dir(dir).map_err(|source| StorageError::ListDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| StorageError::ListDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        match names.classify(file_name) {
            Some(FileKind::Segment(n)) => {
                segments.insert(n);
            }
            Some(FileKind::MetaTemp) => remove_if_present(&entry.path())?,
            _ => {}
        }
    }

    let mut run = Recovery {
        names,
        options,
        report: OpenReport::default(),
        repaired: Vec::new(),
        buf: Vec::new(),
    };
    let loaded = match Meta::load(names)? {
        Loaded::Valid(meta) => Some(meta),
        Loaded::Missing => {
            run.report.metadata = if segments.is_empty() {
                MetadataState::Created
            } else {
                MetadataState::Missing
            };
            None
        }
        Loaded::Corrupt => {
            run.report.metadata = MetadataState::Corrupt;
            None
        }
    };
    if let Some(meta) = loaded {
        run.report.metadata = MetadataState::Loaded;
        let stale: Vec<u64> = segments.range(..meta.read_file).copied().collect();
        for n in stale {
            remove_if_present(&names.segment(n))?;
            segments.remove(&n);
            run.report.stale_segments_removed += 1;
        }
    }
    let state = match loaded {
        Some(meta) if run.consistent(&meta, &segments)? => run.after_sync(meta, &segments)?,
        Some(meta) => {
            run.report.metadata = MetadataState::Inconsistent;
            run.scan_all(Some(meta), &segments)?
        }
        None => run.scan_all(None, &segments)?,
    };
    run.report.depth = state.depth;
    Ok(Recovered {
        state,
        metadata_current: loaded == Some(state),
        report: run.report,
        repaired: run.repaired,
    })
}

struct Recovery<'a> {
    names: &'a Names,
    options: &'a DiskQueueOptions,
    report: OpenReport,
    repaired: Vec<QueueFile>,
    buf: Vec<u8>,
}

impl Recovery<'_> {
    fn file_len(&self, n: u64) -> Result<u64, StorageError> {
        let path = self.names.segment(n);
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|source| StorageError::Read { path, source })
    }

    /// Whether every segment the metadata refers to is there and long enough.
    fn consistent(&self, meta: &Meta, segments: &BTreeSet<u64>) -> Result<bool, StorageError> {
        if meta.read_file > meta.write_file
            || (meta.read_file == meta.write_file && meta.read_pos > meta.write_pos)
            || meta.write_file - meta.read_file > segments.len() as u64
        {
            return Ok(false);
        }
        for n in meta.read_file..=meta.write_file {
            let lazily_created = n == meta.write_file && meta.write_pos == 0;
            if !segments.contains(&n) && !lazily_created {
                return Ok(false);
            }
        }
        if segments.contains(&meta.write_file) && self.file_len(meta.write_file)? < meta.write_pos {
            return Ok(false);
        }
        if meta.read_file < meta.write_file && self.file_len(meta.read_file)? < meta.read_pos {
            return Ok(false);
        }
        Ok(true)
    }

    fn scan(&mut self, n: u64, start: u64) -> Result<(QueueFile, SegmentScan), StorageError> {
        let file = QueueFile::open_write(self.names.segment(n), false, &self.options.faults)?;
        let scan = scan_segment(&file, start, None, self.options.max_msg_size, &mut self.buf)?;
        Ok((file, scan))
    }

    /// Cuts segment `n` back to its last whole batch.
    fn cut_torn_tail(&mut self, file: QueueFile, scan: &SegmentScan) -> Result<(), StorageError> {
        if scan.commit_end >= scan.len {
            return Ok(());
        }
        let cut = scan.len - scan.commit_end;
        tracing::warn!(
            path = %file.path().display(),
            offset = scan.commit_end,
            bytes = cut,
            reason = %scan.problem.map_or("incomplete batch".to_string(), |p| p.to_string()),
            "disk queue: cutting off a torn tail",
        );
        file.truncate(scan.commit_end)?;
        self.report.torn_segments += 1;
        self.report.torn_bytes_cut += cut;
        self.repaired.push(file);
        Ok(())
    }

    /// Trusts the metadata up to its synced write position and scans what follows.
    fn after_sync(&mut self, meta: Meta, segments: &BTreeSet<u64>) -> Result<Meta, StorageError> {
        let mut state = meta;
        for &n in segments.range(meta.write_file..) {
            let start = if n == meta.write_file {
                meta.write_pos
            } else {
                0
            };
            let (file, scan) = self.scan(n, start)?;
            self.cut_torn_tail(file, &scan)?;
            state.depth += scan.commit_records;
            self.report.unsynced_records_kept += scan.commit_records;
            state.write_file = n;
            state.write_pos = scan.commit_end;
        }
        Ok(state)
    }

    /// Counts every record from the read position, or from the first segment present.
    fn scan_all(
        &mut self,
        hint: Option<Meta>,
        segments: &BTreeSet<u64>,
    ) -> Result<Meta, StorageError> {
        let from = hint.map_or(0, |m| m.read_file);
        let present: Vec<u64> = segments.range(from..).copied().collect();
        let Some(&first) = present.first() else {
            let n = hint.map_or(0, |m| m.write_file);
            return Ok(Meta {
                depth: 0,
                read_file: n,
                read_pos: 0,
                write_file: n,
                write_pos: 0,
            });
        };
        let last = segments.last().copied().unwrap_or(first);
        let mut read_pos = 0;
        if let Some(meta) = hint.filter(|m| m.read_file == first)
            && meta.read_pos <= self.file_len(first)?
        {
            read_pos = meta.read_pos;
        }
        let mut state = Meta {
            depth: 0,
            read_file: first,
            read_pos,
            write_file: last,
            write_pos: 0,
        };
        for (i, &n) in present.iter().enumerate() {
            let start = if n == first { read_pos } else { 0 };
            let (file, scan) = self.scan(n, start)?;
            if n == last {
                self.cut_torn_tail(file, &scan)?;
                state.depth += scan.commit_records;
                state.write_pos = scan.commit_end;
                continue;
            }
            if let Some(problem) = scan.problem {
                drop(file);
                let (bad, kept) = move_aside(self.names, n, scan.valid_end, self.options)?;
                tracing::error!(
                    segment = %self.names.segment(n).display(),
                    offset = scan.valid_end,
                    moved_to = %bad.display(),
                    %problem,
                    "disk queue: corrupt segment; moved the rest of it aside",
                );
                self.report.corrupt_segments += 1;
                if kept.is_none() && n == state.read_file {
                    // Renamed whole: reading starts with the next segment.
                    state.read_file = present.get(i + 1).copied().unwrap_or(last);
                    state.read_pos = 0;
                }
                self.repaired.extend(kept);
            }
            state.depth += scan.records;
        }
        Ok(state)
    }
}
