//! TLS on the gRPC listener (`--grpc-tls-cert`, `--grpc-tls-key`), mutual when
//! `--grpc-tls-client-ca-file` is given. The files are read and checked once, at start:
//! tonic would accept an empty certificate file or a key of another certificate and only
//! fail each handshake later.

use crate::config::{ConfigError, Options};
use rustls::RootCertStore;
use rustls::crypto::ring;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A connection that has not finished its handshake by then is closed, so a client that
/// stalls in the handshake holds nothing for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's TLS configuration; `None` when the flags leave TLS off.
pub(crate) fn server_config(o: &Options) -> Result<Option<ServerTlsConfig>, ConfigError> {
    let (cert, key) = match (&o.grpc_tls_cert, &o.grpc_tls_key) {
        (None, None) => {
            if o.grpc_tls_client_ca_file.is_some() {
                return Err(ConfigError {
                    flag: "grpc-tls-client-ca-file",
                    reason: "needs --grpc-tls-cert and --grpc-tls-key (TLS on the gRPC listener)"
                        .into(),
                });
            }
            return Ok(None);
        }
        (Some(_), None) => return Err(missing("grpc-tls-key", "--grpc-tls-cert")),
        (None, Some(_)) => return Err(missing("grpc-tls-cert", "--grpc-tls-key")),
        (Some(cert), Some(key)) => (cert, key),
    };
    let mut config = ServerTlsConfig::new()
        .identity(read_identity(cert, key)?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &o.grpc_tls_client_ca_file {
        let ca = read_client_ca(ca).map_err(|reason| ConfigError {
            flag: "grpc-tls-client-ca-file",
            reason,
        })?;
        // Required, not optional: a broker without a certificate signed by the CA fails the
        // handshake.
        config = config.client_ca_root(ca);
    }
    Ok(Some(config))
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

/// The listener's certificate and its key, checked to belong together.
fn read_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, ConfigError> {
    let cert_error = |reason| ConfigError {
        flag: "grpc-tls-cert",
        reason,
    };
    let key_error = |reason| ConfigError {
        flag: "grpc-tls-key",
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

/// Every certificate in the file must be a usable trust anchor (tonic would skip a bad one
/// silently, and with it the brokers it signs).
fn read_client_ca(path: &Path) -> Result<Certificate, String> {
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
    Ok(Certificate::from_pem(pem))
}

#[cfg(test)]
mod tests {
    use crate::Options;

    fn error(args: &[&str]) -> String {
        Options::from_args(std::iter::once("knsq-lookupd").chain(args.iter().copied()))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn tls_is_off_by_default() {
        let o = Options::from_args(["knsq-lookupd"]).unwrap();
        assert!(super::server_config(&o).unwrap().is_none());
    }

    // Files with content are checked in tests/tests/lookupd_tls.rs, which has a test CA.
    #[test]
    fn incomplete_or_unreadable_tls_flags_name_their_flag() {
        assert_eq!(
            error(&["--grpc-tls-cert=c.pem"]),
            "invalid value for --grpc-tls-key: is needed with --grpc-tls-cert"
        );
        assert_eq!(
            error(&["-grpc-tls-key=k.pem"]),
            "invalid value for --grpc-tls-cert: is needed with --grpc-tls-key"
        );
        assert!(
            error(&["--grpc-tls-client-ca-file=ca.pem"])
                .starts_with("invalid value for --grpc-tls-client-ca-file: needs --grpc-tls-cert")
        );
        let e = error(&[
            "--grpc-tls-cert=/no/such/cert.pem",
            "--grpc-tls-key=/no/such/key.pem",
        ]);
        assert!(
            e.starts_with("invalid value for --grpc-tls-cert: cannot read /no/such/cert.pem"),
            "{e}"
        );
    }
}
