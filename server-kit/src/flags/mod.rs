//! Flags as nsqd and nsqlookupd take them: Go's syntax ([`parse_go_command_line`]), their
//! TOML config files (`--config`), Go's durations and booleans, nsqd's log levels, and the
//! error that names a bad flag.

mod config_file;
mod duration;
mod go_syntax;

pub use config_file::{ConfigFileError, DURATION, FileOrigins};
pub use duration::{format_go_duration, parse_go_duration};
pub use go_syntax::{normalize_go_flags, parse_go_command_line};

/// An option value that makes no sense, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for --{flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub reason: String,
}

/// nsqd's `--log-level` values, lower-cased.
pub fn parse_log_level(text: &str) -> Result<String, String> {
    let level = text.to_ascii_lowercase();
    match level.as_str() {
        "debug" | "info" | "warn" | "error" | "fatal" => Ok(level),
        _ => Err(format!(
            "{text:?} is not one of debug, info, warn, error, fatal"
        )),
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean")),
    }
}

/// The host name, as nsqd uses it for `--broadcast-address` and `hostname` fields.
pub fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
