//! Reading the TLS files flags name: certificates, private keys, CA files and, without one,
//! the system's CA certificates. Every listener and client with TLS (TCP and HTTPS clients,
//! auth servers, lookupd's gRPC both ways) reads them here, so a bad file fails at start
//! with the same words and the name of its flag.

use crate::flags::ConfigError;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::Arc;

/// A certificate chain and its key, checked to belong together.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The two files as read, for what takes PEM (tonic).
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

// By hand, so the key is never printed.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

/// A CA file's certificates, every one a usable trust anchor.
#[derive(Debug)]
pub struct Roots {
    pub store: RootCertStore,
    /// The file as read, for what takes PEM (tonic).
    pub pem: Vec<u8>,
}

/// The crypto provider of every rustls config in knsq (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files of a certificate and of its key, which are given together or not at all.
pub fn cert_and_key<'a>(
    cert_flag: &'static str,
    cert: Option<&'a Path>,
    key_flag: &'static str,
    key: Option<&'a Path>,
) -> Result<Option<(&'a Path, &'a Path)>, ConfigError> {
    let needed = |flag, with| ConfigError {
        flag,
        reason: format!("is needed with --{with}"),
    };
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(needed(key_flag, cert_flag)),
        (None, Some(_)) => Err(needed(cert_flag, key_flag)),
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
    }
}

/// The certificate chain in `cert_path` and the private key in `key_path`. A key of another
/// certificate is refused here rather than at every handshake.
pub fn identity(
    cert_flag: &'static str,
    cert_path: &Path,
    key_flag: &'static str,
    key_path: &Path,
) -> Result<Identity, ConfigError> {
    let cert_pem = read(cert_flag, cert_path)?;
    let certs = certificates(cert_flag, cert_path, &cert_pem)?;
    let key_pem = read(key_flag, key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ConfigError {
        flag: key_flag,
        reason: match e {
            pem::Error::NoItemsFound => format!("no PEM private key in {}", key_path.display()),
            e => format!("{} is not valid PEM: {e}", key_path.display()),
        },
    })?;
    // Every TLS config in knsq uses this provider, so its check is the one that counts.
    CertifiedKey::from_der(certs.clone(), key.clone_key(), &crypto_provider()).map_err(|e| {
        ConfigError {
            flag: key_flag,
            reason: format!(
                "{} does not fit the certificate in {}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        }
    })?;
    Ok(Identity {
        certs,
        key,
        cert_pem,
        key_pem,
    })
}

/// A CA file. Every certificate in it must be a usable trust anchor: a file with one bad
/// entry is more likely a mistake than a wish to trust the rest (and tonic would skip it
/// silently).
pub fn root_store(flag: &'static str, path: &Path) -> Result<Roots, ConfigError> {
    let pem = read(flag, path)?;
    let mut store = RootCertStore::empty();
    for (i, cert) in certificates(flag, path, &pem)?.into_iter().enumerate() {
        store.add(cert).map_err(|e| ConfigError {
            flag,
            reason: format!(
                "certificate {} in {} is not usable as a CA: {e}",
                i + 1,
                path.display()
            ),
        })?;
    }
    Ok(Roots { store, pem })
}

/// The system's CA certificates, for a client given no CA file. `needs` says who wanted them
/// (e.g. "https:// auth servers need --tls-root-ca-file or the system's CA certificates").
pub fn system_roots(flag: &'static str, needs: &str) -> Result<RootCertStore, ConfigError> {
    usable_roots(rustls_native_certs::load_native_certs(), flag, needs)
}

/// The odd unparsable system certificate is skipped, as TLS clients do, but finding none at
/// all is an error rather than servers that can never be verified.
fn usable_roots(
    found: rustls_native_certs::CertificateResult,
    flag: &'static str,
    needs: &str,
) -> Result<RootCertStore, ConfigError> {
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added > 0 {
        return Ok(store);
    }
    let mut reason = format!("{needs}, and no usable system CA certificate was found");
    for e in &found.errors {
        reason.push_str(&format!("; {e}"));
    }
    Err(ConfigError { flag, reason })
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError {
        flag,
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

/// The certificates in a file read from `path`: at least one.
fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError {
            flag,
            reason: format!("{} is not valid PEM: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(ConfigError {
            flag,
            reason: format!("no PEM certificate in {}", path.display()),
        });
    }
    Ok(certs)
}

/// A self-signed certificate for `localhost` and its key, written to `dir` (for tests).
#[cfg(any(test, feature = "testing"))]
pub fn self_signed(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{CertificateParams, KeyPair};
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_certificate_and_its_key_come_together() {
        let (c, k) = (Some(Path::new("c.pem")), Some(Path::new("k.pem")));
        assert_eq!(cert_and_key("cert", None, "key", None).unwrap(), None);
        assert_eq!(
            cert_and_key("cert", c, "key", k).unwrap(),
            Some((Path::new("c.pem"), Path::new("k.pem")))
        );
        let e = cert_and_key("cert", c, "key", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid value for --key: is needed with --cert"
        );
        let e = cert_and_key("cert", None, "key", k).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid value for --cert: is needed with --key"
        );
    }

    #[test]
    fn an_identity_is_a_certificate_and_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "a");
        let (_, other_key) = self_signed(dir.path(), "b");
        let garbage = write(dir.path(), "garbage.pem", "not PEM at all");
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN PRIVATE KEY-----\n@@@\n",
        );

        let id = identity("c", &cert, "k", &key).unwrap();
        assert_eq!(id.certs.len(), 1);
        assert_eq!(id.cert_pem, std::fs::read(&cert).unwrap());
        assert_eq!(id.key_pem, std::fs::read(&key).unwrap());

        let e = identity("c", Path::new("/no/such.pem"), "k", &key).unwrap_err();
        assert_eq!(e.flag, "c");
        assert!(e.reason.starts_with("cannot read /no/such.pem: "), "{e}");
        let e = identity("c", &garbage, "k", &key).unwrap_err();
        assert_eq!(e.flag, "c");
        assert!(e.reason.starts_with("no PEM certificate in"), "{e}");
        let e = identity("c", &cert, "k", Path::new("/no/key.pem")).unwrap_err();
        assert_eq!(e.flag, "k");
        assert!(e.reason.starts_with("cannot read /no/key.pem: "), "{e}");
        let e = identity("c", &cert, "k", &garbage).unwrap_err();
        assert_eq!(e.flag, "k");
        assert!(e.reason.starts_with("no PEM private key in"), "{e}");
        let e = identity("c", &cert, "k", &broken).unwrap_err();
        assert_eq!(e.flag, "k");
        assert!(e.reason.contains("broken.pem is not valid PEM"), "{e}");
        let e = identity("c", &cert, "k", &other_key).unwrap_err();
        assert_eq!(e.flag, "k");
        assert!(e.reason.contains("does not fit the certificate in"), "{e}");
    }

    #[test]
    fn every_certificate_of_a_ca_file_must_be_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = self_signed(dir.path(), "a");
        let (b, _) = self_signed(dir.path(), "b");
        let both = std::fs::read_to_string(&a).unwrap() + &std::fs::read_to_string(&b).unwrap();
        let both = write(dir.path(), "both.pem", &both);
        let roots = root_store("ca", &both).unwrap();
        assert_eq!(roots.store.len(), 2);
        assert_eq!(roots.pem, std::fs::read(&both).unwrap());

        let e = root_store("ca", &dir.path().join("missing.pem")).unwrap_err();
        assert_eq!(e.flag, "ca");
        assert!(e.reason.starts_with("cannot read "), "{e}");
        assert!(e.reason.contains("missing.pem"), "{e}");
        let empty = write(dir.path(), "empty.pem", "not PEM\n");
        let e = root_store("ca", &empty).unwrap_err();
        assert!(e.reason.starts_with("no PEM certificate in"), "{e}");
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n@@@\n",
        );
        let e = root_store("ca", &broken).unwrap_err();
        assert!(e.reason.contains("is not valid PEM"), "{e}");
        // Valid PEM around bytes that are no certificate, after a good one.
        let junk = std::fs::read_to_string(&a).unwrap()
            + "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let junk = write(dir.path(), "junk.pem", &junk);
        let e = root_store("ca", &junk).unwrap_err();
        assert_eq!(e.flag, "ca");
        assert!(
            e.reason.starts_with("certificate 2 in ") && e.reason.contains("not usable as a CA"),
            "{e}"
        );
    }

    #[test]
    fn system_certificates_are_trusted_and_none_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed(dir.path(), "ca");
        let mut found = rustls_native_certs::CertificateResult::default();
        found
            .certs
            .push(CertificateDer::from_pem_file(&cert).unwrap());
        // An unparsable one beside it is skipped.
        found.certs.push(CertificateDer::from(vec![0u8; 3]));
        assert_eq!(usable_roots(found, "f", "x").unwrap().len(), 1);

        let e = usable_roots(Default::default(), "f", "clients need a CA").unwrap_err();
        assert_eq!(e.flag, "f");
        assert_eq!(
            e.reason,
            "clients need a CA, and no usable system CA certificate was found"
        );
    }
}
