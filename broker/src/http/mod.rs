//! nsqd's HTTP API on `--http-address` and, with TLS, `--https-address`, plus `/metrics` for
//! Prometheus.
//!
//! Routes, parameters, status codes and error texts follow nsqd 1.3; every V1 response
//! carries `X-NSQ-Content-Type: nsq; version=1.0`. knsq's own endpoints (dead letters) follow
//! the same conventions.

mod admin;
mod dead_letter;
mod node;
mod publish;
mod server;
mod stats_text;

pub(crate) use server::HttpLimits;

use crate::broker::Broker;
use crate::lookup::Lookup;
use crate::metrics::Metrics;
use crate::protocol::Clients;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use server_kit::http::{ApiError, json_response};
use server_kit::process::LogLevelSetter;
use server_kit::tls::server::HttpsListener;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) broker: Arc<Broker>,
    /// The TCP clients, for `/stats`.
    pub(crate) clients: Arc<Clients>,
    /// The lookupd registrations, whose addresses `/config` shows and changes.
    pub(crate) lookup: Arc<Lookup>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) log_level: Arc<Mutex<String>>,
    pub(crate) set_log_level: Option<LogLevelSetter>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/ping", get(node::ping))
        .route("/livez", get(node::livez))
        .route("/readyz", get(node::readyz))
        .route("/drain", get(node::drain_status).post(node::start_drain))
        .route("/info", get(node::info))
        .route("/stats", get(node::stats))
        .route("/metrics", get(node::metrics))
        .route("/config/{opt}", get(node::get_config).put(node::put_config))
        .route("/pub", post(publish::publish))
        .route("/mpub", post(publish::multi_publish))
        .route("/topic/create", post(admin::topic_create))
        .route("/topic/delete", post(admin::topic_delete))
        .route("/topic/empty", post(admin::topic_empty))
        .route("/topic/pause", post(admin::topic_pause))
        .route("/topic/unpause", post(admin::topic_unpause))
        .route("/channel/create", post(admin::channel_create))
        .route("/channel/delete", post(admin::channel_delete))
        .route("/channel/empty", post(admin::channel_empty))
        .route("/channel/pause", post(admin::channel_pause))
        .route("/channel/unpause", post(admin::channel_unpause))
        .route(
            "/channel/config",
            get(dead_letter::get_channel_config).post(dead_letter::set_channel_config),
        )
        .route("/channel/redrive", post(dead_letter::channel_redrive))
        .route("/channel/peek", get(dead_letter::channel_peek))
        .route("/topic/peek", get(dead_letter::topic_peek))
        .fallback(|| async { ApiError::not_found("NOT_FOUND") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED")
        })
        .with_state(state)
}

/// What plain HTTP offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlainHttp {
    /// The API, as over HTTPS.
    Api,
    /// Only nsqd's 403 pointing at the HTTPS port (`--tls-required=true`).
    TlsRequired { https_port: u16 },
}

/// nsqd's answer to every plain-HTTP request while TLS is required, byte for byte (its body
/// is formatted by hand, hence the spaces). A router of only a fallback answers every method
/// and path, as nsqd checks before routing.
fn refuse_plain_http(https_port: u16) -> Router {
    let refusal = move || async move {
        json_response(
            StatusCode::FORBIDDEN,
            format!(r#"{{"message": "TLS_REQUIRED", "https_port": {https_port}}}"#),
        )
    };
    Router::new().fallback(refusal)
}

/// Serves plain HTTP on an already-bound listener until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    plain: PlainHttp,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = match plain {
        PlainHttp::Api => router(state),
        PlainHttp::TlsRequired { https_port } => refuse_plain_http(https_port),
    };
    server::serve(server::PlainListener::new(listener), app, limits, shutdown).await
}

/// Serves the API over HTTPS until `shutdown`.
pub(crate) async fn serve_https(
    listener: HttpsListener,
    state: AppState,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    server::serve(listener, router(state), limits, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use server_kit::http::{NSQ_CONTENT_TYPE, NSQ_V1};
    use tower::ServiceExt;

    #[tokio::test]
    async fn plain_http_is_refused_while_tls_is_required() {
        let app = refuse_plain_http(4152);
        for (method, path) in [("GET", "/ping"), ("POST", "/pub?topic=t"), ("GET", "/nope")] {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap();
            let resp = app.clone().oneshot(request).await.unwrap();
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            assert_eq!(resp.headers()[NSQ_CONTENT_TYPE], NSQ_V1);
            assert_eq!(
                resp.headers()["content-type"],
                "application/json; charset=utf-8"
            );
            let body = to_bytes(resp.into_body(), 1024).await.unwrap();
            assert_eq!(
                &body[..],
                br#"{"message": "TLS_REQUIRED", "https_port": 4152}"#
            );
        }
    }
}
