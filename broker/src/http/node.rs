//! `/ping`, `/info`, `/stats`, `/config/:opt` and `/metrics`.

use super::AppState;
use super::stats_text::render_stats;
use crate::config::NSQ_COMPAT_VERSION;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use server_kit::http::Params;
use server_kit::http::{ApiError, json_response, metrics_response, text_response};

/// `OK`, or 500 `NOK - <reason>` while disk writes fail, as nsqd.
pub(super) async fn ping(State(s): State<AppState>) -> Response {
    match s.broker.settings.health.problem() {
        None => "OK".into_response(),
        Some(reason) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("NOK - {reason}")).into_response()
        }
    }
}

/// knsq: liveness — the process serves HTTP. Never fails for disk trouble (that is `/ping`).
pub(super) async fn livez() -> Response {
    "OK".into_response()
}

/// knsq: readiness — 200 `OK` while the broker takes new clients, 503 while it drains or
/// stops, so that a load balancer (a Kubernetes Service) sends clients elsewhere.
pub(super) async fn readyz(State(s): State<AppState>) -> Response {
    if s.broker.is_ready() {
        return "OK".into_response();
    }
    let why = if s.broker.is_draining() {
        "draining"
    } else {
        "stopping"
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("NOT READY - {why}"),
    )
        .into_response()
}

/// What `GET /drain` and `POST /drain` answer.
#[derive(Serialize)]
struct Drain {
    draining: bool,
    #[serde(flatten)]
    status: crate::broker::DrainStatus,
}

fn drain_response(s: &AppState) -> Response {
    to_json(&Drain {
        draining: s.broker.is_draining(),
        status: s.broker.drain_status(),
    })
}

/// knsq: `GET /drain`: whether the broker drains, and how far it got.
pub(super) async fn drain_status(State(s): State<AppState>) -> Response {
    drain_response(&s)
}

/// knsq: `POST /drain`: starts draining (idempotent; a drain cannot be cancelled).
pub(super) async fn start_drain(State(s): State<AppState>) -> Response {
    s.broker.start_drain();
    drain_response(&s)
}

#[derive(Serialize)]
struct Info<'a> {
    version: &'static str,
    broadcast_address: &'a str,
    hostname: String,
    http_port: u16,
    tcp_port: u16,
    start_time: i64,
    max_heartbeat_interval: u64,
    max_output_buffer_size: u64,
    max_output_buffer_timeout: u64,
    max_deflate_level: u8,
    topology_zone: &'a str,
    topology_region: &'a str,
    /// knsq only, and only while draining.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    draining: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_remaining_messages: Option<u64>,
}

pub(super) fn to_json(value: &impl Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR").into_response()
        }
    }
}

pub(super) async fn info(State(s): State<AppState>) -> Response {
    let b = &s.broker;
    let o = &b.options;
    to_json(&Info {
        version: NSQ_COMPAT_VERSION,
        broadcast_address: &o.broadcast_address,
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        http_port: b.http_address.port(),
        tcp_port: b.tcp_address.port(),
        start_time: b.start_time,
        max_heartbeat_interval: o.max_heartbeat_interval.as_nanos() as u64,
        max_output_buffer_size: o.max_output_buffer_size,
        max_output_buffer_timeout: o.max_output_buffer_timeout.as_nanos() as u64,
        max_deflate_level: 6,
        topology_zone: &o.topology_zone,
        topology_region: &o.topology_region,
        draining: b.is_draining(),
        drain_remaining_messages: b.is_draining().then(|| b.drain_status().remaining_messages),
    })
}

/// nsqd's boolean parameters: true/1 and false/0; anything else means the default.
fn bool_param(params: &Params, key: &str, default: bool) -> bool {
    match params.get(key) {
        Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        _ => default,
    }
}

pub(super) async fn stats(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(q.as_deref())?;
    let nonempty = |k| params.get(k).filter(|v| !v.is_empty());
    let stats = s.broker.stats(
        nonempty("topic"),
        nonempty("channel"),
        bool_param(&params, "include_clients", true),
        bool_param(&params, "include_mem", true),
        |topic| s.clients.producers(topic),
    );
    if params.get("format") == Some("json") {
        return Ok(to_json(&stats));
    }
    Ok(text_response(render_stats(&stats)))
}

pub(super) async fn get_config(
    State(s): State<AppState>,
    Path(opt): Path<String>,
) -> Result<Response, ApiError> {
    config_value(&s, &opt)
}

fn config_value(s: &AppState, opt: &str) -> Result<Response, ApiError> {
    if opt == "log_level" {
        let level = s
            .log_level
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        return Ok(to_json(&level));
    }
    if opt == "drain" {
        return Ok(to_json(&s.broker.is_draining()));
    }
    if opt == "nsqlookupd_tcp_addresses" {
        // Changeable at runtime: the lookupd registrations hold the current list.
        return Ok(to_json(&s.lookup.addresses()));
    }
    s.broker
        .options
        .config_value(opt)
        .map(|v| to_json(&v))
        .ok_or(ApiError::bad_request("INVALID_OPTION"))
}

pub(super) async fn put_config(
    State(s): State<AppState>,
    Path(opt): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let invalid_value = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "INVALID_VALUE");
    let limit = usize::try_from(s.broker.options.max_msg_size).unwrap_or(usize::MAX);
    let body = to_bytes(body, limit)
        .await
        .map_err(|_| invalid_value.clone())?;
    if opt == "drain" {
        // As nsqio/nsq#1302 plans it: `true`, or nothing; a drain cannot be cancelled.
        if !(body.trim_ascii().is_empty() || body.trim_ascii() == b"true") {
            return Err(ApiError::bad_request("INVALID_VALUE"));
        }
        s.broker.start_drain();
        return config_value(&s, &opt);
    }
    if body.is_empty() {
        return Err(invalid_value);
    }
    match opt.as_str() {
        "log_level" => {
            let level = std::str::from_utf8(&body)
                .ok()
                .map(|l| l.trim().to_ascii_lowercase())
                .filter(|l| matches!(l.as_str(), "debug" | "info" | "warn" | "error" | "fatal"))
                .ok_or(ApiError::bad_request("INVALID_VALUE"))?;
            if let Some(set) = &s.set_log_level {
                set(&level).map_err(|_| ApiError::bad_request("INVALID_VALUE"))?;
            }
            *s.log_level.lock().unwrap_or_else(|e| e.into_inner()) = level;
        }
        "nsqlookupd_tcp_addresses" => {
            // A JSON array of strings, as nsqd decodes into its option; `null` empties it.
            let addresses: Option<Vec<String>> = serde_json::from_slice(&body)
                .map_err(|_| ApiError::bad_request("INVALID_VALUE"))?;
            s.lookup.set_addresses(addresses.unwrap_or_default());
        }
        _ => return Err(ApiError::bad_request("INVALID_OPTION")),
    }
    config_value(&s, &opt)
}

pub(super) async fn metrics(State(s): State<AppState>) -> Response {
    metrics_response(s.metrics.render())
}
