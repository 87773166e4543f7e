//! One client connection: magic, IDENTIFY with the TLS and compression upgrades it asks
//! for, and reading frames with `proto::wire`.

use ::tests::transport::{ClientStream, Compression};
use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use proto::wire::{Command, Frame, MAGIC_V2};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest frame accepted from the broker; far above any message the bench sends.
pub(crate) const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Read buffer size: enough for hundreds of 200-byte message frames per read.
const READ_BUF: usize = 256 * 1024;

/// A connection with its own read buffer (so reads are cancel-safe) and write buffer.
pub(crate) struct Conn {
    pub(crate) stream: ClientStream,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
}

/// What the broker told us in its IDENTIFY response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub(crate) max_rdy_count: Option<u64>,
}

/// IDENTIFY options a connection asks for.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IdentifyOpts {
    pub(crate) output_buffer_size: Option<i64>,
    pub(crate) output_buffer_timeout: Option<i64>,
    pub(crate) tls_v1: bool,
    pub(crate) snappy: bool,
    pub(crate) deflate: bool,
    pub(crate) deflate_level: Option<u32>,
}

impl IdentifyOpts {
    pub(crate) fn json(&self) -> String {
        let mut json = format!(
            concat!(
                "{{\"feature_negotiation\":true,\"client_id\":\"knsq-bench\",",
                "\"hostname\":\"knsq-bench\",\"user_agent\":\"knsq-bench/{}\""
            ),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(v) = self.output_buffer_size {
            json.push_str(&format!(",\"output_buffer_size\":{v}"));
        }
        if let Some(v) = self.output_buffer_timeout {
            json.push_str(&format!(",\"output_buffer_timeout\":{v}"));
        }
        if self.tls_v1 {
            json.push_str(",\"tls_v1\":true");
        }
        if self.snappy {
            json.push_str(",\"snappy\":true");
        }
        if self.deflate {
            json.push_str(",\"deflate\":true");
        }
        if let Some(v) = self.deflate_level {
            json.push_str(&format!(",\"deflate_level\":{v}"));
        }
        json.push('}');
        json
    }
}

/// How a connection verifies the broker when it asks for TLS.
#[derive(Debug, Clone)]
pub(crate) struct TlsSetup {
    pub(crate) config: Arc<ClientConfig>,
    /// The name (or IP address) the broker's certificate must carry: the host of --address.
    pub(crate) name: ServerName<'static>,
}

impl TlsSetup {
    /// Trusts the CA certificates in `root_ca` (PEM), or with `root_ca` None any certificate
    /// at all (--tls-skip-verify).
    pub(crate) fn new(address: &str, root_ca: Option<&Path>) -> Result<TlsSetup> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let config = match root_ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("reading {}", path.display()))?;
                if certs.is_empty() {
                    bail!("{} holds no certificate", path.display());
                }
                for cert in certs {
                    roots.add(cert)?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SkipVerify(provider)))
                .with_no_client_auth(),
        };
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| anyhow!("{host:?} is not a valid TLS server name"))?;
        Ok(TlsSetup {
            config: Arc::new(config),
            name,
        })
    }
}

/// Accepts any server certificate (but still checks the handshake signatures, which prove
/// the server holds the key of the certificate it sent).
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Conn {
    /// Connects, sends the magic and IDENTIFY, reads the broker's answer and performs the
    /// upgrades `identify` asks for, failing if the broker did not agree to one.
    pub(crate) async fn open(
        address: &str,
        identify: &IdentifyOpts,
        tls: Option<&TlsSetup>,
    ) -> Result<(Conn, Negotiated)> {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream: ClientStream::tcp(stream),
            rbuf: BytesMut::with_capacity(READ_BUF),
            wbuf: BytesMut::with_capacity(64 * 1024),
        };
        conn.wbuf.extend_from_slice(MAGIC_V2);
        Command::Identify(identify.json().into()).encode(&mut conn.wbuf);
        conn.flush().await?;
        let response = match conn
            .read_frame()
            .await
            .context("reading IDENTIFY response")?
        {
            Frame::Response(body) => body,
            Frame::Error(e) => bail!("IDENTIFY failed: {}", String::from_utf8_lossy(&e)),
            Frame::Message(_) => bail!("message frame in answer to IDENTIFY"),
        };
        // A plain `OK` (no feature negotiation) agrees to nothing.
        let json = response.first() == Some(&b'{');
        let agreed = |key: &str| json && json_bool(&response, key) == Some(true);
        let negotiated = Negotiated {
            max_rdy_count: json.then(|| json_u64(&response, "max_rdy_count")).flatten(),
        };
        // The upgrades in nsqd's order, each acknowledged by an OK through the new layer.
        if identify.tls_v1 {
            let tls = tls.ok_or_else(|| anyhow!("TLS asked for without a TLS setup"))?;
            if !agreed("tls_v1") {
                bail!("server refused TLS (tls_v1 is not true in its IDENTIFY response)");
            }
            if !conn.rbuf.is_empty() {
                bail!("the server sent data before the TLS handshake");
            }
            conn.stream
                .start_tls(tls.config.clone(), tls.name.clone())
                .await
                .context("TLS handshake")?;
            conn.expect_ok("TLS upgrade").await?;
        }
        let compression = match (identify.snappy, identify.deflate) {
            (true, _) if !agreed("snappy") => bail!("server refused snappy"),
            (true, _) => Some(Compression::Snappy),
            (_, true) if !agreed("deflate") => bail!("server refused deflate"),
            (_, true) => {
                let level = json_u64(&response, "deflate_level").unwrap_or(6);
                Some(Compression::Deflate(u32::try_from(level).unwrap_or(9)))
            }
            _ => None,
        };
        if let Some(compression) = compression {
            // Bytes read past the IDENTIFY response (or the TLS OK) are already compressed.
            let already_read = conn.rbuf.split();
            conn.stream.start_compression(compression, &already_read)?;
            conn.expect_ok("compression upgrade").await?;
        }
        Ok((conn, negotiated))
    }

    /// Writes and clears the write buffer.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            // Free on plain TCP; pushes out TLS records and compressed bytes.
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Writes `bytes` now, bypassing the write buffer.
    pub(crate) async fn write_now(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads more bytes into the read buffer; cancel-safe. Fails when the broker closed.
    pub(crate) async fn fill(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_BUF / 4 {
            self.rbuf.reserve(READ_BUF);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("broker closed the connection");
        }
        Ok(())
    }

    /// The next frame, skipping heartbeats (answered with NOP); cancel-safe.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            while let Some(frame) = Frame::decode(&mut self.rbuf, MAX_FRAME)? {
                if matches!(&frame, Frame::Response(b) if b[..] == *proto::wire::HEARTBEAT) {
                    Command::Nop.encode(&mut self.wbuf);
                    self.flush().await?;
                    continue;
                }
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Reads a frame that must be `OK`.
    pub(crate) async fn expect_ok(&mut self, what: &str) -> Result<()> {
        match self.read_frame().await? {
            Frame::Response(b) if b[..] == *proto::wire::OK => Ok(()),
            other => bail!("{what}: expected OK, got {}", describe(&other)),
        }
    }
}

/// A frame for an error message.
pub(crate) fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Response(b) => format!("response {:?}", String::from_utf8_lossy(b)),
        Frame::Error(b) => format!("error {:?}", String::from_utf8_lossy(b)),
        Frame::Message(m) => format!("message {}", m.id),
    }
}

/// What follows `"key":` in a flat JSON object, without a JSON parser.
fn json_value<'a>(json: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let pat = format!("\"{key}\"");
    let at = json.windows(pat.len()).position(|w| w == pat.as_bytes())?;
    let rest = &json[at + pat.len()..];
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b":")?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    Some(&rest[start..])
}

/// The boolean value of `"key":` in a flat JSON object.
pub(crate) fn json_bool(json: &[u8], key: &str) -> Option<bool> {
    let value = json_value(json, key)?;
    if value.starts_with(b"true") {
        Some(true)
    } else if value.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

/// The unsigned integer value of `"key":` in a flat JSON object.
pub(crate) fn json_u64(json: &[u8], key: &str) -> Option<u64> {
    let digits = json_value(json, key)?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_json() {
        let plain = IdentifyOpts::default().json();
        assert!(
            plain.starts_with("{\"feature_negotiation\":true,"),
            "{plain}"
        );
        assert!(plain.ends_with('}'));
        let buffered = IdentifyOpts {
            output_buffer_size: Some(-1),
            output_buffer_timeout: Some(25),
            ..IdentifyOpts::default()
        }
        .json();
        assert!(
            buffered.ends_with(",\"output_buffer_size\":-1,\"output_buffer_timeout\":25}"),
            "{buffered}"
        );
        let upgraded = IdentifyOpts {
            tls_v1: true,
            deflate: true,
            deflate_level: Some(3),
            ..IdentifyOpts::default()
        }
        .json();
        assert!(
            upgraded.ends_with(",\"tls_v1\":true,\"deflate\":true,\"deflate_level\":3}"),
            "{upgraded}"
        );
        let snappy = IdentifyOpts {
            snappy: true,
            ..IdentifyOpts::default()
        }
        .json();
        assert!(snappy.ends_with(",\"snappy\":true}"), "{snappy}");
        for json in [plain, buffered, upgraded, snappy] {
            serde_json::from_str::<serde_json::Value>(&json).unwrap();
        }
    }

    #[test]
    fn json_bool_finds_top_level_booleans() {
        let json = br#"{"tls_v1": true,"snappy":false,"deflate_level":6,"version":"true"}"#;
        assert_eq!(json_bool(json, "tls_v1"), Some(true));
        assert_eq!(json_bool(json, "snappy"), Some(false));
        assert_eq!(json_bool(json, "deflate_level"), None);
        assert_eq!(json_bool(json, "version"), None);
        assert_eq!(json_bool(json, "deflate"), None);
    }

    #[test]
    fn tls_setup_takes_the_name_from_the_address() {
        let ip = TlsSetup::new("127.0.0.1:4150", None).unwrap();
        assert_eq!(ip.name, ServerName::try_from("127.0.0.1").unwrap());
        let host = TlsSetup::new("localhost:4150", None).unwrap();
        assert_eq!(host.name, ServerName::try_from("localhost").unwrap());
        let v6 = TlsSetup::new("[::1]:4150", None).unwrap();
        assert_eq!(v6.name, ServerName::try_from("::1").unwrap());
        let missing = TlsSetup::new("127.0.0.1:4150", Some(Path::new("/nonexistent.pem")));
        assert!(format!("{:#}", missing.unwrap_err()).contains("/nonexistent.pem"));
    }

    #[test]
    fn json_u64_finds_top_level_numbers() {
        let json = br#"{"max_rdy_count": 2500,"version":"1.3.0","msg_timeout":60000}"#;
        assert_eq!(json_u64(json, "max_rdy_count"), Some(2500));
        assert_eq!(json_u64(json, "msg_timeout"), Some(60000));
        assert_eq!(json_u64(json, "version"), None);
        assert_eq!(json_u64(json, "missing"), None);
    }
}
