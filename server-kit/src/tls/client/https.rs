//! How an HTTP client (the broker's, for auth servers) connects: plain TCP for `http://`
//! servers, TCP then a TLS handshake for `https://` ones. The connect timeout
//! (`--http-client-connect-timeout`) covers the TCP connect and the handshake together.

use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why a connection to an auth server failed (the TCP part is hyper-util's own error).
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Tcp(Box<dyn std::error::Error + Send + Sync>),
    #[error("{0:?} is not a name a TLS certificate can be checked against")]
    ServerName(String),
    // The text comes from the source, which `crate::with_sources` appends.
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
    #[error("TCP connect and TLS handshake not done within {0:?} (--http-client-connect-timeout)")]
    HandshakeTimeout(Duration),
    #[error("https:// needs TLS, which was not set up")]
    NoTls,
}

/// hyper-util's connector for an HTTP client that may speak to `https://` servers.
#[derive(Clone)]
pub struct HttpsConnector {
    http: HttpConnector,
    /// `None` when every auth server is `http://`: no certificates are loaded then.
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
}

impl HttpsConnector {
    /// `tls`: the client config for `https://` servers; `None` when every server is plain.
    pub fn new(connect_timeout: Duration, tls: Option<Arc<ClientConfig>>) -> HttpsConnector {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // Lets `https://` URIs through; the scheme then decides whether a handshake follows.
        http.enforce_http(false);
        HttpsConnector {
            http,
            tls: tls.map(TlsConnector::from),
            connect_timeout,
        }
    }
}

impl std::fmt::Debug for HttpsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsConnector")
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl tower_service::Service<Uri> for HttpsConnector {
    type Response = HttpsStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<HttpsStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let started = Instant::now();
        let tcp = self.http.call(uri.clone());
        let tls = self.tls.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            let tcp = tcp.await.map_err(|e| ConnectError::Tcp(e.into()))?;
            if uri.scheme_str() != Some("https") {
                return Ok(HttpsStream::Plain(tcp));
            }
            let tls = tls.ok_or(ConnectError::NoTls)?;
            let name = server_name(&uri)?;
            // The TCP connect already spent part of the budget.
            let left = limit.saturating_sub(started.elapsed());
            let stream = timeout(left, tls.connect(name, tcp.into_inner()))
                .await
                .map_err(|_| ConnectError::HandshakeTimeout(limit))?
                .map_err(ConnectError::Handshake)?;
            Ok(HttpsStream::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// The name the server's certificate must carry: the URL's host, a DNS name or an IP.
fn server_name(uri: &Uri) -> Result<ServerName<'static>, ConnectError> {
    let host = uri.host().unwrap_or_default();
    // `Uri` keeps the brackets of an IPv6 literal.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| ConnectError::ServerName(host.into()))
}

/// A connection to an HTTP server.
pub enum HttpsStream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for HttpsStream {
    fn connected(&self) -> Connected {
        match self {
            HttpsStream::Plain(s) => s.connected(),
            HttpsStream::Tls(s) => s.inner().get_ref().0.connected(),
        }
    }
}

impl Read for HttpsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpsStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            HttpsStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for HttpsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HttpsStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            HttpsStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpsStream::Plain(s) => Pin::new(s).poll_flush(cx),
            HttpsStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpsStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            HttpsStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HttpsStream::Plain(s) => s.is_write_vectored(),
            HttpsStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HttpsStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            HttpsStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_checked_against_the_host() {
        let name = |u: &str| {
            server_name(&u.parse().unwrap())
                .unwrap()
                .to_str()
                .into_owned()
        };
        assert_eq!(name("https://auth.example:8443/a"), "auth.example");
        assert_eq!(name("https://127.0.0.1/a"), "127.0.0.1");
        assert_eq!(name("https://[::1]:443/a"), "::1");
    }
}
