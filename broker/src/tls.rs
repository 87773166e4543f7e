//! TLS for client connections: the rustls server config built from nsqd's flags, and what a
//! finished handshake tells `/stats` and the auth server.

use crate::config::{ClientAuthPolicy, ConfigError, TlsOptions};
use crate::pem;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// The server config for TCP (and HTTPS) clients, or `None` without `--tls-cert`.
pub(crate) fn server_config(o: &TlsOptions) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
    let (Some(cert_path), Some(key_path)) = (&o.tls_cert, &o.tls_key) else {
        return Ok(None);
    };
    let identity = pem::identity("tls-cert", cert_path, "tls-key", key_path)?;
    let provider = pem::crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(o.tls_min_version.rustls())
        .map_err(|e| ConfigError {
            flag: "tls-min-version",
            reason: e.to_string(),
        })?;
    let builder = match o.tls_client_auth_policy {
        None => builder.with_no_client_auth(),
        Some(ClientAuthPolicy::Require) => {
            builder.with_client_cert_verifier(Arc::new(AnyClientCert {
                algorithms: provider.signature_verification_algorithms,
            }))
        }
        Some(ClientAuthPolicy::RequireVerify) => {
            // Without a CA file nsqd verifies client certificates against the system's CAs.
            let (roots, flag, source) = match &o.tls_root_ca_file {
                Some(path) => (
                    pem::root_store("tls-root-ca-file", path)?.store,
                    "tls-root-ca-file",
                    path.display().to_string(),
                ),
                None => (
                    pem::system_roots(
                        "tls-client-auth-policy",
                        "require-verify needs --tls-root-ca-file or the system's CA certificates",
                    )?,
                    "tls-client-auth-policy",
                    "the system's CA certificates".to_string(),
                ),
            };
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ConfigError {
                    flag,
                    reason: format!("{source}: {e}"),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(identity.certs, identity.key)
        .map_err(|e| config_error("tls-key", key_path, e))?;
    Ok(Some(Arc::new(config)))
}

fn config_error(flag: &'static str, path: &Path, e: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        flag,
        reason: format!("{}: {e}", path.display()),
    }
}

/// `--tls-client-auth-policy=require`: a client must show a certificate (and prove it holds
/// its key), which nobody vouches for, as Go's `RequireAnyClientCert`.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client's TLS session as `/stats` reports it (nsqd's names) and the auth server is told.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TlsSummary {
    /// nsqd's name: `TLS1.2`, `TLS1.3`.
    pub(crate) version: &'static str,
    /// Go's name, e.g. `TLS_AES_128_GCM_SHA256`.
    pub(crate) cipher_suite: String,
    pub(crate) negotiated_protocol: String,
    /// The subject common name of the client's certificate, if it sent one.
    pub(crate) common_name: String,
}

impl TlsSummary {
    pub(crate) fn of(conn: &ServerConnection) -> TlsSummary {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS1.2",
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS1.3",
            _ => "Unknown",
        };
        let cipher_suite = conn
            .negotiated_cipher_suite()
            .map(|s| {
                let suite = s.suite();
                let name = suite
                    .as_str()
                    .map_or_else(|| format!("{suite:?}"), str::to_string);
                // rustls names TLS 1.3 suites TLS13_*; Go (and so nsqd) names them TLS_*.
                match name.strip_prefix("TLS13_") {
                    Some(rest) => format!("TLS_{rest}"),
                    None => name,
                }
            })
            .unwrap_or_default();
        TlsSummary {
            version,
            cipher_suite,
            negotiated_protocol: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
            common_name: conn
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| common_name(cert))
                .unwrap_or_default(),
        }
    }
}

/// The subject common name of a DER certificate: Certificate → tbsCertificate → the subject
/// (after an optional version, the serial, the signature algorithm, the issuer, the validity)
/// → the last attribute with OID 2.5.4.3, as Go's `Subject.CommonName`.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, certificate, _) = read_tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = read_tlv(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    // [0] version, when present.
    if tbs.first() == Some(&0xa0) {
        tbs = read_tlv(tbs)?.2;
    }
    // serial, signature, issuer, validity
    for _ in 0..4 {
        tbs = read_tlv(tbs)?.2;
    }
    let (tag, mut subject, _) = read_tlv(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut found = None;
    while !subject.is_empty() {
        let (_, mut set, rest) = read_tlv(subject)?;
        subject = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = read_tlv(set)?;
            set = rest;
            let (oid_tag, oid, value) = read_tlv(attribute)?;
            if oid_tag == 0x06 && oid == CN_OID {
                let (_, text, _) = read_tlv(value)?;
                found = Some(text);
            }
        }
    }
    found.and_then(|text| std::str::from_utf8(text).ok().map(str::to_string))
}

/// One DER element: its tag, its contents and what follows it.
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        rest = &rest[count..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_with_cn(cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "knsq");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn tls_options(args: &[String]) -> TlsOptions {
        let args = std::iter::once("knsq-broker".to_string()).chain(args.iter().cloned());
        crate::Options::from_args(args).unwrap().tls
    }

    #[test]
    fn the_files_of_the_tls_flags_are_read_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::pem::self_signed(dir.path(), "a");
        let (_, other_key) = crate::pem::self_signed(dir.path(), "b");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not PEM").unwrap();
        let [cert, key, other_key, garbage] =
            [cert, key, other_key, garbage].map(|p| p.display().to_string());
        let error = |args: &[String]| server_config(&tls_options(args)).unwrap_err();

        assert!(server_config(&tls_options(&[])).unwrap().is_none());
        let files = [format!("--tls-cert={cert}"), format!("--tls-key={key}")];
        assert!(server_config(&tls_options(&files)).unwrap().is_some());
        let verify = "--tls-client-auth-policy=require-verify".to_string();
        let with_ca = |ca: &str| {
            [
                &files[..],
                &[verify.clone(), format!("--tls-root-ca-file={ca}")],
            ]
            .concat()
        };
        assert!(
            server_config(&tls_options(&with_ca(&cert)))
                .unwrap()
                .is_some()
        );

        let e = error(&[format!("--tls-cert={garbage}"), files[1].clone()]);
        assert_eq!(e.flag, "tls-cert");
        let e = error(&[files[0].clone(), format!("--tls-key={other_key}")]);
        assert_eq!(e.flag, "tls-key");
        assert!(e.reason.contains("does not fit the certificate"), "{e}");
        let e = error(&with_ca(&garbage));
        assert_eq!(e.flag, "tls-root-ca-file");
        assert!(e.reason.starts_with("no PEM certificate in"), "{e}");

        // Without a CA file, client certificates are verified against the system's CAs, as
        // nsqd's; a system without usable ones is refused (pem's tests cover that wording).
        let system = [&files[..], std::slice::from_ref(&verify)].concat();
        match crate::pem::system_roots("f", "x") {
            Ok(_) => assert!(server_config(&tls_options(&system)).unwrap().is_some()),
            Err(_) => assert_eq!(error(&system).flag, "tls-client-auth-policy"),
        }
    }

    #[test]
    fn common_name_is_read_from_the_subject() {
        assert_eq!(
            common_name(&cert_with_cn(Some("client-7"))).as_deref(),
            Some("client-7")
        );
        assert_eq!(common_name(&cert_with_cn(None)), None);

        // rcgen keeps one value per attribute type, so a subject with two CNs is built by
        // hand: just the parts of a certificate the reader walks.
        fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
            let len = u8::try_from(contents.len()).unwrap();
            assert!(len < 0x80);
            [&[tag, len][..], contents].concat()
        }
        let cn = |text: &str| {
            let attribute = [tlv(0x06, &[0x55, 0x04, 0x03]), tlv(0x0c, text.as_bytes())].concat();
            tlv(0x31, &tlv(0x30, &attribute))
        };
        let subject = tlv(0x30, &[cn("first"), cn("last")].concat());
        let skipped = tlv(0x02, &[1]).repeat(4); // serial, signature, issuer, validity
        let der = tlv(0x30, &tlv(0x30, &[skipped, subject].concat()));
        assert_eq!(common_name(&der).as_deref(), Some("last"));
    }

    #[test]
    fn common_name_of_garbage_is_none() {
        let der = cert_with_cn(Some("x"));
        for cut in [0, 1, 2, 10, der.len() / 2, der.len() - 1] {
            // Truncations must not panic; most are refused.
            let _ = common_name(&der[..cut]);
        }
        assert_eq!(common_name(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(common_name(b"hello"), None);
    }
}
