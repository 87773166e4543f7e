//! The lookupd's options: nsqlookupd's flag names and defaults, each also settable from a
//! `KNSQ_LOOKUPD_<FLAG>` environment variable or from nsqlookupd's TOML config file
//! (`--config`), parsed with Go's flag syntax as well as GNU's.

use crate::registry::Lifetimes;
use clap::Parser;
pub use server_kit::flags::ConfigError;
use server_kit::flags::{
    DURATION, FileOrigins, default_hostname, parse_go_bool, parse_go_command_line,
    parse_go_duration, parse_log_level,
};
use server_kit::process::ServerOptions;
use server_kit::tls;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::ServerTlsConfig;

/// The options, checked, with the TLS files they name read: what [`crate::run`] takes, so
/// nothing is checked or read twice.
#[derive(Debug, Clone)]
pub struct Config {
    pub options: Options,
    /// TLS on the gRPC listener (`--grpc-tls-*`).
    pub(crate) grpc_tls: Option<ServerTlsConfig>,
}

impl ServerOptions for Config {
    fn log_level(&self) -> &str {
        &self.options.log_level
    }

    fn log_prefix(&self) -> &str {
        &self.options.log_prefix
    }

    fn verbose(&self) -> bool {
        self.options.verbose
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "knsq-lookupd",
    version,
    about = "knsq-lookupd: an nsqlookupd-compatible directory of knsq brokers",
    after_help = "Flags take nsqlookupd's names and Go's syntax too: -flag=value, -flag value, --flag, --flag=false."
)]
pub struct Options {
    /// Path to an nsqlookupd TOML config file (options named as flags with `_` for `-`);
    /// flags on the command line or in the environment override it
    #[arg(long, env = "KNSQ_LOOKUPD_CONFIG")]
    pub config: Option<PathBuf>,

    /// <addr>:<port> to listen on for broker registrations (gRPC); nsqlookupd's
    /// --tcp-address is accepted as an alias
    #[arg(
        long,
        visible_alias = "tcp-address",
        env = "KNSQ_LOOKUPD_GRPC_ADDRESS",
        default_value = "0.0.0.0:4160"
    )]
    pub grpc_address: String,

    /// PEM certificate (chain) for the gRPC listener; with --grpc-tls-key, brokers must
    /// register over TLS
    #[arg(long, env = "KNSQ_LOOKUPD_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// PEM private key of --grpc-tls-cert
    #[arg(long, env = "KNSQ_LOOKUPD_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,

    /// PEM file of the certificate authorities that sign brokers' client certificates;
    /// brokers must then present one (mutual TLS)
    #[arg(long, env = "KNSQ_LOOKUPD_GRPC_TLS_CLIENT_CA_FILE")]
    pub grpc_tls_client_ca_file: Option<PathBuf>,

    /// <addr>:<port> to listen on for HTTP clients
    #[arg(
        long,
        env = "KNSQ_LOOKUPD_HTTP_ADDRESS",
        default_value = "0.0.0.0:4161"
    )]
    pub http_address: String,

    /// Address of this lookupd, told to brokers (default: the host name)
    #[arg(long, env = "KNSQ_LOOKUPD_BROADCAST_ADDRESS", default_value_t = default_hostname())]
    pub broadcast_address: String,

    /// A broker silent for this long is hidden from /lookup and /nodes
    #[arg(long, env = "KNSQ_LOOKUPD_INACTIVE_PRODUCER_TIMEOUT", default_value = "5m", value_name = DURATION, value_parser = parse_go_duration)]
    pub inactive_producer_timeout: Duration,

    /// How long a tombstoned broker is hidden from /lookup of that topic
    #[arg(long, env = "KNSQ_LOOKUPD_TOMBSTONE_LIFETIME", default_value = "45s", value_name = DURATION, value_parser = parse_go_duration)]
    pub tombstone_lifetime: Duration,

    /// Log level: debug, info, warn, error or fatal
    #[arg(long, env = "KNSQ_LOOKUPD_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,

    /// What every log line starts with
    #[arg(
        long,
        env = "KNSQ_LOOKUPD_LOG_PREFIX",
        default_value = "[knsq-lookupd] "
    )]
    pub log_prefix: String,

    /// Time allowed for a clean shutdown after SIGTERM before the lookupd exits anyway
    #[arg(long, env = "KNSQ_LOOKUPD_SHUTDOWN_TIMEOUT", default_value = "10s", value_name = DURATION, value_parser = parse_go_duration)]
    pub shutdown_timeout: Duration,

    /// Deprecated in nsqlookupd (use --log-level=debug); accepted and ignored
    #[arg(long, env = "KNSQ_LOOKUPD_VERBOSE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub verbose: bool,

    /// Which flags `--config`'s file set, to blame it for a value found wrong.
    #[arg(skip)]
    pub config_file: FileOrigins,
}

impl Options {
    /// Parses a command line (nsqlookupd's Go syntax included) and the config file it names.
    pub fn from_args<I, T>(args: I) -> Result<Options, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let (mut options, _, origins) = parse_go_command_line::<Options, T>(args, &[])?;
        options.config_file = origins;
        Ok(options)
    }

    /// Checks what a flag's type cannot and reads the files the flags name: every check of
    /// the options is here, and happens once.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_values()
            .map_err(|e| self.config_file.blame(e))
    }

    fn validate_values(&self) -> Result<Config, ConfigError> {
        if self.inactive_producer_timeout < Duration::from_millis(1) {
            return Err(ConfigError {
                flag: "inactive-producer-timeout",
                reason: "must be at least 1ms".into(),
            });
        }
        if self.broadcast_address.is_empty() {
            return Err(ConfigError {
                flag: "broadcast-address",
                reason: "must not be empty".into(),
            });
        }
        Ok(Config {
            options: self.clone(),
            grpc_tls: self.grpc_tls()?,
        })
    }

    /// TLS on the gRPC listener; `None` when the flags leave it off.
    fn grpc_tls(&self) -> Result<Option<ServerTlsConfig>, ConfigError> {
        tls::server::grpc_tls(tls::server::GrpcTlsFlags {
            cert: ("grpc-tls-cert", self.grpc_tls_cert.as_deref()),
            key: ("grpc-tls-key", self.grpc_tls_key.as_deref()),
            client_ca: (
                "grpc-tls-client-ca-file",
                self.grpc_tls_client_ca_file.as_deref(),
            ),
        })
    }

    pub fn lifetimes(&self) -> Lifetimes {
        Lifetimes {
            inactive_producer_timeout: self.inactive_producer_timeout,
            tombstone_lifetime: self.tombstone_lifetime,
        }
    }

    /// Options for tests and embedding: nsqlookupd's defaults, listening on loopback port 0.
    pub fn for_tests() -> Options {
        let mut o = Options::from_args(["knsq-lookupd"]).unwrap_or_else(|e| panic!("{e}"));
        o.grpc_address = "127.0.0.1:0".into();
        o.http_address = "127.0.0.1:0".into();
        o.broadcast_address = "127.0.0.1".into();
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::from_args(std::iter::once("knsq-lookupd").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_nsqlookupds() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.grpc_address, "0.0.0.0:4160");
        assert_eq!(o.http_address, "0.0.0.0:4161");
        assert_eq!(o.inactive_producer_timeout, Duration::from_secs(300));
        assert_eq!(o.tombstone_lifetime, Duration::from_secs(45));
        assert_eq!(o.log_level, "info");
        assert!(!o.verbose);
        assert!(!o.broadcast_address.is_empty());
        o.validate().unwrap();
    }

    #[test]
    fn accepts_nsqlookupd_command_lines() {
        let o = parse(&[
            "-tcp-address=127.0.0.1:1",
            "-http-address",
            "127.0.0.1:2",
            "--broadcast-address=lookupd-0.lookupd",
            "-inactive-producer-timeout=1m30s",
            "--tombstone-lifetime",
            "10s",
            "-log-level=DEBUG",
            "-log-prefix=[x] ",
            "-verbose",
        ])
        .unwrap();
        assert_eq!(o.grpc_address, "127.0.0.1:1");
        assert_eq!(o.http_address, "127.0.0.1:2");
        assert_eq!(o.broadcast_address, "lookupd-0.lookupd");
        assert_eq!(o.inactive_producer_timeout, Duration::from_secs(90));
        assert_eq!(o.tombstone_lifetime, Duration::from_secs(10));
        assert_eq!(o.log_level, "debug");
        assert!(o.verbose);
        let o = parse(&["--grpc-address=127.0.0.1:3", "--verbose=false"]).unwrap();
        assert_eq!(o.grpc_address, "127.0.0.1:3");
        assert!(!o.verbose);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let err = parse(&["--tombstone-lifetime=abc"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tombstone-lifetime"), "{err}");
        let err = parse(&["--log-level=loud"]).unwrap_err().to_string();
        assert!(err.contains("--log-level"), "{err}");
        let err = parse(&["--inactive-producer-timeout=0"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for --inactive-producer-timeout: must be at least 1ms"
        );
        assert!(parse(&["--data-path=/x"]).is_err(), "not a lookupd flag");
    }

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
        assert!(o.grpc_tls().unwrap().is_none());
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
