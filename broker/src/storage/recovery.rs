//! Opening a queue: finding where reading and writing stand from the snapshot, its journal and
//! the segments present, and repairing what a crash or a damaged disk left behind.
//!
//! - Snapshot valid and consistent with the files: it is trusted up to its write position, and
//!   only what lies after that is scanned. Whole batches found there are kept; a torn or
//!   incomplete batch at the end of a segment is cut off. The journal that continues the
//!   snapshot is replayed (up to its first damaged entry, and never past the data that
//!   survived): records handed out since the snapshot and finished are skipped, those not
//!   finished are handed out again. So is the journal of the next snapshot when that one was
//!   begun and never landed: what happened while it was being written is there.
//! - Segments missing before the first one present were consumed (they are deleted only once
//!   every record in them is finished): reading starts at the first one present.
//! - Snapshot missing, damaged, or pointing at files that are not there: every segment from the
//!   read position (or the first segment present) is scanned and the depth counted; everything
//!   found is handed out. The last segment's torn tail is cut.
//! - Damaged stretches are left where they are; readers step over them (see [`super::read`]).
//! - Segments before the read position (consumed, but not yet deleted when the process died)
//!   are removed, and so are left-over metadata temp files.

use super::file::{FaultSwitch, FileKind, Names, QueueFile, remove_if_present, rename, sync_dir};
use super::journal;
use super::meta::{Loaded, Meta};
use super::progress::Resume;
use super::scan::{SegmentScan, records_between, scan_segment};
use super::{DiskQueueOptions, MetadataState, OpenReport, Pos, StorageError};
use std::collections::{BTreeSet, HashSet};

/// Where a queue stands when it opens.
#[derive(Debug, Default)]
pub(super) struct OpenState {
    pub(super) generation: u64,
    pub(super) depth: u64,
    pub(super) read: Pos,
    pub(super) write: Pos,
    pub(super) resume: Option<Resume>,
    /// What the journals say beyond the snapshot, when the next snapshot's journal had entries
    /// (it was begun and never landed): to be said again in a fresh journal before that
    /// snapshot is written anew, so that a crash meanwhile loses none of it. The old file may
    /// also describe records a power loss took, whose positions new records will reuse.
    pub(super) restate: Option<journal::Entry>,
}

/// The state a queue opens with.
pub(super) struct Recovered {
    pub(super) state: OpenState,
    pub(super) report: OpenReport,
    /// Segments written after the snapshot or changed by repairs, to fsync before the next
    /// snapshot says where the data ends.
    pub(super) unsynced: Vec<QueueFile>,
    /// Whether the snapshot on disk already says everything (nothing to add, nothing to replay).
    pub(super) metadata_current: bool,
}

/// Reads the snapshot, its journal and the directory, repairs what needs it and tells where the
/// queue stands.
/// Renames the files a queue has under its verbatim name (`verbatim`) to its encoded names
/// (`names`), so that a data directory written before names were encoded keeps its messages.
/// Each file is renamed on its own; after a crash half-way the next open renames the rest.
pub(super) fn rename_verbatim_files(verbatim: &Names, names: &Names) -> Result<(), StorageError> {
    let mut renamed = 0usize;
    for (file_name, _, path) in verbatim.files()? {
        if let Some(to) = names.renamed_from(verbatim, &file_name) {
            rename(&path, &to)?;
            renamed += 1;
        }
    }
    let dir = names.dir();
    if renamed > 0 {
        sync_dir(dir, &FaultSwitch::default())?;
        tracing::info!(
            files = renamed,
            dir = %dir.display(),
            "disk queue files renamed to the encoded form of their queue's name"
        );
    }
    Ok(())
}

pub(super) fn recover(
    names: &Names,
    options: &DiskQueueOptions,
) -> Result<Recovered, StorageError> {
    let mut segments = BTreeSet::new();
    for (_, kind, path) in names.files()? {
        match kind {
            FileKind::Segment(n) => {
                segments.insert(n);
            }
            FileKind::MetaTemp => remove_if_present(&path)?,
            _ => {}
        }
    }

    let mut run = Recovery {
        names,
        options,
        report: OpenReport::default(),
        unsynced: Vec::new(),
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
    let (state, metadata_current) = match loaded {
        Some(mut meta) => {
            run.report.metadata = MetadataState::Loaded;
            let stale: Vec<u64> = segments.range(..meta.read.segment).copied().collect();
            for n in stale {
                remove_if_present(&names.segment(n))?;
                segments.remove(&n);
                run.report.stale_segments_removed += 1;
            }
            let adjusted = skip_missing_consumed(&mut meta, &segments);
            if run.consistent(&meta, &segments)? {
                let (state, current) = run.after_snapshot(meta, &segments)?;
                (
                    state,
                    current && !adjusted && run.report.stale_segments_removed == 0,
                )
            } else {
                run.report.metadata = MetadataState::Inconsistent;
                (run.scan_all(Some(&meta), &segments)?, false)
            }
        }
        None => (run.scan_all(None, &segments)?, false),
    };
    run.report.depth = state.depth;
    Ok(Recovered {
        state,
        metadata_current,
        report: run.report,
        unsynced: run.unsynced,
    })
}

/// Segments before the first one present are gone because every record in them was
/// finished: reading starts at the first one present. Returns whether it moved.
fn skip_missing_consumed(meta: &mut Meta, segments: &BTreeSet<u64>) -> bool {
    if segments.contains(&meta.read.segment) {
        return false;
    }
    let Some(&first) = segments.range(meta.read.segment..).next() else {
        return false;
    };
    if first > meta.write.segment {
        return false;
    }
    let start = Pos {
        segment: first,
        offset: 0,
    };
    meta.read = start;
    meta.popped = meta.popped.max(start);
    meta.unfinished.retain(|p| *p >= start);
    true
}

struct Recovery<'a> {
    names: &'a Names,
    options: &'a DiskQueueOptions,
    report: OpenReport,
    unsynced: Vec<QueueFile>,
    buf: Vec<u8>,
}

impl Recovery<'_> {
    fn file_len(&self, n: u64) -> Result<u64, StorageError> {
        let path = self.names.segment(n);
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|source| StorageError::Read { path, source })
    }

    /// Whether every segment the snapshot refers to is there and long enough.
    fn consistent(&self, meta: &Meta, segments: &BTreeSet<u64>) -> Result<bool, StorageError> {
        if meta.read > meta.write || meta.popped > meta.write {
            return Ok(false);
        }
        for n in meta.read.segment..=meta.write.segment {
            let lazily_created = n == meta.write.segment && meta.write.offset == 0;
            if !segments.contains(&n) && !lazily_created {
                return Ok(false);
            }
        }
        if segments.contains(&meta.write.segment)
            && self.file_len(meta.write.segment)? < meta.write.offset
        {
            return Ok(false);
        }
        Ok(true)
    }

    fn scan(
        &mut self,
        n: u64,
        start: u64,
        visit: impl FnMut(u64),
    ) -> Result<(QueueFile, SegmentScan), StorageError> {
        let file = QueueFile::open_write(self.names.segment(n), false, &self.options.faults)?;
        let scan = scan_segment(
            &file,
            start,
            None,
            self.options.max_msg_size,
            &mut self.buf,
            visit,
        )?;
        for damage in scan.damage.iter().filter(|d| d.to <= scan.commit_end) {
            self.report.damaged_records += damage.records;
            self.report.damaged_bytes += damage.to - damage.from;
        }
        Ok((file, scan))
    }

    /// Cuts segment `n` back to its last whole batch.
    fn cut_torn_tail(&mut self, file: &QueueFile, scan: &SegmentScan) -> Result<(), StorageError> {
        if scan.commit_end >= scan.len {
            return Ok(());
        }
        let cut = scan.len - scan.commit_end;
        let reason = scan
            .damage
            .iter()
            .rfind(|d| d.to > scan.commit_end)
            .map_or("incomplete batch".to_string(), |d| d.problem.to_string());
        tracing::warn!(
            path = %file.path().display(),
            offset = scan.commit_end,
            bytes = cut,
            %reason,
            "disk queue: cutting off a torn tail",
        );
        file.truncate(scan.commit_end)?;
        self.report.torn_segments += 1;
        self.report.torn_bytes_cut += cut;
        Ok(())
    }

    /// Trusts the snapshot up to its write position, scans what follows and replays the
    /// journal. Returns the state and whether the snapshot already says all of it.
    fn after_snapshot(
        &mut self,
        meta: Meta,
        segments: &BTreeSet<u64>,
    ) -> Result<(OpenState, bool), StorageError> {
        let mut depth = meta.depth;
        let mut write = meta.write;
        for &n in segments.range(meta.write.segment..) {
            let start = if n == meta.write.segment {
                meta.write.offset
            } else {
                0
            };
            let (file, scan) = self.scan(n, start, |_| {})?;
            self.cut_torn_tail(&file, &scan)?;
            depth += scan.commit_records;
            self.report.unsynced_records_kept += scan.commit_records;
            write = Pos {
                segment: n,
                offset: scan.commit_end,
            };
            if scan.commit_records > 0 || scan.len > scan.commit_end {
                self.unsynced.push(file);
            }
        }

        // What was handed out and finished since the snapshot: its journal, then the journal of
        // the next snapshot if one was begun (entries go there from the moment it is prepared,
        // and it may not have reached the disk). It says nothing of data past what survived (a
        // machine crash can lose what was written and handed out since the last fsync; new
        // records will be written there), so it stops at the end of the data.
        let mut popped = meta.popped;
        let mut finished = HashSet::new();
        let entries = journal::replay(self.names, meta.generation)?;
        let next = journal::replay(self.names, meta.generation + 1)?;
        let next_begun = !next.is_empty();
        let replayed = !entries.is_empty() || next_begun;
        for entry in entries.into_iter().chain(next) {
            popped = popped.max(entry.popped);
            finished.extend(entry.finished);
        }
        let popped = popped.min(write);
        finished.retain(|p| *p < popped);
        let mut again: BTreeSet<Pos> = meta
            .unfinished
            .iter()
            .copied()
            .filter(|p| *p < write && !finished.contains(p))
            .collect();
        let mut finished_count = meta
            .unfinished
            .iter()
            .filter(|p| finished.contains(*p))
            .count() as u64;
        if popped > meta.popped {
            let names = self.names;
            let faults = &self.options.faults;
            records_between(
                |n| match QueueFile::open_read(names.segment(n), faults) {
                    Ok(file) => Ok(Some(file)),
                    Err(StorageError::Open { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                },
                meta.popped,
                popped,
                self.options.max_msg_size,
                &mut self.buf,
                |pos| {
                    if finished.contains(&pos) {
                        finished_count += 1;
                    } else {
                        again.insert(pos);
                    }
                },
            )?;
        }
        self.report.handed_out_again = again.len() as u64;
        self.report.finished_skipped = finished_count;
        // Records in read..popped not to hand out again were finished: the reader skips them.
        let resume = (popped > meta.read).then_some(Resume {
            until: popped,
            again,
        });
        let restate = next_begun.then(|| {
            let mut finished: Vec<Pos> = finished.into_iter().collect();
            finished.sort_unstable();
            journal::Entry { popped, finished }
        });
        let state = OpenState {
            generation: meta.generation,
            depth: depth.saturating_sub(finished_count),
            read: meta.read,
            write,
            resume,
            restate,
        };
        let current = !replayed && write == meta.write;
        Ok((state, current))
    }

    /// Counts every record from the read position, or from the first segment present; all of
    /// them are handed out.
    fn scan_all(
        &mut self,
        hint: Option<&Meta>,
        segments: &BTreeSet<u64>,
    ) -> Result<OpenState, StorageError> {
        let from = hint.map_or(0, |m| m.read.segment);
        let present: Vec<u64> = segments.range(from..).copied().collect();
        let generation = hint.map_or(0, |m| m.generation);
        let Some(&first) = present.first() else {
            let n = hint.map_or(0, |m| m.write.segment);
            let start = Pos {
                segment: n,
                offset: 0,
            };
            return Ok(OpenState {
                generation,
                depth: 0,
                read: start,
                write: start,
                resume: None,
                restate: None,
            });
        };
        let last = present.last().copied().unwrap_or(first);
        let mut read = Pos {
            segment: first,
            offset: 0,
        };
        if let Some(meta) = hint.filter(|m| m.read.segment == first)
            && meta.read.offset <= self.file_len(first)?
        {
            read.offset = meta.read.offset;
        }
        let mut depth = 0;
        let mut write = read;
        for &n in &present {
            let start = if n == first { read.offset } else { 0 };
            let (file, scan) = self.scan(n, start, |_| {})?;
            if n == last {
                self.cut_torn_tail(&file, &scan)?;
                depth += scan.commit_records;
                write = Pos {
                    segment: n,
                    offset: scan.commit_end,
                };
            } else {
                depth += scan.records;
            }
            self.unsynced.push(file);
        }
        Ok(OpenState {
            generation,
            depth,
            read,
            write,
            resume: None,
            restate: None,
        })
    }
}
