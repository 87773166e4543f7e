//! How the auth-server client connects: plain TCP for `http://` servers, TCP then a TLS
//! handshake for `https://` ones. The TLS client trusts `--tls-root-ca-file` when given and
//! the system's CA certificates otherwise, as nsqd's does, and speaks from
//! `--tls-min-version` up. `--http-client-connect-timeout` covers the TCP connect and the
//! handshake together.

use crate::config::{ConfigError, Options};
use crate::pem;
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

/// hyper-util's connector for the auth servers' client.
#[derive(Clone)]
pub(super) struct AuthConnector {
    http: HttpConnector,
    /// `None` when every auth server is `http://`: no certificates are loaded then.
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
}

impl AuthConnector {
    pub(super) fn new(connect_timeout: Duration, tls: Option<TlsConnector>) -> AuthConnector {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // Lets `https://` URIs through; the scheme then decides whether a handshake follows.
        http.enforce_http(false);
        AuthConnector {
            http,
            tls,
            connect_timeout,
        }
    }
}

impl std::fmt::Debug for AuthConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConnector")
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl tower_service::Service<Uri> for AuthConnector {
    type Response = AuthStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<AuthStream, Self::Error>> + Send>>;

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
                return Ok(AuthStream::Plain(tcp));
            }
            let tls = tls.ok_or(ConnectError::NoTls)?;
            let name = server_name(&uri)?;
            // The TCP connect already spent part of the budget.
            let left = limit.saturating_sub(started.elapsed());
            let stream = timeout(left, tls.connect(name, tcp.into_inner()))
                .await
                .map_err(|_| ConnectError::HandshakeTimeout(limit))?
                .map_err(ConnectError::Handshake)?;
            Ok(AuthStream::Tls(Box::new(TokioIo::new(stream))))
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

/// A connection to an auth server.
pub(super) enum AuthStream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for AuthStream {
    fn connected(&self) -> Connected {
        match self {
            AuthStream::Plain(s) => s.connected(),
            AuthStream::Tls(s) => s.inner().get_ref().0.connected(),
        }
    }
}

impl Read for AuthStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AuthStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            AuthStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for AuthStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AuthStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            AuthStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AuthStream::Plain(s) => Pin::new(s).poll_flush(cx),
            AuthStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AuthStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            AuthStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            AuthStream::Plain(s) => s.is_write_vectored(),
            AuthStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AuthStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AuthStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}

/// The TLS client for `https://` auth servers.
pub(super) fn tls_connector(o: &Options) -> Result<TlsConnector, ConfigError> {
    let roots = match &o.tls.tls_root_ca_file {
        Some(path) => pem::root_store("tls-root-ca-file", path)?.store,
        None => pem::system_roots(
            "auth-http-address",
            "https:// auth servers need --tls-root-ca-file or the system's CA certificates",
        )?,
    };
    let config = ClientConfig::builder_with_provider(pem::crypto_provider())
        .with_protocol_versions(o.tls.tls_min_version.rustls())
        .map_err(|e| ConfigError {
            flag: "tls-min-version",
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
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
