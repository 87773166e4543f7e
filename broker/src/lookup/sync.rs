//! What a lookupd must be told: the difference between the broker's topics and what the
//! stream has registered so far. Pure functions, no I/O.

use proto::cluster::v1::broker_message::Kind;
use proto::cluster::v1::{
    RegisterChannel, RegisterTopic, Snapshot, TopicRegistration, UnregisterChannel, UnregisterTopic,
};
use std::collections::{BTreeMap, BTreeSet};

/// Topics and their channels, as a broker has them or as a lookupd was told.
pub(crate) type Registrations = BTreeMap<String, BTreeSet<String>>;

/// The `Snapshot` message for everything the broker has.
pub(super) fn snapshot(all: &Registrations) -> Snapshot {
    Snapshot {
        topics: all
            .iter()
            .map(|(topic, channels)| TopicRegistration {
                topic: topic.clone(),
                channels: channels.iter().cloned().collect(),
            })
            .collect(),
    }
}

/// The messages that bring the lookupd's view of `topic` (`told`) to what the broker has
/// now (`now`, `None` when the topic is gone), and updates `told` to match.
pub(super) fn diff(
    topic: &str,
    now: Option<BTreeSet<String>>,
    told: &mut Registrations,
) -> Vec<Kind> {
    let mut out = Vec::new();
    let register_channel = |channel: &str| {
        Kind::RegisterChannel(RegisterChannel {
            topic: topic.to_string(),
            channel: channel.to_string(),
        })
    };
    match (now, told.get(topic)) {
        (None, None) => {}
        (None, Some(_)) => {
            // Also drops the topic's channels on the lookupd.
            out.push(Kind::UnregisterTopic(UnregisterTopic {
                topic: topic.to_string(),
            }));
            told.remove(topic);
        }
        (Some(channels), None) => {
            out.push(Kind::RegisterTopic(RegisterTopic {
                topic: topic.to_string(),
            }));
            out.extend(channels.iter().map(|c| register_channel(c)));
            told.insert(topic.to_string(), channels);
        }
        (Some(channels), Some(old)) => {
            out.extend(old.difference(&channels).map(|c| {
                Kind::UnregisterChannel(UnregisterChannel {
                    topic: topic.to_string(),
                    channel: c.clone(),
                })
            }));
            out.extend(channels.difference(old).map(|c| register_channel(c)));
            told.insert(topic.to_string(), channels);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn describe(kinds: &[Kind]) -> Vec<String> {
        kinds
            .iter()
            .map(|k| match k {
                Kind::RegisterTopic(m) => format!("+{}", m.topic),
                Kind::UnregisterTopic(m) => format!("-{}", m.topic),
                Kind::RegisterChannel(m) => format!("+{}/{}", m.topic, m.channel),
                Kind::UnregisterChannel(m) => format!("-{}/{}", m.topic, m.channel),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_new_topic_is_registered_with_its_channels() {
        let mut told = Registrations::new();
        let out = diff("t", Some(set(&["a", "b#ephemeral"])), &mut told);
        assert_eq!(describe(&out), ["+t", "+t/a", "+t/b#ephemeral"]);
        assert_eq!(told["t"], set(&["a", "b#ephemeral"]));
        assert!(diff("t", Some(set(&["a", "b#ephemeral"])), &mut told).is_empty());
    }

    #[test]
    fn channels_that_come_and_go_are_registered_and_unregistered() {
        let mut told = Registrations::from([("t".to_string(), set(&["a", "b"]))]);
        let out = diff("t", Some(set(&["b", "c"])), &mut told);
        assert_eq!(describe(&out), ["-t/a", "+t/c"]);
        assert_eq!(told["t"], set(&["b", "c"]));
    }

    #[test]
    fn a_deleted_topic_is_unregistered_once() {
        let mut told = Registrations::from([("t".to_string(), set(&["a"]))]);
        assert_eq!(describe(&diff("t", None, &mut told)), ["-t"]);
        assert!(told.is_empty());
        assert!(diff("t", None, &mut told).is_empty());
    }

    #[test]
    fn snapshots_list_every_topic_and_channel() {
        let all = Registrations::from([
            ("t".to_string(), set(&["a"])),
            ("u#ephemeral".to_string(), set(&[])),
        ]);
        let snap = snapshot(&all);
        assert_eq!(snap.topics.len(), 2);
        assert_eq!(snap.topics[0].topic, "t");
        assert_eq!(snap.topics[0].channels, ["a"]);
        assert!(snap.topics[1].channels.is_empty());
    }
}
