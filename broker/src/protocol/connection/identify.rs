//! IDENTIFY: the client's settings, and the upgrades it agrees on.

use super::{Connection, ReadNow, Step};
use crate::protocol::identify::IdentifyRequest;
use proto::wire::{ErrorCode, ProtocolError};
use tokio::io::AsyncRead;

impl<R: AsyncRead + ReadNow + Unpin + Send> Connection<R> {
    pub(super) fn identify(&mut self, body: &[u8]) -> Result<(), ProtocolError> {
        let request = IdentifyRequest::parse(body)?;
        let options = &self.shared.broker.options;
        let applied = request.apply(&self.client.identity(), options)?;
        let agreed = request.negotiate(options, self.shared.tls.is_some())?;
        let upgrades = agreed.tls || agreed.snappy || agreed.deflate;
        if upgrades && self.input.layers.is_layered() {
            return Err(ProtocolError::new(
                ErrorCode::IdentifyFailed,
                "IDENTIFY cannot upgrade a connection twice",
            ));
        }
        let response = request.response(&applied, &agreed, options);
        self.input.heartbeat = applied.heartbeat_interval;
        self.client.set_identity(applied);
        self.client.settings_changed.notify_one();
        if upgrades {
            // Until the upgrades' OKs are out, no heartbeat may slip in.
            self.client.outbox.set_upgrading(true);
            self.step = Step::Upgrade(agreed);
        }
        self.send_response(&response);
        Ok(())
    }
}
