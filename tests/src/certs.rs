//! Certificates made by the tests themselves: a throwaway CA, server certificates for
//! loopback, and client certificates, written as PEM files the binaries take as flags.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tempfile::TempDir;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// The certificate chain and key for a rustls client or server config.
    pub fn load(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let certs = CertificateDer::pem_file_iter(&self.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.key)?;
        Ok((certs, key))
    }
}

/// A test certificate authority with its files in a temporary directory.
pub struct TestCa {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Result<TestCa> {
        let dir = tempfile::tempdir()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "knsq test CA");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem())?;
        Ok(TestCa {
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            ca_file,
            dir,
        })
    }

    /// The CA certificate's PEM file (for `--tls-root-ca-file` and clients).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A server certificate for `localhost` and 127.0.0.1, named `<name>.pem`/`<name>-key.pem`.
    pub fn server(&self, name: &str) -> Result<CertFiles> {
        self.issue(
            name,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject common name is `common_name`.
    pub fn client(&self, name: &str, common_name: &str) -> Result<CertFiles> {
        self.issue(name, common_name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        name: &str,
        common_name: &str,
        alt_names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertFiles> {
        let names: Vec<String> = alt_names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }

    /// A rustls client config trusting this CA, presenting `identity` if given.
    pub fn client_config(&self, identity: Option<&CertFiles>) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let config = match identity {
            Some(files) => {
                let (certs, key) = files.load()?;
                builder
                    .with_client_auth_cert(certs, key)
                    .context("client certificate")?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// The name clients check the test server certificates against.
pub fn loopback_name() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a valid DNS name")
}
