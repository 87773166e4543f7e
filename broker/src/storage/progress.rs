//! What readers were handed and have finished: tickets for records handed out, the positions
//! of those not finished, what a restart hands out again, and the journal entries that make
//! this survive a crash.

use super::{DiskQueue, Pos};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Names a record handed out by [`DiskQueue::pop`], to finish it by. Small enough to sit in a
/// queued message's padding; a queue never has 2³² records unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(pub(crate) u32);

/// Records handed out before a restart: up to `until`, those in `again` are handed out again
/// and every other one was finished.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Resume {
    pub(super) until: Pos,
    pub(super) again: BTreeSet<Pos>,
}

/// What the reader does with a record it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    HandOut,
    /// Handed out before a restart and not finished: once more, with one more attempt.
    HandOutAgain,
    /// Finished before a restart.
    Skip,
}

#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Records handed out and not finished, by ticket number.
    held: BTreeMap<u64, Pos>,
    /// Tickets handed out so far.
    tickets: u64,
    resume: Option<Resume>,
    /// Finished since the last journal entry.
    finished: Vec<Pos>,
    /// How far reading had got at the last journal entry.
    journaled: Pos,
    /// Tickets to finish once the sync pass numbered with each has completed.
    when_durable: VecDeque<(u64, u64)>,
}

impl Progress {
    pub(super) fn resuming(resume: Option<Resume>) -> Progress {
        Progress {
            resume: resume.filter(|r| !r.again.is_empty() || r.until > Pos::default()),
            ..Progress::default()
        }
    }

    pub(super) fn unfinished(&self) -> usize {
        self.held.len()
    }

    /// What to do with the record at `pos`, which the reader just found.
    pub(super) fn fate(&mut self, pos: Pos) -> Fate {
        let Some(resume) = self.resume.as_mut() else {
            return Fate::HandOut;
        };
        if pos >= resume.until {
            self.resume = None;
            return Fate::HandOut;
        }
        if resume.again.remove(&pos) {
            Fate::HandOutAgain
        } else {
            Fate::Skip
        }
    }

    fn hand_out(&mut self, pos: Pos) -> Ticket {
        let number = self.tickets;
        self.tickets += 1;
        self.held.insert(number, pos);
        Ticket(number as u32)
    }

    /// The full number of a ticket: the newest one handed out with these low 32 bits.
    fn number(&self, ticket: Ticket) -> Option<u64> {
        let newest = self.tickets.checked_sub(1)?;
        newest.checked_sub(u64::from((newest as u32).wrapping_sub(ticket.0)))
    }

    /// Marks the record finished; false when the ticket is unknown (already finished, or
    /// forgotten by `empty`).
    fn finish(&mut self, ticket: Ticket) -> bool {
        let Some(pos) = self.number(ticket).and_then(|n| self.held.remove(&n)) else {
            return false;
        };
        self.finished.push(pos);
        true
    }

    /// The first record not finished, given where the reader stands.
    pub(super) fn floor(&self, reader: Pos) -> Pos {
        match self.held.values().next() {
            Some(&pos) => pos.min(reader),
            None => reader,
        }
    }

    /// Every record before this was handed out.
    fn popped(&self, reader: Pos) -> Pos {
        match &self.resume {
            Some(resume) => resume.until.max(reader),
            None => reader,
        }
    }

    /// Positions handed out and not finished, and those still to hand out again, ascending.
    pub(super) fn unfinished_positions(&self) -> Vec<Pos> {
        let mut positions: Vec<Pos> = self.held.values().copied().collect();
        if let Some(resume) = &self.resume {
            positions.extend(resume.again.iter().copied());
        }
        positions.sort_unstable();
        positions
    }
}

impl DiskQueue {
    /// Where the reader stands.
    pub(super) fn reader_pos(&self) -> Pos {
        Pos {
            segment: self.read.segment,
            offset: self.read.pos,
        }
    }

    /// The first record not finished: where reading would start again after a restart.
    pub(super) fn read_floor(&self) -> Pos {
        self.progress.floor(self.reader_pos())
    }

    /// Every record before this position was handed out.
    pub(super) fn popped_pos(&self) -> Pos {
        self.progress.popped(self.reader_pos())
    }

    /// Gives a record just read a ticket.
    pub(super) fn hand_out(&mut self, pos: Pos) -> super::Ticket {
        self.progress.hand_out(pos)
    }

    /// What to do with the record at `pos`, which the reader just found.
    pub(super) fn fate(&mut self, pos: Pos) -> Fate {
        self.progress.fate(pos)
    }

    /// The record is done with: finished by its consumer, or stored again where its loss
    /// does not matter. It will not be handed out again, even after a crash (once the next
    /// journal entry is written).
    pub(crate) fn finish(&mut self, ticket: Ticket) {
        if self.progress.finish(ticket) {
            self.ops_since_sync += 1;
            self.meta_dirty = true;
        }
    }

    /// The record was stored again (in another queue, or at the back of this one): it is
    /// finished once a sync pass over every queue, begun after this call, has completed, so
    /// that a machine crash cannot lose both copies.
    pub(crate) fn finish_when_durable(&mut self, ticket: Ticket) {
        if let Some(number) = self.progress.number(ticket) {
            let pass = self.options.passes.next();
            self.progress.when_durable.push_back((pass, number));
        }
    }

    /// Finishes what [`DiskQueue::finish_when_durable`] was waiting for.
    pub(super) fn finish_durable(&mut self) {
        let completed = self.options.passes.completed();
        while let Some(&(pass, number)) = self.progress.when_durable.front() {
            if pass > completed {
                break;
            }
            self.progress.when_durable.pop_front();
            self.finish(Ticket(number as u32));
        }
    }

    /// Finishes every record handed out (clean shutdown: what was in memory was stored again).
    pub(crate) fn finish_all(&mut self) {
        let tickets: Vec<u64> = self.progress.held.keys().copied().collect();
        for number in tickets {
            self.finish(Ticket(number as u32));
        }
        self.progress.when_durable.clear();
    }

    /// Appends a journal entry when reading moved or records were finished since the last one.
    pub(super) fn write_journal(&mut self) {
        let popped = self.popped_pos();
        if self.progress.finished.is_empty() && popped == self.progress.journaled {
            return;
        }
        self.journal.append(popped, &self.progress.finished);
        self.progress.finished.clear();
        self.progress.journaled = popped;
    }
}
