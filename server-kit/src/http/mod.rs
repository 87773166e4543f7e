//! nsqd's HTTP API conventions, which nsqlookupd shares: the one error type handlers return,
//! V1 responses with `X-NSQ-Content-Type`, and query strings parsed as strictly as Go does.

mod error;
mod params;

pub use error::{
    ApiError, NSQ_CONTENT_TYPE, NSQ_V1, json_response, metrics_response, text_response,
};
pub use params::Params;
