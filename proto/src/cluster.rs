//! The gRPC registration API between brokers and lookupds (package `knsq.cluster.v1`),
//! generated at build time from `proto/knsq/cluster/v1/cluster.proto`.
//!
//! Brokers use [`v1::registry_client::RegistryClient`]; lookupds implement
//! [`v1::registry_server::Registry`]. Each message a broker sends converts into a
//! [`v1::BrokerMessage`] with `into()`.

#[allow(unreachable_pub, clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("knsq.cluster.v1");
}

use v1::broker_message::Kind;

macro_rules! broker_message_from {
    ($($message:ident => $kind:ident),* $(,)?) => {$(
        impl From<v1::$message> for v1::BrokerMessage {
            fn from(message: v1::$message) -> v1::BrokerMessage {
                v1::BrokerMessage {
                    kind: Some(Kind::$kind(message)),
                }
            }
        }
    )*};
}

broker_message_from! {
    Identify => Identify,
    Snapshot => Snapshot,
    RegisterTopic => RegisterTopic,
    UnregisterTopic => UnregisterTopic,
    RegisterChannel => RegisterChannel,
    UnregisterChannel => UnregisterChannel,
    Heartbeat => Heartbeat,
}

#[cfg(test)]
mod tests {
    use super::v1::*;
    use prost::Message;

    #[test]
    fn messages_convert_into_broker_messages_and_round_trip() {
        let message: BrokerMessage = RegisterChannel {
            topic: "t".into(),
            channel: "c".into(),
        }
        .into();
        let bytes = message.encode_to_vec();
        // Field 5 (register_channel), length-delimited, holding topic (1) and channel (2).
        assert_eq!(bytes, [0x2a, 6, 0x0a, 1, b't', 0x12, 1, b'c']);
        assert_eq!(BrokerMessage::decode(&bytes[..]).unwrap(), message);
        let heartbeat: BrokerMessage = Heartbeat {}.into();
        assert_eq!(heartbeat.encode_to_vec(), [0x3a, 0]);
    }
}
