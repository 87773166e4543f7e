//! Syncing: prepared under the owner's lock, run without it, completed under it again, so an
//! fsync never holds up the queue's readers and writers.

use super::file::{FaultSwitch, Names, QueueFile, remove_if_present, sync_dir};
use super::meta::Meta;
use super::{DiskQueue, StorageError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Sync passes over every queue of a process: a pass fsyncs what every queue had written when
/// it began. [`DiskQueue::finish_when_durable`] waits for a pass begun after the call.
#[derive(Debug, Default)]
pub(crate) struct SyncPasses {
    begun: AtomicU64,
    completed: AtomicU64,
}

impl SyncPasses {
    /// Numbers a pass about to begin.
    pub(crate) fn begin(&self) -> u64 {
        self.begun.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Pass `pass` has synced every queue successfully.
    pub(crate) fn completed_ok(&self, pass: u64) {
        self.completed.fetch_max(pass, Ordering::AcqRel);
    }

    /// The number the next pass to begin will have.
    pub(super) fn next(&self) -> u64 {
        self.begun.load(Ordering::Acquire) + 1
    }

    pub(super) fn completed(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }
}

/// What sync jobs of one queue share with it under a lock of their own.
#[derive(Debug, Default)]
pub(super) struct IoState {
    /// The newest job whose snapshot is on disk.
    written: u64,
    /// The queue was deleted: jobs still running write nothing more.
    deleted: bool,
}

pub(super) fn mark_deleted(io: &Mutex<IoState>) {
    io.lock().unwrap_or_else(|e| e.into_inner()).deleted = true;
}

/// The I/O of one sync, taken out of the queue so that it runs without the queue's lock.
#[derive(Debug)]
pub(crate) struct SyncJob {
    number: u64,
    io: Arc<Mutex<IoState>>,
    names: Names,
    faults: FaultSwitch,
    /// Files to fdatasync, with the generation of the last write each had when prepared.
    pub(super) files: Vec<(Arc<QueueFile>, u64)>,
    /// Fsync the directory, covering this many segment files created.
    sync_dir: Option<u64>,
    snapshot: Option<Meta>,
    /// Consumed segments to delete once the snapshot is on disk.
    remove: Vec<u64>,
    /// What [`SyncJob::run`] did, for [`DiskQueue::complete_sync`].
    done: Option<Done>,
}

#[derive(Debug)]
struct Done {
    synced: bool,
    snapshot_written: bool,
    removed: Vec<u64>,
}

impl SyncJob {
    /// fdatasyncs the data, then for a full sync replaces the snapshot and deletes the
    /// segments it no longer points at. Runs without the queue's lock; blocks.
    pub(crate) fn run(&mut self) -> Result<(), StorageError> {
        let io = self.io.clone();
        let mut io = io.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = Done {
            synced: false,
            snapshot_written: false,
            removed: Vec::new(),
        };
        if io.deleted {
            self.done = Some(done);
            return Ok(());
        }
        let result = self.run_locked(&mut io, &mut done);
        self.done = Some(done);
        result
    }

    fn run_locked(&self, io: &mut IoState, done: &mut Done) -> Result<(), StorageError> {
        let synced = self.sync_data();
        done.synced = synced.is_ok();
        let Some(snapshot) = &self.snapshot else {
            return synced;
        };
        if self.number <= io.written {
            // A newer snapshot is on disk already, and it deleted what this one would.
            return synced;
        }
        // The snapshot says where the data ends, so it goes only after the data is durable.
        let stored = synced.and_then(|()| snapshot.store(&self.names, &self.faults));
        if stored.is_ok() {
            io.written = self.number;
            done.snapshot_written = true;
        }
        // Every record in these segments is finished, so they go even when the snapshot could
        // not be written (a full disk gets its space back this way); recovery treats a missing
        // segment before the first one present as consumed.
        for &segment in &self.remove {
            match remove_if_present(&self.names.segment(segment)) {
                Ok(()) => done.removed.push(segment),
                Err(error) => {
                    // Left behind the read position; removed when the queue is next opened.
                    tracing::warn!(%error, "disk queue: cannot delete a consumed segment");
                    break;
                }
            }
        }
        stored
    }

    fn sync_data(&self) -> Result<(), StorageError> {
        for (file, _) in &self.files {
            file.sync()?;
        }
        if self.sync_dir.is_some() {
            sync_dir(self.names.dir(), &self.faults)?;
        }
        Ok(())
    }
}

impl DiskQueue {
    /// Prepares a sync: fdatasync of what was written, and with `full` a new snapshot (read
    /// positions, what is handed out) and the deletion of consumed segments. `None` when there
    /// is nothing to do. Run the job without the owner's lock, then hand it to
    /// [`DiskQueue::complete_sync`].
    pub(crate) fn prepare_sync(&mut self, full: bool) -> Option<SyncJob> {
        self.finish_durable();
        self.write_journal();
        let mut files: Vec<(Arc<QueueFile>, u64)> = self.unsynced.clone();
        if self.write.written > self.write.synced
            && let Some(file) = &self.write.file
        {
            files.push((file.clone(), self.write.written));
        }
        let snapshot_wanted =
            full && (self.meta_dirty || !self.consumed.is_empty() || self.snapshots_pending > 0);
        let dir_dirty = self.dirs_created > self.dirs_synced;
        if files.is_empty() && !dir_dirty && !snapshot_wanted {
            self.ops_since_sync = 0;
            return None;
        }
        self.jobs += 1;
        let mut job = SyncJob {
            number: self.jobs,
            io: self.io.clone(),
            names: self.names.clone(),
            faults: self.options.faults.clone(),
            files,
            sync_dir: dir_dirty.then_some(self.dirs_created),
            snapshot: None,
            remove: Vec::new(),
            done: None,
        };
        if snapshot_wanted {
            let generation = self.generation + 1;
            job.snapshot = Some(Meta {
                generation,
                depth: self.depth + self.unfinished() as u64,
                read: self.read_floor(),
                popped: self.popped_pos(),
                write: super::Pos {
                    segment: self.write.segment,
                    offset: self.write.pos,
                },
                unfinished: self.progress.unfinished_positions(),
            });
            job.remove = self.deletable_segments().collect();
            // From here on the journal continues the new snapshot.
            self.journal
                .begin(&self.names, generation, &self.options.faults);
            self.snapshots_pending += 1;
            self.meta_dirty = false;
            self.ops_since_sync = 0;
        }
        Some(job)
    }

    /// Takes in what a job did; `result` is what [`SyncJob::run`] returned.
    pub(crate) fn complete_sync(&mut self, job: SyncJob, result: &Result<(), StorageError>) {
        let done = job.done.unwrap_or(Done {
            synced: false,
            snapshot_written: false,
            removed: Vec::new(),
        });
        if done.synced {
            for (file, generation) in &job.files {
                let current = self
                    .write
                    .file
                    .as_ref()
                    .is_some_and(|f| Arc::ptr_eq(f, file));
                if current {
                    self.write.synced = self.write.synced.max(*generation);
                }
                self.unsynced
                    .retain(|(f, g)| !(Arc::ptr_eq(f, file) && *g <= *generation));
            }
            if let Some(created) = job.sync_dir {
                self.dirs_synced = self.dirs_synced.max(created);
            }
        }
        if let Some(snapshot) = &job.snapshot {
            self.snapshots_pending -= 1;
            if done.snapshot_written {
                self.generation = self.generation.max(snapshot.generation);
            } else if result.is_err() {
                self.meta_dirty = true;
            }
        }
        self.consumed.retain(|s| !done.removed.contains(s));
    }

    /// Prepares, runs and completes a full sync in one go, under the owner's lock.
    pub(crate) fn sync(&mut self) -> Result<(), StorageError> {
        let Some(mut job) = self.prepare_sync(true) else {
            return Ok(());
        };
        let result = job.run();
        self.complete_sync(job, &result);
        result
    }

    /// Makes everything appended so far durable without a new snapshot: one fdatasync per
    /// segment written (and a directory fsync if a segment was created). Enough for records to
    /// survive a machine crash: recovery scans past the snapshot's write position.
    #[cfg(test)]
    pub(crate) fn sync_data(&mut self) -> Result<(), StorageError> {
        let Some(mut job) = self.prepare_sync(false) else {
            return Ok(());
        };
        let result = job.run();
        self.complete_sync(job, &result);
        result
    }
}
