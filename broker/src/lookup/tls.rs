//! TLS on the gRPC channel to lookupds (`--lookupd-tls*`). The files are read and checked
//! when the flags are validated and again when registrations start; every connection then
//! takes its `ClientTlsConfig` from what was read, so a file changed later has no effect
//! until a restart.

use crate::config::{ConfigError, Options};
use crate::pem;
use rustls::pki_types::TrustAnchor;
use std::time::Duration;
use tonic::transport::{ClientTlsConfig, Identity};

/// What a TLS connection to a lookupd needs, read from the flags' files.
#[derive(Debug, Clone)]
pub(crate) struct ClientTls {
    /// The certificate authorities lookupds' certificates must chain to.
    roots: Vec<TrustAnchor<'static>>,
    /// The broker's client certificate and key, for lookupds requiring mutual TLS.
    identity: Option<Identity>,
    server_name: Option<String>,
}

impl ClientTls {
    /// Reads and checks the `--lookupd-tls*` files; `None` when TLS to lookupds is off.
    pub(crate) fn from_options(o: &Options) -> Result<Option<ClientTls>, ConfigError> {
        if !enabled(o) {
            if o.lookupd_tls_server_name.is_some() {
                return Err(ConfigError {
                    flag: "lookupd-tls-server-name",
                    reason: "is only used with TLS to lookupds: add --lookupd-tls".into(),
                });
            }
            return Ok(None);
        }
        let roots = match &o.lookupd_tls_root_ca_file {
            Some(path) => pem::root_store("lookupd-tls-root-ca-file", path)?.store,
            None => pem::system_roots(
                "lookupd-tls",
                "TLS to lookupds needs --lookupd-tls-root-ca-file or the system's CA certificates",
            )?,
        };
        let files = pem::cert_and_key(
            "lookupd-tls-cert",
            o.lookupd_tls_cert.as_deref(),
            "lookupd-tls-key",
            o.lookupd_tls_key.as_deref(),
        )?;
        let identity = match files {
            None => None,
            Some((cert, key)) => {
                let id = pem::identity("lookupd-tls-cert", cert, "lookupd-tls-key", key)?;
                Some(Identity::from_pem(id.cert_pem, id.key_pem))
            }
        };
        let server_name = match o.lookupd_tls_server_name.as_deref().map(str::trim) {
            Some("") => {
                return Err(ConfigError {
                    flag: "lookupd-tls-server-name",
                    reason: "must not be empty".into(),
                });
            }
            name => name.map(String::from),
        };
        Ok(Some(ClientTls {
            roots: roots.roots,
            identity,
            server_name,
        }))
    }

    pub(crate) fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The configuration of one connection. Without `--lookupd-tls-server-name`, tonic checks
    /// the certificate against the host of the lookupd's address (a DNS name or an IP).
    pub(crate) fn config(&self, handshake_timeout: Duration) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new()
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

/// Whether TLS is on for lookupd connections: `--lookupd-tls`, or any file it reads.
pub(crate) fn enabled(o: &Options) -> bool {
    o.lookupd_tls
        || o.lookupd_tls_root_ca_file.is_some()
        || o.lookupd_tls_cert.is_some()
        || o.lookupd_tls_key.is_some()
}

/// The URI tonic connects to for a lookupd address: `host:port` as nsqd takes lookupd
/// addresses gets the scheme TLS calls for; a full URI is taken as it is, if its scheme
/// agrees (tonic would speak plain HTTP/2 to an `http://` URI even with TLS configured).
pub(crate) fn endpoint_uri(address: &str, tls: bool) -> Result<String, String> {
    match address.split_once("://") {
        None if tls => Ok(format!("https://{address}")),
        None => Ok(format!("http://{address}")),
        Some(("http", _)) if tls => Err(format!(
            "{address:?} is plain http:// but TLS to lookupds is on (--lookupd-tls)"
        )),
        Some(("https", _)) if !tls => Err(format!(
            "{address:?} is https:// but TLS to lookupds is off: add --lookupd-tls"
        )),
        Some(("http" | "https", _)) => Ok(address.to_string()),
        Some((scheme, _)) => Err(format!("{address:?}: {scheme}:// is not http or https")),
    }
}

/// Checks the `--lookupd-tls*` flags and that every `--lookupd-grpc-address` agrees with them.
pub(crate) fn check_options(o: &Options) -> Result<(), ConfigError> {
    ClientTls::from_options(o)?;
    let tls = enabled(o);
    for address in &o.lookupd_grpc_addresses {
        endpoint_uri(address.trim(), tls).map_err(|reason| ConfigError {
            flag: "lookupd-grpc-address",
            reason,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pem::self_signed;

    fn options(args: &[String]) -> Options {
        Options::from_args(std::iter::once("knsq-broker".to_string()).chain(args.iter().cloned()))
            .unwrap()
    }

    fn error(args: &[String]) -> ConfigError {
        options(args).validate().unwrap_err()
    }

    #[test]
    fn uris_follow_the_tls_setting() {
        assert_eq!(endpoint_uri("l:4160", false).unwrap(), "http://l:4160");
        assert_eq!(endpoint_uri("l:4160", true).unwrap(), "https://l:4160");
        assert_eq!(
            endpoint_uri("https://l:4160", true).unwrap(),
            "https://l:4160"
        );
        assert!(endpoint_uri("http://l:4160", true).is_err());
        assert!(endpoint_uri("https://l:4160", false).is_err());
        assert!(endpoint_uri("unix://x", false).is_err());
    }

    #[test]
    fn tls_is_off_by_default_and_turned_on_by_any_of_its_files() {
        assert!(ClientTls::from_options(&options(&[])).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "ca");
        let o = options(&[format!("--lookupd-tls-root-ca-file={}", cert.display())]);
        assert!(enabled(&o));
        let tls = ClientTls::from_options(&o).unwrap().unwrap();
        assert!(tls.identity.is_none() && tls.server_name.is_none());
        let o = options(&[
            format!("-lookupd-tls-root-ca-file={}", cert.display()),
            format!("-lookupd-tls-cert={}", cert.display()),
            format!("-lookupd-tls-key={}", key.display()),
            "-lookupd-tls-server-name=lookupd.internal".into(),
            "-lookupd-grpc-address=lookupd-0:4160".into(),
        ]);
        o.validate().unwrap();
        let tls = ClientTls::from_options(&o).unwrap().unwrap();
        assert!(tls.identity.is_some());
        assert_eq!(tls.server_name.as_deref(), Some("lookupd.internal"));
        assert!(options(&["--lookupd-tls".into()]).lookupd_tls);
        assert!(!options(&["--lookupd-tls=false".into()]).lookupd_tls);
    }

    #[test]
    fn bad_tls_flags_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "a");
        let (_, other_key) = self_signed(dir.path(), "b");
        let ca = format!("--lookupd-tls-root-ca-file={}", cert.display());
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n@@@\n").unwrap();

        let e = error(&[format!("--lookupd-tls-cert={}", cert.display()), ca.clone()]);
        assert_eq!(
            e.to_string(),
            "invalid value for --lookupd-tls-key: is needed with --lookupd-tls-cert"
        );
        let e = error(&[format!("--lookupd-tls-key={}", key.display()), ca.clone()]);
        assert_eq!(e.flag, "lookupd-tls-cert");
        let e = error(&["--lookupd-tls-root-ca-file=/no/such/ca.pem".into()]);
        assert_eq!(e.flag, "lookupd-tls-root-ca-file");
        assert!(e.reason.contains("cannot read /no/such/ca.pem"), "{e}");
        let e = error(&[format!("--lookupd-tls-root-ca-file={}", garbage.display())]);
        assert!(e.reason.starts_with("no PEM certificate in"), "{e}");
        let e = error(&[format!("--lookupd-tls-root-ca-file={}", broken.display())]);
        assert!(e.reason.contains("is not valid PEM"), "{e}");
        let e = error(&[
            ca.clone(),
            format!("--lookupd-tls-cert={}", cert.display()),
            format!("--lookupd-tls-key={}", other_key.display()),
        ]);
        assert_eq!(e.flag, "lookupd-tls-key");
        assert!(e.reason.contains("does not fit the certificate"), "{e}");
        let e = error(&[
            ca.clone(),
            format!("--lookupd-tls-cert={}", cert.display()),
            format!("--lookupd-tls-key={}", garbage.display()),
        ]);
        assert!(e.reason.starts_with("no PEM private key in"), "{e}");
        let e = error(&["--lookupd-tls-server-name=x".into()]);
        assert_eq!(e.flag, "lookupd-tls-server-name");
        let e = error(&[ca.clone(), "--lookupd-tls-server-name=".into()]);
        assert_eq!(e.flag, "lookupd-tls-server-name");
        let e = error(&[ca, "--lookupd-grpc-address=http://l:4160".into()]);
        assert_eq!(e.flag, "lookupd-grpc-address");
    }
}
