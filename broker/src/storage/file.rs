//! The files under a disk queue: their names, and the one place where the queue touches them,
//! with the fault switch that tests use to make writes and fsyncs fail on demand.

use super::StorageError;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Makes every write and fsync of the queues that share it fail with an I/O error while it is on.
///
/// A write under the switch really writes the first half of its bytes and then fails, as a disk
/// that fills up mid-write does, so the queue's clean-up of partial writes is exercised too.
/// Reads, truncation, renames and removals are not affected. The switch costs one relaxed
/// atomic load per write or fsync; clones share the same state.
#[derive(Debug, Clone, Default)]
pub(crate) struct FaultSwitch(Arc<AtomicBool>);

impl FaultSwitch {
    /// Turns the injected faults on (`true`) or off again (`false`).
    #[cfg(test)]
    pub(crate) fn set_failing(&self, failing: bool) {
        self.0.store(failing, Ordering::Relaxed);
    }

    pub(crate) fn is_failing(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn check(&self) -> io::Result<()> {
        if self.is_failing() {
            return Err(injected());
        }
        Ok(())
    }
}

fn injected() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "injected fault: the storage fault switch is on",
    )
}

/// What a file name in the queue's directory is, for queue `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileKind {
    Segment(u64),
    /// A segment part moved aside as corrupt.
    Bad,
    Meta,
    MetaTemp,
    /// One of the two progress journals.
    Journal,
}

/// The queue's own file names: `<stem>.diskqueue.<n, 6 digits or more>.dat` for segments,
/// `<stem>.diskqueue.meta` for the metadata, `<stem>.diskqueue.journal.<0|1>` for the progress
/// journals and `<segment>.<offset>.bad` for damaged bytes set aside, where the stem is
/// [`file_stem`] of the queue's name.
#[derive(Debug, Clone)]
pub(super) struct Names {
    dir: PathBuf,
    prefix: String,
}

/// The stem of queue `name`'s file names: the name with every character but `a`-`z`, `0`-`9`,
/// `_`, `-` and `:` (which joins a topic and a channel) written as `%` and two upper-case hex
/// digits per byte. Any name thus becomes a file name (`.` is `%2E`, `..` is `%2E%2E`), names
/// that differ only in case or punctuation never share files, even on a case-insensitive file
/// system, and the `.diskqueue.` that follows cannot be part of a stem. The usual lower-case
/// names (`orders`, `orders:archive`) are their own stems, as in nsqd's layout.
pub(super) fn file_stem(name: &str) -> String {
    let mut stem = String::with_capacity(name.len());
    for byte in name.bytes() {
        match byte {
            b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b':' => stem.push(char::from(byte)),
            _ => stem.push_str(&format!("%{byte:02X}")),
        }
    }
    stem
}

impl Names {
    pub(super) fn new(dir: &Path, name: &str) -> Names {
        Names::with_stem(dir, &file_stem(name))
    }

    /// The names the files of queue `name` had when they were named after it verbatim, as
    /// knsq's first versions and nsqd name them; `None` when that is the encoded name too.
    pub(super) fn verbatim(dir: &Path, name: &str) -> Option<Names> {
        (file_stem(name) != name).then(|| Names::with_stem(dir, name))
    }

    fn with_stem(dir: &Path, stem: &str) -> Names {
        Names {
            dir: dir.to_path_buf(),
            prefix: format!("{stem}.diskqueue."),
        }
    }

    /// Where `file_name`, one of `other`'s files, goes under these names.
    pub(super) fn renamed_from(&self, other: &Names, file_name: &str) -> Option<PathBuf> {
        let rest = file_name.strip_prefix(&other.prefix)?;
        Some(self.dir.join(format!("{}{rest}", self.prefix)))
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn segment(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{}{n:06}.dat", self.prefix))
    }

    pub(super) fn meta(&self) -> PathBuf {
        self.dir.join(format!("{}meta", self.prefix))
    }

    pub(super) fn meta_temp(&self) -> PathBuf {
        self.dir.join(format!("{}meta.tmp", self.prefix))
    }

    /// Where the damaged bytes found at `offset` of segment `n` are set aside.
    pub(super) fn bad(&self, n: u64, offset: u64) -> PathBuf {
        self.dir
            .join(format!("{}{n:06}.dat.{offset}.bad", self.prefix))
    }

    /// The progress journal used by snapshots of this parity (see `journal`).
    pub(super) fn journal(&self, parity: u64) -> PathBuf {
        self.dir
            .join(format!("{}journal.{}", self.prefix, parity % 2))
    }

    /// This queue's files in its directory: name, kind and path of each.
    pub(super) fn files(&self) -> Result<Vec<(String, FileKind, PathBuf)>, StorageError> {
        let list_error = |source| StorageError::ListDir {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(list_error)? {
            let entry = entry.map_err(list_error)?;
            let Ok(file_name) = entry.file_name().into_string() else {
                continue;
            };
            if let Some(kind) = self.classify(&file_name) {
                files.push((file_name, kind, entry.path()));
            }
        }
        Ok(files)
    }

    pub(super) fn classify(&self, file_name: &str) -> Option<FileKind> {
        let rest = file_name.strip_prefix(&self.prefix)?;
        match rest {
            "meta" => return Some(FileKind::Meta),
            "meta.tmp" => return Some(FileKind::MetaTemp),
            "journal.0" | "journal.1" => return Some(FileKind::Journal),
            _ => {}
        }
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (digits, tail) = rest.split_at(digits_end);
        if digits.is_empty() {
            return None;
        }
        match tail {
            ".dat" => digits.parse().ok().map(FileKind::Segment),
            t if t.starts_with(".dat.") && t.ends_with(".bad") => Some(FileKind::Bad),
            _ => None,
        }
    }
}

/// An open file of the queue: positional reads and writes, with the path for errors and the
/// fault switch for tests.
#[derive(Debug)]
pub(super) struct QueueFile {
    file: File,
    path: PathBuf,
    faults: FaultSwitch,
}

impl QueueFile {
    pub(super) fn open_read(
        path: PathBuf,
        faults: &FaultSwitch,
    ) -> Result<QueueFile, StorageError> {
        match File::open(&path) {
            Ok(file) => Ok(QueueFile {
                file,
                path,
                faults: faults.clone(),
            }),
            Err(source) => Err(StorageError::Open { path, source }),
        }
    }

    /// Opens `path` for writing, creating it if needed; `truncate` empties it.
    pub(super) fn open_write(
        path: PathBuf,
        truncate: bool,
        faults: &FaultSwitch,
    ) -> Result<QueueFile, StorageError> {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .open(&path);
        match opened {
            Ok(file) => {
                #[cfg(test)]
                power::file_opened(&path, &file, truncate);
                Ok(QueueFile {
                    file,
                    path,
                    faults: faults.clone(),
                })
            }
            Err(source) => Err(StorageError::Open { path, source }),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes all of `buf` at `offset`, normally with one `pwrite`.
    pub(super) fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        let result = if self.faults.is_failing() {
            let half = &buf[..buf.len() / 2];
            self.file
                .write_all_at(half, offset)
                .and_then(|()| Err(injected()))
        } else {
            self.file.write_all_at(buf, offset)
        };
        result.map_err(|source| StorageError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Reads into `buf` at `offset`; fewer bytes than asked only at the end of the file.
    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, StorageError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StorageError::Read {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(done)
    }

    /// `fdatasync`: the data and the file length reach the disk.
    pub(super) fn sync(&self) -> Result<(), StorageError> {
        self.faults
            .check()
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StorageError::Sync {
                path: self.path.clone(),
                source,
            })?;
        #[cfg(test)]
        power::file_synced(&self.path, &self.file);
        Ok(())
    }

    pub(super) fn truncate(&self, len: u64) -> Result<(), StorageError> {
        self.file
            .set_len(len)
            .map_err(|source| StorageError::Truncate {
                path: self.path.clone(),
                len,
                source,
            })
    }

    pub(super) fn len(&self) -> Result<u64, StorageError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| StorageError::Read {
                path: self.path.clone(),
                source,
            })
    }
}

/// fsyncs directory `dir`, so that file creations, renames and removals in it are durable.
pub(super) fn sync_dir(dir: &Path, faults: &FaultSwitch) -> Result<(), StorageError> {
    faults
        .check()
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(|source| StorageError::Sync {
            path: dir.to_path_buf(),
            source,
        })?;
    #[cfg(test)]
    power::dir_synced(dir);
    Ok(())
}

/// Removes `path`; a file already gone is fine.
pub(super) fn remove_if_present(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StorageError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(super) fn rename(from: &Path, to: &Path) -> Result<(), StorageError> {
    std::fs::rename(from, to).map_err(|source| StorageError::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

/// A model of what a power loss keeps, for tests: per modelled directory, the file names as of
/// its last directory fsync and each file's contents as of its last fsync. [`power::lose_power`]
/// puts the directory back to that state, as a machine that lost power would find it.
#[cfg(test)]
pub(crate) mod power {
    use std::collections::HashMap;
    use std::ffi::OsString;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    #[derive(Default)]
    struct DirModel {
        /// Names and the inode each pointed at, as of the last directory fsync.
        names: HashMap<OsString, u64>,
        /// Contents per inode as of its last fsync.
        contents: HashMap<u64, Vec<u8>>,
    }

    static MODELS: Mutex<Option<HashMap<PathBuf, DirModel>>> = Mutex::new(None);

    fn with_model<T>(dir: &Path, f: impl FnOnce(&mut DirModel) -> T) -> Option<T> {
        let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
        models.get_or_insert_with(HashMap::new).get_mut(dir).map(f)
    }

    /// Starts modelling `dir`: everything in it now counts as durable.
    pub(crate) fn track(dir: &Path) {
        let mut model = DirModel::default();
        for entry in std::fs::read_dir(dir).expect("list the modelled directory") {
            let entry = entry.expect("directory entry");
            let meta = entry.metadata().expect("metadata");
            model.names.insert(entry.file_name(), meta.ino());
            let bytes = std::fs::read(entry.path()).expect("read a modelled file");
            model.contents.insert(meta.ino(), bytes);
        }
        let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
        models
            .get_or_insert_with(HashMap::new)
            .insert(dir.to_path_buf(), model);
    }

    pub(super) fn file_synced(path: &Path, file: &File) {
        let Some(dir) = path.parent() else { return };
        let Ok(meta) = file.metadata() else { return };
        let bytes = match std::fs::read(path) {
            Ok(bytes) if meta.ino() == std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0) => {
                bytes
            }
            // Renamed or removed since it was opened: read through the handle instead.
            _ => {
                use std::os::unix::fs::FileExt;
                let mut bytes = vec![0; meta.len() as usize];
                let _ = file.read_exact_at(&mut bytes, 0);
                bytes
            }
        };
        with_model(dir, |m| m.contents.insert(meta.ino(), bytes));
    }

    pub(super) fn dir_synced(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let names: HashMap<OsString, u64> = entries
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.file_name(), e.metadata().ok()?.ino())))
            .collect();
        with_model(dir, |m| {
            // Inodes no longer named are free, and their numbers may be used again.
            m.contents.retain(|ino, _| names.values().any(|n| n == ino));
            m.names = names;
        });
    }

    /// A file was opened for writing: a new or emptied file has no durable contents yet
    /// (its inode number may have belonged to a file removed before).
    pub(super) fn file_opened(path: &Path, file: &File, truncated: bool) {
        let Some(dir) = path.parent() else { return };
        let Ok(meta) = file.metadata() else { return };
        if truncated || meta.len() == 0 {
            with_model(dir, |m| m.contents.remove(&meta.ino()));
        }
    }

    /// Puts `dir` back to what the model says survived a power loss, then keeps modelling it.
    /// With `torn`, a file that grew since its last fsync keeps a random part of the growth
    /// (`torn(len)` picks how many of `len` new bytes), as a disk that wrote some pages of it
    /// would.
    pub(crate) fn lose_power(dir: &Path, mut torn: impl FnMut(usize) -> usize) {
        let model = {
            let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
            models
                .get_or_insert_with(HashMap::new)
                .remove(dir)
                .expect("lose_power on a directory that is not modelled")
        };
        let mut current: HashMap<u64, Vec<u8>> = HashMap::new();
        for entry in std::fs::read_dir(dir).expect("list") {
            let entry = entry.expect("entry");
            let ino = entry.metadata().expect("metadata").ino();
            current.insert(ino, std::fs::read(entry.path()).expect("read"));
            std::fs::remove_file(entry.path()).expect("remove");
        }
        let mut names: Vec<(&OsString, &u64)> = model.names.iter().collect();
        names.sort();
        for (name, ino) in names {
            let mut bytes = model.contents.get(ino).cloned().unwrap_or_default();
            if let Some(now) = current.get(ino)
                && now.len() > bytes.len()
                && now.starts_with(&bytes)
            {
                let extra = torn(now.len() - bytes.len());
                bytes.extend_from_slice(&now[bytes.len()..bytes.len() + extra]);
            }
            std::fs::write(dir.join(name), bytes).expect("write the surviving file");
        }
        track(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified() {
        let names = Names::new(Path::new("/d"), "t:c");
        assert_eq!(
            names.segment(7),
            Path::new("/d/t:c.diskqueue.000007.dat").to_path_buf()
        );
        assert_eq!(
            names.classify("t:c.diskqueue.000007.dat"),
            Some(FileKind::Segment(7))
        );
        assert_eq!(
            names.classify("t:c.diskqueue.1234567.dat"),
            Some(FileKind::Segment(1_234_567))
        );
        assert_eq!(
            names.classify("t:c.diskqueue.000007.dat.bad"),
            Some(FileKind::Bad)
        );
        assert_eq!(
            names.bad(7, 1234),
            Path::new("/d/t:c.diskqueue.000007.dat.1234.bad").to_path_buf()
        );
        assert_eq!(
            names.classify("t:c.diskqueue.journal.1"),
            Some(FileKind::Journal)
        );
        assert_eq!(names.journal(3), names.journal(1));
        assert_eq!(
            names.classify("t:c.diskqueue.000007.dat.2.bad"),
            Some(FileKind::Bad)
        );
        assert_eq!(names.classify("t:c.diskqueue.meta"), Some(FileKind::Meta));
        assert_eq!(
            names.classify("t:c.diskqueue.meta.tmp"),
            Some(FileKind::MetaTemp)
        );
        assert_eq!(names.classify("t.diskqueue.000007.dat"), None);
        assert_eq!(names.classify("t:c.diskqueue..dat"), None);
        assert_eq!(names.classify("t:c.diskqueue.000007.dat.tmp"), None);
    }

    #[test]
    fn file_stems_encode_the_name() {
        assert_eq!(file_stem("orders"), "orders");
        assert_eq!(file_stem("orders_v2-x:archive"), "orders_v2-x:archive");
        assert_eq!(file_stem("."), "%2E");
        assert_eq!(file_stem(".."), "%2E%2E");
        assert_eq!(file_stem("Orders.v1"), "%4Frders%2Ev1");
        assert_eq!(file_stem("t:c#ephemeral"), "t:c%23ephemeral");
        assert_eq!(file_stem("a/b"), "a%2Fb");
        // Names differing only in case or in `.` get distinct stems, also when the file
        // system folds case.
        let folded = |n: &str| file_stem(n).to_ascii_lowercase();
        assert_ne!(folded("Orders"), folded("orders"));
        assert_ne!(folded("a.b"), folded("a_b"));
        let names = Names::new(Path::new("/d"), "..");
        assert_eq!(
            names.segment(0),
            Path::new("/d/%2E%2E.diskqueue.000000.dat").to_path_buf()
        );
        assert!(Names::verbatim(Path::new("/d"), "orders").is_none());
        let old = Names::verbatim(Path::new("/d"), "a.b").unwrap();
        assert_eq!(
            Names::new(Path::new("/d"), "a.b").renamed_from(&old, "a.b.diskqueue.meta"),
            Some(Path::new("/d/a%2Eb.diskqueue.meta").to_path_buf())
        );
    }
}
