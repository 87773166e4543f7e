//! Consuming: SUB, RDY, FIN, REQ, TOUCH and CLS, and leaving the channel at the end.

use super::state::{ClientState, Subscription};
use super::{Connection, ReadNow};
use crate::queue::{Channel, Consumer, SubscribeError, Subscriber};
use proto::wire::{CommandName, ErrorCode, MessageId, ProtocolError};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncRead;

impl<R: AsyncRead + ReadNow + Unpin + Send> Connection<R> {
    pub(super) fn subscribe(
        &mut self,
        topic_name: &str,
        channel_name: &str,
    ) -> Result<(), ProtocolError> {
        let failed = |text: String| ProtocolError::new(ErrorCode::SubFailed, text);
        let identity = self.client.identity();
        let consumer: Arc<dyn Consumer> = self.client.clone();
        let subscriber = Subscriber {
            id: self.client.id,
            consumer,
            msg_timeout: identity.msg_timeout,
            sample_rate: identity.sample_rate,
        };
        // A topic being deleted at this moment is replaced on the second try, as nsqd retries.
        for attempt in 0..2 {
            match self
                .shared
                .broker
                .subscribe(topic_name, channel_name, &subscriber)
            {
                Ok((topic, channel)) => {
                    self.set_state(ClientState::Subscribed(Subscription { topic, channel }));
                    self.send_response(proto::wire::OK);
                    return Ok(());
                }
                Err(SubscribeError::Exiting) if attempt == 0 => continue,
                Err(SubscribeError::Exiting) => break,
                Err(e) => return Err(failed(format!("SUB failed {e}"))),
            }
        }
        Err(failed("SUB failed to deleted topic/channel".into()))
    }

    /// RDY: how many messages the consumer takes in flight (ignored once it is closing).
    pub(super) fn ready(&mut self, count: u64) {
        if let ClientState::Subscribed(s) = &self.state {
            s.channel.set_ready(self.client.id, count);
        }
    }

    /// Applies the FINs read so far, under one lock of the channel.
    pub(super) fn apply_fins(&mut self) {
        if self.fins.is_empty() {
            return;
        }
        let fins = std::mem::take(&mut self.fins);
        let mut failures = Vec::new();
        match self.channel(CommandName::Fin) {
            Ok(channel) => channel.finish(self.client.id, &fins, |id, e| failures.push((id, e))),
            Err(e) => self.send_error(&e),
        }
        for (id, e) in failures {
            self.send_error(&ProtocolError::new(
                ErrorCode::FinFailed,
                format!("FIN {id} failed {}", e.as_str()),
            ));
        }
        // The vector's room is kept for the next batch.
        self.fins = fins;
        self.fins.clear();
    }

    /// REQ: the message back to the queue, now or after `timeout_ms` (capped by
    /// `--max-req-timeout`).
    pub(super) fn requeue(&mut self, id: &MessageId, timeout_ms: u64) -> Result<(), ProtocolError> {
        let max = self.shared.broker.options.max_req_timeout;
        let delay = Duration::from_millis(timeout_ms).min(max);
        self.channel(CommandName::Req)?
            .requeue(self.client.id, id, delay)
            .map_err(|e| {
                ProtocolError::new(
                    ErrorCode::ReqFailed,
                    format!("REQ {id} failed {}", e.as_str()),
                )
            })
    }

    /// TOUCH: the message's in-flight timeout starts again.
    pub(super) fn touch(&mut self, id: &MessageId) -> Result<(), ProtocolError> {
        self.channel(CommandName::Touch)?
            .touch(self.client.id, id)
            .map_err(|e| {
                ProtocolError::new(
                    ErrorCode::TouchFailed,
                    format!("TOUCH {id} failed {}", e.as_str()),
                )
            })
    }

    /// CLS: no more messages; the client may still finish what it holds.
    pub(super) fn start_close(&mut self) -> Result<(), ProtocolError> {
        let subscription = match std::mem::replace(&mut self.state, ClientState::Init) {
            ClientState::Subscribed(s) => s,
            other => {
                self.state = other;
                return Err(cannot(CommandName::Cls));
            }
        };
        subscription.channel.start_close(self.client.id);
        self.set_state(ClientState::Closing(subscription));
        self.send_response(proto::wire::CLOSE_WAIT);
        Ok(())
    }

    /// Leaves the channel; an ephemeral channel (and topic) without consumers goes away.
    pub(super) fn leave(&mut self) {
        if let Some(Subscription { topic, channel }) = self.state.take_subscription() {
            let left = channel.unsubscribe(self.client.id);
            if left == 0 && channel.ephemeral {
                self.shared.broker.consumer_left(&topic, &channel.name);
            }
        }
    }

    /// The subscribed channel. The state checks admit FIN, REQ and TOUCH only after SUB, so
    /// the error is a safety net, not an expected path.
    fn channel(&self, command: CommandName) -> Result<&Arc<Channel>, ProtocolError> {
        match self.state.subscription() {
            Some(s) => Ok(&s.channel),
            None => Err(cannot(command)),
        }
    }
}

fn cannot(command: CommandName) -> ProtocolError {
    ProtocolError::invalid(format!("cannot {} in current state", command.as_str()))
}
