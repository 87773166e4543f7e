//! The broker's options: nsqd's flag names and defaults, each also settable from a
//! `KNSQ_<FLAG>` environment variable or from nsqd's TOML config file (`--config`), parsed
//! with Go's flag syntax as well as GNU's. Every nsqd flag is accepted: those knsq has no use
//! for are in [`replaced`].

mod auth;
mod drain;
mod lookupd;
mod replaced;
mod tls;

pub(crate) use auth::{AuthSettings, RequestMethod};
pub use drain::{DrainOptions, SigtermMode};
pub(crate) use lookupd::TLS_FLAG as LOOKUPD_TLS_FLAG;
pub use replaced::ReplacedOptions;
pub use server_kit::NSQ_COMPAT_VERSION;
pub use server_kit::flags::ConfigError;
pub use tls::{ClientAuthPolicy, TlsMinVersion, TlsOptions, TlsRequired};

use clap::Parser;
use clap::parser::ValueSource;
use server_kit::flags::{
    DURATION, FileOrigins, default_hostname, format_go_duration, parse_go_bool,
    parse_go_command_line, parse_go_duration, parse_log_level,
};
use server_kit::process::ServerOptions;
use server_kit::tls::client::GrpcClientTls;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The options, checked, with the files they name read and what they configure built: what
/// [`crate::run`] takes, so nothing is checked or read twice.
#[derive(Debug)]
pub struct Config {
    pub options: Options,
    /// TLS for clients (`--tls-cert`, `--tls-key`, `--tls-client-auth-policy`).
    pub(crate) client_tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS to lookupds (`--lookupd-tls*`).
    pub(crate) lookupd_tls: Option<GrpcClientTls>,
    /// The auth servers (`--auth-http-address`), when authorization is on.
    pub(crate) auth: Option<AuthSettings>,
    /// TLS on the handoff listener (`--handoff-tls-*`).
    pub(crate) handoff_tls: Option<tonic::transport::ServerTlsConfig>,
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

    fn startup_warnings(&self) -> Vec<String> {
        self.options.startup_warnings.clone()
    }
}

/// nsqd's config file keys that are not a flag's name with `_` for `-` (its options' `cfg`
/// names).
const CONFIG_KEYS: &[(&str, &str)] = &[
    ("id", "node-id"),
    ("nsqlookupd_tcp_addresses", "lookupd-tcp-address"),
    ("auth_http_addresses", "auth-http-address"),
    (
        "e2e_processing_latency_percentiles",
        "e2e-processing-latency-percentile",
    ),
];

/// nsqd's experiments (`--enable-experiment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Experiment {
    /// In nsqd, delivery to consumers in its `--topology-zone` first, then its
    /// `--topology-region`. knsq accepts it and warns: its delivery does not prefer yet.
    TopologyAwareConsumption,
}

impl Experiment {
    pub fn name(self) -> &'static str {
        match self {
            Experiment::TopologyAwareConsumption => "topology-aware-consumption",
        }
    }
}

fn parse_experiment(text: &str) -> Result<Experiment, String> {
    match text.trim() {
        "topology-aware-consumption" => Ok(Experiment::TopologyAwareConsumption),
        _ => Err(format!(
            "{text:?} is not an experiment (valid: \"topology-aware-consumption\")"
        )),
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "knsq-broker",
    version,
    about = "knsq-broker: an nsqd-compatible message broker",
    after_help = "Flags take nsqd's names and Go's syntax too: -flag=value, -flag value, --flag, --flag=false."
)]
pub struct Options {
    /// Path to an nsqd TOML config file (options named as flags with `_` for `-`, as nsqd
    /// reads them); flags on the command line or in the environment override it
    #[arg(long, env = "KNSQ_CONFIG")]
    pub config: Option<PathBuf>,

    /// Unique id of this broker, in [0,1024): part of every message ID. Also takes a
    /// StatefulSet pod name (`events-broker-2`), whose trailing ordinal is the id
    #[arg(long, env = "KNSQ_NODE_ID", default_value_t = default_node_id(), value_parser = parse_node_id)]
    pub node_id: u16,

    /// Deprecated name of --node-id (`--worker-id=5`); bare, as nsqd 1.x takes it, it does
    /// nothing
    #[arg(long, env = "KNSQ_WORKER_ID", num_args = 0..=1, default_missing_value = "true",
          value_parser = parse_worker_id)]
    pub worker_id: Option<WorkerId>,

    /// Region of this broker, reported to clients (IDENTIFY, /info) and lookupds (their
    /// /nodes and /lookup show it)
    #[arg(long, env = "KNSQ_TOPOLOGY_REGION", default_value = "")]
    pub topology_region: String,

    /// Zone of this broker, reported like --topology-region
    #[arg(long, env = "KNSQ_TOPOLOGY_ZONE", default_value = "")]
    pub topology_zone: String,

    /// nsqd's experimental features (valid: topology-aware-consumption); accepted, with a
    /// warning at start: knsq's delivery does not prefer consumers by topology
    #[arg(long = "enable-experiment", env = "KNSQ_ENABLE_EXPERIMENT", value_delimiter = ',',
          value_parser = parse_experiment)]
    pub experiments: Vec<Experiment>,

    /// <addr>:<port> to listen on for TCP clients
    #[arg(long, env = "KNSQ_TCP_ADDRESS", default_value = "0.0.0.0:4150")]
    pub tcp_address: String,

    /// <addr>:<port> to listen on for HTTP clients
    #[arg(long, env = "KNSQ_HTTP_ADDRESS", default_value = "0.0.0.0:4151")]
    pub http_address: String,

    /// Address this broker tells clients and lookupds to use (default: the host name)
    #[arg(long, env = "KNSQ_BROADCAST_ADDRESS", default_value_t = default_hostname())]
    pub broadcast_address: String,

    /// gRPC <addr>:<port> of a knsq-lookupd to register with; repeatable (nsqd's
    /// --lookupd-tcp-address is an alias)
    #[arg(
        long = "lookupd-grpc-address",
        visible_alias = "lookupd-tcp-address",
        env = "KNSQ_LOOKUPD_GRPC_ADDRESSES",
        value_delimiter = ','
    )]
    pub lookupd_grpc_addresses: Vec<String>,

    /// knsq only: TLS on every lookupd connection; lookupds are verified against
    /// --lookupd-tls-root-ca-file, or the system's CA certificates without it
    #[arg(long, env = "KNSQ_LOOKUPD_TLS", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub lookupd_tls: bool,

    /// knsq only: PEM file of the certificate authorities that sign lookupds' certificates
    /// (implies --lookupd-tls)
    #[arg(long, env = "KNSQ_LOOKUPD_TLS_ROOT_CA_FILE")]
    pub lookupd_tls_root_ca_file: Option<PathBuf>,

    /// knsq only: PEM client certificate (chain) for lookupds that require one (mutual TLS;
    /// implies --lookupd-tls)
    #[arg(long, env = "KNSQ_LOOKUPD_TLS_CERT")]
    pub lookupd_tls_cert: Option<PathBuf>,

    /// knsq only: PEM private key of --lookupd-tls-cert
    #[arg(long, env = "KNSQ_LOOKUPD_TLS_KEY")]
    pub lookupd_tls_key: Option<PathBuf>,

    /// knsq only: name checked in every lookupd's certificate (default: the host of each
    /// --lookupd-grpc-address)
    #[arg(long, env = "KNSQ_LOOKUPD_TLS_SERVER_NAME")]
    pub lookupd_tls_server_name: Option<String>,

    /// <addr>:<port> or http:// URL of an auth server to query with clients' AUTH secrets;
    /// repeatable (any one given turns authorization on)
    #[arg(
        long = "auth-http-address",
        env = "KNSQ_AUTH_HTTP_ADDRESS",
        value_delimiter = ','
    )]
    pub auth_http_addresses: Vec<String>,

    /// HTTP method for auth server requests: get (fields in the query) or post (a form)
    #[arg(long, env = "KNSQ_AUTH_HTTP_REQUEST_METHOD", default_value = "get", value_parser = parse_auth_method)]
    pub auth_http_request_method: String,

    /// Timeout for connecting to an auth server
    #[arg(long, env = "KNSQ_HTTP_CLIENT_CONNECT_TIMEOUT", default_value = "2s", value_name = DURATION, value_parser = parse_go_duration)]
    pub http_client_connect_timeout: Duration,

    /// Timeout for an auth server's answer
    #[arg(long, env = "KNSQ_HTTP_CLIENT_REQUEST_TIMEOUT", default_value = "5s", value_name = DURATION, value_parser = parse_go_duration)]
    pub http_client_request_timeout: Duration,

    /// TCP port told to lookupds (0 = the port --tcp-address listens on)
    #[arg(long, env = "KNSQ_BROADCAST_TCP_PORT", default_value_t = 0)]
    pub broadcast_tcp_port: u16,

    /// HTTP port told to lookupds (0 = the port --http-address listens on)
    #[arg(long, env = "KNSQ_BROADCAST_HTTP_PORT", default_value_t = 0)]
    pub broadcast_http_port: u16,

    /// knsq only: how often the broker sends a heartbeat to each lookupd
    #[arg(long, env = "KNSQ_LOOKUPD_HEARTBEAT_INTERVAL", default_value = "15s", value_name = DURATION, value_parser = parse_go_duration)]
    pub lookupd_heartbeat_interval: Duration,

    /// Directory for the broker's data
    #[arg(long, env = "KNSQ_DATA_PATH", default_value = ".")]
    pub data_path: PathBuf,

    /// Messages kept in memory per topic and per channel
    #[arg(long, env = "KNSQ_MEM_QUEUE_SIZE", default_value_t = 10000)]
    pub mem_queue_size: u64,

    /// Default time a message may be in flight before it is requeued
    #[arg(long, env = "KNSQ_MSG_TIMEOUT", default_value = "60s", value_name = DURATION, value_parser = parse_go_duration)]
    pub msg_timeout: Duration,

    /// Largest msg_timeout a client may ask for, and cap of TOUCH since delivery
    #[arg(long, env = "KNSQ_MAX_MSG_TIMEOUT", default_value = "15m", value_name = DURATION, value_parser = parse_go_duration)]
    pub max_msg_timeout: Duration,

    /// Largest message body, in bytes
    #[arg(long, env = "KNSQ_MAX_MSG_SIZE", default_value_t = 1048576)]
    pub max_msg_size: u64,

    /// Largest MPUB, IDENTIFY or AUTH body, in bytes
    #[arg(long, env = "KNSQ_MAX_BODY_SIZE", default_value_t = 5242880)]
    pub max_body_size: u64,

    /// Largest REQ and DPUB delay
    #[arg(long, env = "KNSQ_MAX_REQ_TIMEOUT", default_value = "1h", value_name = DURATION, value_parser = parse_go_duration)]
    pub max_req_timeout: Duration,

    /// Largest heartbeat interval a client may ask for
    #[arg(long, env = "KNSQ_MAX_HEARTBEAT_INTERVAL", default_value = "60s", value_name = DURATION, value_parser = parse_go_duration)]
    pub max_heartbeat_interval: Duration,

    /// Largest RDY count a client may set
    #[arg(long, env = "KNSQ_MAX_RDY_COUNT", default_value_t = 2500)]
    pub max_rdy_count: u64,

    /// Largest output buffer a client may ask for, in bytes
    #[arg(long, env = "KNSQ_MAX_OUTPUT_BUFFER_SIZE", default_value_t = 65536)]
    pub max_output_buffer_size: u64,

    /// Largest output buffer timeout a client may ask for
    #[arg(long, env = "KNSQ_MAX_OUTPUT_BUFFER_TIMEOUT", default_value = "30s", value_name = DURATION, value_parser = parse_go_duration)]
    pub max_output_buffer_timeout: Duration,

    /// Smallest output buffer timeout a client may ask for
    #[arg(long, env = "KNSQ_MIN_OUTPUT_BUFFER_TIMEOUT", default_value = "25ms", value_name = DURATION, value_parser = parse_go_duration)]
    pub min_output_buffer_timeout: Duration,

    /// Default output buffer timeout of a client
    #[arg(long, env = "KNSQ_OUTPUT_BUFFER_TIMEOUT", default_value = "250ms", value_name = DURATION, value_parser = parse_go_duration)]
    pub output_buffer_timeout: Duration,

    /// Most consumers of one channel (0 = no limit)
    #[arg(long, env = "KNSQ_MAX_CHANNEL_CONSUMERS", default_value_t = 0)]
    pub max_channel_consumers: u64,

    /// knsq only: deliveries of a message before it goes to its channel's dead-letter topic
    /// instead of being delivered again (0 = no limit, as nsqd); channels may have their own
    /// (POST /channel/config)
    #[arg(long, env = "KNSQ_MAX_ATTEMPTS", default_value_t = 0)]
    pub max_attempts: u16,

    /// knsq only: most NSQ TCP connections open at once; a client past it is told
    /// E_INVALID and closed
    #[arg(long, env = "KNSQ_MAX_CONNECTIONS", default_value_t = 65536)]
    pub max_connections: usize,

    /// Size at which a disk queue starts a new segment file, in bytes
    #[arg(long, env = "KNSQ_MAX_BYTES_PER_FILE", default_value_t = 104857600)]
    pub max_bytes_per_file: u64,

    /// Disk queue reads and writes between fsyncs
    #[arg(long, env = "KNSQ_SYNC_EVERY", default_value_t = 2500)]
    pub sync_every: u64,

    /// Answer a publish only after its messages are on disk and fsynced (group commit);
    /// every acknowledged message then survives a crash
    #[arg(long, env = "KNSQ_SYNC_PUBLISH", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub sync_publish: bool,

    /// Longest time between fsyncs of a disk queue that has changed
    #[arg(long, env = "KNSQ_SYNC_TIMEOUT", default_value = "2s", value_name = DURATION, value_parser = parse_go_duration)]
    pub sync_timeout: Duration,

    /// End-to-end processing latency quantile to report, in (0,1]; repeatable or comma-separated
    #[arg(long = "e2e-processing-latency-percentile", env = "KNSQ_E2E_PROCESSING_LATENCY_PERCENTILE",
          value_delimiter = ',', value_parser = parse_quantile)]
    pub e2e_processing_latency_percentiles: Vec<f64>,

    /// Window over which the e2e latency quantiles are computed
    #[arg(long, env = "KNSQ_E2E_PROCESSING_LATENCY_WINDOW_TIME", default_value = "10m", value_name = DURATION, value_parser = parse_go_duration)]
    pub e2e_processing_latency_window_time: Duration,

    /// Log level: debug, info, warn, error or fatal
    #[arg(long, env = "KNSQ_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,

    /// What every log line starts with
    #[arg(long, env = "KNSQ_LOG_PREFIX", default_value = "[knsq-broker] ")]
    pub log_prefix: String,

    /// Time allowed for a clean shutdown after SIGTERM before the broker exits anyway
    #[arg(long, env = "KNSQ_SHUTDOWN_TIMEOUT", default_value = "20s", value_name = DURATION, value_parser = parse_go_duration)]
    pub shutdown_timeout: Duration,

    /// knsq only: time an HTTP client has to send a request's headers, counted from the
    /// connection being opened or going idle (so also the keep-alive idle timeout)
    #[arg(long, env = "KNSQ_HTTP_HEADER_TIMEOUT", default_value = "10s", value_name = DURATION, value_parser = parse_go_duration)]
    pub http_header_timeout: Duration,

    /// knsq only: time an HTTP client has to send a /pub or /mpub body
    #[arg(long, env = "KNSQ_HTTP_BODY_TIMEOUT", default_value = "30s", value_name = DURATION, value_parser = parse_go_duration)]
    pub http_body_timeout: Duration,

    /// knsq only: largest HTTP request line and headers, in bytes (at least 8192)
    #[arg(long, env = "KNSQ_HTTP_MAX_HEADER_BYTES", default_value_t = 65536)]
    pub http_max_header_bytes: u64,

    /// knsq only: HTTP and HTTPS connections open at once, each; at the limit the longest-idle
    /// one is closed to make room (also capped by the file descriptor limit)
    #[arg(long, env = "KNSQ_HTTP_MAX_CONNECTIONS", default_value_t = 4096)]
    pub http_max_connections: u64,

    /// Deprecated in nsqd (use --log-level=debug); accepted and ignored
    #[arg(long, env = "KNSQ_VERBOSE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool)]
    pub verbose: bool,

    #[command(flatten)]
    pub tls: TlsOptions,

    #[command(flatten)]
    pub drain: DrainOptions,

    #[command(flatten)]
    pub replaced: ReplacedOptions,

    /// What to warn about once logging starts: deprecated and unused flags that were given.
    #[arg(skip)]
    pub startup_warnings: Vec<String>,

    /// Which flags `--config`'s file set, to blame it for a value found wrong.
    #[arg(skip)]
    pub config_file: FileOrigins,
}

/// `--worker-id`: nsqd before 1.0 took the node id by this name; nsqd 1.x keeps it as a
/// boolean that does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerId {
    Bare,
    Id(u16),
}

fn parse_worker_id(text: &str) -> Result<WorkerId, String> {
    match parse_go_bool(text) {
        Ok(_) => Ok(WorkerId::Bare),
        Err(_) => parse_node_id(text).map(WorkerId::Id),
    }
}

impl Options {
    /// Parses a command line (nsqd's Go syntax included) and the config file it names.
    pub fn from_args<I, T>(args: I) -> Result<Options, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let (mut options, matches, origins) =
            parse_go_command_line::<Options, T>(args, CONFIG_KEYS)?;
        options.config_file = origins;
        match options.worker_id {
            Some(WorkerId::Id(id)) => {
                // --node-id, when also given, wins.
                if matches.value_source("node_id") == Some(ValueSource::DefaultValue) {
                    options.node_id = id;
                }
                options
                    .startup_warnings
                    .push("--worker-id is deprecated; use --node-id".into());
            }
            Some(WorkerId::Bare) => options.startup_warnings.push(
                "--worker-id is deprecated and does nothing without a value; use --node-id".into(),
            ),
            None => {}
        }
        if options.has_experiment(Experiment::TopologyAwareConsumption) {
            options.startup_warnings.push(
                "--enable-experiment=topology-aware-consumption is accepted but not implemented: \
                 consumers are served without preferring those in this broker's zone or region \
                 (which /info and the lookupds report)"
                    .into(),
            );
        }
        options
            .startup_warnings
            .extend(ReplacedOptions::warning(&matches));
        Ok(options)
    }

    /// Whether `--enable-experiment` turned `experiment` on.
    pub fn has_experiment(&self, experiment: Experiment) -> bool {
        self.experiments.contains(&experiment)
    }

    /// The e2e latency quantiles in nsqd's order, highest first: its flag sorts them so, and
    /// `/stats` and nsqadmin list them in that order.
    pub fn e2e_quantiles(&self) -> Vec<f64> {
        let mut quantiles = self.e2e_processing_latency_percentiles.clone();
        quantiles.sort_by(|a, b| b.total_cmp(a));
        quantiles
    }

    /// Checks what a flag's type cannot (ranges and relations between flags) and reads the
    /// files the flags name: every check of the options is here, and happens once.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_values()
            .map_err(|e| self.config_file.blame(e))
    }

    fn validate_values(&self) -> Result<Config, ConfigError> {
        let fail = |flag, reason: String| Err(ConfigError { flag, reason });
        if self.node_id >= 1024 {
            return fail("node-id", format!("{} is not in [0,1024)", self.node_id));
        }
        if self.max_msg_size == 0 {
            return fail("max-msg-size", "must be at least 1".into());
        }
        if self.max_body_size < self.max_msg_size {
            return fail(
                "max-body-size",
                format!(
                    "{} is smaller than --max-msg-size {}",
                    self.max_body_size, self.max_msg_size
                ),
            );
        }
        if self.sync_every == 0 {
            return fail("sync-every", "must be at least 1".into());
        }
        if self.sync_timeout.is_zero() {
            return fail("sync-timeout", "must be longer than 0s".into());
        }
        if self.max_bytes_per_file < 1024 {
            return fail("max-bytes-per-file", "must be at least 1024".into());
        }
        if self.max_connections == 0 {
            return fail("max-connections", "must be at least 1".into());
        }
        if self.max_rdy_count == 0 {
            return fail("max-rdy-count", "must be at least 1".into());
        }
        if self.http_header_timeout.is_zero() {
            return fail("http-header-timeout", "must be longer than 0s".into());
        }
        if self.http_body_timeout.is_zero() {
            return fail("http-body-timeout", "must be longer than 0s".into());
        }
        if self.http_max_header_bytes < 8192 {
            return fail("http-max-header-bytes", "must be at least 8192".into());
        }
        if self.http_max_connections == 0 {
            return fail("http-max-connections", "must be at least 1".into());
        }
        if self.msg_timeout < Duration::from_millis(1) {
            return fail("msg-timeout", "must be at least 1ms".into());
        }
        if self.max_msg_timeout < self.msg_timeout {
            return fail(
                "max-msg-timeout",
                format!(
                    "{} is shorter than --msg-timeout {}",
                    format_go_duration(self.max_msg_timeout),
                    format_go_duration(self.msg_timeout)
                ),
            );
        }
        if self.max_output_buffer_size < 64 {
            return fail("max-output-buffer-size", "must be at least 64".into());
        }
        if self.min_output_buffer_timeout > self.max_output_buffer_timeout {
            return fail(
                "min-output-buffer-timeout",
                "is longer than --max-output-buffer-timeout".into(),
            );
        }
        if self.max_heartbeat_interval < Duration::from_secs(1) {
            return fail("max-heartbeat-interval", "must be at least 1s".into());
        }
        if self.lookupd_heartbeat_interval < Duration::from_millis(10) {
            return fail("lookupd-heartbeat-interval", "must be at least 10ms".into());
        }
        if let Some(empty) = self
            .lookupd_grpc_addresses
            .iter()
            .find(|a| a.trim().is_empty())
        {
            return fail(
                "lookupd-grpc-address",
                format!("{empty:?} is not an address"),
            );
        }
        let lookupd_tls = lookupd::client_tls(self)?;
        let client_tls = self.tls.validate()?;
        let auth = auth::settings(self)?;
        if self.http_client_connect_timeout.is_zero() {
            return fail(
                "http-client-connect-timeout",
                "must be longer than 0s".into(),
            );
        }
        if self.http_client_request_timeout.is_zero() {
            return fail(
                "http-client-request-timeout",
                "must be longer than 0s".into(),
            );
        }
        if self.e2e_processing_latency_window_time < Duration::from_secs(1) {
            return fail(
                "e2e-processing-latency-window-time",
                "must be at least 1s".into(),
            );
        }
        let handoff_tls = self.drain.check()?;
        Ok(Config {
            options: self.clone(),
            client_tls,
            lookupd_tls,
            auth,
            handoff_tls,
        })
    }

    /// The decoder limits these options set.
    pub fn wire_limits(&self) -> proto::wire::Limits {
        proto::wire::Limits {
            max_msg_size: self.max_msg_size,
            max_body_size: self.max_body_size,
            max_rdy_count: self.max_rdy_count,
            max_req_timeout_ms: self.max_req_timeout.as_millis() as u64,
        }
    }

    /// Options for tests and embedding: nsqd's defaults, listening on loopback port 0.
    pub fn for_tests(data_path: impl Into<PathBuf>) -> Options {
        let mut o = Options::from_args(["knsq-broker"]).unwrap_or_else(|e| panic!("{e}"));
        o.tcp_address = "127.0.0.1:0".into();
        o.http_address = "127.0.0.1:0".into();
        o.tls.https_address = "127.0.0.1:0".into();
        o.drain.handoff_address = "127.0.0.1:0".into();
        o.broadcast_address = "127.0.0.1".into();
        o.data_path = data_path.into();
        o.node_id = 1;
        o
    }

    /// Every option as nsqd names it in its config (`mem_queue_size`), for `GET /config/:opt`.
    /// Durations are nanoseconds, as Go encodes them.
    pub fn config_value(&self, name: &str) -> Option<serde_json::Value> {
        use serde_json::json;
        let ns = |d: Duration| json!(d.as_nanos() as u64);
        Some(match name {
            "node_id" => json!(self.node_id),
            "tcp_address" => json!(self.tcp_address),
            "http_address" => json!(self.http_address),
            "broadcast_address" => json!(self.broadcast_address),
            "nsqlookupd_tcp_addresses" => json!(self.lookupd_grpc_addresses),
            "auth_http_addresses" => json!(self.auth_http_addresses),
            "auth_http_request_method" => json!(self.auth_http_request_method),
            "http_client_connect_timeout" => ns(self.http_client_connect_timeout),
            "http_client_request_timeout" => ns(self.http_client_request_timeout),
            "broadcast_tcp_port" => json!(self.broadcast_tcp_port),
            "broadcast_http_port" => json!(self.broadcast_http_port),
            "data_path" => json!(self.data_path.display().to_string()),
            "mem_queue_size" => json!(self.mem_queue_size),
            "msg_timeout" => ns(self.msg_timeout),
            "max_msg_timeout" => ns(self.max_msg_timeout),
            "max_msg_size" => json!(self.max_msg_size),
            "max_body_size" => json!(self.max_body_size),
            "max_req_timeout" => ns(self.max_req_timeout),
            "max_heartbeat_interval" => ns(self.max_heartbeat_interval),
            "max_rdy_count" => json!(self.max_rdy_count),
            "max_output_buffer_size" => json!(self.max_output_buffer_size),
            "max_output_buffer_timeout" => ns(self.max_output_buffer_timeout),
            "min_output_buffer_timeout" => ns(self.min_output_buffer_timeout),
            "output_buffer_timeout" => ns(self.output_buffer_timeout),
            "max_channel_consumers" => json!(self.max_channel_consumers),
            "max_attempts" => json!(self.max_attempts),
            "max_bytes_per_file" => json!(self.max_bytes_per_file),
            "sync_every" => json!(self.sync_every),
            "sync_timeout" => ns(self.sync_timeout),
            "sync_publish" => json!(self.sync_publish),
            "e2e_processing_latency_percentiles" => json!(self.e2e_quantiles()),
            "e2e_processing_latency_window_time" => ns(self.e2e_processing_latency_window_time),
            "log_level" => json!(self.log_level),
            "log_prefix" => json!(self.log_prefix),
            "topology_region" => json!(self.topology_region),
            "topology_zone" => json!(self.topology_zone),
            "enable_experiment" => {
                json!(
                    self.experiments
                        .iter()
                        .map(|e| e.name())
                        .collect::<Vec<_>>()
                )
            }
            "verbose" => json!(self.verbose),
            _ => return self.tls.config_value(name),
        })
    }
}

fn parse_quantile(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(q) if q > 0.0 && q <= 1.0 => Ok(q),
        _ => Err(format!("{text:?} is not a quantile in (0,1]")),
    }
}

/// A node id, or a StatefulSet pod name ending in `-<ordinal>`: the operator passes
/// `$(POD_NAME)`, which works on every Kubernetes version (the pod-index label needs 1.28).
fn parse_node_id(text: &str) -> Result<u16, String> {
    let digits = match text.rsplit_once('-') {
        Some((name, ordinal)) if !name.is_empty() => ordinal,
        _ => text,
    };
    match digits.parse::<u16>() {
        Ok(id) if !digits.starts_with('+') => Ok(id),
        _ => Err(format!(
            "{text:?} is neither a number nor a pod name ending in -<ordinal>"
        )),
    }
}

/// nsqd's `--auth-http-request-method` values.
fn parse_auth_method(text: &str) -> Result<String, String> {
    match text {
        "get" | "post" => Ok(text.to_string()),
        _ => Err(format!("{text:?} is not get or post")),
    }
}

/// A stable node id from the host name (FNV-1a), as nsqd derives one from it; deployments
/// should set `--node-id` explicitly (the operator uses the pod ordinal).
fn default_node_id() -> u16 {
    let hash = default_hostname()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    (hash % 1024) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::from_args(std::iter::once("knsq-broker").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_nsqds() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.tcp_address, "0.0.0.0:4150");
        assert_eq!(o.http_address, "0.0.0.0:4151");
        assert_eq!(o.mem_queue_size, 10000);
        assert_eq!(o.msg_timeout, Duration::from_secs(60));
        assert_eq!(o.max_msg_timeout, Duration::from_secs(900));
        assert_eq!(o.max_msg_size, 1048576);
        assert_eq!(o.max_body_size, 5242880);
        assert_eq!(o.max_req_timeout, Duration::from_secs(3600));
        assert_eq!(o.max_heartbeat_interval, Duration::from_secs(60));
        assert_eq!(o.max_rdy_count, 2500);
        assert_eq!(o.max_output_buffer_size, 65536);
        assert_eq!(o.max_output_buffer_timeout, Duration::from_secs(30));
        assert_eq!(o.min_output_buffer_timeout, Duration::from_millis(25));
        assert_eq!(o.output_buffer_timeout, Duration::from_millis(250));
        assert_eq!(o.max_channel_consumers, 0);
        assert_eq!(o.max_attempts, 0);
        assert_eq!(o.max_bytes_per_file, 104857600);
        assert_eq!(o.sync_every, 2500);
        assert_eq!(o.sync_timeout, Duration::from_secs(2));
        assert!(o.e2e_processing_latency_percentiles.is_empty());
        assert_eq!(
            o.e2e_processing_latency_window_time,
            Duration::from_secs(600)
        );
        assert!(o.node_id < 1024);
        o.validate().unwrap();
    }

    #[test]
    fn node_id_from_a_pod_name_ordinal() {
        assert_eq!(parse(&["--node-id=7"]).unwrap().node_id, 7);
        assert_eq!(parse(&["--node-id=events-broker-12"]).unwrap().node_id, 12);
        assert_eq!(parse(&["--node-id=b-0"]).unwrap().node_id, 0);
        for bad in ["events-broker", "events-broker-", "-3", "x-+3", "broker-2a"] {
            let err = parse(&[&format!("--node-id={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--node-id"), "{bad}: {err}");
        }
        // The ordinal is still a node id: in [0,1024).
        let err = parse(&["--node-id=events-broker-1024"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for --node-id: 1024 is not in [0,1024)"
        );
    }

    #[test]
    fn accepts_go_flag_syntax() {
        let o = parse(&[
            "-data-path=/tmp/x",
            "--tcp-address",
            "127.0.0.1:1",
            "-mem-queue-size",
            "5",
            "--msg-timeout=2s",
            "-verbose",
            "--e2e-processing-latency-percentile=0.99,0.5",
            "-e2e-processing-latency-percentile",
            "1.0",
        ])
        .unwrap();
        assert_eq!(o.data_path, PathBuf::from("/tmp/x"));
        assert_eq!(o.tcp_address, "127.0.0.1:1");
        assert_eq!(o.mem_queue_size, 5);
        assert_eq!(o.msg_timeout, Duration::from_secs(2));
        assert!(o.verbose);
        assert_eq!(o.e2e_processing_latency_percentiles, vec![0.99, 0.5, 1.0]);
        // Reported highest first, as nsqd's flag sorts them.
        assert_eq!(o.e2e_quantiles(), vec![1.0, 0.99, 0.5]);
        assert_eq!(
            o.config_value("e2e_processing_latency_percentiles"),
            Some(serde_json::json!([1.0, 0.99, 0.5]))
        );
        let o = parse(&["--verbose=false"]).unwrap();
        assert!(!o.verbose);
    }

    #[test]
    fn lookupd_addresses_repeat_and_take_nsqds_flag_name() {
        let o = parse(&[
            "-lookupd-tcp-address=127.0.0.1:4160",
            "--lookupd-grpc-address",
            "lookupd-1:4160",
            "-broadcast-tcp-port=4000",
        ])
        .unwrap();
        assert_eq!(
            o.lookupd_grpc_addresses,
            ["127.0.0.1:4160", "lookupd-1:4160"]
        );
        assert_eq!((o.broadcast_tcp_port, o.broadcast_http_port), (4000, 0));
        assert_eq!(o.lookupd_heartbeat_interval, Duration::from_secs(15));
        assert!(parse(&[]).unwrap().lookupd_grpc_addresses.is_empty());
        let err = parse(&["--lookupd-grpc-address="])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.flag, "lookupd-grpc-address");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let err = parse(&["--msg-timeout=abc"]).unwrap_err().to_string();
        assert!(err.contains("--msg-timeout"), "{err}");
        let err = parse(&["--e2e-processing-latency-percentile=1.5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("e2e-processing-latency-percentile"), "{err}");
        let err = parse(&["--max-attempts=65536"]).unwrap_err().to_string();
        assert!(err.contains("--max-attempts"), "{err}");
        assert!(parse(&["--max-attempts=-1"]).is_err());
        assert_eq!(parse(&["-max-attempts=5"]).unwrap().max_attempts, 5);
        let err = parse(&["--node-id=1024"]).unwrap().validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for --node-id: 1024 is not in [0,1024)"
        );
        let err = parse(&["--max-body-size=10", "--max-msg-size=20"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.flag, "max-body-size");
        assert!(parse(&["--no-such-flag=1"]).is_err());
    }

    #[test]
    fn auth_flags_repeat_and_check_the_method() {
        let o = parse(&[]).unwrap();
        assert!(o.auth_http_addresses.is_empty());
        assert_eq!(o.auth_http_request_method, "get");
        assert_eq!(o.http_client_connect_timeout, Duration::from_secs(2));
        assert_eq!(o.http_client_request_timeout, Duration::from_secs(5));
        let o = parse(&[
            "-auth-http-address=127.0.0.1:4181",
            "--auth-http-address",
            "http://auth:80/check",
            "--auth-http-request-method=post",
            "-http-client-connect-timeout=500ms",
            "--http-client-request-timeout=1s",
        ])
        .unwrap();
        assert_eq!(
            o.auth_http_addresses,
            ["127.0.0.1:4181", "http://auth:80/check"]
        );
        assert_eq!(o.auth_http_request_method, "post");
        assert_eq!(o.http_client_connect_timeout, Duration::from_millis(500));
        assert_eq!(o.http_client_request_timeout, Duration::from_secs(1));
        o.validate().unwrap();
        assert_eq!(
            o.config_value("http_client_connect_timeout"),
            Some(serde_json::json!(500_000_000u64))
        );
        assert_eq!(
            o.config_value("auth_http_request_method"),
            Some(serde_json::json!("post"))
        );
        let err = parse(&["--auth-http-request-method=put"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--auth-http-request-method"), "{err}");
        let err = parse(&["--auth-http-address=ftp://auth/x"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.flag, "auth-http-address");
    }

    #[test]
    fn config_values_use_nsqd_names_and_units() {
        let o = parse(&[]).unwrap();
        assert_eq!(
            o.config_value("msg_timeout"),
            Some(serde_json::json!(60_000_000_000u64))
        );
        assert_eq!(
            o.config_value("mem_queue_size"),
            Some(serde_json::json!(10000))
        );
        assert_eq!(o.config_value("nope"), None);
    }
}
