//! What the broker keeps in `--data-path` besides the queues: the directory lock and the
//! metadata file.

mod dir_lock;
mod metadata;

pub(crate) use dir_lock::DataDirLock;
pub(crate) use metadata::{ChannelMeta, Metadata, TopicMeta};

use std::path::PathBuf;

/// Why the data directory or its metadata cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("--data-path {path} is in use by another knsq-broker (lock file {lock})")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a disk queue: {0}")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("metadata file {path} is not valid: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl From<crate::storage::StorageError> for PersistError {
    fn from(e: crate::storage::StorageError) -> Self {
        PersistError::Storage(Box::new(e))
    }
}

impl PersistError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> PersistError {
        let path = path.into();
        move |source| PersistError::Io {
            action,
            path,
            source,
        }
    }
}
