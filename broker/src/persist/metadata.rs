//! The metadata file: which topics and channels exist and which are paused (ephemeral ones
//! never appear). The shape is nsqd's `nsqd.dat`, so operators find it familiar.
//!
//! Every change rewrites it atomically: a temporary file, fsync, rename over the old one,
//! fsync of the directory. A crash leaves either the old file or the new one, never half.

use super::PersistError;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "knsq-broker.dat";

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Metadata {
    pub(crate) topics: Vec<TopicMeta>,
    pub(crate) version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TopicMeta {
    pub(crate) name: String,
    pub(crate) paused: bool,
    pub(crate) channels: Vec<ChannelMeta>,
}

/// knsq's dead-letter fields are left out when unset, so the file keeps nsqd's shape, and
/// files written before they existed still load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChannelMeta {
    pub(crate) name: String,
    pub(crate) paused: bool,
    /// The channel's own maximum of attempts (instead of `--max-attempts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_attempts: Option<u16>,
    /// The channel's own dead-letter topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dead_letter_topic: Option<String>,
    /// Messages it dead-lettered so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) dead_lettered: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Metadata {
    pub(crate) fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// The saved metadata, or an empty set when there is none yet.
    pub(crate) fn load(dir: &Path) -> Result<Metadata, PersistError> {
        let path = Metadata::path(dir);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| PersistError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Metadata::default()),
            Err(e) => Err(PersistError::io("read", path)(e)),
        }
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<(), PersistError> {
        let path = Metadata::path(dir);
        let tmp = dir.join(format!("{FILE_NAME}.{}.tmp", std::process::id()));
        let bytes = serde_json::to_vec(self).map_err(|source| PersistError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut file = File::create(&tmp).map_err(PersistError::io("create", &tmp))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(PersistError::io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(PersistError::io("rename", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(PersistError::io("sync directory", dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Metadata::load(dir.path()).unwrap(), Metadata::default());
        let meta = Metadata {
            topics: vec![TopicMeta {
                name: "t".into(),
                paused: true,
                channels: vec![
                    ChannelMeta {
                        name: "c".into(),
                        paused: false,
                        max_attempts: None,
                        dead_letter_topic: None,
                        dead_lettered: 0,
                    },
                    ChannelMeta {
                        name: "d".into(),
                        paused: false,
                        max_attempts: Some(5),
                        dead_letter_topic: Some("t.dead".into()),
                        dead_lettered: 3,
                    },
                ],
            }],
            version: "1.3.0".into(),
        };
        meta.save(dir.path()).unwrap();
        assert_eq!(Metadata::load(dir.path()).unwrap(), meta);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn files_without_dead_letter_fields_still_load_and_unset_ones_are_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"topics":[{"name":"t","paused":false,"channels":[{"name":"c","paused":true}]}],"version":"1.3.0"}"#;
        fs::write(Metadata::path(dir.path()), old).unwrap();
        let meta = Metadata::load(dir.path()).unwrap();
        let c = &meta.topics[0].channels[0];
        assert_eq!(
            (c.max_attempts, c.dead_letter_topic.as_deref()),
            (None, None)
        );
        assert_eq!(c.dead_lettered, 0);
        meta.save(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(Metadata::path(dir.path())).unwrap(), old);
    }

    #[test]
    fn a_corrupt_file_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(Metadata::path(dir.path()), b"{nope").unwrap();
        let err = Metadata::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is not valid"), "{err}");
    }
}
