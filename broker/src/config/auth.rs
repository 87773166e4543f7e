//! The auth flags (`--auth-http-address`, `--auth-http-request-method`, the HTTP client
//! timeouts) as the auth client takes them: endpoints as URLs, and TLS for `https://` ones.

use super::{ConfigError, Options};
use hyper::Uri;
use rustls::ClientConfig;
use server_kit::tls;
use std::sync::Arc;
use std::time::Duration;

/// How the auth servers are asked (`--auth-http-request-method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestMethod {
    /// The fields in the query string.
    Get,
    /// The fields as an `application/x-www-form-urlencoded` body.
    Post,
}

/// What the auth flags give.
#[derive(Debug)]
pub(crate) struct AuthSettings {
    pub(crate) endpoints: Vec<Uri>,
    pub(crate) method: RequestMethod,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    /// Only when some endpoint is `https://`, so plain servers need no certificates.
    pub(crate) tls: Option<Arc<ClientConfig>>,
}

/// The auth settings; `None` when no auth server is configured.
pub(super) fn settings(o: &Options) -> Result<Option<AuthSettings>, ConfigError> {
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
    let tls = if endpoints.iter().any(|e| e.scheme_str() == Some("https")) {
        Some(https_client(o)?)
    } else {
        None
    };
    Ok(Some(AuthSettings {
        endpoints,
        method,
        connect_timeout: o.http_client_connect_timeout,
        request_timeout: o.http_client_request_timeout,
        tls,
    }))
}

/// The TLS client for `https://` auth servers: it trusts `--tls-root-ca-file` when given and
/// the system's CA certificates otherwise, as nsqd's does, and speaks from
/// `--tls-min-version` up.
fn https_client(o: &Options) -> Result<Arc<ClientConfig>, ConfigError> {
    let roots = match &o.tls.tls_root_ca_file {
        Some(path) => tls::root_store("tls-root-ca-file", path)?.store,
        None => tls::system_roots(
            "auth-http-address",
            "https:// auth servers need --tls-root-ca-file or the system's CA certificates",
        )?,
    };
    tls::client::https_config(roots, o.tls.tls_min_version.rustls()).map_err(|e| ConfigError {
        flag: "tls-min-version",
        reason: e.to_string(),
    })
}

/// An `--auth-http-address` as a URL: `host:port` means `http://host:port/auth`; an
/// `http://` or `https://` URL is used as given.
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
        Some("http" | "https") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(uri),
        _ => Err(format!(
            "{address:?} is not a host:port or http:// or https:// URL"
        )),
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
        assert_eq!(
            endpoint("https://auth.example:8443/auth")
                .unwrap()
                .to_string(),
            "https://auth.example:8443/auth"
        );
        assert!(endpoint("").is_err());
        assert!(endpoint("ftp://auth.example/x").is_err());
        assert!(endpoint("not a host").is_err());
    }
}
