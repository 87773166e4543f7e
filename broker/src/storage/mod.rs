//! The disk queue: a checksummed, segmented, append-only FIFO of messages on disk, one per topic
//! and per channel under `--data-path`.
//!
//! # Files
//!
//! Queue `name` keeps its records in segment files `<name>.diskqueue.<n>.dat` (`n` with at least
//! six digits, counting up from 0) and where it stands in `<name>.diskqueue.meta`. Every segment
//! starts with an 8-byte header (magic and format version) followed by records; the exact
//! layouts are in the [`record`] and [`meta`] modules. A 200-byte message takes 227 bytes.
//!
//! # Writing
//!
//! [`DiskQueue::append`] encodes a batch into one reused buffer and writes it with one `pwrite`
//! at the end of the current segment. A batch is never split across segments: when it would
//! take the segment past `max_bytes_per_file`, the queue moves to a new segment first, so a batch
//! bigger than that limit gets a segment of its own. The last record of every batch carries a
//! batch-end flag, which lets recovery tell a whole batch from the start of a torn one.
//!
//! A failed write (disk full, I/O error) is truncated back, so the queue reads exactly as before
//! it; if even the truncation fails, the next append retries it, and the stray bytes could never
//! be read anyway because they close no batch.
//!
//! # Reading
//!
//! [`DiskQueue::pop`] reads segments in chunks of [`READ_CHUNK`] bytes and hands out records
//! whose bodies share that chunk's memory ([`bytes::Bytes`]), so a batch costs one read and no
//! allocation per record. A popped body keeps its whole chunk alive until it is dropped.
//!
//! When the reader finishes a segment, the queue syncs (so the new read position is durable) and
//! deletes it. A record that fails its length or checksum check is never handed out: the segment
//! it is in is renamed to `<segment>.bad`, the error is logged and counted
//! ([`DiskQueue::corrupt_segments`]), reading goes on with the next segment, and the depth is
//! counted again from the segments left.
//!
//! # Durability
//!
//! [`DiskQueue::sync`] fdatasyncs what was written since the last sync, then replaces the
//! metadata atomically (temp file, fsync, rename, directory fsync). The owner calls it when
//! [`DiskQueue::sync_due`] says so, on its sync timer, before acknowledging a publish in
//! fsync-before-acknowledge mode, and before dropping the queue at shutdown (dropping does no
//! I/O). After a process crash nothing written is lost (the kernel still has it); after a
//! machine crash, records appended since the last sync may be lost. After either, records
//! popped since the last sync are handed out again (delivery is at least once).
//!
//! # Opening and recovery
//!
//! [`DiskQueue::open`] trusts the metadata up to its synced write position and scans only what
//! was written after it: whole batches there are kept, a torn one is cut off. When the metadata
//! is missing, damaged or does not match the files, every segment is scanned instead, from the
//! read position when known, else from the first segment (records consumed since the last sync
//! are then handed out again). The [`OpenReport`] tells what was found and repaired; see
//! [`recovery`] for the rules.
//!
//! # Faults
//!
//! Every write and fsync goes through [`file::QueueFile`], which consults the
//! [`FaultSwitch`] in [`DiskQueueOptions`]: while it is on, writes half-happen and then fail, and
//! fsyncs fail, so tests can drive the broker's disk-error path and its recovery.

use std::collections::BTreeMap;

mod error;
mod file;
mod meta;
mod record;
mod recovery;
#[cfg(test)]
mod tests;

pub(crate) use error::StorageError;
pub(crate) use file::FaultSwitch;
pub(crate) use record::DiskRecord;

use bytes::{Buf, BytesMut};
use file::{Names, QueueFile, remove_if_present, rename};
use meta::Meta;
use record::{Corruption, Parsed, SEGMENT_HEADER, SEGMENT_HEADER_LEN};
use recovery::{recover, scan_segment};
use std::path::Path;

/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 128 * 1024;
/// An encode buffer grown past this by a huge batch is given back after it.
const ENCODE_BUF_KEEP: usize = 4 << 20;

/// How a disk queue sizes its files and when it asks to be synced.
#[derive(Debug, Clone)]
pub(crate) struct DiskQueueOptions {
    /// A segment is closed when the next batch would take it past this size.
    pub(crate) max_bytes_per_file: u64,
    /// [`DiskQueue::sync_due`] turns true after this many records written and read.
    pub(crate) sync_every: u64,
    /// Largest body accepted; a stored record claiming a larger one is corrupt.
    pub(crate) max_msg_size: u64,
    /// Injected write and fsync failures, for tests; off unless someone turns it on.
    pub(crate) faults: FaultSwitch,
}

impl Default for DiskQueueOptions {
    /// nsqd's defaults: 100 MiB segments, sync every 2500 operations, 1 MiB messages.
    fn default() -> Self {
        DiskQueueOptions {
            max_bytes_per_file: 100 * 1024 * 1024,
            sync_every: 2500,
            max_msg_size: 1024 * 1024,
            faults: FaultSwitch::default(),
        }
    }
}

/// How the metadata file was found at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum MetadataState {
    /// A new queue: neither metadata nor segments.
    #[default]
    Created,
    Loaded,
    /// Segments without metadata: recovered by scanning them.
    Missing,
    /// Unreadable metadata: recovered by scanning the segments.
    Corrupt,
    /// Valid metadata that does not match the segments present: recovered by scanning them.
    Inconsistent,
}

/// What [`DiskQueue::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OpenReport {
    pub(crate) metadata: MetadataState,
    /// Records in the queue after opening.
    pub(crate) depth: u64,
    /// Records found after the last synced position (written, not yet fsynced) and kept.
    pub(crate) unsynced_records_kept: u64,
    /// Segments whose torn or incomplete tail was cut off, and the bytes cut.
    pub(crate) torn_segments: u64,
    pub(crate) torn_bytes_cut: u64,
    /// Segments whose corrupt part was moved aside as `.bad`.
    pub(crate) corrupt_segments: u64,
    /// Consumed segments that were still on disk, removed.
    pub(crate) stale_segments_removed: u64,
}

impl OpenReport {
    /// True when opening changed anything on disk or could not trust the metadata.
    pub(crate) fn repaired(&self) -> bool {
        !matches!(
            self.metadata,
            MetadataState::Created | MetadataState::Loaded
        ) || self.torn_segments > 0
            || self.corrupt_segments > 0
            || self.stale_segments_removed > 0
    }
}

/// One queue on disk. Not internally synchronized: its owner holds it under a mutex.
#[derive(Debug)]
pub(crate) struct DiskQueue {
    names: Names,
    options: DiskQueueOptions,
    depth: u64,
    corrupt_segments: u64,
    ops_since_sync: u64,
    /// The read or write position moved since the metadata was last written.
    meta_dirty: bool,
    read: Reader,
    write: Writer,
    /// Earlier write segments with data not yet fsynced.
    unsynced: Vec<QueueFile>,
    /// Segments fully read, deleted once the metadata no longer points at them.
    consumed: Vec<u64>,
    /// A segment file was created since the directory was last fsynced.
    dir_dirty: bool,
    /// Records handed out by [`DiskQueue::pop_held`] and not released yet, per segment.
    held: BTreeMap<u64, u64>,
    /// Records popped per segment from the oldest held one on: what a reader starting over
    /// from that segment would read again.
    popped: BTreeMap<u64, u64>,
    encode_buf: Vec<u8>,
    #[cfg(test)]
    io: IoCounts,
}

#[derive(Debug)]
struct Reader {
    segment: u64,
    /// Offset in the segment of the next record, which is at the front of `buf`.
    pos: u64,
    file: Option<QueueFile>,
    /// Length of the segment once the writer has left it.
    end: Option<u64>,
    buf: BytesMut,
}

#[derive(Debug)]
struct Writer {
    segment: u64,
    /// End of the data written; 0 before the segment header is.
    pos: u64,
    file: Option<QueueFile>,
    /// Data written to `file` since its last fsync.
    unsynced: bool,
    /// A failed write left bytes past `pos` that could not be truncated yet.
    tail_dirty: bool,
}

/// System calls made, for the tests' performance checks.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
struct IoCounts {
    writes: u64,
    reads: u64,
}

/// What the reader found next.
enum Next {
    Record(DiskRecord),
    /// Nothing more to read now.
    Empty,
}

impl DiskQueue {
    /// Opens or creates queue `name` in `dir` (which must exist). Cuts a torn last batch (crash
    /// mid-write) found after the last synced position, moves corrupt segment parts aside when
    /// the metadata has to be rebuilt, and reports what it repaired.
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        options: DiskQueueOptions,
    ) -> Result<(DiskQueue, OpenReport), StorageError> {
        if name.is_empty() || name.contains(['/', '\\', '\0']) || name == "." || name == ".." {
            return Err(StorageError::InvalidName {
                name: name.to_string(),
            });
        }
        let names = Names::new(dir, name);
        let recovered = recover(&names, &options)?;
        let state = recovered.state;
        let report = recovered.report;
        let mut queue = DiskQueue {
            names,
            options,
            depth: state.depth,
            corrupt_segments: report.corrupt_segments,
            ops_since_sync: 0,
            meta_dirty: !recovered.metadata_current,
            read: Reader {
                segment: state.read_file,
                // A position inside the segment header means "from the start".
                pos: if state.read_pos < SEGMENT_HEADER_LEN {
                    0
                } else {
                    state.read_pos
                },
                file: None,
                end: None,
                buf: BytesMut::new(),
            },
            write: Writer {
                segment: state.write_file,
                pos: state.write_pos,
                file: None,
                unsynced: false,
                tail_dirty: false,
            },
            unsynced: recovered.repaired,
            consumed: Vec::new(),
            dir_dirty: false,
            held: BTreeMap::new(),
            popped: BTreeMap::new(),
            encode_buf: Vec::new(),
            #[cfg(test)]
            io: IoCounts::default(),
        };
        queue.sync()?;
        if report.repaired() {
            tracing::warn!(
                queue = name,
                metadata = ?report.metadata,
                depth = report.depth,
                torn_segments = report.torn_segments,
                torn_bytes_cut = report.torn_bytes_cut,
                corrupt_segments = report.corrupt_segments,
                stale_segments_removed = report.stale_segments_removed,
                "disk queue repaired at open",
            );
        }
        Ok((queue, report))
    }

    /// Appends `records` as one batch with one write, moving to a new segment first when the
    /// batch would take the current one past `max_bytes_per_file`. On error nothing of the batch
    /// is readable, now or after reopening.
    pub(crate) fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a DiskRecord>,
    ) -> Result<(), StorageError> {
        let mut buf = std::mem::take(&mut self.encode_buf);
        buf.clear();
        buf.extend_from_slice(&SEGMENT_HEADER);
        let result = self
            .encode_batch(records, &mut buf)
            .and_then(|count| self.write_batch(&buf, count));
        if buf.capacity() > ENCODE_BUF_KEEP {
            buf = Vec::new();
        }
        self.encode_buf = buf;
        result
    }

    /// Encodes the batch after the segment header already in `buf`; returns the record count.
    fn encode_batch<'a>(
        &self,
        records: impl IntoIterator<Item = &'a DiskRecord>,
        buf: &mut Vec<u8>,
    ) -> Result<u64, StorageError> {
        // The record length is a u32; the largest header is 43 bytes.
        let max_body = self.options.max_msg_size.min(u64::from(u32::MAX) - 64);
        let mut last = None;
        let mut count = 0;
        for record in records {
            let len = record.body.len() as u64;
            if len > max_body {
                return Err(StorageError::RecordTooLarge {
                    len,
                    max: self.options.max_msg_size,
                });
            }
            last = Some(record::encode(buf, record));
            count += 1;
        }
        if let Some(start) = last {
            record::mark_batch_end(buf, start);
        }
        Ok(count)
    }

    /// Writes the encoded batch in `buf` (segment header first) at the end of the queue.
    fn write_batch(&mut self, buf: &[u8], count: u64) -> Result<(), StorageError> {
        if count == 0 {
            return Ok(());
        }
        if self.write.tail_dirty {
            if let Some(file) = &self.write.file {
                file.truncate(self.write.pos)?;
            }
            self.write.tail_dirty = false;
        }
        let batch_len = (buf.len() - SEGMENT_HEADER.len()) as u64;
        if self.write.pos > SEGMENT_HEADER_LEN
            && self.write.pos + batch_len > self.options.max_bytes_per_file
        {
            self.roll();
        }
        let (bytes, offset) = if self.write.pos < SEGMENT_HEADER_LEN {
            (buf, 0)
        } else {
            (&buf[SEGMENT_HEADER.len()..], self.write.pos)
        };
        let file = match self.write.file.take() {
            Some(file) => file,
            None => {
                // A new segment's name is durable only after a directory fsync.
                self.dir_dirty |= offset == 0;
                QueueFile::open_write(
                    self.names.segment(self.write.segment),
                    offset == 0,
                    &self.options.faults,
                )?
            }
        };
        #[cfg(test)]
        {
            self.io.writes += 1;
        }
        let written = file.write_all_at(bytes, offset);
        if written.is_err()
            && let Err(error) = file.truncate(offset)
        {
            tracing::warn!(
                %error,
                "disk queue: cannot truncate a failed write; retrying at the next append",
            );
            self.write.tail_dirty = true;
        }
        self.write.file = Some(file);
        written?;
        self.write.pos = offset + bytes.len() as u64;
        self.write.unsynced = true;
        self.depth += count;
        self.ops_since_sync += count;
        self.meta_dirty = true;
        Ok(())
    }

    /// Closes the current write segment; the next write creates the following one.
    fn roll(&mut self) {
        if let Some(file) = self.write.file.take()
            && self.write.unsynced
        {
            self.unsynced.push(file);
        }
        self.write.segment += 1;
        self.write.pos = 0;
        self.write.unsynced = false;
        self.meta_dirty = true;
    }

    /// Moves up to `max` records from the front of the queue into `out` and returns how many.
    /// Fully read segments are deleted; corrupt records are skipped (see the module docs). A
    /// read error after some records were moved ends the batch early and is returned by the
    /// next call, so records taken from the queue are always reported.
    pub(crate) fn pop(
        &mut self,
        max: usize,
        out: &mut Vec<DiskRecord>,
    ) -> Result<usize, StorageError> {
        self.pop_records(max, out, None)
    }

    /// Like [`DiskQueue::pop`], but the records stay held until [`DiskQueue::release`]d:
    /// their segments are kept and the stored read position goes no further than the oldest
    /// held segment's start, so after a crash they are read again (at least once, never lost).
    /// `segments` gets each record's segment, to release it by.
    pub(crate) fn pop_held(
        &mut self,
        max: usize,
        out: &mut Vec<DiskRecord>,
        segments: &mut Vec<u64>,
    ) -> Result<usize, StorageError> {
        self.pop_records(max, out, Some(segments))
    }

    /// A held record is done with (finished, or stored again elsewhere).
    pub(crate) fn release(&mut self, segment: u64) {
        if let Some(count) = self.held.get_mut(&segment) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(&segment);
                self.meta_dirty = true;
                match self.held.keys().next() {
                    Some(&floor) => self.popped = self.popped.split_off(&floor),
                    None => self.popped.clear(),
                }
            }
        }
    }

    /// Releases every held record (clean shutdown: they are stored again).
    pub(crate) fn release_all(&mut self) {
        if !self.held.is_empty() {
            self.meta_dirty = true;
        }
        self.held.clear();
        self.popped.clear();
    }

    fn pop_records(
        &mut self,
        max: usize,
        out: &mut Vec<DiskRecord>,
        mut held: Option<&mut Vec<u64>>,
    ) -> Result<usize, StorageError> {
        let mut popped = 0;
        while popped < max {
            match self.next_record() {
                Ok(Next::Record(record)) => {
                    out.push(record);
                    popped += 1;
                    self.depth = self.depth.saturating_sub(1);
                    if let Some(segments) = held.as_deref_mut() {
                        let segment = self.read.segment;
                        segments.push(segment);
                        *self.held.entry(segment).or_insert(0) += 1;
                        *self.popped.entry(segment).or_insert(0) += 1;
                    }
                }
                Ok(Next::Empty) => break,
                Err(error) if popped > 0 => {
                    tracing::debug!(%error, "disk queue: read error; ending the batch early");
                    break;
                }
                Err(error) => return Err(error),
            }
        }
        if popped > 0 {
            self.ops_since_sync += popped as u64;
            self.meta_dirty = true;
        }
        Ok(popped)
    }

    fn next_record(&mut self) -> Result<Next, StorageError> {
        loop {
            let end = match self.read_end()? {
                Some(end) => end,
                None => {
                    self.skip_segment(None)?;
                    continue;
                }
            };
            if self.read.pos < SEGMENT_HEADER_LEN {
                if end == 0 {
                    if self.read.segment == self.write.segment {
                        return Ok(self.caught_up());
                    }
                    self.finish_segment();
                    continue;
                }
                if !self.fill(SEGMENT_HEADER.len(), end)? {
                    self.skip_segment(Some(Corruption::Truncated))?;
                    continue;
                }
                if self.read.buf[..SEGMENT_HEADER.len()] != SEGMENT_HEADER {
                    self.skip_segment(Some(Corruption::SegmentHeader))?;
                    continue;
                }
                self.read.buf.advance(SEGMENT_HEADER.len());
                self.read.pos = SEGMENT_HEADER_LEN;
            }
            match record::parse(&self.read.buf, self.options.max_msg_size) {
                Parsed::Record { len, .. } => {
                    let bytes = self.read.buf.split_to(len).freeze();
                    self.read.pos += len as u64;
                    return Ok(Next::Record(record::decode(bytes)));
                }
                Parsed::Corrupt(problem) => self.skip_segment(Some(problem))?,
                Parsed::Incomplete { needed } => {
                    if self.fill(needed, end)? {
                        continue;
                    }
                    if !self.read.buf.is_empty() {
                        self.skip_segment(Some(Corruption::Truncated))?;
                    } else if self.read.segment == self.write.segment {
                        return Ok(self.caught_up());
                    } else {
                        self.finish_segment();
                    }
                }
            }
        }
    }

    /// The reader has read everything written.
    fn caught_up(&mut self) -> Next {
        if self.depth != 0 {
            tracing::warn!(
                queue = %self.names.segment(self.read.segment).display(),
                depth = self.depth,
                "disk queue: depth was off with nothing left to read; reset to 0",
            );
            self.depth = 0;
        }
        Next::Empty
    }

    /// Where the data readable in the read segment ends, opening it if needed; `None` when the
    /// segment file is missing.
    fn read_end(&mut self) -> Result<Option<u64>, StorageError> {
        if self.read.segment == self.write.segment {
            return Ok(Some(self.write.pos));
        }
        if let Some(end) = self.read.end {
            return Ok(Some(end));
        }
        let file = match self.read.file.take() {
            Some(file) => file,
            None => match QueueFile::open_read(
                self.names.segment(self.read.segment),
                &self.options.faults,
            ) {
                Ok(file) => file,
                Err(StorageError::Open { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            },
        };
        let end = file.len()?;
        self.read.file = Some(file);
        self.read.end = Some(end);
        Ok(Some(end))
    }

    /// Reads until the buffer holds `needed` bytes or the segment's data ends at `end`;
    /// returns whether it holds them.
    fn fill(&mut self, needed: usize, end: u64) -> Result<bool, StorageError> {
        while self.read.buf.len() < needed {
            let filled = self.read.pos + self.read.buf.len() as u64;
            if filled >= end {
                return Ok(false);
            }
            let want = (end - filled).min(READ_CHUNK.max(needed - self.read.buf.len()) as u64);
            let want = want as usize;
            let buf = &mut self.read.buf;
            if buf.capacity() - buf.len() < want {
                // Bodies handed out keep the old chunk; start a new one.
                let mut fresh = BytesMut::with_capacity(READ_CHUNK.max(buf.len() + want));
                fresh.extend_from_slice(buf);
                *buf = fresh;
            }
            let file = match self.read.file.take() {
                Some(file) => file,
                None => QueueFile::open_read(
                    self.names.segment(self.read.segment),
                    &self.options.faults,
                )?,
            };
            let old = buf.len();
            buf.resize(old + want, 0);
            #[cfg(test)]
            {
                self.io.reads += 1;
            }
            let got = file.read_at(&mut buf[old..], filled);
            self.read.file = Some(file);
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    buf.truncate(old);
                    return Err(e);
                }
            };
            buf.truncate(old + got);
            if got < want {
                // The file is shorter than the queue thought: it was cut by someone else.
                return Ok(self.read.buf.len() >= needed);
            }
        }
        Ok(true)
    }

    /// The read segment is done: move on, and delete it once the metadata says so.
    fn finish_segment(&mut self) {
        let done = self.read.segment;
        self.read.segment += 1;
        self.read.pos = 0;
        self.read.file = None;
        self.read.end = None;
        self.read.buf.clear();
        self.meta_dirty = true;
        self.consumed.push(done);
        if let Err(error) = self.sync() {
            tracing::warn!(%error, "disk queue: cannot sync after finishing a segment; deleting it after the next sync");
        }
    }

    /// Leaves the read segment because of `problem` (or because its file is missing): moves it
    /// aside as `.bad`, goes on with the next segment and counts the depth again.
    fn skip_segment(&mut self, problem: Option<Corruption>) -> Result<(), StorageError> {
        let segment = self.read.segment;
        let path = self.names.segment(segment);
        self.read.file = None;
        self.read.end = None;
        self.read.buf.clear();
        if segment == self.write.segment {
            // Writing goes on in a fresh segment; what was in this one is set aside.
            self.write.file = None;
            self.write.segment += 1;
            self.write.pos = 0;
            self.write.unsynced = false;
            self.write.tail_dirty = false;
        }
        match problem {
            Some(problem) => {
                self.corrupt_segments += 1;
                let bad = self.names.bad(segment);
                match rename(&path, &bad) {
                    Ok(()) => tracing::error!(
                        segment = %path.display(),
                        offset = self.read.pos,
                        moved_to = %bad.display(),
                        %problem,
                        "disk queue: corrupt record; moved the rest of the segment aside",
                    ),
                    Err(error) => {
                        tracing::error!(
                            segment = %path.display(),
                            offset = self.read.pos,
                            %problem,
                            %error,
                            "disk queue: corrupt record; cannot move the segment aside, deleting it",
                        );
                        self.consumed.push(segment);
                    }
                }
            }
            None => tracing::error!(
                segment = %path.display(),
                "disk queue: segment file missing; skipping it",
            ),
        }
        self.read.segment += 1;
        self.read.pos = 0;
        self.meta_dirty = true;
        self.depth = self.recount()?;
        if let Err(error) = self.sync() {
            tracing::warn!(%error, "disk queue: cannot sync after skipping a segment");
        }
        Ok(())
    }

    /// Counts the records from the read position to the end, as the reader will find them.
    fn recount(&self) -> Result<u64, StorageError> {
        let mut depth = 0;
        let mut scratch = Vec::new();
        for segment in self.read.segment..=self.write.segment {
            let limit = if segment == self.write.segment {
                if self.write.pos == 0 {
                    continue;
                }
                Some(self.write.pos)
            } else {
                None
            };
            let file = match QueueFile::open_read(self.names.segment(segment), &self.options.faults)
            {
                Ok(file) => file,
                Err(StorageError::Open { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let start = if segment == self.read.segment {
                self.read.pos
            } else {
                0
            };
            let scan = scan_segment(&file, start, limit, self.options.max_msg_size, &mut scratch)?;
            depth += scan.records;
        }
        Ok(depth)
    }

    /// Records in the queue.
    pub(crate) fn depth(&self) -> u64 {
        self.depth
    }

    /// True when the records written and read since the last sync reached `sync_every`.
    pub(crate) fn sync_due(&self) -> bool {
        self.ops_since_sync > 0 && self.ops_since_sync >= self.options.sync_every
    }

    /// Makes everything appended so far durable without rewriting the metadata: an fdatasync
    /// of each segment written since the last sync, and a directory fsync if a segment was
    /// created. Cheaper than [`DiskQueue::sync`] (one fsync instead of three, typically), and
    /// enough for records to survive a machine crash: recovery scans past the stored write
    /// position. Read positions are not stored, so records popped since are handed out again.
    pub(crate) fn sync_data(&mut self) -> Result<(), StorageError> {
        while let Some(file) = self.unsynced.last() {
            file.sync()?;
            self.unsynced.pop();
        }
        if self.write.unsynced {
            if let Some(file) = &self.write.file {
                file.sync()?;
            }
            self.write.unsynced = false;
        }
        if self.dir_dirty {
            file::sync_dir(self.names.dir(), &self.options.faults)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Makes everything appended so far durable (fdatasync), then the read and write positions
    /// and depth (metadata replaced atomically), then deletes fully read segments. Cheap when
    /// nothing changed since the last sync.
    pub(crate) fn sync(&mut self) -> Result<(), StorageError> {
        if !self.meta_dirty
            && !self.write.unsynced
            && self.unsynced.is_empty()
            && self.consumed.is_empty()
        {
            self.ops_since_sync = 0;
            return Ok(());
        }
        while let Some(file) = self.unsynced.last() {
            file.sync()?;
            self.unsynced.pop();
        }
        if self.write.unsynced {
            if let Some(file) = &self.write.file {
                file.sync()?;
            }
            self.write.unsynced = false;
        }
        // While records are held, a restart reads again from the oldest held segment.
        let floor = self.held.keys().next().copied();
        let (read_file, read_pos, depth) = match floor {
            Some(floor) => (
                floor,
                0,
                self.depth + self.popped.range(floor..).map(|(_, n)| n).sum::<u64>(),
            ),
            None => (self.read.segment, self.read.pos, self.depth),
        };
        let meta = Meta {
            depth,
            read_file,
            read_pos,
            write_file: self.write.segment,
            write_pos: self.write.pos,
        };
        meta.store(&self.names, &self.options.faults)?;
        self.meta_dirty = false;
        self.dir_dirty = false;
        self.ops_since_sync = 0;
        let (kept, consumed): (Vec<u64>, Vec<u64>) = self
            .consumed
            .drain(..)
            .partition(|segment| floor.is_some_and(|f| *segment >= f));
        self.consumed = kept;
        for segment in consumed {
            let path = self.names.segment(segment);
            if let Err(error) = remove_if_present(&path) {
                // Left behind the read position; removed when the queue is next opened.
                tracing::warn!(%error, "disk queue: cannot delete a consumed segment");
            }
        }
        Ok(())
    }

    /// Deletes every segment and resets the queue to empty; it stays usable.
    pub(crate) fn empty(&mut self) -> Result<(), StorageError> {
        let first = self.read.segment;
        let last = self.write.segment;
        self.read = Reader {
            segment: last + 1,
            pos: 0,
            file: None,
            end: None,
            buf: BytesMut::new(),
        };
        self.write = Writer {
            segment: last + 1,
            pos: 0,
            file: None,
            unsynced: false,
            tail_dirty: false,
        };
        self.unsynced.clear();
        self.depth = 0;
        self.held.clear();
        self.popped.clear();
        self.consumed.extend(first..=last);
        self.meta_dirty = true;
        self.sync()
    }

    /// Deletes all files of the queue: segments, `.bad` files and metadata.
    pub(crate) fn delete(self) -> Result<(), StorageError> {
        let dir = self.names.dir().to_path_buf();
        let names = self.names.clone();
        drop(self);
        let entries = std::fs::read_dir(&dir).map_err(|source| StorageError::ListDir {
            path: dir.clone(),
            source,
        })?;
        let mut first_error = None;
        for entry in entries {
            let entry = entry.map_err(|source| StorageError::ListDir {
                path: dir.clone(),
                source,
            })?;
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| names.classify(n).is_some());
            if ours && let Err(e) = remove_if_present(&entry.path()) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Segments found corrupt and moved aside since the queue was opened (at open included).
    pub(crate) fn corrupt_segments(&self) -> u64 {
        self.corrupt_segments
    }
}
