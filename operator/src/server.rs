//! The operator's HTTP server: `/metrics`, `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AppState {
    registry: Registry,
    ready: Arc<AtomicBool>,
}

/// The routes; `ready` turns `/readyz` green once the operator has reached the API server.
pub fn router(registry: Registry, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, ready })
}

/// Serve on an already-bound listener until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("utf8"))
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let registry = Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).expect("register");
        metrics.failed("Conflict");
        let ready = Arc::new(AtomicBool::new(false));
        let router = router(registry, ready.clone());
        assert_eq!(
            get(&router, "/healthz").await,
            (StatusCode::OK, "ok".to_owned())
        );
        assert_eq!(
            get(&router, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, "not ready".to_owned())
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(
            get(&router, "/readyz").await,
            (StatusCode::OK, "ok".to_owned())
        );
        let (status, body) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.lines()
                .any(|l| l == "knsq_operator_reconcile_errors_total{reason=\"Conflict\"} 1"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn serves_on_a_bound_listener_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run(
            listener,
            router(Registry::new(), Arc::default()),
            shutdown.clone(),
        ));
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        shutdown.cancel();
        server.await.expect("join").expect("clean shutdown");
    }
}
