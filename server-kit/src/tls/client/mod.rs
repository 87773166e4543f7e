//! TLS where knsq is the client: gRPC to lookupds (the broker's registrations) and HTTPS to
//! auth servers ([`HttpsConnector`]). The files are read once, when the flags are checked; every connection then
//! takes its configuration from what was read, so a file changed later has no effect until a
//! restart.

mod https;

pub use https::HttpsConnector;

use super::crypto_provider;
#[cfg(feature = "grpc-client")]
use rustls::pki_types::TrustAnchor;
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use std::sync::Arc;

/// What a TLS connection to a gRPC server needs.
#[cfg(feature = "grpc-client")]
#[derive(Debug, Clone)]
pub struct GrpcClientTls {
    /// The certificate authorities servers' certificates must chain to.
    roots: Vec<TrustAnchor<'static>>,
    /// A client certificate and key, for servers requiring mutual TLS.
    identity: Option<tonic::transport::Identity>,
    server_name: Option<String>,
}

#[cfg(feature = "grpc-client")]
impl GrpcClientTls {
    /// `identity`: the client certificate for mutual TLS; `server_name`: the name checked in
    /// servers' certificates instead of the host each is reached by.
    pub fn new(
        roots: RootCertStore,
        identity: Option<super::Identity>,
        server_name: Option<String>,
    ) -> GrpcClientTls {
        GrpcClientTls {
            roots: roots.roots,
            identity: identity
                .map(|id| tonic::transport::Identity::from_pem(id.cert_pem, id.key_pem)),
            server_name,
        }
    }

    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The configuration of one connection. Without a server name, tonic checks the
    /// certificate against the host of the server's address (a DNS name or an IP).
    pub fn config(
        &self,
        handshake_timeout: std::time::Duration,
    ) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new()
            .trust_anchors(self.roots.iter().cloned())
            .timeout(handshake_timeout);
        if let Some(identity) = &self.identity {
            config = config.identity(identity.clone());
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

/// The URI tonic connects to for a gRPC address: `host:port` as nsqd takes lookupd addresses
/// gets the scheme TLS calls for; a full URI is taken as it is, if its scheme agrees (tonic
/// would speak plain HTTP/2 to an `http://` URI even with TLS configured). `flag` names the
/// setting that turns TLS on, for the error.
pub fn grpc_endpoint_uri(address: &str, tls: bool, flag: &str) -> Result<String, String> {
    match address.split_once("://") {
        None if tls => Ok(format!("https://{address}")),
        None => Ok(format!("http://{address}")),
        Some(("http", _)) if tls => Err(format!(
            "{address:?} is plain http:// but TLS to lookupds is on (--{flag})"
        )),
        Some(("https", _)) if !tls => Err(format!(
            "{address:?} is https:// but TLS to lookupds is off: add --{flag}"
        )),
        Some(("http" | "https", _)) => Ok(address.to_string()),
        Some((scheme, _)) => Err(format!("{address:?}: {scheme}:// is not http or https")),
    }
}

/// How long a gRPC connection may take to be established, TLS handshake included.
#[cfg(feature = "grpc-client")]
pub const GRPC_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// HTTP/2 pings on idle gRPC connections, and how long an answer may take: a peer that
/// vanished without closing is noticed in seconds.
#[cfg(feature = "grpc-client")]
const GRPC_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);
#[cfg(feature = "grpc-client")]
const GRPC_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A gRPC endpoint for `address` (see [`grpc_endpoint_uri`]), over TLS with `tls`.
#[cfg(feature = "grpc-client")]
pub fn grpc_endpoint(
    address: &str,
    tls: Option<&GrpcClientTls>,
    flag: &str,
) -> Result<tonic::transport::Endpoint, String> {
    let uri = grpc_endpoint_uri(address, tls.is_some(), flag)?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| crate::with_sources(&e))?
        .connect_timeout(GRPC_CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(GRPC_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(GRPC_KEEPALIVE_TIMEOUT);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.config(GRPC_CONNECT_TIMEOUT))
            .map_err(|e| crate::with_sources(&e))?;
    }
    Ok(endpoint)
}

/// The rustls client for `https://` servers: certificates checked against `roots`, TLS
/// versions from `versions`.
pub fn https_config(
    roots: RootCertStore,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_follow_the_tls_setting() {
        let uri = |address, tls| grpc_endpoint_uri(address, tls, "lookupd-tls");
        assert_eq!(uri("l:4160", false).unwrap(), "http://l:4160");
        assert_eq!(uri("l:4160", true).unwrap(), "https://l:4160");
        assert_eq!(uri("https://l:4160", true).unwrap(), "https://l:4160");
        assert!(uri("http://l:4160", true).is_err());
        assert!(uri("https://l:4160", false).is_err());
        assert!(uri("unix://x", false).is_err());
    }
}
