//! knsq's flags for leaving the cluster: what SIGTERM does, the lame-duck delay, draining and
//! handing messages off to peer brokers over gRPC.

use super::ConfigError;
use clap::Args;
use server_kit::flags::{DURATION, parse_go_bool, parse_go_duration};
use server_kit::tls;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::ServerTlsConfig;

/// What SIGTERM (and SIGINT) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigtermMode {
    /// Messages in memory go to disk and the broker exits (nsqd's behaviour).
    CleanShutdown,
    /// The broker drains: consumers take what is left, the rest is handed off, then it exits.
    Drain,
}

fn parse_sigterm(text: &str) -> Result<SigtermMode, String> {
    match text {
        "clean-shutdown" => Ok(SigtermMode::CleanShutdown),
        "drain" => Ok(SigtermMode::Drain),
        other => Err(format!("{other:?} is not clean-shutdown or drain")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct DrainOptions {
    /// knsq only: what SIGTERM does: clean-shutdown (nsqd's) or drain
    #[arg(long, env = "KNSQ_SIGTERM", default_value = "clean-shutdown", value_parser = parse_sigterm)]
    pub sigterm: SigtermMode,

    /// knsq only: on SIGTERM, first report not ready on /readyz and keep serving this long, so
    /// that load balancers stop sending clients before the broker stops or drains
    #[arg(long, env = "KNSQ_SHUTDOWN_DELAY", default_value = "0s", value_name = DURATION, value_parser = parse_go_duration)]
    pub shutdown_delay: Duration,

    /// knsq only: how long a draining broker waits for consumers to take what it holds before
    /// handing everything left to peer brokers (channels without consumers are handed off at
    /// once)
    #[arg(long, env = "KNSQ_DRAIN_TIMEOUT", default_value = "60s", value_name = DURATION, value_parser = parse_go_duration)]
    pub drain_timeout: Duration,

    /// knsq only: once drained, stay up (unregistered, idle) instead of exiting 0
    #[arg(long, env = "KNSQ_STAY_UP_WHEN_DRAINED", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub stay_up_when_drained: bool,

    /// knsq only: address of the gRPC service peer brokers hand messages off to (port 0, the
    /// default, picks a free one, which lookupds tell peers); empty serves none
    #[arg(long, env = "KNSQ_HANDOFF_ADDRESS", default_value = "0.0.0.0:0")]
    pub handoff_address: String,

    /// knsq only: handoff port told to lookupds (0 = the port --handoff-address listens on)
    #[arg(long, env = "KNSQ_BROADCAST_HANDOFF_PORT", default_value_t = 0)]
    pub broadcast_handoff_port: u16,

    /// knsq only: a peer broker's handoff address (host:port) to hand messages off to;
    /// repeatable. Without any, peers are the brokers registered with the lookupds
    #[arg(
        long = "handoff-peer",
        env = "KNSQ_HANDOFF_PEERS",
        value_delimiter = ','
    )]
    pub handoff_peers: Vec<String>,

    /// knsq only: PEM certificate (chain) for the handoff listener; with --handoff-tls-key,
    /// peers must hand off over TLS (they dial with the --lookupd-tls* settings)
    #[arg(long, env = "KNSQ_HANDOFF_TLS_CERT")]
    pub handoff_tls_cert: Option<PathBuf>,

    /// knsq only: PEM private key of --handoff-tls-cert
    #[arg(long, env = "KNSQ_HANDOFF_TLS_KEY")]
    pub handoff_tls_key: Option<PathBuf>,

    /// knsq only: PEM certificate authorities of peers' client certificates (mutual TLS)
    #[arg(long, env = "KNSQ_HANDOFF_TLS_CLIENT_CA_FILE")]
    pub handoff_tls_client_ca_file: Option<PathBuf>,
}

impl DrainOptions {
    /// Checks the values and reads the TLS files of the handoff listener.
    pub(super) fn check(&self) -> Result<Option<ServerTlsConfig>, ConfigError> {
        if self.drain_timeout.is_zero() {
            return Err(ConfigError {
                flag: "drain-timeout",
                reason: "must be longer than 0s".into(),
            });
        }
        if let Some(empty) = self.handoff_peers.iter().find(|p| p.trim().is_empty()) {
            return Err(ConfigError {
                flag: "handoff-peer",
                reason: format!("{empty:?} is not a host:port"),
            });
        }
        tls::server::grpc_tls(tls::server::GrpcTlsFlags {
            cert: ("handoff-tls-cert", self.handoff_tls_cert.as_deref()),
            key: ("handoff-tls-key", self.handoff_tls_key.as_deref()),
            client_ca: (
                "handoff-tls-client-ca-file",
                self.handoff_tls_client_ca_file.as_deref(),
            ),
        })
    }
}
