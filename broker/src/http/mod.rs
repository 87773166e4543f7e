//! nsqd's HTTP API on `--http-address`, plus `/metrics` for Prometheus.
//!
//! Routes, parameters, status codes and error texts follow nsqd 1.3; every V1 response
//! carries `X-NSQ-Content-Type: nsq; version=1.0`.

mod admin;
mod error;
mod node;
mod params;
mod publish;
mod stats_text;

pub use error::{
    ApiError, NSQ_CONTENT_TYPE, NSQ_V1, json_response, metrics_response, text_response,
};
pub use params::Params;

use crate::broker::Broker;
use crate::metrics::Metrics;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Changes the process's log level at runtime (`PUT /config/log_level`).
pub type LogLevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) broker: Arc<Broker>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) log_level: Arc<Mutex<String>>,
    pub(crate) set_log_level: Option<LogLevelSetter>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/ping", get(node::ping))
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
        .fallback(|| async { ApiError::not_found("NOT_FOUND") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED")
        })
        .with_state(state)
}

/// Serves the API on an already-bound listener until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
