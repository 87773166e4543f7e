//! The knsq servers' own HTTP APIs as the operator uses them: a broker's drain
//! (`POST /drain`, `GET /drain`) and runtime lookupd list (`/config/nsqlookupd_tcp_addresses`),
//! and a lookupd's registered brokers (`GET /nodes`). Pods are reached by IP, which works for
//! pods that are not ready (a draining broker is not) and needs no DNS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// How long one request may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{method} http://{address}{path}: {source}")]
    Transport {
        method: Method,
        address: SocketAddr,
        path: String,
        #[source]
        source: TransportError,
    },
    #[error("{method} http://{address}{path} answered {status}: {body}")]
    Status {
        method: Method,
        address: SocketAddr,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("{method} http://{address}{path} answered what is not the JSON expected")]
    Decode {
        method: Method,
        address: SocketAddr,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    #[error("building the request")]
    Request(#[source] http::Error),
    #[error("HTTP")]
    Http(#[source] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A status and body, however they were obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Sends one request; the operator's is plain HTTP/1.1, tests script their own.
pub trait Transport: Send + Sync {
    fn send(
        &self,
        method: Method,
        address: SocketAddr,
        path: String,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Reply, TransportError>>;
}

/// Plain HTTP/1.1, a connection per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Http1;

impl Transport for Http1 {
    fn send(
        &self,
        method: Method,
        address: SocketAddr,
        path: String,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Reply, TransportError>> {
        Box::pin(async move {
            tokio::time::timeout(TIMEOUT, exchange(method, address, path, body))
                .await
                .map_err(|_| TransportError::Timeout(TIMEOUT))?
        })
    }
}

async fn exchange(
    method: Method,
    address: SocketAddr,
    path: String,
    body: Bytes,
) -> Result<Reply, TransportError> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(TransportError::Connect)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(TransportError::Http)?;
    let driver = tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, address.to_string())
        .body(Full::new(body))
        .map_err(TransportError::Request)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(TransportError::Http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(TransportError::Http)?
        .to_bytes();
    driver.abort();
    Ok(Reply { status, body })
}

/// A broker's drain as `GET /drain` reports it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DrainReport {
    pub draining: bool,
    /// `serving`, `draining`, `handing_off`, `drained` or `blocked`.
    pub state: String,
    pub remaining_messages: u64,
    /// Why the drain cannot go on, when blocked.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A broker registered with a lookupd, from its `/nodes`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct RegisteredBroker {
    pub broadcast_address: String,
    pub http_port: u16,
}

#[derive(Deserialize)]
struct Nodes {
    producers: Vec<RegisteredBroker>,
}

/// The calls the operator makes to knsq's servers.
#[derive(Clone)]
pub struct KnsqHttp {
    transport: Arc<dyn Transport>,
}

impl Default for KnsqHttp {
    fn default() -> Self {
        Self::new(Arc::new(Http1))
    }
}

impl std::fmt::Debug for KnsqHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnsqHttp").finish_non_exhaustive()
    }
}

impl KnsqHttp {
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self { transport }
    }

    async fn call(
        &self,
        method: Method,
        address: SocketAddr,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, Error> {
        let reply = self
            .transport
            .send(method.clone(), address, path.to_owned(), body)
            .await
            .map_err(|source| Error::Transport {
                method: method.clone(),
                address,
                path: path.to_owned(),
                source,
            })?;
        if !reply.status.is_success() {
            return Err(Error::Status {
                method,
                address,
                path: path.to_owned(),
                status: reply.status,
                body: String::from_utf8_lossy(&reply.body).trim().to_owned(),
            });
        }
        Ok(reply.body)
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        address: SocketAddr,
        path: &str,
        body: Bytes,
    ) -> Result<T, Error> {
        let bytes = self.call(method.clone(), address, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Decode {
            method,
            address,
            path: path.to_owned(),
            source,
        })
    }

    /// Ask a broker to drain (idempotent: a draining broker just goes on).
    pub async fn start_drain(&self, broker: SocketAddr) -> Result<(), Error> {
        self.call(Method::POST, broker, "/drain", Bytes::new())
            .await
            .map(drop)
    }

    /// Where a broker's drain stands.
    pub async fn drain_report(&self, broker: SocketAddr) -> Result<DrainReport, Error> {
        self.json(Method::GET, broker, "/drain", Bytes::new()).await
    }

    /// The lookupd addresses a running broker registers with.
    pub async fn lookupd_addresses(&self, broker: SocketAddr) -> Result<Vec<String>, Error> {
        self.json(
            Method::GET,
            broker,
            "/config/nsqlookupd_tcp_addresses",
            Bytes::new(),
        )
        .await
    }

    /// Replace a running broker's lookupd addresses; it registers with the new ones and leaves
    /// the others.
    pub async fn set_lookupd_addresses(
        &self,
        broker: SocketAddr,
        addresses: &[String],
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(addresses).map_err(|source| Error::Decode {
            method: Method::PUT,
            address: broker,
            path: "/config/nsqlookupd_tcp_addresses".to_owned(),
            source,
        })?;
        self.call(
            Method::PUT,
            broker,
            "/config/nsqlookupd_tcp_addresses",
            body.into(),
        )
        .await
        .map(drop)
    }

    /// The brokers registered with a lookupd.
    pub async fn registered_brokers(
        &self,
        lookupd: SocketAddr,
    ) -> Result<Vec<RegisteredBroker>, Error> {
        let nodes: Nodes = self
            .json(Method::GET, lookupd, "/nodes", Bytes::new())
            .await?;
        Ok(nodes.producers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers every request with one reply and remembers what was asked.
    struct Scripted {
        reply: Reply,
        seen: Mutex<Vec<(Method, SocketAddr, String, Bytes)>>,
    }

    impl Transport for Scripted {
        fn send(
            &self,
            method: Method,
            address: SocketAddr,
            path: String,
            body: Bytes,
        ) -> BoxFuture<'static, Result<Reply, TransportError>> {
            self.seen
                .lock()
                .expect("lock")
                .push((method, address, path, body));
            let reply = self.reply.clone();
            Box::pin(async move { Ok(reply) })
        }
    }

    fn scripted(status: u16, body: &str) -> Arc<Scripted> {
        Arc::new(Scripted {
            reply: Reply {
                status: StatusCode::from_u16(status).expect("status"),
                body: Bytes::copy_from_slice(body.as_bytes()),
            },
            seen: Mutex::default(),
        })
    }

    const BROKER: &str = "10.0.0.7:4151";

    #[tokio::test]
    async fn drain_report_parses_the_brokers_json() {
        let transport = scripted(
            200,
            r#"{"draining": true, "state": "blocked", "remaining_messages": 12, "reason": "no peer"}"#,
        );
        let http = KnsqHttp::new(transport.clone());
        let address = BROKER.parse().expect("address");
        let report = http.drain_report(address).await.expect("report");
        assert_eq!(
            report,
            DrainReport {
                draining: true,
                state: "blocked".to_owned(),
                remaining_messages: 12,
                reason: Some("no peer".to_owned()),
            }
        );
        let seen = transport.seen.lock().expect("lock");
        assert_eq!(
            (seen[0].0.clone(), seen[0].2.as_str()),
            (Method::GET, "/drain")
        );
    }

    #[tokio::test]
    async fn lookupd_list_is_put_as_a_json_array() {
        let transport = scripted(200, r#"["a:4160"]"#);
        let http = KnsqHttp::new(transport.clone());
        let address = BROKER.parse().expect("address");
        http.set_lookupd_addresses(address, &["a:4160".to_owned(), "b:4160".to_owned()])
            .await
            .expect("put");
        let seen = transport.seen.lock().expect("lock");
        assert_eq!(seen[0].0, Method::PUT);
        assert_eq!(seen[0].2, "/config/nsqlookupd_tcp_addresses");
        assert_eq!(&seen[0].3[..], br#"["a:4160","b:4160"]"#);
    }

    #[tokio::test]
    async fn errors_name_the_call_and_the_answer() {
        let http = KnsqHttp::new(scripted(503, "draining\n"));
        let address = BROKER.parse().expect("address");
        let error = http.start_drain(address).await.expect_err("refused");
        assert_eq!(
            error.to_string(),
            "POST http://10.0.0.7:4151/drain answered 503 Service Unavailable: draining"
        );
        let http = KnsqHttp::new(scripted(200, "not json"));
        let error = http
            .registered_brokers(address)
            .await
            .expect_err("not JSON");
        assert!(matches!(error, Error::Decode { .. }), "{error}");
    }

    #[tokio::test]
    async fn http1_talks_to_a_real_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = vec![0; 4096];
            let n = stream.read(&mut request).await.expect("read");
            let body = r#"{"producers":[{"broadcast_address":"b-0.h.ns.svc","http_port":4151,"tcp_port":4150}]}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        let brokers = KnsqHttp::default()
            .registered_brokers(address)
            .await
            .expect("nodes");
        assert_eq!(
            brokers,
            [RegisteredBroker {
                broadcast_address: "b-0.h.ns.svc".to_owned(),
                http_port: 4151
            }]
        );
        let request = server.await.expect("server");
        assert!(request.starts_with("GET /nodes HTTP/1.1\r\n"), "{request}");
    }

    #[tokio::test]
    async fn http1_reports_refused_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        let error = KnsqHttp::default()
            .drain_report(address)
            .await
            .expect_err("nothing listens");
        assert!(
            matches!(
                error,
                Error::Transport {
                    source: TransportError::Connect(_),
                    ..
                }
            ),
            "{error}"
        );
    }
}
