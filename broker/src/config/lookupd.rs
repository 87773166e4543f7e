//! The `--lookupd-*` flags that need more than their type: TLS to lookupds, and addresses that
//! agree with it.

use super::{ConfigError, Options};
use server_kit::tls::client::{GrpcClientTls, grpc_endpoint_uri};
use server_kit::tls::{self, cert_and_key};

/// The flag that turns TLS to lookupds on, named in errors about addresses.
pub(crate) const TLS_FLAG: &str = "lookupd-tls";

/// Whether TLS is on for lookupd connections: `--lookupd-tls`, or any file it reads.
fn tls_enabled(o: &Options) -> bool {
    o.lookupd_tls
        || o.lookupd_tls_root_ca_file.is_some()
        || o.lookupd_tls_cert.is_some()
        || o.lookupd_tls_key.is_some()
}

/// Checks the `--lookupd-tls*` flags, reading their files, and that every
/// `--lookupd-grpc-address` agrees with them; `None` when TLS to lookupds is off.
pub(super) fn client_tls(o: &Options) -> Result<Option<GrpcClientTls>, ConfigError> {
    let tls = read_client_tls(o)?;
    for address in &o.lookupd_grpc_addresses {
        grpc_endpoint_uri(address.trim(), tls.is_some(), TLS_FLAG).map_err(|reason| {
            ConfigError {
                flag: "lookupd-grpc-address",
                reason,
            }
        })?;
    }
    Ok(tls)
}

fn read_client_tls(o: &Options) -> Result<Option<GrpcClientTls>, ConfigError> {
    if !tls_enabled(o) {
        if o.lookupd_tls_server_name.is_some() {
            return Err(ConfigError {
                flag: "lookupd-tls-server-name",
                reason: "is only used with TLS to lookupds: add --lookupd-tls".into(),
            });
        }
        return Ok(None);
    }
    let roots = match &o.lookupd_tls_root_ca_file {
        Some(path) => tls::root_store("lookupd-tls-root-ca-file", path)?.store,
        None => tls::system_roots(
            "lookupd-tls",
            "TLS to lookupds needs --lookupd-tls-root-ca-file or the system's CA certificates",
        )?,
    };
    let files = cert_and_key(
        "lookupd-tls-cert",
        o.lookupd_tls_cert.as_deref(),
        "lookupd-tls-key",
        o.lookupd_tls_key.as_deref(),
    )?;
    let identity = match files {
        None => None,
        Some((cert, key)) => Some(tls::identity(
            "lookupd-tls-cert",
            cert,
            "lookupd-tls-key",
            key,
        )?),
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
    Ok(Some(GrpcClientTls::new(roots, identity, server_name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use server_kit::tls::self_signed;

    fn options(args: &[String]) -> Options {
        Options::from_args(std::iter::once("knsq-broker".to_string()).chain(args.iter().cloned()))
            .unwrap()
    }

    fn error(args: &[String]) -> ConfigError {
        options(args).validate().unwrap_err()
    }

    #[test]
    fn tls_is_off_by_default_and_turned_on_by_any_of_its_files() {
        assert!(read_client_tls(&options(&[])).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "ca");
        let o = options(&[format!("--lookupd-tls-root-ca-file={}", cert.display())]);
        assert!(tls_enabled(&o));
        let tls = read_client_tls(&o).unwrap().unwrap();
        assert!(!tls.has_identity() && tls.server_name().is_none());
        let o = options(&[
            format!("-lookupd-tls-root-ca-file={}", cert.display()),
            format!("-lookupd-tls-cert={}", cert.display()),
            format!("-lookupd-tls-key={}", key.display()),
            "-lookupd-tls-server-name=lookupd.internal".into(),
            "-lookupd-grpc-address=lookupd-0:4160".into(),
        ]);
        o.validate().unwrap();
        let tls = read_client_tls(&o).unwrap().unwrap();
        assert!(tls.has_identity());
        assert_eq!(tls.server_name(), Some("lookupd.internal"));
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
        let e = error(&[ca.clone(), "--lookupd-tls-server-name= ".into()]);
        assert_eq!(e.flag, "lookupd-tls-server-name");
        let e = error(&[ca, "--lookupd-grpc-address=http://l:4160".into()]);
        assert_eq!(e.flag, "lookupd-grpc-address");
    }
}
