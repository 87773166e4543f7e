//! TLS on the gRPC channel to lookupds (`--lookupd-tls*`). The files are read and checked
//! when the flags are validated and again when registrations start; every connection then
//! takes its `ClientTlsConfig` from what was read, so a file changed later has no effect
//! until a restart.

use crate::config::{ConfigError, Options};
use rustls::RootCertStore;
use rustls::crypto::ring;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use rustls::sign::CertifiedKey;
use std::path::Path;
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
            Some(path) => read_roots(path).map_err(|reason| ConfigError {
                flag: "lookupd-tls-root-ca-file",
                reason,
            })?,
            None => system_roots(rustls_native_certs::load_native_certs())?,
        };
        let identity = match (&o.lookupd_tls_cert, &o.lookupd_tls_key) {
            (None, None) => None,
            (Some(_), None) => return Err(missing("lookupd-tls-key", "--lookupd-tls-cert")),
            (None, Some(_)) => return Err(missing("lookupd-tls-cert", "--lookupd-tls-key")),
            (Some(cert), Some(key)) => Some(read_identity(cert, key)?),
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
            roots,
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

fn missing(flag: &'static str, with: &str) -> ConfigError {
    ConfigError {
        flag,
        reason: format!("is needed with {with}"),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no PEM certificate in {}", path.display()));
    }
    Ok(certs)
}

/// Every certificate in the file must be a usable trust anchor: a CA file with one bad
/// entry is more likely a mistake than a wish to trust the rest.
fn read_roots(path: &Path) -> Result<Vec<TrustAnchor<'static>>, String> {
    let pem = read(path)?;
    let mut store = RootCertStore::empty();
    for (i, cert) in certificates(&pem, path)?.into_iter().enumerate() {
        store.add(cert).map_err(|e| {
            format!(
                "certificate {} in {} is not usable as a CA: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(store.roots)
}

/// The system's CA certificates; the odd unparsable one is skipped, as TLS clients do, but
/// finding none at all is an error rather than lookupds that can never be verified.
fn system_roots(
    found: rustls_native_certs::CertificateResult,
) -> Result<Vec<TrustAnchor<'static>>, ConfigError> {
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added > 0 {
        return Ok(store.roots);
    }
    let mut reason = "no --lookupd-tls-root-ca-file given and no usable system CA certificate \
                      found"
        .to_string();
    for e in &found.errors {
        reason.push_str(&format!("; {e}"));
    }
    Err(ConfigError {
        flag: "lookupd-tls",
        reason,
    })
}

/// The client certificate and its key, checked to belong together.
fn read_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, ConfigError> {
    let cert_error = |reason| ConfigError {
        flag: "lookupd-tls-cert",
        reason,
    };
    let key_error = |reason| ConfigError {
        flag: "lookupd-tls-key",
        reason,
    };
    let cert_pem = read(cert_path).map_err(cert_error)?;
    let certs = certificates(&cert_pem, cert_path).map_err(cert_error)?;
    let key_pem = read(key_path).map_err(key_error)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        key_error(match e {
            pem::Error::NoItemsFound => format!("no PEM private key in {}", key_path.display()),
            e => format!("{} is not valid PEM: {e}", key_path.display()),
        })
    })?;
    CertifiedKey::from_der(certs, key, &ring::default_provider()).map_err(|e| {
        key_error(format!(
            "{} does not fit the certificate in {}: {e}",
            key_path.display(),
            cert_path.display()
        ))
    })?;
    Ok(Identity::from_pem(cert_pem, key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};
    use std::path::PathBuf;

    /// A self-signed certificate and its key, written to `dir`.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

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
    fn without_a_root_ca_file_the_system_certificates_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed(dir.path(), "ca");
        let der = CertificateDer::from_pem_file(&cert).unwrap();
        let mut found = rustls_native_certs::CertificateResult::default();
        found.certs.push(der);
        assert_eq!(system_roots(found).unwrap().len(), 1);
        let e = system_roots(Default::default()).unwrap_err();
        assert_eq!(e.flag, "lookupd-tls");
        assert!(e.reason.contains("no usable system CA certificate"), "{e}");
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
