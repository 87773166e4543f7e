//! An exclusive lock on the data directory, so two brokers never share one.

use super::PersistError;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

/// Held for the broker's lifetime; the OS releases it when the process ends, however it ends.
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<DataDirLock, PersistError> {
        let path = dir.join("knsq-broker.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(PersistError::io("open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(PersistError::Locked {
                path: dir.to_path_buf(),
                lock: path,
            }),
            Err(TryLockError::Error(e)) => Err(PersistError::io("lock", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("in use by another knsq-broker"),
            "{err}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
