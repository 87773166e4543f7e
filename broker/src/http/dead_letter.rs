//! knsq's dead-letter endpoints, in the style of nsqd's API: a channel's maximum of attempts
//! and dead-letter topic (`/channel/config`), the first messages of a topic or channel without
//! taking them (`/topic/peek`, `/channel/peek`), and moving dead letters back to the channels
//! they came from (`/channel/redrive`). Bad input changes nothing.

use super::AppState;
use super::node::to_json;
use crate::queue::dead_letter::{RedriveError, TopicRefused, check_topic};
use crate::queue::{Channel, DeadLetterConfig, Topic};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use server_kit::http::{ApiError, Params};
use std::sync::Arc;

type Reply = Result<Response, ApiError>;

/// Messages `/topic/peek` and `/channel/peek` show unless asked, and at most.
const PEEK_DEFAULT: usize = 10;
const PEEK_MAX: usize = 1000;

fn existing_topic(s: &AppState, name: &str) -> Result<Arc<Topic>, ApiError> {
    s.broker
        .existing_topic(name)
        .ok_or(ApiError::not_found("TOPIC_NOT_FOUND"))
}

fn existing_channel(s: &AppState, topic: &str, channel: &str) -> Result<Arc<Channel>, ApiError> {
    existing_topic(s, topic)?
        .existing_channel(channel)
        .ok_or(ApiError::not_found("CHANNEL_NOT_FOUND"))
}

/// A positive count parameter; `None` when absent.
fn positive(params: &Params, key: &str, error: &'static str) -> Result<Option<u64>, ApiError> {
    params
        .get(key)
        .map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(ApiError::bad_request(error))
        })
        .transpose()
}

/// What `/channel/config` shows: the settings in force and the channel's own.
#[derive(Serialize)]
struct ChannelConfig {
    topic: String,
    channel: String,
    max_attempts: u16,
    dead_letter_topic: String,
    dead_lettered_count: u64,
    /// The channel's own settings; `null` ones follow `--max-attempts` and the default topic.
    configured: Configured,
}

#[derive(Serialize)]
struct Configured {
    max_attempts: Option<u16>,
    dead_letter_topic: Option<String>,
}

fn show_config(channel: &Channel) -> Response {
    let in_force = channel.dead_letter_settings();
    let own = channel.dead_letter_config();
    to_json(&ChannelConfig {
        topic: channel.topic_name.clone(),
        channel: channel.name.clone(),
        max_attempts: in_force.max_attempts,
        dead_letter_topic: in_force.dead_letter_topic,
        dead_lettered_count: in_force.dead_lettered_count,
        configured: Configured {
            max_attempts: own.max_attempts,
            dead_letter_topic: own.topic,
        },
    })
}

/// `GET /channel/config?topic=…&channel=…`
pub(super) async fn get_channel_config(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let (topic, channel) = params.topic_and_channel()?;
    let channel = existing_channel(&s, topic, channel)?;
    Ok(show_config(&channel))
}

/// `POST /channel/config?topic=…&channel=…[&max_attempts=N][&dead_letter_topic=T]`: a parameter
/// left out stays as it was; an empty one (or `max_attempts=default`) goes back to the default.
pub(super) async fn set_channel_config(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let (topic, channel) = params.topic_and_channel()?;
    let max_attempts = params
        .get("max_attempts")
        .map(|v| match v {
            "" | "default" => Ok(None),
            v => v
                .parse::<u16>()
                .map(Some)
                .map_err(|_| ApiError::bad_request("INVALID_ARG_MAX_ATTEMPTS")),
        })
        .transpose()?;
    let dead_letter_topic = params
        .get("dead_letter_topic")
        .map(|v| match v {
            "" => Ok(None),
            v => match check_topic(v, topic) {
                Ok(()) => Ok(Some(v.to_string())),
                Err(TopicRefused::Invalid) => {
                    Err(ApiError::bad_request("INVALID_ARG_DEAD_LETTER_TOPIC"))
                }
                Err(TopicRefused::Ephemeral) => {
                    Err(ApiError::bad_request("EPHEMERAL_DEAD_LETTER_TOPIC"))
                }
                Err(TopicRefused::Source) => {
                    Err(ApiError::bad_request("DEAD_LETTER_TOPIC_IS_SOURCE"))
                }
            },
        })
        .transpose()?;
    let channel = existing_channel(&s, topic, channel)?;
    if max_attempts.is_some() || dead_letter_topic.is_some() {
        let own = channel.dead_letter_config();
        let config = DeadLetterConfig {
            max_attempts: max_attempts.unwrap_or(own.max_attempts),
            topic: dead_letter_topic.unwrap_or(own.topic),
        };
        s.broker.configure_dead_letters(&channel, config);
    }
    Ok(show_config(&channel))
}

#[derive(Serialize)]
struct Peek<T> {
    topic: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<String>,
    messages: Vec<T>,
}

fn peek_count(params: &Params) -> Result<usize, ApiError> {
    let count = positive(params, "count", "INVALID_ARG_COUNT")?;
    match count {
        None => Ok(PEEK_DEFAULT),
        Some(n) if n <= PEEK_MAX as u64 => Ok(n as usize),
        Some(_) => Err(ApiError::bad_request("INVALID_ARG_COUNT")),
    }
}

/// `GET /topic/peek?topic=…[&count=N]`: what the topic holds while it has no channel (or is
/// paused), first first.
pub(super) async fn topic_peek(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let topic = params
        .get("topic")
        .ok_or(ApiError::bad_request("MISSING_ARG_TOPIC"))?;
    if !proto::wire::names::is_valid_topic_name(topic.as_bytes()) {
        return Err(ApiError::bad_request("INVALID_ARG_TOPIC"));
    }
    let count = peek_count(&params)?;
    let messages = existing_topic(&s, topic)?.peek(count);
    Ok(to_json(&Peek {
        topic: topic.to_string(),
        channel: None,
        messages,
    }))
}

/// `GET /channel/peek?topic=…&channel=…[&count=N]`: the channel's queued messages (not those
/// in flight or deferred), first first.
pub(super) async fn channel_peek(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let (topic, channel) = params.topic_and_channel()?;
    let count = peek_count(&params)?;
    let messages = existing_channel(&s, topic, channel)?.peek(count);
    Ok(to_json(&Peek {
        topic: topic.to_string(),
        channel: Some(channel.to_string()),
        messages,
    }))
}

#[derive(Serialize)]
struct Redriven {
    moved: u64,
    /// Why the redrive stopped early, after moving some.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

fn redrive_error(e: &RedriveError) -> ApiError {
    match e {
        RedriveError::NotDeadLetter { .. } => ApiError::bad_request("NOT_A_DEAD_LETTER"),
        RedriveError::OriginGone { .. } => ApiError::not_found("ORIGIN_CHANNEL_NOT_FOUND"),
        RedriveError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "EXITING"),
        RedriveError::Storage(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR")
        }
    }
}

/// `POST /channel/redrive?topic=…&channel=…[&count=N][&rate=R]`: moves up to `count` messages
/// (by default, all queued now) from the front of a dead-letter topic's channel back into the
/// channels they came from, at most `rate` a second; answers when done.
pub(super) async fn channel_redrive(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let (topic, channel) = params.topic_and_channel()?;
    let count = positive(&params, "count", "INVALID_ARG_COUNT")?;
    let rate = positive(&params, "rate", "INVALID_ARG_RATE")?
        .map(|r| u32::try_from(r).map_err(|_| ApiError::bad_request("INVALID_ARG_RATE")))
        .transpose()?;
    let channel = existing_channel(&s, topic, channel)?;
    match s.broker.redrive(&channel, count, rate).await {
        Ok(moved) => Ok(to_json(&Redriven { moved, error: None })),
        Err((moved, e)) => {
            tracing::warn!(topic = %channel.topic_name, channel = %channel.name, moved, error = %e, "redrive stopped");
            if moved == 0 {
                return Err(redrive_error(&e));
            }
            Ok(to_json(&Redriven {
                moved,
                error: Some(redrive_error(&e).message),
            }))
        }
    }
}
