//! `/topic/*` and `/channel/*`: create, delete, empty, pause, unpause.

use super::AppState;
use super::error::{ApiError, text_response};
use super::params::Params;
use crate::queue::{Channel, Topic};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use proto::wire::names::{is_valid_channel_name, is_valid_topic_name};
use std::sync::Arc;

type Reply = Result<Response, ApiError>;

fn done() -> Reply {
    Ok(text_response(""))
}

/// nsqd's topic-only endpoints differ in whether they validate the name first.
fn topic_arg(query: &Option<String>, validate: bool) -> Result<String, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let topic = params
        .get("topic")
        .ok_or(ApiError::bad_request("MISSING_ARG_TOPIC"))?;
    if validate && !is_valid_topic_name(topic.as_bytes()) {
        return Err(ApiError::bad_request("INVALID_TOPIC"));
    }
    Ok(topic.to_string())
}

fn existing_topic(s: &AppState, name: &str) -> Result<Arc<Topic>, ApiError> {
    s.broker
        .existing_topic(name)
        .ok_or(ApiError::not_found("TOPIC_NOT_FOUND"))
}

/// `topic` and `channel`, both validated, and the topic, which must exist.
fn topic_and_channel(
    s: &AppState,
    query: &Option<String>,
) -> Result<(Arc<Topic>, String), ApiError> {
    let params = Params::parse(query.as_deref())?;
    let topic = params
        .get("topic")
        .ok_or(ApiError::bad_request("MISSING_ARG_TOPIC"))?;
    if !is_valid_topic_name(topic.as_bytes()) {
        return Err(ApiError::bad_request("INVALID_ARG_TOPIC"));
    }
    let channel = params
        .get("channel")
        .ok_or(ApiError::bad_request("MISSING_ARG_CHANNEL"))?;
    if !is_valid_channel_name(channel.as_bytes()) {
        return Err(ApiError::bad_request("INVALID_ARG_CHANNEL"));
    }
    Ok((existing_topic(s, topic)?, channel.to_string()))
}

fn existing_channel(s: &AppState, query: &Option<String>) -> Result<Arc<Channel>, ApiError> {
    let (topic, channel) = topic_and_channel(s, query)?;
    topic
        .existing_channel(&channel)
        .ok_or(ApiError::not_found("CHANNEL_NOT_FOUND"))
}

pub(super) async fn topic_create(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    s.broker.topic(&topic_arg(&q, true)?);
    done()
}

pub(super) async fn topic_delete(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    if !s.broker.delete_topic(&topic_arg(&q, false)?) {
        return Err(ApiError::not_found("TOPIC_NOT_FOUND"));
    }
    done()
}

pub(super) async fn topic_empty(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_topic(&s, &topic_arg(&q, true)?)?.empty();
    done()
}

pub(super) async fn topic_pause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_topic(&s, &topic_arg(&q, false)?)?.set_paused(true);
    done()
}

pub(super) async fn topic_unpause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_topic(&s, &topic_arg(&q, false)?)?.set_paused(false);
    done()
}

pub(super) async fn channel_create(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let (topic, channel) = topic_and_channel(&s, &q)?;
    topic
        .channel(&channel)
        .ok_or(ApiError::not_found("TOPIC_NOT_FOUND"))?;
    done()
}

pub(super) async fn channel_delete(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let (topic, channel) = topic_and_channel(&s, &q)?;
    if !topic.delete_channel(&channel) {
        return Err(ApiError::not_found("CHANNEL_NOT_FOUND"));
    }
    done()
}

pub(super) async fn channel_empty(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_channel(&s, &q)?.empty();
    done()
}

pub(super) async fn channel_pause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_channel(&s, &q)?.set_paused(true);
    done()
}

pub(super) async fn channel_unpause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_channel(&s, &q)?.set_paused(false);
    done()
}
