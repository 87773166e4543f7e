//! Reading: handing records out in order, stepping over damage, and moving on through
//! segments.

use super::file::QueueFile;
use super::progress::{Fate, Ticket};
use super::record::{self, Corruption, Parsed, SEGMENT_HEADER_LEN};
use super::{DiskQueue, DiskRecord, Pos, READ_CHUNK, ROLL_WHEN_READ, StorageError, scan};
use bytes::BytesMut;

impl DiskQueue {
    /// Moves up to `max` records from the front of the queue into `out`, each with the ticket
    /// to [`DiskQueue::finish`] it by, and returns how many. Damaged records are stepped over
    /// (see the module docs). A read error after some records were moved ends the batch early
    /// and is returned by the next call, so records taken from the queue are always reported.
    pub(crate) fn pop(
        &mut self,
        max: usize,
        out: &mut Vec<(DiskRecord, Ticket)>,
    ) -> Result<usize, StorageError> {
        self.finish_durable();
        let mut popped = 0;
        let mut error = None;
        while popped < max && self.has_unread() {
            match self.next_record() {
                Ok(Some((mut record, pos, again))) => {
                    if again {
                        record.attempts = record.attempts.saturating_add(1);
                    }
                    let ticket = self.hand_out(pos);
                    out.push((record, ticket));
                    popped += 1;
                    self.depth = self.depth.saturating_sub(1);
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if popped > 0 {
            self.ops_since_sync += popped as u64;
            self.meta_dirty = true;
        }
        if !self.has_unread() {
            self.caught_up();
        }
        // Before anyone sees these records, the journal says they were handed out.
        self.write_journal();
        match error {
            Some(e) if popped == 0 => Err(e),
            Some(error) => {
                tracing::debug!(%error, "disk queue: read error; ending the batch early");
                Ok(popped)
            }
            None => Ok(popped),
        }
    }

    /// The next record to hand out, its position, and whether it is handed out again.
    fn next_record(&mut self) -> Result<Option<(DiskRecord, Pos, bool)>, StorageError> {
        loop {
            let end = match self.read_end()? {
                Some(end) => end,
                None => {
                    tracing::error!(
                        segment = %self.names.segment(self.read.segment).display(),
                        "disk queue: segment file missing; skipping it",
                    );
                    self.next_segment();
                    continue;
                }
            };
            if self.read.pos < SEGMENT_HEADER_LEN {
                if end == 0 {
                    if self.read.segment == self.write.segment {
                        return Ok(None);
                    }
                    self.next_segment();
                    continue;
                }
                self.start_segment(end)?;
                continue;
            }
            match record::parse(&self.read.buf, self.read.format, self.options.max_msg_size) {
                Parsed::Record { len, .. } => {
                    let pos = self.reader_pos();
                    let bytes = self.read.buf.split_to(len).freeze();
                    self.read.pos += len as u64;
                    match self.fate(pos) {
                        Fate::Skip => continue,
                        fate => {
                            let record = record::decode(bytes, self.read.format);
                            return Ok(Some((record, pos, fate == Fate::HandOutAgain)));
                        }
                    }
                }
                Parsed::Corrupt(problem) => self.step_over_damage(problem, end)?,
                Parsed::Incomplete { needed } => {
                    if self.fill(needed, end)? {
                        continue;
                    }
                    if !self.read.buf.is_empty() || self.read.pos < end {
                        self.step_over_damage(Corruption::Truncated, end)?;
                    } else if self.read.segment == self.write.segment {
                        return Ok(None);
                    } else {
                        self.next_segment();
                    }
                }
            }
        }
    }

    /// Reads the header of the segment the reader is at the start of. A damaged header is set
    /// aside together with whatever follows it up to the first valid record.
    fn start_segment(&mut self, end: u64) -> Result<(), StorageError> {
        let file = self.read_file()?;
        let found = scan::segment_format(&file, self.options.max_msg_size);
        self.read.buf.clear();
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                self.read.file = Some(file);
                return Err(e);
            }
        };
        match found {
            Some((format, true)) => {
                self.read.file = Some(file);
                self.read.format = format;
                self.read.pos = SEGMENT_HEADER_LEN;
            }
            Some((format, false)) => {
                self.read.format = format;
                let mut scratch = std::mem::take(&mut self.scan_buf);
                let first = scan::next_record(
                    &file,
                    SEGMENT_HEADER_LEN,
                    end,
                    format,
                    self.options.max_msg_size,
                    &mut scratch,
                );
                self.scan_buf = scratch;
                self.read.file = Some(file);
                let first = first?;
                let records = (first == SEGMENT_HEADER_LEN).then_some(0);
                self.set_aside(0, first, Corruption::SegmentHeader, records)?;
                self.read.pos = first;
            }
            None => {
                // Shorter than a header: no record fits in it.
                self.read.file = Some(file);
                self.set_aside(0, end, Corruption::Truncated, Some(0))?;
                self.read.pos = end.max(SEGMENT_HEADER_LEN);
            }
        }
        Ok(())
    }

    /// The reader has read everything written. A write segment that has grown large, or that
    /// a write failed in, is closed so that its space can be given back.
    fn caught_up(&mut self) {
        if self.depth != 0 {
            // Damage found while reading makes the depth an estimate; anything else is a bug.
            if self.damage == super::Damage::default() {
                tracing::warn!(
                    queue = %self.names.segment(self.read.segment).display(),
                    depth = self.depth,
                    "disk queue: depth was off with nothing left to read; reset to 0",
                );
            }
            self.depth = 0;
        }
        if self.read.segment == self.write.segment
            && (self.write.pos >= ROLL_WHEN_READ.min(self.options.max_bytes_per_file)
                || (self.write.failed && self.write.pos > 0))
        {
            self.roll();
            self.next_segment();
        }
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
            None => match self.read_file() {
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

    /// The read segment's file, open.
    fn read_file(&mut self) -> Result<QueueFile, StorageError> {
        match self.read.file.take() {
            Some(file) => Ok(file),
            None => {
                QueueFile::open_read(self.names.segment(self.read.segment), &self.options.faults)
            }
        }
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
            let file = self.read_file()?;
            let buf = &mut self.read.buf;
            let old = buf.len();
            buf.resize(old + want, 0);
            #[cfg(test)]
            {
                self.io_counts.reads += 1;
            }
            let got = file.read_at(&mut buf[old..], filled);
            self.read.file = Some(file);
            let buf = &mut self.read.buf;
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

    /// The read segment is done: move on; it is deleted once every record in it is finished.
    fn next_segment(&mut self) {
        let done = self.read.segment;
        self.read.segment += 1;
        self.read.pos = 0;
        self.read.file = None;
        self.read.end = None;
        self.read.buf.clear();
        self.meta_dirty = true;
        self.consumed.push(done);
    }

    /// The bytes at the reader are not a valid record: find the next one and set what lies
    /// between aside.
    fn step_over_damage(&mut self, problem: Corruption, end: u64) -> Result<(), StorageError> {
        let from = self.read.pos;
        let file = self.read_file()?;
        let mut scratch = std::mem::take(&mut self.scan_buf);
        let to = scan::next_record(
            &file,
            from + 1,
            end,
            self.read.format,
            self.options.max_msg_size,
            &mut scratch,
        );
        self.scan_buf = scratch;
        self.read.file = Some(file);
        let to = to?;
        self.set_aside(from, to, problem, None)?;
        self.read.pos = to;
        self.read.buf.clear();
        Ok(())
    }

    /// Copies bytes `from..to` of the read segment to a `.bad` file, logs and counts them.
    /// `records` is how many records the stretch held, when known; else it is estimated.
    fn set_aside(
        &mut self,
        from: u64,
        to: u64,
        problem: Corruption,
        records: Option<u64>,
    ) -> Result<(), StorageError> {
        let file = self.read_file()?;
        let mut damaged = vec![0u8; (to - from) as usize];
        let got = file.read_at(&mut damaged, from);
        self.read.file = Some(file);
        damaged.truncate(got?);
        let records =
            records.unwrap_or_else(|| record::records_in_damage(&damaged, self.read.format));
        let segment = self.names.segment(self.read.segment);
        let bad = self.names.bad(self.read.segment, from);
        let kept = QueueFile::open_write(bad.clone(), true, &self.options.faults)
            .and_then(|out| out.write_all_at(&damaged, 0));
        match kept {
            Ok(()) => tracing::error!(
                segment = %segment.display(),
                offset = from,
                bytes = to - from,
                records,
                %problem,
                set_aside = %bad.display(),
                "disk queue: damaged records skipped",
            ),
            Err(error) => tracing::error!(
                segment = %segment.display(),
                offset = from,
                bytes = to - from,
                records,
                %problem,
                %error,
                "disk queue: damaged records skipped; cannot keep a copy",
            ),
        }
        self.damage.records += records;
        self.damage.bytes += to - from;
        self.depth = self.depth.saturating_sub(records);
        Ok(())
    }
}
