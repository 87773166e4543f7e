//! nsqd's flags for TLS and compressed client connections, and the TLS server config they
//! give (built by [`server_kit::tls::server`]).

use super::ConfigError;
use clap::Args;
use rustls::ServerConfig;
use server_kit::flags::parse_go_bool;
use server_kit::tls::server::{ClientCerts, ServerTlsError};
use server_kit::tls::{self, cert_and_key};
use std::path::PathBuf;
use std::sync::Arc;

/// Where TLS is required of clients (`--tls-required`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRequired {
    No,
    /// TCP clients and HTTP clients.
    Yes,
    /// TCP clients only: plain HTTP stays allowed (`tcp-https`).
    TcpOnly,
}

impl TlsRequired {
    /// nsqd's number for the setting (`/config/tls_required`).
    pub fn as_nsqd_int(self) -> u8 {
        match self {
            TlsRequired::No => 0,
            TlsRequired::TcpOnly => 1,
            TlsRequired::Yes => 2,
        }
    }
}

/// The oldest TLS version offered (`--tls-min-version`), as given. rustls speaks TLS 1.2 and
/// 1.3 only, so older minimums nsqd accepts mean TLS 1.2 (see [`TlsMinVersion::rustls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMinVersion {
    Ssl30,
    Tls10,
    Tls11,
    Tls12,
    Tls13,
}

impl TlsMinVersion {
    /// Go's `tls.Version*` number, which nsqd's `/config/tls_min_version` shows.
    pub fn as_go_version(self) -> u16 {
        match self {
            TlsMinVersion::Ssl30 => 0x0300,
            TlsMinVersion::Tls10 => 0x0301,
            TlsMinVersion::Tls11 => 0x0302,
            TlsMinVersion::Tls12 => 0x0303,
            TlsMinVersion::Tls13 => 0x0304,
        }
    }

    /// The versions rustls offers: TLS 1.2 and 1.3 for anything below `tls1.3`.
    pub fn rustls(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        const TLS12_UP: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            TlsMinVersion::Tls13 => TLS13,
            _ => TLS12_UP,
        }
    }
}

/// Client certificates asked of TCP and HTTPS clients (`--tls-client-auth-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthPolicy {
    /// Any certificate, not verified (`require`).
    Require,
    /// A certificate signed by `--tls-root-ca-file`, or without it by one of the system's CA
    /// certificates, as nsqd (`require-verify`).
    RequireVerify,
}

#[derive(Debug, Clone, Args)]
pub struct TlsOptions {
    /// Path to a PEM certificate (chain) for TLS with clients
    #[arg(long, env = "KNSQ_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Path to the PEM private key of --tls-cert
    #[arg(long, env = "KNSQ_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Client certificate policy: require (any certificate) or require-verify (signed by
    /// --tls-root-ca-file, or the system's CAs without it); either makes TLS required
    #[arg(long, env = "KNSQ_TLS_CLIENT_AUTH_POLICY", value_parser = parse_client_auth_policy)]
    pub tls_client_auth_policy: Option<ClientAuthPolicy>,

    /// Path to a PEM file of certificate authorities that sign client certificates
    #[arg(long, env = "KNSQ_TLS_ROOT_CA_FILE")]
    pub tls_root_ca_file: Option<PathBuf>,

    /// Require TLS of clients: true, false, or tcp-https (TCP only, plain HTTP allowed)
    #[arg(long, env = "KNSQ_TLS_REQUIRED", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_tls_required)]
    pub tls_required: TlsRequired,

    /// Oldest TLS version accepted: ssl3.0, tls1.0, tls1.1, tls1.2 or tls1.3 (below tls1.2
    /// means tls1.2, the oldest knsq speaks)
    #[arg(long, env = "KNSQ_TLS_MIN_VERSION", default_value = "tls1.0", value_parser = parse_tls_min_version)]
    pub tls_min_version: TlsMinVersion,

    /// <addr>:<port> to listen on for HTTPS clients (only with --tls-cert and --tls-key;
    /// empty for none)
    #[arg(long, env = "KNSQ_HTTPS_ADDRESS", default_value = "0.0.0.0:4152")]
    pub https_address: String,

    /// Offer snappy compression to clients
    #[arg(long, env = "KNSQ_SNAPPY", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "true", value_parser = parse_go_bool)]
    pub snappy: bool,

    /// Offer deflate compression to clients
    #[arg(long, env = "KNSQ_DEFLATE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "true", value_parser = parse_go_bool)]
    pub deflate: bool,

    /// Highest deflate level a client may ask for, 1 to 9
    #[arg(long, env = "KNSQ_MAX_DEFLATE_LEVEL", default_value_t = 6)]
    pub max_deflate_level: u8,
}

impl TlsOptions {
    /// Whether TLS is on for clients.
    pub fn enabled(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some()
    }

    /// Whether HTTPS is served: TLS on and a non-empty `--https-address`, as nsqd.
    pub fn serves_https(&self) -> bool {
        self.enabled() && !self.https_address.is_empty()
    }

    /// `--tls-required` as nsqd applies it: a client auth policy requires TLS.
    pub fn required(&self) -> TlsRequired {
        if self.tls_client_auth_policy.is_some() && self.tls_required == TlsRequired::No {
            TlsRequired::Yes
        } else {
            self.tls_required
        }
    }

    /// Checks the flags and reads their files: the server config for TCP (and HTTPS) clients,
    /// `None` without `--tls-cert`.
    pub(super) fn validate(&self) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
        let fail = |flag, reason: &str| {
            Err(ConfigError {
                flag,
                reason: reason.into(),
            })
        };
        if !(1..=9).contains(&self.max_deflate_level) {
            return fail("max-deflate-level", "must be in [1,9]");
        }
        cert_and_key(
            "tls-cert",
            self.tls_cert.as_deref(),
            "tls-key",
            self.tls_key.as_deref(),
        )?;
        if !self.enabled() && self.required() != TlsRequired::No {
            let flag = if self.tls_client_auth_policy.is_some() {
                "tls-client-auth-policy"
            } else {
                "tls-required"
            };
            return fail(
                flag,
                "cannot require TLS client connections without --tls-cert and --tls-key",
            );
        }
        // The files are read and checked here, so a bad one fails at start.
        server_config(self)
    }

    /// nsqd's config value for `name`, if it is one of these options.
    pub(super) fn config_value(&self, name: &str) -> Option<serde_json::Value> {
        use serde_json::json;
        let path = |p: &Option<PathBuf>| {
            json!(
                p.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        };
        Some(match name {
            "tls_cert" => path(&self.tls_cert),
            "tls_key" => path(&self.tls_key),
            "tls_root_ca_file" => path(&self.tls_root_ca_file),
            "tls_client_auth_policy" => json!(match self.tls_client_auth_policy {
                None => "",
                Some(ClientAuthPolicy::Require) => "require",
                Some(ClientAuthPolicy::RequireVerify) => "require-verify",
            }),
            "tls_required" => json!(self.required().as_nsqd_int()),
            "tls_min_version" => json!(self.tls_min_version.as_go_version()),
            "https_address" => json!(self.https_address),
            "snappy" => json!(self.snappy),
            "deflate" => json!(self.deflate),
            "max_deflate_level" => json!(self.max_deflate_level),
            _ => return None,
        })
    }
}

/// The server config for TCP (and HTTPS) clients, or `None` without `--tls-cert`.
fn server_config(o: &TlsOptions) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
    let (Some(cert_path), Some(key_path)) = (&o.tls_cert, &o.tls_key) else {
        return Ok(None);
    };
    let identity = tls::identity("tls-cert", cert_path, "tls-key", key_path)?;
    // Without a CA file nsqd verifies client certificates against the system's CAs.
    let (client_certs, roots_flag, roots_source) = match o.tls_client_auth_policy {
        None => (ClientCerts::Optional, "", String::new()),
        Some(ClientAuthPolicy::Require) => (ClientCerts::Any, "", String::new()),
        Some(ClientAuthPolicy::RequireVerify) => match &o.tls_root_ca_file {
            Some(path) => (
                ClientCerts::Verified(tls::root_store("tls-root-ca-file", path)?.store),
                "tls-root-ca-file",
                path.display().to_string(),
            ),
            None => (
                ClientCerts::Verified(tls::system_roots(
                    "tls-client-auth-policy",
                    "require-verify needs --tls-root-ca-file or the system's CA certificates",
                )?),
                "tls-client-auth-policy",
                "the system's CA certificates".to_string(),
            ),
        },
    };
    let config = tls::server::config(identity, o.tls_min_version.rustls(), client_certs);
    config.map(Some).map_err(|e| match e {
        ServerTlsError::Versions(e) => ConfigError {
            flag: "tls-min-version",
            reason: e.to_string(),
        },
        ServerTlsError::ClientVerifier(e) => ConfigError {
            flag: roots_flag,
            reason: format!("{roots_source}: {e}"),
        },
        ServerTlsError::Identity(e) => ConfigError {
            flag: "tls-key",
            reason: format!("{}: {e}", key_path.display()),
        },
    })
}

fn parse_tls_required(text: &str) -> Result<TlsRequired, String> {
    let lower = text.to_ascii_lowercase();
    if lower == "tcp-https" {
        return Ok(TlsRequired::TcpOnly);
    }
    match parse_go_bool(&lower) {
        Ok(true) => Ok(TlsRequired::Yes),
        Ok(false) => Ok(TlsRequired::No),
        Err(_) => Err(format!("{text:?} is not true, false or tcp-https")),
    }
}

/// nsqd's versions; empty keeps the default (`tls_min_version = ""` in nsqd's example config).
fn parse_tls_min_version(text: &str) -> Result<TlsMinVersion, String> {
    match text.to_ascii_lowercase().as_str() {
        "ssl3.0" => Ok(TlsMinVersion::Ssl30),
        "tls1.0" | "" => Ok(TlsMinVersion::Tls10),
        "tls1.1" => Ok(TlsMinVersion::Tls11),
        "tls1.2" => Ok(TlsMinVersion::Tls12),
        "tls1.3" => Ok(TlsMinVersion::Tls13),
        _ => Err(format!(
            "{text:?} is not one of ssl3.0, tls1.0, tls1.1, tls1.2, tls1.3"
        )),
    }
}

fn parse_client_auth_policy(text: &str) -> Result<ClientAuthPolicy, String> {
    match text {
        "require" => Ok(ClientAuthPolicy::Require),
        "require-verify" => Ok(ClientAuthPolicy::RequireVerify),
        _ => Err(format!("{text:?} is not require or require-verify")),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Options;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::from_args(std::iter::once("knsq-broker").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_nsqds() {
        let o = parse(&[]).unwrap();
        assert!(!o.tls.enabled());
        assert_eq!(o.tls.required(), super::TlsRequired::No);
        assert!(o.tls.snappy && o.tls.deflate);
        assert_eq!(o.tls.max_deflate_level, 6);
        assert_eq!(o.tls.https_address, "0.0.0.0:4152");
        o.validate().unwrap();
    }

    #[test]
    fn go_syntax_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = server_kit::tls::self_signed(dir.path(), "a");
        let cert = format!("-tls-cert={}", cert.display());
        let key = key.display().to_string();
        let o = parse(&[
            "-snappy=false",
            "--deflate=false",
            "-tls-required",
            &cert,
            "-tls-key",
            &key,
            "-tls-min-version=tls1.3",
        ])
        .unwrap();
        assert!(!o.tls.snappy && !o.tls.deflate);
        assert_eq!(o.tls.required(), super::TlsRequired::Yes);
        assert_eq!(o.tls.tls_min_version, super::TlsMinVersion::Tls13);
        o.validate().unwrap();
        // A file that cannot be read fails validation, not the running broker.
        let o = parse(&["--tls-cert=/no/c.pem", "--tls-key=/no/k.pem"]).unwrap();
        assert_eq!(o.validate().unwrap_err().flag, "tls-cert");
        let o = parse(&["--tls-required=tcp-https"]).unwrap();
        assert_eq!(o.tls.tls_required, super::TlsRequired::TcpOnly);
        assert!(parse(&["--tls-required=maybe"]).is_err());
        assert!(parse(&["--tls-min-version=tls2"]).is_err());
        assert!(parse(&["--tls-client-auth-policy=sometimes"]).is_err());
    }

    #[test]
    fn bad_combinations_name_their_flag() {
        let flag = |args: &[&str]| parse(args).unwrap().validate().unwrap_err().flag;
        assert_eq!(flag(&["--max-deflate-level=0"]), "max-deflate-level");
        assert_eq!(flag(&["--max-deflate-level=10"]), "max-deflate-level");
        assert_eq!(flag(&["--tls-cert=c.pem"]), "tls-key");
        assert_eq!(flag(&["--tls-key=k.pem"]), "tls-cert");
        assert_eq!(flag(&["--tls-required"]), "tls-required");
        assert_eq!(
            flag(&["--tls-client-auth-policy=require"]),
            "tls-client-auth-policy"
        );
    }

    #[test]
    fn tls_min_version_is_reported_as_given() {
        use super::TlsMinVersion::*;
        for (text, version, number) in [
            ("ssl3.0", Ssl30, 768),
            ("tls1.0", Tls10, 769),
            ("tls1.1", Tls11, 770),
            ("tls1.2", Tls12, 771),
            ("TLS1.3", Tls13, 772),
        ] {
            let o = parse(&[&format!("--tls-min-version={text}")]).unwrap();
            assert_eq!(o.tls.tls_min_version, version);
            let value = o.config_value("tls_min_version");
            assert_eq!(value, Some(serde_json::json!(number)), "{text}");
            let offered = version.rustls().len();
            assert_eq!(offered, if version == Tls13 { 1 } else { 2 }, "{text}");
        }
        let o = parse(&[]).unwrap();
        assert_eq!(o.tls.tls_min_version, Tls10);
        assert_eq!(
            o.config_value("tls_min_version"),
            Some(serde_json::json!(769))
        );
    }

    #[test]
    fn auth_policy_makes_tls_required() {
        let o = parse(&[
            "--tls-cert=c",
            "--tls-key=k",
            "--tls-client-auth-policy=require",
        ])
        .unwrap();
        assert_eq!(o.tls.required(), super::TlsRequired::Yes);
        assert_eq!(o.config_value("tls_required"), Some(serde_json::json!(2)));
    }

    fn tls_options(args: &[String]) -> super::TlsOptions {
        let args = std::iter::once("knsq-broker".to_string()).chain(args.iter().cloned());
        Options::from_args(args).unwrap().tls
    }

    #[test]
    fn the_files_of_the_tls_flags_are_read_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = server_kit::tls::self_signed(dir.path(), "a");
        let (_, other_key) = server_kit::tls::self_signed(dir.path(), "b");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not PEM").unwrap();
        let [cert, key, other_key, garbage] =
            [cert, key, other_key, garbage].map(|p| p.display().to_string());
        let error = |args: &[String]| super::server_config(&tls_options(args)).unwrap_err();

        assert!(super::server_config(&tls_options(&[])).unwrap().is_none());
        let files = [format!("--tls-cert={cert}"), format!("--tls-key={key}")];
        assert!(
            super::server_config(&tls_options(&files))
                .unwrap()
                .is_some()
        );
        let verify = "--tls-client-auth-policy=require-verify".to_string();
        let with_ca = |ca: &str| {
            [
                &files[..],
                &[verify.clone(), format!("--tls-root-ca-file={ca}")],
            ]
            .concat()
        };
        assert!(
            super::server_config(&tls_options(&with_ca(&cert)))
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
        match server_kit::tls::system_roots("f", "x") {
            Ok(_) => assert!(
                super::server_config(&tls_options(&system))
                    .unwrap()
                    .is_some()
            ),
            Err(_) => assert_eq!(error(&system).flag, "tls-client-auth-policy"),
        }
    }
}
