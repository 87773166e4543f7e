//! `/topic/*` and `/channel/*`: create, delete, empty, pause, unpause.

use super::AppState;
use crate::queue::{Channel, Topic};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use proto::wire::names::is_valid_topic_name;
use server_kit::http::Params;
use server_kit::http::{ApiError, text_response};
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
    let (topic, channel) = params.topic_and_channel()?;
    Ok((existing_topic(s, topic)?, channel.to_string()))
}

fn existing_channel(s: &AppState, query: &Option<String>) -> Result<Arc<Channel>, ApiError> {
    let (topic, channel) = topic_and_channel(s, query)?;
    topic
        .existing_channel(&channel)
        .ok_or(ApiError::not_found("CHANNEL_NOT_FOUND"))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "admin request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR")
}

/// knsq: a draining broker takes no new topics or channels.
fn refuse_while_draining(s: &AppState) -> Result<(), ApiError> {
    if s.broker.is_draining() {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "DRAINING",
        ));
    }
    Ok(())
}

pub(super) async fn topic_create(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let topic = topic_arg(&q, true)?;
    if s.broker.existing_topic(&topic).is_none() {
        refuse_while_draining(&s)?;
    }
    s.broker.prepare_topic(&topic).await; // lookupd hook: a new topic gets its known channels
    s.broker.topic(&topic).map_err(internal)?;
    done()
}

pub(super) async fn topic_delete(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    if !s.broker.delete_topic(&topic_arg(&q, false)?) {
        return Err(ApiError::not_found("TOPIC_NOT_FOUND"));
    }
    done()
}

pub(super) async fn topic_empty(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_topic(&s, &topic_arg(&q, true)?)?
        .empty()
        .map_err(internal)?;
    done()
}

pub(super) async fn topic_pause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let topic = existing_topic(&s, &topic_arg(&q, false)?)?;
    s.broker.set_topic_paused(&topic, true);
    done()
}

pub(super) async fn topic_unpause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let topic = existing_topic(&s, &topic_arg(&q, false)?)?;
    s.broker.set_topic_paused(&topic, false);
    done()
}

pub(super) async fn channel_create(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let (topic, channel) = topic_and_channel(&s, &q)?;
    if topic.existing_channel(&channel).is_none() {
        refuse_while_draining(&s)?;
    }
    s.broker
        .create_channel(&topic, &channel)
        .map_err(internal)?
        .ok_or(ApiError::not_found("TOPIC_NOT_FOUND"))?;
    done()
}

pub(super) async fn channel_delete(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    let (topic, channel) = topic_and_channel(&s, &q)?;
    if !s.broker.delete_channel(&topic, &channel) {
        return Err(ApiError::not_found("CHANNEL_NOT_FOUND"));
    }
    done()
}

pub(super) async fn channel_empty(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    existing_channel(&s, &q)?.empty().map_err(internal)?;
    done()
}

pub(super) async fn channel_pause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    set_channel_paused(&s, &q, true)
}

pub(super) async fn channel_unpause(State(s): State<AppState>, RawQuery(q): RawQuery) -> Reply {
    set_channel_paused(&s, &q, false)
}

fn set_channel_paused(s: &AppState, q: &Option<String>, paused: bool) -> Reply {
    let (topic, channel) = topic_and_channel(s, q)?;
    if !s.broker.set_channel_paused(&topic, &channel, paused) {
        return Err(ApiError::not_found("CHANNEL_NOT_FOUND"));
    }
    done()
}
