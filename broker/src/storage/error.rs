//! The storage layer's error: what failed, on which file, and the I/O error underneath.

use std::io;
use std::path::PathBuf;

/// A disk queue operation that failed. Every I/O variant names the file it was working on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StorageError {
    #[error("{name:?} is not a valid topic or channel name")]
    InvalidName { name: String },
    #[error("message body of {len} bytes is larger than --max-msg-size {max}")]
    RecordTooLarge { len: u64, max: u64 },
    #[error("cannot list disk queue directory {path}: {source}")]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot fsync {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot truncate {path} to {len} bytes: {source}")]
    Truncate {
        path: PathBuf,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
