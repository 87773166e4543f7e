//! TLS on the gRPC listener (`--grpc-tls-cert`, `--grpc-tls-key`), mutual when
//! `--grpc-tls-client-ca-file` is given. The files are read and checked once, at start:
//! tonic would accept an empty certificate file or a key of another certificate and only
//! fail each handshake later.

use crate::config::{ConfigError, Options};
use broker::pem;
use std::time::Duration;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A connection that has not finished its handshake by then is closed, so a client that
/// stalls in the handshake holds nothing for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's TLS configuration; `None` when the flags leave TLS off.
pub(crate) fn server_config(o: &Options) -> Result<Option<ServerTlsConfig>, ConfigError> {
    let files = pem::cert_and_key(
        "grpc-tls-cert",
        o.grpc_tls_cert.as_deref(),
        "grpc-tls-key",
        o.grpc_tls_key.as_deref(),
    )?;
    let Some((cert, key)) = files else {
        if o.grpc_tls_client_ca_file.is_some() {
            return Err(ConfigError {
                flag: "grpc-tls-client-ca-file",
                reason: "needs --grpc-tls-cert and --grpc-tls-key (TLS on the gRPC listener)"
                    .into(),
            });
        }
        return Ok(None);
    };
    let id = pem::identity("grpc-tls-cert", cert, "grpc-tls-key", key)?;
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(id.cert_pem, id.key_pem))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &o.grpc_tls_client_ca_file {
        let ca = pem::root_store("grpc-tls-client-ca-file", ca)?;
        // Required, not optional: a broker without a certificate signed by the CA fails the
        // handshake.
        config = config.client_ca_root(Certificate::from_pem(ca.pem));
    }
    Ok(Some(config))
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
