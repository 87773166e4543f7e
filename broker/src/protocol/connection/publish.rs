//! PUB, MPUB and DPUB, and with `--sync-publish` the answers held until the messages are on
//! disk.

use super::{Connection, ReadNow};
use crate::queue::PublishError;
use bytes::{Bytes, BytesMut};
use proto::wire::{Command, CommandName, ErrorCode, ProtocolError};
use std::time::Duration;
use tokio::io::AsyncRead;

/// Answers held back until the publishes before them are fsynced (`--sync-publish`).
#[derive(Debug)]
pub(super) struct Held {
    /// Covers every publish held so far.
    ticket: u64,
    frames: Vec<HeldFrame>,
}

#[derive(Debug)]
enum HeldFrame {
    /// `OK` once durable; the publish's error if the fsync failed.
    Published(CommandName),
    Encoded(BytesMut),
}

impl Held {
    /// A response or error frame, sent after what is held before it.
    pub(super) fn push_frame(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        let mut frame = BytesMut::new();
        encode(&mut frame);
        self.frames.push(HeldFrame::Encoded(frame));
    }
}

impl<R: AsyncRead + ReadNow + Unpin + Send> Connection<R> {
    pub(super) fn publish_one(&mut self, topic: &str, body: Bytes) -> Result<(), ProtocolError> {
        self.publish(CommandName::Pub, topic, &[body], Duration::ZERO)
    }

    pub(super) fn publish_many(
        &mut self,
        topic: &str,
        bodies: &[Bytes],
    ) -> Result<(), ProtocolError> {
        self.publish(CommandName::Mpub, topic, bodies, Duration::ZERO)
    }

    pub(super) fn publish_deferred(
        &mut self,
        topic: &str,
        body: Bytes,
        defer_ms: u64,
    ) -> Result<(), ProtocolError> {
        let defer = Duration::from_millis(defer_ms);
        self.publish(CommandName::Dpub, topic, &[body], defer)
    }

    fn publish(
        &mut self,
        command: CommandName,
        topic_name: &str,
        bodies: &[Bytes],
        defer: Duration,
    ) -> Result<(), ProtocolError> {
        let broker = &self.shared.broker;
        let cached = self
            .last_topic
            .take()
            .filter(|t| t.name == topic_name)
            .map(|t| t.publish(bodies, defer).map(|()| t));
        let result = match cached {
            // A cached topic that was deleted since: look it up again.
            None | Some(Err(PublishError::Exiting)) => broker.publish(topic_name, bodies, defer),
            Some(result) => result,
        };
        let topic = result.map_err(|e| {
            ProtocolError::new(
                publish_error_code(command),
                format!("{} failed {e}", command.as_str()),
            )
        })?;
        self.last_topic = Some(topic);
        self.client.count_published(topic_name, bodies.len() as u64);
        let settings = &self.shared.broker.settings;
        if settings.sync_publish {
            let ticket = settings.commits.ticket();
            let held = self.held.get_or_insert_with(|| Held {
                ticket,
                frames: Vec::new(),
            });
            held.ticket = ticket;
            held.frames.push(HeldFrame::Published(command));
        } else {
            self.send_response(proto::wire::OK);
        }
        Ok(())
    }

    /// The topic a PUB, MPUB, DPUB or SUB would create, when lookupds should be asked for its
    /// channels first. The topic last published to is known to exist: the PUB path stays a
    /// name comparison.
    pub(super) fn new_topic(&self, command: &Command) -> Option<String> {
        let topic = match command {
            Command::Pub { topic, .. }
            | Command::Mpub { topic, .. }
            | Command::Dpub { topic, .. }
            | Command::Sub { topic, .. } => topic.as_str(),
            _ => return None,
        };
        if self.last_topic.as_ref().is_some_and(|t| t.name == topic) {
            return None;
        }
        let broker = &self.shared.broker;
        broker.needs_prepare(topic).then(|| topic.to_string())
    }

    /// Waits for the fsync covering held publishes, then sends what was held: `OK`s, or the
    /// publish error (fatal) if the fsync failed. False when the connection must close.
    pub(super) async fn release_held(&mut self) -> bool {
        let Some(held) = self.held.take() else {
            return true;
        };
        let durable = tokio::select! {
            durable = self.shared.broker.settings.commits.wait(held.ticket) => durable,
            _ = self.client.closed.cancelled() => return false,
        };
        for frame in held.frames {
            match frame {
                HeldFrame::Encoded(bytes) => {
                    self.client
                        .outbox
                        .push(true, |buf| buf.extend_from_slice(&bytes));
                }
                HeldFrame::Published(_) if durable => self.send_response(proto::wire::OK),
                HeldFrame::Published(command) => {
                    let text = format!("{} failed fsync failed", command.as_str());
                    self.send_error(&ProtocolError::new(publish_error_code(command), text));
                    return false;
                }
            }
        }
        true
    }
}

fn publish_error_code(command: CommandName) -> ErrorCode {
    match command {
        CommandName::Mpub => ErrorCode::MpubFailed,
        CommandName::Dpub => ErrorCode::DpubFailed,
        _ => ErrorCode::PubFailed,
    }
}
