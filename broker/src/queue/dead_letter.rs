//! Dead-letter topics: where a channel's messages go once they reached its maximum of attempts.
//!
//! A channel with a limit (`--max-attempts`, or its own from `POST /channel/config`) never
//! delivers a message whose attempts reached it again: when its last delivery ends (REQ or
//! timeout), or when it is found over the limit on its way to a consumer (after a restart, or
//! once the limit was lowered), the message goes to the channel's dead-letter topic with its ID
//! and body, behind an [envelope](super::envelope) saying where it came from. The channel's
//! timer task moves it, outside the channel's lock: the copy is stored in the dead-letter topic
//! before the channel lets go of the original, whose disk record, if any, is finished only once
//! the copy is durable in `--sync-publish` mode (at least once).
//!
//! A dead letter is never dead-lettered again (a consumer of the dead-letter topic may retry it
//! forever); redriving one strips the envelope and puts it back into the channel it came from
//! with its attempts reset.

use super::message::Msg;
use crate::storage::StorageError;
use proto::wire::names::{EPHEMERAL_SUFFIX, MAX_NAME_LEN, is_ephemeral, is_valid_topic_name};
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, Weak};

/// The default dead-letter topic of a channel ends so.
const DEFAULT_SUFFIX: &str = ".dlq";

/// The dead-letter topic a channel uses unless one is configured: `<topic>.<channel>.dlq`,
/// without their `#ephemeral` suffixes. When that is longer than a topic name may be (64
/// characters), it is cut to 51 and followed by `.` and 8 hex digits of an FNV-1a hash of
/// `<topic>:<channel>`, so that different channels keep different topics.
pub(crate) fn default_topic(topic: &str, channel: &str) -> String {
    fn base(name: &str) -> &str {
        name.strip_suffix(EPHEMERAL_SUFFIX).unwrap_or(name)
    }
    let name = format!("{}.{}{DEFAULT_SUFFIX}", base(topic), base(channel));
    if name.len() <= MAX_NAME_LEN {
        return name;
    }
    let hash = format!("{topic}:{channel}")
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    let keep = MAX_NAME_LEN - (1 + 8 + DEFAULT_SUFFIX.len());
    // Names are ASCII, so any cut is on a character boundary.
    format!("{}.{hash:08x}{DEFAULT_SUFFIX}", &name[..keep])
}

/// Why a topic cannot be a channel's dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TopicRefused {
    #[error("not a valid topic name")]
    Invalid,
    /// An ephemeral topic drops what it cannot hold: dead letters would be lost.
    #[error("an ephemeral topic cannot keep dead letters")]
    Ephemeral,
    #[error("the channel's own topic")]
    Source,
}

/// Checks `name` as the dead-letter topic of a channel of `source`.
pub(crate) fn check_topic(name: &str, source: &str) -> Result<(), TopicRefused> {
    if !is_valid_topic_name(name.as_bytes()) {
        Err(TopicRefused::Invalid)
    } else if is_ephemeral(name) {
        Err(TopicRefused::Ephemeral)
    } else if name == source {
        Err(TopicRefused::Source)
    } else {
        Ok(())
    }
}

/// A channel's own dead-letter settings; what is unset follows the broker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeadLetterConfig {
    /// Its maximum of attempts instead of `--max-attempts` (0: none).
    pub(crate) max_attempts: Option<u16>,
    /// Its dead-letter topic instead of [`default_topic`].
    pub(crate) topic: Option<String>,
}

/// The queues' handle on the broker's topics, through which dead letters reach their topic;
/// the broker implements it, so channels never depend on it.
pub(crate) trait DeadLetterTopics: Send + Sync + fmt::Debug {
    /// The topic `name`, created (and recorded in the metadata) if needed.
    fn dead_letter_topic(&self, name: &str) -> Result<Arc<dyn DeadLetterSink>, StorageError>;

    /// A channel's dead-letter count changed: the metadata should record it soon.
    fn dead_letters_counted(&self);
}

/// A topic as dead letters see it.
pub(crate) trait DeadLetterSink: Send + Sync {
    /// Stores dead letters, keeping their IDs.
    fn put_dead(&self, msgs: &[Msg]) -> Result<(), DeadLetterError>;
}

/// Why dead letters could not be stored; the channel keeps them and tries again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeadLetterError {
    #[error("the broker is shutting down")]
    Closed,
    /// The topic was deleted meanwhile.
    #[error("the dead-letter topic was deleted")]
    Gone,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a redrive moved nothing of a batch.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedriveError {
    #[error("message {id} is not a dead letter: it has no origin")]
    NotDeadLetter { id: String },
    #[error("channel {channel} of topic {topic}, where a message came from, does not exist")]
    OriginGone { topic: String, channel: String },
    #[error("the broker is shutting down")]
    Closed,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The way from channels to dead-letter topics, shared through the queue settings.
#[derive(Debug)]
pub(crate) struct DeadLetters {
    topics: OnceLock<Weak<dyn DeadLetterTopics>>,
    /// False once shutdown has begun writing the queues to disk: a move after that could land
    /// in a topic already written, while its original is forgotten.
    open: RwLock<bool>,
}

impl Default for DeadLetters {
    fn default() -> Self {
        DeadLetters {
            topics: OnceLock::new(),
            open: RwLock::new(true),
        }
    }
}

impl DeadLetters {
    /// Connects the topics; once, when the broker starts.
    pub(crate) fn connect(&self, topics: Weak<dyn DeadLetterTopics>) {
        if self.topics.set(topics).is_err() {
            tracing::warn!("dead-letter topics connected twice; keeping the first");
        }
    }

    /// No move starts after this returns, and none is under way.
    pub(crate) fn close(&self) {
        *self.open.write().unwrap_or_else(|e| e.into_inner()) = false;
    }

    /// Held while a message is copied out of a channel (to a dead-letter topic, or back by
    /// redrive); `None` once shutdown has begun storing the queues.
    pub(crate) fn copying(&self) -> Option<RwLockReadGuard<'_, bool>> {
        let open = self.open.read().unwrap_or_else(|e| e.into_inner());
        (*open).then_some(open)
    }

    /// Stores `msgs` in the topic `name`, created if needed.
    pub(crate) fn store(&self, name: &str, msgs: &[Msg]) -> Result<(), DeadLetterError> {
        let _copying = self.copying().ok_or(DeadLetterError::Closed)?;
        let topics = self
            .topics
            .get()
            .and_then(Weak::upgrade)
            .ok_or(DeadLetterError::Closed)?;
        match topics.dead_letter_topic(name)?.put_dead(msgs) {
            // Deleted meanwhile: the name gets a new topic.
            Err(DeadLetterError::Gone) => topics.dead_letter_topic(name)?.put_dead(msgs),
            other => other,
        }
    }

    /// A channel counted dead letters.
    pub(crate) fn counted(&self) {
        if let Some(topics) = self.topics.get().and_then(Weak::upgrade) {
            topics.dead_letters_counted();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topics_keep_within_the_name_rules() {
        assert_eq!(default_topic("orders", "billing"), "orders.billing.dlq");
        assert_eq!(default_topic("t#ephemeral", "c#ephemeral"), "t.c.dlq");
        let (t, c) = ("t".repeat(40), "c".repeat(40));
        let long = default_topic(&t, &c);
        assert_eq!(long.len(), MAX_NAME_LEN);
        assert!(long.starts_with(&format!("{t}.{}", &c[..10])), "{long}");
        assert!(long.ends_with(".dlq"));
        assert!(is_valid_topic_name(long.as_bytes()));
        // Channels that share the first 51 characters still get different topics.
        assert_ne!(
            default_topic(&t, &format!("{c}1")),
            default_topic(&t, &format!("{c}2"))
        );
    }

    #[test]
    fn dead_letter_topics_are_checked() {
        assert_eq!(check_topic("orders.dead", "orders"), Ok(()));
        assert_eq!(
            check_topic("bad name", "orders"),
            Err(TopicRefused::Invalid)
        );
        assert_eq!(check_topic("", "orders"), Err(TopicRefused::Invalid));
        assert_eq!(
            check_topic("d#ephemeral", "orders"),
            Err(TopicRefused::Ephemeral)
        );
        assert_eq!(check_topic("orders", "orders"), Err(TopicRefused::Source));
    }
}
