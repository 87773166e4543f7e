//! Authorization through nsqd-style auth servers (`--auth-http-address`).
//!
//! A client's `AUTH <secret>` is sent to an auth server, which answers with the topics and
//! channels the secret may publish to and subscribe to, for a TTL ([`AuthState`]). The
//! connection checks SUB, PUB, MPUB and DPUB against that answer and asks again once the TTL
//! is over. Requests are bounded by `--http-client-connect-timeout` and
//! `--http-client-request-timeout`, so an unreachable auth server fails a client quickly.

mod authorizations;

pub(crate) use authorizations::{AuthState, Permission};

use crate::config::{ConfigError, Options};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::{Instant, timeout};

/// The largest auth-server response read; a real one is a few hundred bytes.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Why a query to the auth servers failed. Clients only ever see `E_AUTH_FAILED AUTH failed`;
/// this goes to the log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("cannot build the request: {0}")]
    Request(#[source] hyper::http::Error),
    #[error("request failed: {}", chain(.0))]
    Http(#[source] hyper_util::client::legacy::Error),
    #[error("cannot read the response: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("no response within {0:?} (--http-client-request-timeout)")]
    Timeout(Duration),
    #[error("got response {status} {body:?}")]
    Status { status: StatusCode, body: String },
    #[error("cannot decode the response: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("unknown permission {0}")]
    UnknownPermission(String),
    #[error("unable to compile {what} {pattern:?} {source}")]
    BadRegex {
        what: &'static str,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("invalid TTL {0} (must be >0)")]
    BadTtl(i64),
    /// Every server was tried; one entry per server, in the order tried.
    #[error("{}", Failures(.0))]
    AllFailed(Vec<(Uri, AuthError)>),
}

/// An error with its sources, `outer: inner: …` (hyper's own text hides the cause, such as a
/// refused connection).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

struct Failures<'a>(&'a [(Uri, AuthError)]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (uri, e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "failed to auth against {uri} - {e}")?;
        }
        Ok(())
    }
}

/// How the auth servers are asked (`--auth-http-request-method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestMethod {
    /// The fields in the query string.
    Get,
    /// The fields as an `application/x-www-form-urlencoded` body.
    Post,
}

/// What the auth server is told about a client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Query<'a> {
    pub(crate) remote_ip: IpAddr,
    pub(crate) tls: bool,
    pub(crate) secret: &'a [u8],
    pub(crate) common_name: &'a str,
}

/// The configured auth servers and the HTTP client that asks them.
#[derive(Debug)]
pub(crate) struct AuthServers {
    endpoints: Vec<Uri>,
    method: RequestMethod,
    request_timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AuthServers {
    /// The auth servers `--auth-http-address` names; `None` when auth is off.
    pub(crate) fn from_options(o: &Options) -> Result<Option<AuthServers>, ConfigError> {
        let Some((endpoints, method)) = settings(o)? else {
            return Ok(None);
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(o.http_client_connect_timeout));
        connector.set_nodelay(true);
        Ok(Some(AuthServers {
            endpoints,
            method,
            request_timeout: o.http_client_request_timeout,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }))
    }

    /// Asks the servers in turn, starting at a random one, until one gives a valid answer.
    pub(crate) async fn query(&self, q: Query<'_>) -> Result<AuthState, AuthError> {
        let n = self.endpoints.len();
        let start = fastrand::usize(..n);
        let mut failures = Vec::new();
        for i in 0..n {
            let uri = &self.endpoints[(start + i) % n];
            match self.query_one(uri, &q).await {
                Ok(state) => return Ok(state),
                Err(e) => failures.push((uri.clone(), e)),
            }
        }
        Err(AuthError::AllFailed(failures))
    }

    async fn query_one(&self, uri: &Uri, q: &Query<'_>) -> Result<AuthState, AuthError> {
        let fields = form_fields(q);
        let request = match self.method {
            RequestMethod::Get => {
                let separator = if uri.query().is_some() { '&' } else { '?' };
                Request::get(format!("{uri}{separator}{fields}")).body(Full::default())
            }
            RequestMethod::Post => Request::builder()
                .method(Method::POST)
                .uri(uri)
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(fields))),
        };
        let mut request = request.map_err(AuthError::Request)?;
        request.headers_mut().insert(
            ACCEPT,
            HeaderValue::from_static("application/vnd.nsq; version=1.0"),
        );
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(AuthError::Http)?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(AuthError::Body)?
                .to_bytes();
            Ok::<_, AuthError>((status, body))
        };
        let (status, body) = timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| AuthError::Timeout(self.request_timeout))??;
        if status != StatusCode::OK {
            return Err(AuthError::Status {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        AuthState::parse(&body, Instant::now())
    }
}

/// Checks the auth flags without building a client.
pub(crate) fn check_options(o: &Options) -> Result<(), ConfigError> {
    settings(o).map(|_| ())
}

/// The endpoints and method the flags give; `None` when no auth server is configured.
fn settings(o: &Options) -> Result<Option<(Vec<Uri>, RequestMethod)>, ConfigError> {
    if o.auth_http_addresses.is_empty() {
        return Ok(None);
    }
    let endpoints = o
        .auth_http_addresses
        .iter()
        .map(|a| {
            endpoint(a).map_err(|reason| ConfigError {
                flag: "auth-http-address",
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let method = match o.auth_http_request_method.as_str() {
        "get" => RequestMethod::Get,
        "post" => RequestMethod::Post,
        other => {
            return Err(ConfigError {
                flag: "auth-http-request-method",
                reason: format!("{other:?} is not get or post"),
            });
        }
    };
    Ok(Some((endpoints, method)))
}

/// An `--auth-http-address` as a URL: `host:port` means `http://host:port/auth`; anything
/// with `://` is used as given.
fn endpoint(address: &str) -> Result<Uri, String> {
    let address = address.trim();
    if address.is_empty() {
        return Err("an empty address".into());
    }
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}/auth")
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{address:?} is not a host:port or URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(uri),
        Some("https") => Err(format!(
            "{address:?}: HTTPS auth servers need TLS, which knsq-broker does not support yet; use http://"
        )),
        _ => Err(format!("{address:?} is not a host:port or http:// URL")),
    }
}

/// The request fields in Go's `url.Values.Encode` form: sorted by name, query-escaped.
fn form_fields(q: &Query<'_>) -> String {
    let mut out = String::new();
    let remote_ip = q.remote_ip.to_string();
    let fields: [(&str, &[u8]); 4] = [
        ("common_name", q.common_name.as_bytes()),
        ("remote_ip", remote_ip.as_bytes()),
        ("secret", q.secret),
        ("tls", if q.tls { b"true" } else { b"false" }),
    ];
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        query_escape(value, &mut out);
    }
    out
}

/// Go's `url.QueryEscape`: unreserved bytes as they are, space as `+`, the rest `%XX`.
fn query_escape(value: &[u8], out: &mut String) {
    for &b in value {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_host_port_or_urls() {
        assert_eq!(
            endpoint("127.0.0.1:4181").unwrap().to_string(),
            "http://127.0.0.1:4181/auth"
        );
        assert_eq!(
            endpoint("auth.example:80").unwrap().to_string(),
            "http://auth.example:80/auth"
        );
        assert_eq!(
            endpoint("http://auth.example:8080/v1/check?realm=x")
                .unwrap()
                .to_string(),
            "http://auth.example:8080/v1/check?realm=x"
        );
        let err = endpoint("https://auth.example/auth").unwrap_err();
        assert!(err.contains("TLS"), "{err}");
        assert!(endpoint("").is_err());
        assert!(endpoint("ftp://auth.example/x").is_err());
        assert!(endpoint("not a host").is_err());
    }

    #[test]
    fn fields_are_encoded_as_go_does() {
        let q = Query {
            remote_ip: "10.0.0.7".parse().unwrap(),
            tls: false,
            secret: b"s3cr&t =/~",
            common_name: "",
        };
        assert_eq!(
            form_fields(&q),
            "common_name=&remote_ip=10.0.0.7&secret=s3cr%26t+%3D%2F~&tls=false"
        );
        let q = Query {
            remote_ip: "::1".parse().unwrap(),
            tls: true,
            secret: &[0xff, b'a'],
            common_name: "cn",
        };
        assert_eq!(
            form_fields(&q),
            "common_name=cn&remote_ip=%3A%3A1&secret=%FFa&tls=true"
        );
    }

    #[test]
    fn options_choose_the_method_and_endpoints() {
        let mut o = Options::for_tests(".");
        assert!(AuthServers::from_options(&o).unwrap().is_none());
        o.auth_http_addresses = vec!["127.0.0.1:1".into(), "http://h:2/a".into()];
        let servers = AuthServers::from_options(&o).unwrap().unwrap();
        assert_eq!(servers.method, RequestMethod::Get);
        assert_eq!(servers.endpoints.len(), 2);
        o.auth_http_request_method = "post".into();
        let servers = AuthServers::from_options(&o).unwrap().unwrap();
        assert_eq!(servers.method, RequestMethod::Post);
        o.auth_http_request_method = "put".into();
        let err = AuthServers::from_options(&o).unwrap_err();
        assert_eq!(err.flag, "auth-http-request-method");
        o.auth_http_request_method = "get".into();
        o.auth_http_addresses = vec!["https://h/auth".into()];
        let err = AuthServers::from_options(&o).unwrap_err();
        assert_eq!(err.flag, "auth-http-address");
    }
}
