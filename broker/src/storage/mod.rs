//! The disk queue: a checksummed, segmented, append-only FIFO of messages on disk, one per topic
//! and per channel under `--data-path`.
//!
//! # Files
//!
//! Queue `name` keeps its records in segment files `<stem>.diskqueue.<n>.dat` (`n` with at least
//! six digits, counting up from 0), a snapshot of where it stands in `<stem>.diskqueue.meta`
//! and what happened since that snapshot in `<stem>.diskqueue.journal.<0|1>`, where the stem
//! is an encoding of the name that any name can take ([`file::file_stem`]: `orders` is
//! `orders`, `..` is `%2E%2E`). Files a queue left under its verbatim name (knsq before the
//! encoding, or nsqd's layout) are renamed to the encoded one when it opens. Every segment
//! starts with an 8-byte header (magic and format version) followed by records; the exact
//! layouts are in the [`record`], [`meta`] and [`journal`] modules. A 200-byte message takes
//! 229 bytes.
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
//! # Reading, finishing, and what a crash hands out again
//!
//! [`DiskQueue::pop`] reads segments in chunks of [`READ_CHUNK`] bytes and hands out records
//! whose bodies share that chunk's memory ([`bytes::Bytes`]), so a batch costs one read and no
//! allocation per record. Every record handed out comes with a [`Ticket`] and stays on disk
//! until [`DiskQueue::finish`] is called with it: a segment is deleted only once every record
//! in it is finished. The queue knows the position of each unfinished record, and before the
//! records of a `pop` reach anyone, a journal entry saying how far reading got (and which
//! records were finished since the previous entry) is appended to the journal. After a crash,
//! reading starts again at the first unfinished record: records handed out before the crash and
//! never finished are handed out again with one more attempt (they were delivered at least
//! once), and records finished before the crash are skipped. What a process crash hands out
//! again is therefore only what was unfinished, plus what was finished since the last journal
//! entry (at most one pop's worth); a machine crash may also hand out again what was finished
//! since the last snapshot.
//!
//! # Damage
//!
//! A record that fails its checks is never handed out. The reader looks for the next offset
//! where a valid record starts (every record begins with a marker; see [`record`]), copies the
//! damaged bytes to `<segment>.<offset>.bad` for inspection, logs where they were, counts the
//! records and bytes lost ([`DiskQueue::damage`]) and goes on: one flipped byte costs the one
//! record it is in.
//!
//! # Durability
//!
//! A sync is prepared under the owner's lock ([`DiskQueue::prepare_sync`]), run without it
//! ([`SyncJob::run`]: fdatasync of what was written, and for a full sync a new snapshot,
//! replaced atomically), and completed under the lock again ([`DiskQueue::complete_sync`]), so
//! fsyncs never hold up publishers or consumers. Several syncs may run at once (a publisher
//! waiting for its fsync while the timer's full sync runs): none takes for done what an earlier
//! one is still doing (the directory fsync, a snapshot), and what is handed out or finished
//! while a snapshot is written is journaled for it (see [`journal`]). The owner syncs when
//! [`DiskQueue::sync_due`] says so, on its sync timer, before acknowledging a publish in
//! fsync-before-acknowledge mode, and before dropping the queue at shutdown (dropping does no
//! I/O). After a process crash nothing written is lost (the kernel still has it); after a
//! machine crash, records appended since the last sync may be lost.
//!
//! A record stored again elsewhere (moved to a channel, requeued to the back of the queue) must
//! stay on disk until that copy is durable: [`DiskQueue::finish_when_durable`] waits for a
//! sync pass over every queue ([`SyncPasses`]) before finishing it.
//!
//! # Opening and recovery
//!
//! [`DiskQueue::open`] starts from the snapshot, replays the journal that continues it, and
//! scans only what was written after the snapshot: whole batches there are kept, a torn one is
//! cut off. When the snapshot is missing, damaged or does not match the files, every segment is
//! scanned instead, from the read position when known, else from the first segment. The
//! [`OpenReport`] tells what was found and repaired; see [`recovery`] for the rules.
//!
//! # Faults
//!
//! Every write and fsync goes through [`file::QueueFile`], which consults the
//! [`FaultSwitch`] in [`DiskQueueOptions`]: while it is on, writes half-happen and then fail, and
//! fsyncs fail, so tests can drive the broker's disk-error path and its recovery.

mod error;
mod file;
mod journal;
mod meta;
mod progress;
mod read;
mod record;
mod recovery;
mod scan;
mod sync;
#[cfg(test)]
mod tests;

pub(crate) use error::StorageError;
pub(crate) use file::FaultSwitch;
#[cfg(test)]
pub(crate) use file::power;
pub(crate) use progress::Ticket;
pub(crate) use record::DiskRecord;
pub(crate) use sync::SyncPasses;

use bytes::BytesMut;
use file::{Names, QueueFile, remove_if_present};
use journal::Journal;
use progress::Progress;
use record::{Format, SEGMENT_HEADER_LEN, WRITE_FORMAT};
use recovery::recover;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 128 * 1024;
/// An encode buffer grown past this by a huge batch is given back after it.
const ENCODE_BUF_KEEP: usize = 4 << 20;
/// A write segment at least this large is closed as soon as readers have caught up with it,
/// so that its space is given back without waiting for it to fill.
const ROLL_WHEN_READ: u64 = 1 << 20;

/// A place in the queue: a segment and a byte offset in it. Records are identified by where
/// they start; offsets before the segment header mean "the start of the segment".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub(crate) struct Pos {
    pub(crate) segment: u64,
    pub(crate) offset: u64,
}

/// How a disk queue sizes its files and when it asks to be synced.
#[derive(Debug, Clone)]
pub(crate) struct DiskQueueOptions {
    /// A segment is closed when the next batch would take it past this size.
    pub(crate) max_bytes_per_file: u64,
    /// [`DiskQueue::sync_due`] turns true after this many records written, read and finished.
    pub(crate) sync_every: u64,
    /// Largest body accepted; a stored record claiming a larger one is damaged.
    pub(crate) max_msg_size: u64,
    /// Injected write and fsync failures, for tests; off unless someone turns it on.
    pub(crate) faults: FaultSwitch,
    /// The sync passes over every queue of the process, which [`DiskQueue::finish_when_durable`]
    /// waits for.
    pub(crate) passes: Arc<SyncPasses>,
}

impl Default for DiskQueueOptions {
    /// nsqd's defaults: 100 MiB segments, sync every 2500 operations, 1 MiB messages.
    fn default() -> Self {
        DiskQueueOptions {
            max_bytes_per_file: 100 * 1024 * 1024,
            sync_every: 2500,
            max_msg_size: 1024 * 1024,
            faults: FaultSwitch::default(),
            passes: Arc::default(),
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
    /// Records in the queue after opening: what will be handed out.
    pub(crate) depth: u64,
    /// Records found after the snapshot's write position (written, not in the snapshot) and
    /// kept.
    pub(crate) unsynced_records_kept: u64,
    /// Records handed out before the crash and not finished: handed out again.
    pub(crate) handed_out_again: u64,
    /// Records finished before the crash, known from the journal: skipped.
    pub(crate) finished_skipped: u64,
    /// Segments whose torn or incomplete tail was cut off, and the bytes cut.
    pub(crate) torn_segments: u64,
    pub(crate) torn_bytes_cut: u64,
    /// Damaged stretches found while scanning (readers step over them and set them aside).
    pub(crate) damaged_records: u64,
    pub(crate) damaged_bytes: u64,
    /// Consumed segments that were still on disk, removed.
    pub(crate) stale_segments_removed: u64,
}

impl OpenReport {
    /// True when opening found anything beyond a clean snapshot or a new queue.
    pub(crate) fn repaired(&self) -> bool {
        !matches!(
            self.metadata,
            MetadataState::Created | MetadataState::Loaded
        ) || self.torn_segments > 0
            || self.damaged_bytes > 0
            || self.stale_segments_removed > 0
    }
}

/// Records and bytes lost to damage since the queue was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Damage {
    pub(crate) records: u64,
    pub(crate) bytes: u64,
}

/// One queue on disk. Not internally synchronized: its owner holds it under a mutex.
#[derive(Debug)]
pub(crate) struct DiskQueue {
    names: Names,
    options: DiskQueueOptions,
    /// Records still to hand out (an estimate when damage is found while reading; reading
    /// never relies on it).
    depth: u64,
    damage: Damage,
    ops_since_sync: u64,
    /// A position moved since the last snapshot.
    meta_dirty: bool,
    read: Reader,
    write: Writer,
    /// Earlier write segments with data not yet fsynced, with the generation of their last
    /// write.
    unsynced: Vec<(Arc<QueueFile>, u64)>,
    /// Segments fully read, deleted once the snapshot's read position is past them.
    consumed: Vec<u64>,
    /// Segment files created so far, and how many of them a directory fsync covers: a new
    /// segment's name is durable only after one. Counted rather than flagged, so that a sync
    /// finishing while an earlier one still runs cannot take the directory as done.
    dirs_created: u64,
    dirs_synced: u64,
    progress: Progress,
    journal: Journal,
    /// Generation of the newest snapshot known to be on disk.
    generation: u64,
    /// Serialises snapshot writes and deletion between the owner and sync jobs.
    io: Arc<Mutex<sync::IoState>>,
    /// Sync jobs prepared, to tell a newer snapshot from an older one.
    jobs: u64,
    /// Snapshots prepared and not completed: until one lands, a full sync writes its own.
    snapshots_pending: u32,
    encode_buf: Vec<u8>,
    scan_buf: Vec<u8>,
    #[cfg(test)]
    io_counts: IoCounts,
}

#[derive(Debug)]
struct Reader {
    segment: u64,
    /// Offset in the segment of the next record, which is at the front of `buf`; below the
    /// header length before the header was read.
    pos: u64,
    format: Format,
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
    file: Option<Arc<QueueFile>>,
    /// Writes so far, counted across segments, and the last of them fsynced in this segment.
    written: u64,
    synced: u64,
    /// A failed write left bytes past `pos` that could not be truncated yet.
    tail_dirty: bool,
    /// A write failed since this segment began: close it as soon as it is read, to give
    /// its space back.
    failed: bool,
}

/// System calls made, for the tests' performance checks.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
struct IoCounts {
    writes: u64,
    reads: u64,
}

impl DiskQueue {
    /// Opens or creates queue `name` in `dir` (which must exist). Cuts a torn last batch (crash
    /// mid-write) found after the snapshot, and reports what it found and repaired.
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        options: DiskQueueOptions,
    ) -> Result<(DiskQueue, OpenReport), StorageError> {
        if name.is_empty() {
            return Err(StorageError::InvalidName {
                name: name.to_string(),
            });
        }
        let names = Names::new(dir, name);
        if let Some(verbatim) = Names::verbatim(dir, name) {
            recovery::rename_verbatim_files(&verbatim, &names)?;
        }
        let recovered = recover(&names, &options)?;
        let state = recovered.state;
        let report = recovered.report;
        let mut queue = DiskQueue {
            names,
            depth: state.depth,
            damage: Damage::default(),
            ops_since_sync: 0,
            meta_dirty: !recovered.metadata_current,
            read: Reader {
                segment: state.read.segment,
                pos: if state.read.offset < SEGMENT_HEADER_LEN {
                    0
                } else {
                    state.read.offset
                },
                format: WRITE_FORMAT,
                file: None,
                end: None,
                buf: BytesMut::new(),
            },
            write: Writer {
                segment: state.write.segment,
                pos: state.write.offset,
                file: None,
                written: 0,
                synced: 0,
                tail_dirty: false,
                failed: false,
            },
            unsynced: recovered
                .unsynced
                .into_iter()
                .map(|f| (Arc::new(f), 1))
                .collect(),
            consumed: Vec::new(),
            dirs_created: 0,
            dirs_synced: 0,
            progress: Progress::resuming(state.resume),
            journal: Journal::new(),
            generation: state.generation,
            io: Arc::default(),
            jobs: 0,
            snapshots_pending: 0,
            encode_buf: Vec::new(),
            scan_buf: Vec::new(),
            options,
            #[cfg(test)]
            io_counts: IoCounts::default(),
        };
        if queue.read.pos >= SEGMENT_HEADER_LEN {
            queue.read.format = queue.segment_format(queue.read.segment)?;
        }
        if let Some(entry) = state.restate {
            // What the unfinished snapshot's journal said counts until the snapshot this sync
            // writes says it.
            let generation = queue.generation + 1;
            queue
                .journal
                .begin(&queue.names, generation, &queue.options.faults);
            queue.journal.append(entry.popped, &entry.finished);
        }
        queue.sync()?;
        if !queue.journal.is_started() {
            // The snapshot on disk says everything: its journal goes on from empty.
            queue
                .journal
                .begin(&queue.names, queue.generation, &queue.options.faults);
        }
        if report.repaired() || report.handed_out_again > 0 {
            tracing::warn!(
                queue = name,
                metadata = ?report.metadata,
                depth = report.depth,
                handed_out_again = report.handed_out_again,
                finished_skipped = report.finished_skipped,
                torn_segments = report.torn_segments,
                torn_bytes_cut = report.torn_bytes_cut,
                damaged_records = report.damaged_records,
                damaged_bytes = report.damaged_bytes,
                stale_segments_removed = report.stale_segments_removed,
                "disk queue recovered at open",
            );
        }
        Ok((queue, report))
    }

    /// The format of segment `n`, from its header (new segments are written in
    /// [`WRITE_FORMAT`]).
    fn segment_format(&mut self, n: u64) -> Result<Format, StorageError> {
        let path = self.names.segment(n);
        let file = match QueueFile::open_read(path, &self.options.faults) {
            Ok(file) => file,
            Err(StorageError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(WRITE_FORMAT);
            }
            Err(e) => return Err(e),
        };
        Ok(scan::segment_format(&file, self.options.max_msg_size)?
            .map_or(WRITE_FORMAT, |(format, _)| format))
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
        buf.extend_from_slice(&WRITE_FORMAT.header());
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
        // The record length is a u32; the largest header is 45 bytes.
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
        let header_len = SEGMENT_HEADER_LEN as usize;
        let batch_len = (buf.len() - header_len) as u64;
        if self.write.pos > SEGMENT_HEADER_LEN
            && self.write.pos + batch_len > self.options.max_bytes_per_file
        {
            self.roll();
        }
        let (bytes, offset) = if self.write.pos < SEGMENT_HEADER_LEN {
            (buf, 0)
        } else {
            (&buf[header_len..], self.write.pos)
        };
        let file = match self.write.file.take() {
            Some(file) => file,
            None => {
                // A new segment's name is durable only after a directory fsync.
                self.dirs_created += u64::from(offset == 0);
                Arc::new(QueueFile::open_write(
                    self.names.segment(self.write.segment),
                    offset == 0,
                    &self.options.faults,
                )?)
            }
        };
        #[cfg(test)]
        {
            self.io_counts.writes += 1;
        }
        let written = file.write_all_at(bytes, offset);
        if written.is_err() {
            self.write.failed = true;
            if let Err(error) = file.truncate(offset) {
                tracing::warn!(
                    %error,
                    "disk queue: cannot truncate a failed write; retrying at the next append",
                );
                self.write.tail_dirty = true;
            }
        }
        self.write.file = Some(file);
        written?;
        self.write.pos = offset + bytes.len() as u64;
        self.write.written += 1;
        self.depth += count;
        self.ops_since_sync += count;
        self.meta_dirty = true;
        Ok(())
    }

    /// Closes the current write segment; the next write creates the following one.
    fn roll(&mut self) {
        if let Some(file) = self.write.file.take()
            && self.write.written > self.write.synced
        {
            self.unsynced.push((file, self.write.written));
        }
        self.write.segment += 1;
        self.write.pos = 0;
        self.write.synced = self.write.written;
        self.write.failed = false;
        self.meta_dirty = true;
    }

    /// Whether records may be left to read: the reader has not reached the end of what was
    /// written. Exact where the depth is an estimate, so nothing waits behind a miscount.
    pub(crate) fn has_unread(&self) -> bool {
        self.read.segment < self.write.segment || self.read.pos < self.write.pos
    }

    /// Records still to hand out.
    pub(crate) fn depth(&self) -> u64 {
        self.depth
    }

    /// Records and bytes lost to damage since the queue was opened.
    pub(crate) fn damage(&self) -> Damage {
        self.damage
    }

    /// Records handed out and not finished yet.
    pub(crate) fn unfinished(&self) -> usize {
        self.progress.unfinished()
    }

    /// True when the records written, read and finished since the last sync reached
    /// `sync_every`, or when a consumed segment can be deleted.
    pub(crate) fn sync_due(&self) -> bool {
        (self.ops_since_sync > 0 && self.ops_since_sync >= self.options.sync_every)
            || self.deletable_segments().next().is_some()
    }

    /// Consumed segments every record of which is finished.
    fn deletable_segments(&self) -> impl Iterator<Item = u64> + '_ {
        let floor = self.read_floor().segment;
        self.consumed.iter().copied().filter(move |&s| s < floor)
    }

    /// Deletes every segment and resets the queue to empty; it stays usable. Records handed
    /// out and not finished are forgotten (finishing them later does nothing).
    pub(crate) fn empty(&mut self) -> Result<(), StorageError> {
        let first = self.read.segment.min(self.read_floor().segment);
        let last = self.write.segment;
        self.read = Reader {
            segment: last + 1,
            pos: 0,
            format: WRITE_FORMAT,
            file: None,
            end: None,
            buf: BytesMut::new(),
        };
        self.write.file = None;
        self.write.segment = last + 1;
        self.write.pos = 0;
        self.write.synced = self.write.written;
        self.write.tail_dirty = false;
        self.write.failed = false;
        self.unsynced.clear();
        self.depth = 0;
        self.progress = Progress::resuming(None);
        self.consumed.extend(first..=last);
        self.consumed.sort_unstable();
        self.consumed.dedup();
        self.meta_dirty = true;
        self.sync()
    }

    /// Deletes all files of the queue: segments, set-aside damage, metadata and journals.
    pub(crate) fn delete(self) -> Result<(), StorageError> {
        let names = self.names.clone();
        // A sync job still running writes nothing once this is set.
        sync::mark_deleted(&self.io);
        drop(self);
        let mut first_error = None;
        for (_, _, path) in names.files()? {
            if let Err(e) = remove_if_present(&path) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
