//! An auth server's answer: who the client is and what it may do, checked once and with its
//! regular expressions compiled once, as nsqd's `internal/auth` validates it.

use super::AuthError;
use regex::Regex;
use serde::{Deserialize, Deserializer};
use std::time::Duration;
use tokio::time::Instant;

/// What a command needs: SUB needs `subscribe`; PUB, MPUB and DPUB need `publish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permission {
    Subscribe,
    Publish,
}

/// The authorizations a secret was granted, until `expires`.
#[derive(Debug)]
pub(crate) struct AuthState {
    pub(crate) identity: String,
    pub(crate) identity_url: String,
    authorizations: Vec<Authorization>,
    expires: Instant,
}

#[derive(Debug)]
struct Authorization {
    topic: Regex,
    channels: Vec<Regex>,
    subscribe: bool,
    publish: bool,
}

/// The response body as the auth server sends it; a missing or `null` field is its zero
/// value, as Go's decoder leaves it.
#[derive(Debug, Deserialize)]
struct Response {
    #[serde(default, deserialize_with = "null_default")]
    ttl: i64,
    #[serde(default, deserialize_with = "null_default")]
    identity: String,
    #[serde(default, deserialize_with = "null_default")]
    identity_url: String,
    #[serde(default, deserialize_with = "null_default")]
    authorizations: Vec<RawAuthorization>,
}

#[derive(Debug, Deserialize)]
struct RawAuthorization {
    #[serde(default, deserialize_with = "null_default")]
    topic: String,
    #[serde(default, deserialize_with = "null_default")]
    channels: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    permissions: Vec<String>,
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl AuthState {
    /// Parses and validates a response: every permission is `subscribe` or `publish`, every
    /// regular expression compiles, and the TTL is positive. Valid from `now` for the TTL.
    pub(crate) fn parse(body: &[u8], now: Instant) -> Result<AuthState, AuthError> {
        let response: Response = serde_json::from_slice(body).map_err(AuthError::Decode)?;
        let mut authorizations = Vec::with_capacity(response.authorizations.len());
        for raw in response.authorizations {
            let (mut subscribe, mut publish) = (false, false);
            for p in &raw.permissions {
                match p.as_str() {
                    "subscribe" => subscribe = true,
                    "publish" => publish = true,
                    _ => return Err(AuthError::UnknownPermission(p.clone())),
                }
            }
            let compile = |what: &'static str, pattern: &str| {
                Regex::new(pattern).map_err(|source| AuthError::BadRegex {
                    what,
                    pattern: pattern.to_string(),
                    source,
                })
            };
            let topic = compile("topic", &raw.topic)?;
            let channels = raw
                .channels
                .iter()
                .map(|c| compile("channel", c))
                .collect::<Result<Vec<_>, _>>()?;
            authorizations.push(Authorization {
                topic,
                channels,
                subscribe,
                publish,
            });
        }
        if response.ttl <= 0 {
            return Err(AuthError::BadTtl(response.ttl));
        }
        Ok(AuthState {
            identity: response.identity,
            identity_url: response.identity_url,
            authorizations,
            expires: now + Duration::from_secs(response.ttl as u64),
        })
    }

    /// How many authorizations were granted; none means the client is not authorized at all.
    pub(crate) fn permission_count(&self) -> usize {
        self.authorizations.len()
    }

    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        now >= self.expires
    }

    /// Whether one authorization grants `permission` with a topic expression matching `topic`
    /// and a channel expression matching `channel`. Expressions are unanchored (they match
    /// anywhere in the name); a publish has the channel `""`, so it needs a channel expression
    /// that matches the empty string, such as `.*`.
    pub(crate) fn is_allowed(&self, topic: &str, channel: &str, permission: Permission) -> bool {
        self.authorizations.iter().any(|a| {
            let granted = match permission {
                Permission::Subscribe => a.subscribe,
                Permission::Publish => a.publish,
            };
            granted && a.topic.is_match(topic) && a.channels.iter().any(|c| c.is_match(channel))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<AuthState, String> {
        AuthState::parse(json.as_bytes(), Instant::now()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_response_parses() {
        let state = parse(
            r#"{"ttl":3600,"identity":"alice","identity_url":"https://id/alice",
                "authorizations":[{"topic":"^orders$","channels":[".*"],"permissions":["subscribe","publish"]},
                                  {"topic":"logs","channels":["^archive$"],"permissions":["subscribe"]}]}"#,
        )
        .unwrap();
        assert_eq!(state.identity, "alice");
        assert_eq!(state.identity_url, "https://id/alice");
        assert_eq!(state.permission_count(), 2);
        assert!(!state.is_expired(Instant::now()));
    }

    #[test]
    fn missing_and_null_fields_are_empty() {
        let state = parse(r#"{"ttl":1,"identity":null,"authorizations":null}"#).unwrap();
        assert_eq!(state.identity, "");
        assert_eq!(state.identity_url, "");
        assert_eq!(state.permission_count(), 0);
        let state =
            parse(r#"{"ttl":1,"authorizations":[{"topic":"t","permissions":["publish"]}]}"#)
                .unwrap();
        // No channel expression: nothing matches, not even a publish.
        assert!(!state.is_allowed("t", "", Permission::Publish));
    }

    #[test]
    fn invalid_responses_are_rejected() {
        let auth = |perm: &str, topic: &str, channel: &str, ttl: i64| {
            format!(
                r#"{{"ttl":{ttl},"authorizations":[{{"topic":"{topic}","channels":["{channel}"],"permissions":["{perm}"]}}]}}"#
            )
        };
        assert_eq!(
            parse(&auth("admin", "t", ".*", 60)).unwrap_err(),
            "unknown permission admin"
        );
        let err = parse(&auth("publish", "(", ".*", 60)).unwrap_err();
        assert!(err.starts_with("unable to compile topic \"(\""), "{err}");
        let err = parse(&auth("publish", "t", "[", 60)).unwrap_err();
        assert!(err.starts_with("unable to compile channel \"[\""), "{err}");
        assert_eq!(
            parse(&auth("publish", "t", ".*", 0)).unwrap_err(),
            "invalid TTL 0 (must be >0)"
        );
        assert_eq!(
            parse(&auth("publish", "t", ".*", -5)).unwrap_err(),
            "invalid TTL -5 (must be >0)"
        );
        assert_eq!(
            parse(r#"{"authorizations":[]}"#).unwrap_err(),
            "invalid TTL 0 (must be >0)"
        );
        assert!(parse("[]").is_err());
        for body in ["", "{", "null", r#"{"ttl":"60"}"#, r#"{"ttl":1.5}"#] {
            let err = parse(body).unwrap_err();
            assert!(
                err.starts_with("cannot decode the response"),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn matching_is_unanchored_and_per_permission() {
        let state = parse(
            r#"{"ttl":60,"authorizations":[
                {"topic":"ord","channels":["arch"],"permissions":["subscribe"]},
                {"topic":"^pub_only$","channels":[".*"],"permissions":["publish"]},
                {"topic":"^strict$","channels":["^c$"],"permissions":["publish","subscribe"]}]}"#,
        )
        .unwrap();
        // Unanchored: "ord" matches anywhere in the topic name, "arch" anywhere in the channel.
        assert!(state.is_allowed("orders", "archive", Permission::Subscribe));
        assert!(state.is_allowed("big_orders", "my_arch", Permission::Subscribe));
        assert!(!state.is_allowed("orders", "live", Permission::Subscribe));
        // Subscribe-only: no publish, whatever the expressions.
        assert!(!state.is_allowed("orders", "", Permission::Publish));
        // Publish needs a channel expression that matches "".
        assert!(state.is_allowed("pub_only", "", Permission::Publish));
        assert!(!state.is_allowed("pub_only", "c", Permission::Subscribe));
        assert!(!state.is_allowed("strict", "", Permission::Publish));
        assert!(state.is_allowed("strict", "c", Permission::Subscribe));
        assert!(!state.is_allowed("strict2", "c", Permission::Subscribe));
    }

    #[test]
    fn the_ttl_sets_the_expiry() {
        let now = Instant::now();
        let state = AuthState::parse(br#"{"ttl":2,"authorizations":[]}"#, now).unwrap();
        assert!(!state.is_expired(now + Duration::from_millis(1999)));
        assert!(state.is_expired(now + Duration::from_secs(2)));
    }
}
