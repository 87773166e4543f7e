//! Checks a broker's messages and turns them into registry events. Every refusal names the
//! field and the problem, and is sent to the broker as `INVALID_ARGUMENT`.

use crate::registry::PeerInfo;
use proto::cluster::v1::{BrokerMessage, Identify, broker_message::Kind};
use proto::wire::names::{is_valid_channel_name, is_valid_topic_name};

/// A checked message of a registration stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Identify(PeerInfo),
    Snapshot(Vec<(String, Vec<String>)>),
    RegisterTopic(String),
    UnregisterTopic(String),
    RegisterChannel(String, String),
    UnregisterChannel(String, String),
    Heartbeat,
}

impl Event {
    /// The message kind, as the metrics and errors name it.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Event::Identify(_) => "identify",
            Event::Snapshot(_) => "snapshot",
            Event::RegisterTopic(_) => "register_topic",
            Event::UnregisterTopic(_) => "unregister_topic",
            Event::RegisterChannel(..) => "register_channel",
            Event::UnregisterChannel(..) => "unregister_channel",
            Event::Heartbeat => "heartbeat",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidMessage {
    #[error(
        "message has no kind: set one of identify, snapshot, register_topic, unregister_topic, register_channel, unregister_channel, heartbeat"
    )]
    NoKind,
    #[error("{field} is required")]
    Missing { field: String },
    #[error("{field} must be in 1-65535, got {value}")]
    Port { field: &'static str, value: u32 },
    #[error("identify.node_id must be in [0,1024), got {0}")]
    NodeId(u32),
    #[error("{field} {name:?} is not a valid topic name")]
    Topic { field: String, name: String },
    #[error("{field} {name:?} is not a valid channel name")]
    Channel { field: String, name: String },
    #[error("the first message of a stream must be identify, got {0}")]
    NotIdentified(&'static str),
    #[error("identify was already sent on this stream")]
    AlreadyIdentified,
}

/// Checks `message`; `remote_address` is where its stream comes from.
pub(crate) fn event(message: BrokerMessage, remote_address: &str) -> Result<Event, InvalidMessage> {
    Ok(match message.kind.ok_or(InvalidMessage::NoKind)? {
        Kind::Identify(identify) => Event::Identify(peer_info(identify, remote_address)?),
        Kind::Snapshot(snapshot) => Event::Snapshot(
            snapshot
                .topics
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    let field = format!("snapshot.topics[{i}]");
                    let topic = topic(&format!("{field}.topic"), t.topic)?;
                    let channels = t
                        .channels
                        .into_iter()
                        .enumerate()
                        .map(|(j, c)| channel(&format!("{field}.channels[{j}]"), c))
                        .collect::<Result<_, _>>()?;
                    Ok((topic, channels))
                })
                .collect::<Result<_, InvalidMessage>>()?,
        ),
        Kind::RegisterTopic(m) => Event::RegisterTopic(topic("register_topic.topic", m.topic)?),
        Kind::UnregisterTopic(m) => {
            Event::UnregisterTopic(topic("unregister_topic.topic", m.topic)?)
        }
        Kind::RegisterChannel(m) => Event::RegisterChannel(
            topic("register_channel.topic", m.topic)?,
            channel("register_channel.channel", m.channel)?,
        ),
        Kind::UnregisterChannel(m) => Event::UnregisterChannel(
            topic("unregister_channel.topic", m.topic)?,
            channel("unregister_channel.channel", m.channel)?,
        ),
        Kind::Heartbeat(_) => Event::Heartbeat,
    })
}

/// A topic name as `TopicChannels` and the stream messages require it.
pub(crate) fn topic(field: &str, name: String) -> Result<String, InvalidMessage> {
    if name.is_empty() {
        return Err(InvalidMessage::Missing {
            field: field.into(),
        });
    }
    if !is_valid_topic_name(name.as_bytes()) {
        return Err(InvalidMessage::Topic {
            field: field.into(),
            name,
        });
    }
    Ok(name)
}

fn channel(field: &str, name: String) -> Result<String, InvalidMessage> {
    if name.is_empty() {
        return Err(InvalidMessage::Missing {
            field: field.into(),
        });
    }
    if !is_valid_channel_name(name.as_bytes()) {
        return Err(InvalidMessage::Channel {
            field: field.into(),
            name,
        });
    }
    Ok(name)
}

fn port(field: &'static str, value: u32) -> Result<u16, InvalidMessage> {
    u16::try_from(value)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(InvalidMessage::Port { field, value })
}

fn peer_info(m: Identify, remote_address: &str) -> Result<PeerInfo, InvalidMessage> {
    let required = |field: &str, value: &str| {
        if value.trim().is_empty() {
            Err(InvalidMessage::Missing {
                field: field.into(),
            })
        } else {
            Ok(())
        }
    };
    required("identify.broadcast_address", &m.broadcast_address)?;
    let tcp_port = port("identify.tcp_port", m.tcp_port)?;
    let http_port = port("identify.http_port", m.http_port)?;
    required("identify.version", &m.version)?;
    let node_id = u16::try_from(m.node_id)
        .ok()
        .filter(|&id| id < 1024)
        .ok_or(InvalidMessage::NodeId(m.node_id))?;
    Ok(PeerInfo {
        remote_address: remote_address.into(),
        hostname: m.hostname,
        broadcast_address: m.broadcast_address,
        tcp_port,
        http_port,
        version: m.version,
        node_id,
        topology_zone: m.topology_zone,
        topology_region: m.topology_region,
        handoff_port: u16::try_from(m.handoff_port).map_err(|_| InvalidMessage::Port {
            field: "identify.handoff_port",
            value: m.handoff_port,
        })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::cluster::v1::{
        Heartbeat, RegisterChannel, RegisterTopic, Snapshot, TopicRegistration,
    };

    fn identify() -> Identify {
        Identify {
            broadcast_address: "b".into(),
            tcp_port: 4150,
            http_port: 4151,
            version: "0.1.0".into(),
            node_id: 3,
            hostname: "h".into(),
            topology_zone: "z".into(),
            topology_region: "r".into(),
            handoff_port: 4153,
        }
    }

    fn check(kind: Kind) -> Result<Event, String> {
        event(BrokerMessage { kind: Some(kind) }, "1.2.3.4:5").map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_identify_becomes_peer_info() {
        let Ok(Event::Identify(peer)) = check(Kind::Identify(identify())) else {
            panic!("identify refused");
        };
        assert_eq!(peer.remote_address, "1.2.3.4:5");
        assert_eq!(
            (peer.tcp_port, peer.http_port, peer.node_id),
            (4150, 4151, 3)
        );
        assert_eq!(peer.topology_zone, "z");
    }

    #[test]
    fn identify_refusals_name_the_field() {
        type Change = fn(&mut Identify);
        let cases: [(Change, &str); 6] = [
            (
                |m| m.broadcast_address.clear(),
                "identify.broadcast_address is required",
            ),
            (
                |m| m.tcp_port = 0,
                "identify.tcp_port must be in 1-65535, got 0",
            ),
            (
                |m| m.http_port = 70000,
                "identify.http_port must be in 1-65535, got 70000",
            ),
            (|m| m.version = " ".into(), "identify.version is required"),
            (
                |m| m.node_id = 1024,
                "identify.node_id must be in [0,1024), got 1024",
            ),
            (|m| m.hostname.clear(), ""),
        ];
        for (change, want) in cases {
            let mut m = identify();
            change(&mut m);
            match check(Kind::Identify(m)) {
                Err(got) => assert_eq!(got, want),
                Ok(_) => assert!(want.is_empty(), "accepted, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn names_follow_nsq_rules() {
        assert_eq!(
            check(Kind::RegisterTopic(RegisterTopic {
                topic: "a$b".into()
            })),
            Err(r#"register_topic.topic "a$b" is not a valid topic name"#.into())
        );
        assert_eq!(
            check(Kind::RegisterTopic(RegisterTopic { topic: "".into() })),
            Err("register_topic.topic is required".into())
        );
        assert_eq!(
            check(Kind::RegisterChannel(RegisterChannel {
                topic: "t".into(),
                channel: "c d".into()
            })),
            Err(r#"register_channel.channel "c d" is not a valid channel name"#.into())
        );
        let snapshot = Snapshot {
            topics: vec![
                TopicRegistration {
                    topic: "t".into(),
                    channels: vec!["c#ephemeral".into()],
                },
                TopicRegistration {
                    topic: "u".into(),
                    channels: vec!["ok".into(), "x".repeat(65)],
                },
            ],
        };
        let err = check(Kind::Snapshot(snapshot.clone())).unwrap_err();
        assert!(
            err.starts_with("snapshot.topics[1].channels[1] \"xxx"),
            "{err}"
        );
        let mut fine = snapshot;
        fine.topics[1].channels.pop();
        assert_eq!(
            check(Kind::Snapshot(fine)),
            Ok(Event::Snapshot(vec![
                ("t".into(), vec!["c#ephemeral".into()]),
                ("u".into(), vec!["ok".into()])
            ]))
        );
    }

    #[test]
    fn an_empty_message_is_refused() {
        assert_eq!(
            event(BrokerMessage { kind: None }, "x"),
            Err(InvalidMessage::NoKind)
        );
        assert_eq!(check(Kind::Heartbeat(Heartbeat {})), Ok(Event::Heartbeat));
    }
}
