//! `/pub` and `/mpub`.

use super::AppState;
use crate::queue::PublishError;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use proto::wire::names::is_valid_topic_name;
use server_kit::http::Params;
use server_kit::http::{ApiError, text_response};
use std::time::Duration;

const MSG_TOO_BIG: ApiError = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "MSG_TOO_BIG");
const BODY_TOO_BIG: ApiError = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_BIG");

const BODY_TIMEOUT: ApiError = ApiError::new(StatusCode::REQUEST_TIMEOUT, "BODY_TIMEOUT");

/// Reads a body of at most `limit` bytes within `--http-body-timeout`; a declared or actual
/// larger one is `too_big`, a slower one 408 `BODY_TIMEOUT`.
async fn read_body(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    too_big: ApiError,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_big);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let timeout = s.broker.options.http_body_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(read) => read.map_err(|_| too_big),
        Err(_) => Err(BODY_TIMEOUT),
    }
}

/// The `topic` parameter, validated as for publishing.
fn topic_param(params: &Params) -> Result<&str, ApiError> {
    let topic = params
        .get("topic")
        .ok_or(ApiError::bad_request("MISSING_ARG_TOPIC"))?;
    if !is_valid_topic_name(topic.as_bytes()) {
        return Err(ApiError::bad_request("INVALID_TOPIC"));
    }
    Ok(topic)
}

/// 503 `EXITING` while the topic goes away, as nsqd; 500 when the disk write failed.
fn publish_failed(e: PublishError) -> ApiError {
    tracing::warn!(error = %e, "HTTP publish refused");
    match e {
        PublishError::Exiting => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "EXITING"),
        // knsq: the broker is leaving the cluster; publish to another one.
        PublishError::Draining => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "DRAINING"),
        PublishError::Storage(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR")
        }
    }
}

pub(super) async fn publish(
    State(s): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let o = &s.broker.options;
    let body = read_body(&s, &headers, body, o.max_msg_size, MSG_TOO_BIG).await?;
    if body.is_empty() {
        return Err(ApiError::bad_request("MSG_EMPTY"));
    }
    let params = Params::parse(query.as_deref())?;
    let topic = topic_param(&params)?;
    let mut defer = Duration::ZERO;
    if let Some(ms) = params.get("defer") {
        let invalid = || ApiError::bad_request("INVALID_DEFER");
        let ms: i64 = ms.parse().map_err(|_| invalid())?;
        defer = u64::try_from(ms)
            .map(Duration::from_millis)
            .map_err(|_| invalid())?;
        if defer > o.max_req_timeout {
            return Err(invalid());
        }
    }
    s.broker.prepare_topic(topic).await; // lookupd hook: a new topic gets its known channels
    s.broker
        .publish(topic, &[body], defer)
        .map_err(publish_failed)?;
    durable(&s).await
}

pub(super) async fn multi_publish(
    State(s): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let o = &s.broker.options;
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > o.max_body_size)
    {
        return Err(BODY_TOO_BIG);
    }
    let params = Params::parse(query.as_deref())?;
    let topic = topic_param(&params)?;
    let body = read_body(&s, &headers, body, o.max_body_size, BODY_TOO_BIG).await?;
    // nsqd 1.3: `binary` of false/0 means text; any other value, or none given, as below.
    let binary = match params.get("binary") {
        None | Some("false") | Some("0") => false,
        Some(_) => true,
    };
    let messages = if binary {
        proto::wire::split_mpub_messages(&body, &o.wire_limits()).map_err(|e| {
            let text = if e.code == proto::wire::ErrorCode::BadBody {
                "BAD_BODY"
            } else {
                "BAD_MESSAGE"
            };
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, text)
        })?
    } else {
        split_lines(&body, o.max_msg_size)?
    };
    s.broker.prepare_topic(topic).await; // lookupd hook: a new topic gets its known channels
    s.broker
        .publish(topic, &messages, Duration::ZERO)
        .map_err(publish_failed)?;
    durable(&s).await
}

/// `OK` once the publish is durable (at once unless `--sync-publish`).
async fn durable(s: &AppState) -> Result<Response, ApiError> {
    if !s.broker.published_durably().await {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
        ));
    }
    Ok(text_response("OK"))
}

/// Text `/mpub`: one message per line; empty lines are dropped, as in nsqd.
fn split_lines(body: &Bytes, max_msg_size: u64) -> Result<Vec<Bytes>, ApiError> {
    let mut messages = Vec::new();
    let mut start = 0;
    for end in body
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .chain(std::iter::once(body.len()))
    {
        if end > start {
            if (end - start) as u64 > max_msg_size {
                return Err(MSG_TOO_BIG);
            }
            messages.push(body.slice(start..end));
        }
        start = end + 1;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_mpub_drops_empty_lines_and_checks_sizes() {
        let body = Bytes::from_static(b"a\n\nbc\n");
        assert_eq!(
            split_lines(&body, 10).unwrap(),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
        );
        assert_eq!(
            split_lines(&Bytes::from_static(b"abc"), 2).unwrap_err(),
            MSG_TOO_BIG
        );
        assert!(split_lines(&Bytes::new(), 2).unwrap().is_empty());
    }
}
