//! Authorization through nsqd-style auth servers (`--auth-http-address`).
//!
//! A client's `AUTH <secret>` is sent to an auth server, which answers with the topics and
//! channels the secret may publish to and subscribe to, for a TTL ([`AuthState`]). The
//! connection checks SUB, PUB, MPUB and DPUB against that answer and asks again once the TTL
//! is over. Requests are bounded by `--http-client-connect-timeout` and
//! `--http-client-request-timeout`, so an unreachable auth server fails a client quickly.
//! `https://` servers are reached over TLS ([`server_kit::tls::client`]).

mod authorizations;

pub(crate) use authorizations::{AuthState, Permission};

use crate::config::{AuthSettings, RequestMethod};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use server_kit::tls::client::HttpsConnector;
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
    #[error("request failed: {}", server_kit::with_sources(.0))]
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
    client: Client<HttpsConnector, Full<Bytes>>,
}

impl AuthServers {
    /// The client for the auth servers of checked options.
    pub(crate) fn new(settings: &AuthSettings) -> AuthServers {
        let connector = HttpsConnector::new(settings.connect_timeout, settings.tls.clone());
        AuthServers {
            endpoints: settings.endpoints.clone(),
            method: settings.method,
            request_timeout: settings.request_timeout,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
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
    use crate::config::{ConfigError, Options};

    /// The auth servers of `o`, through the flags' checks as the broker starts them.
    fn from_options(o: &Options) -> Result<Option<AuthServers>, ConfigError> {
        Ok(o.validate()?.auth.as_ref().map(AuthServers::new))
    }

    fn check_options(o: &Options) -> Result<(), ConfigError> {
        from_options(o).map(drop)
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
        assert!(from_options(&o).unwrap().is_none());
        o.auth_http_addresses = vec!["127.0.0.1:1".into(), "http://h:2/a".into()];
        let servers = from_options(&o).unwrap().unwrap();
        assert_eq!(servers.method, RequestMethod::Get);
        assert_eq!(servers.endpoints.len(), 2);
        o.auth_http_request_method = "post".into();
        let servers = from_options(&o).unwrap().unwrap();
        assert_eq!(servers.method, RequestMethod::Post);
        o.auth_http_request_method = "put".into();
        let err = from_options(&o).unwrap_err();
        assert_eq!(err.flag, "auth-http-request-method");
    }

    /// A server on 127.0.0.1 that never answers a request: with `tls`, it first shows a
    /// self-signed certificate for `localhost`; without, it does not even start TLS.
    async fn unhelpful_server(tls: bool) -> std::net::SocketAddr {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config =
            rustls::ServerConfig::builder_with_provider(server_kit::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Plain connections stay open, unread, until the test ends.
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                if tls {
                    tokio::spawn(acceptor.clone().accept(stream));
                } else {
                    held.push(stream);
                }
            }
        });
        addr
    }

    /// Options asking the https auth server at `addr` and trusting a CA written to `dir`
    /// that signed nothing the servers show.
    fn https_options(dir: &std::path::Path, addr: std::net::SocketAddr) -> Options {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, params.self_signed(&key).unwrap().pem()).unwrap();
        let mut o = Options::for_tests(dir);
        o.tls.tls_root_ca_file = Some(ca_file);
        o.auth_http_addresses = vec![format!("https://localhost:{}/auth", addr.port())];
        o
    }

    fn query() -> Query<'static> {
        Query {
            remote_ip: "127.0.0.1".parse().unwrap(),
            tls: false,
            secret: b"s",
            common_name: "",
        }
    }

    #[tokio::test]
    async fn untrusted_certificates_fail_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let o = https_options(dir.path(), unhelpful_server(true).await);
        let servers = from_options(&o).unwrap().unwrap();
        let err = servers.query(query()).await.unwrap_err().to_string();
        assert!(err.contains("TLS handshake failed"), "{err}");
        assert!(err.contains("invalid peer certificate"), "{err}");
    }

    #[tokio::test]
    async fn the_connect_timeout_covers_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = https_options(dir.path(), unhelpful_server(false).await);
        o.http_client_connect_timeout = Duration::from_millis(200);
        o.http_client_request_timeout = Duration::from_secs(10);
        let servers = from_options(&o).unwrap().unwrap();
        let started = Instant::now();
        let err = servers.query(query()).await.unwrap_err().to_string();
        assert!(err.contains("--http-client-connect-timeout"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    }

    #[test]
    fn https_servers_need_a_readable_ca_file_when_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let mut o = Options::for_tests(".");
        o.tls.tls_root_ca_file = Some(ca_file.clone());
        // Plain servers do not read it.
        o.auth_http_addresses = vec!["127.0.0.1:1".into()];
        from_options(&o).unwrap().unwrap();
        o.auth_http_addresses = vec!["127.0.0.1:1".into(), "https://h/auth".into()];
        let err = from_options(&o).unwrap_err();
        assert_eq!(err.flag, "tls-root-ca-file");
        assert!(check_options(&o).is_err());
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca_file, params.self_signed(&key).unwrap().pem()).unwrap();
        let servers = from_options(&o).unwrap().unwrap();
        assert_eq!(servers.endpoints[1].scheme_str(), Some("https"));
        check_options(&o).unwrap();
    }
}
