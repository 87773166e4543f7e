//! What the HTTP API reads: nsqlookupd's lookups, filtered as it filters them.

use super::{BrokerId, PeerInfo, Registry};
use std::time::SystemTime;

/// `/lookup`: the topic's channels and its live, untombstoned producers.
#[derive(Debug, PartialEq, Eq)]
pub struct Lookup<'a> {
    pub channels: Vec<&'a str>,
    pub producers: Vec<&'a PeerInfo>,
}

/// One live broker of `/nodes`, with its topics and whether each is tombstoned now.
#[derive(Debug, PartialEq, Eq)]
pub struct Node<'a> {
    pub info: &'a PeerInfo,
    pub topics: Vec<(&'a str, bool)>,
}

/// One registration key of `/debug` (`category:key:subkey`) and its producers.
#[derive(Debug, PartialEq, Eq)]
pub struct DebugEntry<'a> {
    pub key: String,
    pub producers: Vec<DebugProducer<'a>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct DebugProducer<'a> {
    pub id: &'a BrokerId,
    pub info: &'a PeerInfo,
    pub last_update: SystemTime,
    pub tombstoned_at: Option<SystemTime>,
}

impl Registry {
    /// `None` when there is no such topic key.
    pub fn lookup(&self, topic: &str, now: SystemTime) -> Option<Lookup<'_>> {
        let entry = self.topics.get(topic)?;
        let producers = entry
            .producers
            .iter()
            .filter(|(_, registration)| !self.is_tombstoned(registration, now))
            .filter_map(|(id, _)| self.producers.get(id))
            .filter(|producer| self.is_active(producer, now))
            .map(|producer| &producer.info)
            .collect();
        Some(Lookup {
            channels: entry.channels.keys().map(String::as_str).collect(),
            producers,
        })
    }

    /// Every topic key, producers or not, sorted.
    pub fn topics(&self) -> Vec<&str> {
        self.topics.keys().map(String::as_str).collect()
    }

    /// The topic's channel keys, sorted; empty for an unknown topic.
    pub fn channels(&self, topic: &str) -> Vec<&str> {
        self.topics
            .get(topic)
            .map(|entry| entry.channels.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Live brokers (tombstoned ones included), sorted by identity.
    pub fn nodes(&self, now: SystemTime) -> Vec<Node<'_>> {
        self.producers
            .iter()
            .filter(|(_, producer)| self.is_active(producer, now))
            .map(|(id, producer)| Node {
                info: &producer.info,
                topics: self
                    .topics
                    .iter()
                    .filter_map(|(topic, entry)| {
                        let registration = entry.producers.get(id)?;
                        Some((topic.as_str(), self.is_tombstoned(registration, now)))
                    })
                    .collect(),
            })
            .collect()
    }

    /// Every registration key that has producers, as nsqlookupd's `/debug` lists them:
    /// `client::` for the brokers themselves, `topic:<topic>:` and `channel:<topic>:<channel>`.
    pub fn debug(&self) -> Vec<DebugEntry<'_>> {
        let producer = |id: &BrokerId, tombstoned_at| {
            self.producers
                .get_key_value(id)
                .map(|(id, p)| DebugProducer {
                    id,
                    info: &p.info,
                    last_update: p.last_update,
                    tombstoned_at,
                })
        };
        let mut entries = Vec::new();
        let clients: Vec<_> = self
            .producers
            .keys()
            .filter_map(|id| producer(id, None))
            .collect();
        if !clients.is_empty() {
            entries.push(DebugEntry {
                key: "client::".into(),
                producers: clients,
            });
        }
        for (topic, entry) in &self.topics {
            let producers: Vec<_> = entry
                .producers
                .iter()
                .filter_map(|(id, registration)| producer(id, registration.tombstoned_at))
                .collect();
            if !producers.is_empty() {
                entries.push(DebugEntry {
                    key: format!("topic:{topic}:"),
                    producers,
                });
            }
            for (channel, ids) in &entry.channels {
                let producers: Vec<_> = ids.iter().filter_map(|id| producer(id, None)).collect();
                if !producers.is_empty() {
                    entries.push(DebugEntry {
                        key: format!("channel:{topic}:{channel}"),
                        producers,
                    });
                }
            }
        }
        entries
    }
}
