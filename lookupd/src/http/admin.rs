//! The administration endpoints: `/topic/create`, `/topic/delete`, `/channel/create`,
//! `/channel/delete`, `/topic/tombstone`.

use super::read::topic_param;
use crate::directory::Directory;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use proto::wire::names::is_valid_topic_name;
use server_kit::http::{ApiError, Params, text_response};
use std::sync::Arc;
use std::time::SystemTime;

type Reply = Result<Response, ApiError>;

fn done() -> Reply {
    Ok(text_response(""))
}

pub(super) async fn topic_create(State(d): State<Arc<Directory>>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let topic = topic_param(&params)?;
    if !is_valid_topic_name(topic.as_bytes()) {
        return Err(ApiError::bad_request("INVALID_ARG_TOPIC"));
    }
    tracing::info!(topic, "DB: adding topic");
    d.update(|r| r.create_topic(topic));
    done()
}

/// No validation and no 404, as in nsqlookupd.
pub(super) async fn topic_delete(State(d): State<Arc<Directory>>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let topic = topic_param(&params)?;
    tracing::info!(topic, "DB: removing topic");
    d.update(|r| r.delete_topic(topic));
    done()
}

pub(super) async fn channel_create(
    State(d): State<Arc<Directory>>,
    RawQuery(q): RawQuery,
) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let (topic, channel) = params.topic_and_channel()?;
    tracing::info!(topic, channel, "DB: adding channel");
    d.update(|r| r.create_channel(topic, channel));
    done()
}

pub(super) async fn channel_delete(
    State(d): State<Arc<Directory>>,
    RawQuery(q): RawQuery,
) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let (topic, channel) = params.topic_and_channel()?;
    if !d.update(|r| r.delete_channel(topic, channel)) {
        return Err(ApiError::not_found("CHANNEL_NOT_FOUND"));
    }
    tracing::info!(topic, channel, "DB: removed channel");
    done()
}

/// `node` is `<broadcast_address>:<http_port>` of the producer to hide from `/lookup`.
pub(super) async fn topic_tombstone(
    State(d): State<Arc<Directory>>,
    RawQuery(q): RawQuery,
) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let topic = topic_param(&params)?;
    let node = params
        .get("node")
        .ok_or(ApiError::bad_request("MISSING_ARG_NODE"))?;
    let count = d.update(|r| r.tombstone(topic, node, SystemTime::now()));
    tracing::info!(topic, node, count, "DB: setting tombstone for producer");
    done()
}
