//! TLS where knsq is the server: the rustls config for NSQ TCP and HTTPS clients, with
//! nsqd's client certificate policies; the gRPC listener's config; and what a finished
//! handshake tells `/stats` and the auth server; and the HTTPS listener ([`https`]).

mod https;

use super::{Identity, crypto_provider};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConnection, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};
use std::sync::Arc;

pub use https::{HttpsListener, https_config};

/// The client certificates a server asks for.
#[derive(Debug)]
pub enum ClientCerts {
    /// None.
    Optional,
    /// Any certificate, not verified, as Go's `RequireAnyClientCert` (nsqd's `require`).
    Any,
    /// One signed by these authorities (nsqd's `require-verify`).
    Verified(RootCertStore),
}

/// Why a server config could not be built from files that were read fine.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("{0}")]
    Versions(#[source] rustls::Error),
    #[error("{0}")]
    ClientVerifier(#[source] VerifierBuilderError),
    #[error("{0}")]
    Identity(#[source] rustls::Error),
}

/// The rustls config for a TLS server: `identity` shown to clients, TLS `versions` offered,
/// `client_certs` asked of them.
pub fn config(
    identity: Identity,
    versions: &[&'static SupportedProtocolVersion],
    client_certs: ClientCerts,
) -> Result<Arc<ServerConfig>, ServerTlsError> {
    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(ServerTlsError::Versions)?;
    let builder = match client_certs {
        ClientCerts::Optional => builder.with_no_client_auth(),
        ClientCerts::Any => builder.with_client_cert_verifier(Arc::new(AnyClientCert {
            algorithms: provider.signature_verification_algorithms,
        })),
        ClientCerts::Verified(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(ServerTlsError::ClientVerifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(identity.certs, identity.key)
        .map_err(ServerTlsError::Identity)?;
    Ok(Arc::new(config))
}

/// A connection that has not finished its gRPC handshake by then is closed, so a client that
/// stalls in the handshake holds nothing for long.
#[cfg(feature = "grpc-server")]
const GRPC_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The config of a gRPC (tonic) listener showing `identity`; with `client_ca`, clients must
/// show a certificate those authorities signed (mutual TLS).
#[cfg(feature = "grpc-server")]
pub fn grpc_config(
    identity: Identity,
    client_ca: Option<super::Roots>,
) -> tonic::transport::ServerTlsConfig {
    use tonic::transport::{Certificate, Identity as PemIdentity, ServerTlsConfig};
    let mut config = ServerTlsConfig::new()
        .identity(PemIdentity::from_pem(identity.cert_pem, identity.key_pem))
        .timeout(GRPC_HANDSHAKE_TIMEOUT);
    if let Some(ca) = client_ca {
        // Required, not optional: a client without a certificate signed by the CA fails the
        // handshake.
        config = config.client_ca_root(Certificate::from_pem(ca.pem));
    }
    config
}

/// The flags of a gRPC listener's TLS: a certificate, its key, and the authorities clients'
/// certificates must be signed by (mutual TLS).
#[cfg(feature = "grpc-server")]
#[derive(Debug, Clone, Copy)]
pub struct GrpcTlsFlags<'a> {
    pub cert: (&'static str, Option<&'a std::path::Path>),
    pub key: (&'static str, Option<&'a std::path::Path>),
    pub client_ca: (&'static str, Option<&'a std::path::Path>),
}

/// TLS on a gRPC listener from its flags; `None` when they leave it off. The files are read
/// and checked here: tonic would accept an empty certificate file or a key of another
/// certificate and only fail each handshake later.
#[cfg(feature = "grpc-server")]
pub fn grpc_tls(
    flags: GrpcTlsFlags<'_>,
) -> Result<Option<tonic::transport::ServerTlsConfig>, crate::flags::ConfigError> {
    let files = super::cert_and_key(flags.cert.0, flags.cert.1, flags.key.0, flags.key.1)?;
    let Some((cert, key)) = files else {
        if flags.client_ca.1.is_some() {
            return Err(crate::flags::ConfigError {
                flag: flags.client_ca.0,
                reason: format!(
                    "needs --{} and --{} (TLS on the gRPC listener)",
                    flags.cert.0, flags.key.0
                ),
            });
        }
        return Ok(None);
    };
    let identity = super::identity(flags.cert.0, cert, flags.key.0, key)?;
    let client_ca = match flags.client_ca.1 {
        Some(ca) => Some(super::root_store(flags.client_ca.0, ca)?),
        None => None,
    };
    Ok(Some(grpc_config(identity, client_ca)))
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
pub struct TlsSummary {
    /// nsqd's name: `TLS1.2`, `TLS1.3`.
    pub version: &'static str,
    /// Go's name, e.g. `TLS_AES_128_GCM_SHA256`.
    pub cipher_suite: String,
    pub negotiated_protocol: String,
    /// The subject common name of the client's certificate, if it sent one.
    pub common_name: String,
}

impl TlsSummary {
    pub fn of(conn: &ServerConnection) -> TlsSummary {
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
pub fn common_name(der: &[u8]) -> Option<String> {
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
