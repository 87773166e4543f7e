//! The one error type every HTTP handler returns: nsqd's `{"message": "<TEXT>"}` with a status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The header nsqd sets on every V1 API response; go-nsq unwraps bodies only when it is there.
pub const NSQ_CONTENT_TYPE: &str = "x-nsq-content-type";
pub const NSQ_V1: &str = "nsq; version=1.0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: &'static str,
}

impl ApiError {
    pub const fn new(status: StatusCode, message: &'static str) -> ApiError {
        ApiError { status, message }
    }

    pub const fn bad_request(message: &'static str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub const fn not_found(message: &'static str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "message": self.message }).to_string();
        json_response(self.status, body)
    }
}

/// A V1 JSON response.
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(NSQ_CONTENT_TYPE, HeaderValue::from_static(NSQ_V1));
    resp
}

/// A V1 text (or empty) success response: the body as is, with the V1 header.
pub fn text_response(body: impl Into<String>) -> Response {
    let mut resp = (StatusCode::OK, body.into()).into_response();
    resp.headers_mut().remove(header::CONTENT_TYPE);
    resp.headers_mut()
        .insert(NSQ_CONTENT_TYPE, HeaderValue::from_static(NSQ_V1));
    resp
}

/// `/metrics`: the Prometheus text exposition, or a bare 500 when rendering failed.
pub fn metrics_response(rendered: Result<String, prometheus::Error>) -> Response {
    match rendered {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
