//! nsqlookupd's HTTP API on `--http-address`, plus `/metrics` for Prometheus.
//!
//! Routes, parameters, JSON shapes, status codes and error texts follow nsqlookupd 1.3; every
//! V1 response carries `X-NSQ-Content-Type: nsq; version=1.0`, without which go-nsq would not
//! read the body. The response helpers and the error type are server-kit's (nsqd and
//! nsqlookupd share these conventions).

mod admin;
mod read;

use crate::directory::Directory;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use server_kit::http::ApiError;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub(crate) fn router(directory: Arc<Directory>) -> Router {
    Router::new()
        .route("/ping", get(read::ping))
        .route("/info", get(read::info))
        .route("/debug", get(read::debug))
        .route("/lookup", get(read::lookup))
        .route("/topics", get(read::topics))
        .route("/channels", get(read::channels))
        .route("/nodes", get(read::nodes))
        .route("/metrics", get(read::metrics))
        .route("/topic/create", post(admin::topic_create))
        .route("/topic/delete", post(admin::topic_delete))
        .route("/channel/create", post(admin::channel_create))
        .route("/channel/delete", post(admin::channel_delete))
        .route("/topic/tombstone", post(admin::topic_tombstone))
        .fallback(|| async { ApiError::not_found("NOT_FOUND") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED")
        })
        .layer(middleware::from_fn_with_state(directory.clone(), measure))
        .with_state(directory)
}

/// Counts and times every request by route (unknown paths share one label).
async fn measure(
    State(directory): State<Arc<Directory>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    directory
        .metrics
        .http_request(&route, response.status().as_u16(), started.elapsed());
    response
}

/// Serves the API on an already-bound listener until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    directory: Arc<Directory>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(directory))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests;
