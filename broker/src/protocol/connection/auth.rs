//! AUTH, and the permission checks of SUB, PUB, MPUB and DPUB with `--auth-http-address`.

use super::{Connection, ReadNow};
use crate::auth::{AuthError, AuthState, Permission, Query};
use crate::protocol::client::AuthSummary;
use bytes::Bytes;
use proto::wire::{Command, CommandName, ErrorCode, ProtocolError};
use tokio::io::AsyncRead;
use tokio::time::Instant;

/// A connection's authorization.
#[derive(Debug)]
pub(super) enum Auth {
    /// No auth server is configured: every command is allowed.
    Off,
    /// Authorization is on and the client has not authenticated yet.
    Required,
    /// What the auth server granted the client's secret; the secret is sent again once the
    /// authorizations expire.
    Granted { state: AuthState, secret: Bytes },
}

impl Auth {
    /// Whether the auth server must be asked before `command` runs (an AUTH, or a SUB or
    /// publish whose authorizations expired, when `may_query`), or the error that refuses it.
    pub(super) fn check(&self, command: &Command, may_query: bool) -> Result<bool, ProtocolError> {
        let granted = match self {
            Auth::Off => return Ok(false),
            Auth::Required => None,
            Auth::Granted { state, .. } => Some(state),
        };
        let (name, topic, channel, permission) = match command {
            // Once authorized, `execute` answers `AUTH already set`.
            Command::Auth(_) => return Ok(granted.is_none()),
            Command::Sub { topic, channel } => (
                CommandName::Sub,
                topic.as_str(),
                channel.as_str(),
                Permission::Subscribe,
            ),
            Command::Pub { topic, .. } => {
                (CommandName::Pub, topic.as_str(), "", Permission::Publish)
            }
            Command::Mpub { topic, .. } => {
                (CommandName::Mpub, topic.as_str(), "", Permission::Publish)
            }
            Command::Dpub { topic, .. } => {
                (CommandName::Dpub, topic.as_str(), "", Permission::Publish)
            }
            _ => return Ok(false),
        };
        let Some(state) = granted else {
            return Err(auth_first(name));
        };
        if may_query && state.is_expired(Instant::now()) {
            return Ok(true);
        }
        if state.is_allowed(topic, channel, permission) {
            return Ok(false);
        }
        Err(unauthorized(name, topic, channel))
    }

    /// An MPUB's authorization, checked before its body is read as nsqd does. Expired ones
    /// let the body in: the auth server is asked once the command is whole.
    pub(super) fn check_mpub(&self, topic: &str) -> Result<(), ProtocolError> {
        match self {
            Auth::Off => Ok(()),
            Auth::Required => Err(auth_first(CommandName::Mpub)),
            Auth::Granted { state, .. }
                if state.is_expired(Instant::now())
                    || state.is_allowed(topic, "", Permission::Publish) =>
            {
                Ok(())
            }
            Auth::Granted { .. } => Err(unauthorized(CommandName::Mpub, topic, "")),
        }
    }

    /// The answer to an AUTH that is not sent to the auth server.
    pub(super) fn refuse_again(&self) -> ProtocolError {
        match self {
            Auth::Off => ProtocolError::new(ErrorCode::AuthDisabled, "AUTH disabled"),
            _ => ProtocolError::invalid("AUTH already set"),
        }
    }
}

impl<R: AsyncRead + ReadNow + Unpin + Send> Connection<R> {
    /// Asks the auth server about the client's secret, then answers the AUTH or runs the
    /// command whose authorizations had expired. False when the connection must close.
    pub(super) async fn authorize(&mut self, command: Command) -> bool {
        let secret = match (&command, &self.auth) {
            (Command::Auth(secret), _) => secret.clone(),
            (_, Auth::Granted { secret, .. }) => secret.clone(),
            // Only an AUTH or a command whose grant expired waits for the auth server.
            _ => return false,
        };
        let shared = self.shared.clone();
        let Some(servers) = shared.auth.as_ref() else {
            return false;
        };
        let query = Query {
            remote_ip: self.client.remote_address.ip(),
            tls: self.input.layers.tls,
            secret: &secret,
            common_name: &self.input.common_name,
        };
        let answer = tokio::select! {
            _ = self.client.closed.cancelled() => return false,
            answer = servers.query(query) => answer,
        };
        self.authorized(command, secret, answer)
    }

    /// Takes the auth server's answer for an AUTH (answering it) or for a command that found
    /// its authorizations expired (then checking and starting it). False when the connection
    /// must close.
    fn authorized(
        &mut self,
        command: Command,
        secret: Bytes,
        answer: Result<AuthState, AuthError>,
    ) -> bool {
        let state = match answer {
            Ok(state) => state,
            Err(e) => {
                // The details stay in the log: clients are not told about the auth servers.
                tracing::warn!(error = %e, "AUTH failed");
                self.send_error(&ProtocolError::new(ErrorCode::AuthFailed, "AUTH failed"));
                return false;
            }
        };
        let count = state.permission_count();
        self.client.set_auth(AuthSummary {
            authed: count > 0,
            identity: state.identity.clone(),
            identity_url: state.identity_url.clone(),
        });
        tracing::debug!(identity = %state.identity, permissions = count, "authorized");
        let response = matches!(command, Command::Auth(_)).then(|| {
            serde_json::json!({
                "identity": state.identity,
                "identity_url": state.identity_url,
                "permission_count": count,
            })
        });
        self.auth = Auth::Granted { state, secret };
        let Some(response) = response else {
            self.start(command, false);
            return true;
        };
        if count == 0 {
            self.send_error(&ProtocolError::new(
                ErrorCode::Unauthorized,
                "AUTH no authorizations found",
            ));
            return false;
        }
        self.send_response(response.to_string().as_bytes());
        true
    }
}

/// `E_UNAUTHORIZED` for a command the authorizations do not cover.
fn unauthorized(name: CommandName, topic: &str, channel: &str) -> ProtocolError {
    // Names are validated ASCII, so plain quotes read as Go's %q.
    ProtocolError::new(
        ErrorCode::Unauthorized,
        format!(
            "AUTH failed for {} on \"{topic}\" \"{channel}\"",
            name.as_str()
        ),
    )
}

/// `E_AUTH_FIRST`: auth is on and the client has not authenticated.
fn auth_first(name: CommandName) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::AuthFirst,
        format!("AUTH required before {}", name.as_str()),
    )
}
