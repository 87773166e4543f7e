//! Where a client is in nsqd's protocol, with what each state owns, and the rules nsqd checks
//! before it reads a command's parameters and body.

use crate::queue::{Channel, Topic};
use proto::wire::{CommandName, Precheck, ProtocolError};
use std::sync::Arc;

/// The channel a SUB joined, and its topic.
#[derive(Debug)]
pub(super) struct Subscription {
    pub(super) topic: Arc<Topic>,
    pub(super) channel: Arc<Channel>,
}

/// nsqd's client states (`stateInit`, `stateSubscribed`, `stateClosing`).
#[derive(Debug)]
pub(super) enum ClientState {
    /// Connected: IDENTIFY, AUTH, publishing, SUB.
    Init,
    /// After SUB: RDY, FIN, REQ, TOUCH and CLS on its channel, and publishing.
    Subscribed(Subscription),
    /// After CLS: no more messages; the ones in flight may still be finished or requeued.
    Closing(Subscription),
}

impl ClientState {
    /// nsqd's number for the state, as `/stats` shows it.
    pub(super) fn number(&self) -> i32 {
        match self {
            ClientState::Init => 0,
            ClientState::Subscribed(_) => 3,
            ClientState::Closing(_) => 4,
        }
    }

    /// The subscription, after SUB.
    pub(super) fn subscription(&self) -> Option<&Subscription> {
        match self {
            ClientState::Init => None,
            ClientState::Subscribed(s) | ClientState::Closing(s) => Some(s),
        }
    }

    /// Ends the subscription (the connection is over), back to `Init`.
    pub(super) fn take_subscription(&mut self) -> Option<Subscription> {
        match std::mem::replace(self, ClientState::Init) {
            ClientState::Init => None,
            ClientState::Subscribed(s) | ClientState::Closing(s) => Some(s),
        }
    }

    /// The rules nsqd applies before reading a command's parameters and body: TLS first
    /// when it is required and missing, then the state. `heartbeats`: whether the client
    /// left them on (SUB needs them).
    pub(super) fn check(
        &self,
        name: CommandName,
        heartbeats: bool,
        tls_missing: bool,
    ) -> Result<Precheck, ProtocolError> {
        let cannot =
            || ProtocolError::invalid(format!("cannot {} in current state", name.as_str()));
        if tls_missing && name != CommandName::Identify {
            return Err(ProtocolError::invalid(format!(
                "cannot {} in current state (TLS required)",
                name.as_str()
            )));
        }
        let init = matches!(self, ClientState::Init);
        let subscribed = matches!(self, ClientState::Subscribed(_));
        let closing = matches!(self, ClientState::Closing(_));
        match name {
            // nsqd ignores RDY from a closing client before even parsing its count.
            CommandName::Rdy if closing => Ok(Precheck::Skip),
            CommandName::Identify | CommandName::Auth | CommandName::Sub if !init => Err(cannot()),
            CommandName::Sub if !heartbeats => Err(ProtocolError::invalid(
                "cannot SUB with heartbeats disabled",
            )),
            CommandName::Rdy | CommandName::Fin | CommandName::Req | CommandName::Touch if init => {
                Err(cannot())
            }
            CommandName::Cls if !subscribed => Err(cannot()),
            _ => Ok(Precheck::Parse),
        }
    }
}
