//! `--config FILE`: the TOML files nsqd and nsqlookupd read. Every option is named as its
//! flag with `_` for `-` (`mem_queue_size = 100`), a few by the names nsqd's options carry
//! (`id` for `--node-id`, `nsqlookupd_tcp_addresses` for `--lookupd-tcp-address`).
//!
//! The file's settings are turned into `--flag=value` arguments and parsed with the real
//! ones, so a value is checked by the same parser whichever way it came; a flag given on the
//! command line or in the environment is left out of the file's arguments, so it wins. Unlike
//! nsqd, which skips keys it does not know, a key that is no option is an error naming it:
//! a typo would otherwise leave a setting at its default without a word.

use super::ConfigError;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use std::path::{Path, PathBuf};

/// The value name of every duration flag: a config file's integer for one means
/// milliseconds, as nsqd reads it (`msg_timeout = 60000`).
pub const DURATION: &str = "DURATION";

/// What is wrong with a config file, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path}: unknown option {key:?}")]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path}: invalid value {value} for {key}: {reason}")]
    BadValue {
        path: PathBuf,
        key: String,
        /// As written in the file (`"lots"`, `[1, 2]`).
        value: String,
        reason: String,
    },
}

impl ConfigFileError {
    fn kind(&self) -> clap::error::ErrorKind {
        use clap::error::ErrorKind;
        match self {
            ConfigFileError::Read { .. } | ConfigFileError::Syntax { .. } => ErrorKind::Io,
            ConfigFileError::UnknownKey { .. } => ErrorKind::UnknownArgument,
            ConfigFileError::BadValue { .. } => ErrorKind::ValueValidation,
        }
    }

    /// As clap reports a bad command line: `error: …` and exit status 2.
    pub(super) fn into_clap(self, cmd: &mut Command) -> clap::Error {
        cmd.error(self.kind(), self.to_string())
    }
}

/// Which flags took their value from the config file, and under which key, so that a value
/// found wrong after parsing (a node id out of range, say) is blamed on the file's line.
#[derive(Debug, Clone, Default)]
pub struct FileOrigins {
    path: Option<PathBuf>,
    /// (flag, key) pairs.
    keys: Vec<(String, String)>,
}

impl FileOrigins {
    /// `error`, saying which key of which file set the flag it names, if the file did.
    pub fn blame(&self, error: ConfigError) -> ConfigError {
        let key = self.keys.iter().find(|(flag, _)| flag == error.flag);
        match (&self.path, key) {
            (Some(path), Some((_, key))) => ConfigError {
                flag: error.flag,
                reason: format!(
                    "{} (set by {key} in config file {})",
                    error.reason,
                    path.display()
                ),
            },
            _ => error,
        }
    }
}

/// The arguments the config file at `path` stands for, leaving out what `matches` (the
/// command line and environment) already set, and where each came from. `renames` maps file
/// keys that are not the flag name with underscores to their flag.
pub(super) fn file_arguments(
    cmd: &Command,
    matches: &ArgMatches,
    path: &Path,
    renames: &[(&str, &str)],
) -> Result<(Vec<String>, FileOrigins), ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|source| ConfigFileError::Syntax {
        path: path.to_path_buf(),
        source,
    })?;
    let bad_value = |key: &str, value: &toml::Value, reason: String| ConfigFileError::BadValue {
        path: path.to_path_buf(),
        key: key.to_string(),
        value: shown(value),
        reason,
    };
    let bin = cmd.get_name().to_string();
    let mut out = Vec::new();
    let mut origins = FileOrigins {
        path: Some(path.to_path_buf()),
        keys: Vec::new(),
    };
    for (key, value) in &table {
        let arg = find_arg(cmd, key, renames).ok_or_else(|| ConfigFileError::UnknownKey {
            path: path.to_path_buf(),
            key: key.clone(),
        })?;
        let id = arg.get_id().as_str();
        if id == "config" {
            return Err(bad_value(
                key,
                value,
                "a config file cannot name another".into(),
            ));
        }
        if matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let long = arg.get_long().unwrap_or(id);
        let values = arg_values(arg, value).map_err(|reason| bad_value(key, value, reason))?;
        let args: Vec<String> = values.iter().map(|v| format!("--{long}={v}")).collect();
        // Parsed alone first, so that a bad value is reported by the key it came from.
        let alone = std::iter::once(bin.clone()).chain(drop_unset(cmd, args.clone()));
        if let Err(e) = cmd.clone().try_get_matches_from(alone)
            && names_flag(&e, long)
        {
            return Err(bad_value(key, value, reason_of(&e)));
        }
        out.extend(args);
        origins.keys.push((long.to_string(), key.clone()));
    }
    Ok((out, origins))
}

/// The flag a file key stands for: a rename, or the key with `-` for `_` as a flag's name
/// or alias.
fn find_arg<'c>(cmd: &'c Command, key: &str, renames: &[(&str, &str)]) -> Option<&'c Arg> {
    let name = renames
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, flag)| flag.to_string())
        .unwrap_or_else(|| key.replace('_', "-"));
    cmd.get_arguments().find(|a| {
        a.get_long() == Some(name.as_str())
            || a.get_all_aliases()
                .is_some_and(|aliases| aliases.contains(&name.as_str()))
    })
}

/// A TOML value as flag values, converted as nsqd converts them: integers of duration
/// options are milliseconds, lists only for repeatable options.
fn arg_values(arg: &Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    use toml::Value;
    let is_duration = arg
        .get_value_names()
        .is_some_and(|names| names.iter().any(|n| n.as_str() == DURATION));
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) if is_duration => Ok(format!("{i}ms")),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("a {} is not a value for it", other.type_str())),
    };
    match value {
        Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
            items.iter().map(scalar).collect()
        }
        Value::Array(_) => Err("takes one value, not a list".into()),
        v => scalar(v).map(|s| vec![s]),
    }
}

/// A TOML value as the file writes it, near enough for an error message.
fn shown(value: &toml::Value) -> String {
    use toml::Value;
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(shown).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Table(_) => "(a table)".into(),
    }
}

/// Whether a clap error is about the value of `--<long>`.
fn names_flag(e: &clap::Error, long: &str) -> bool {
    use clap::error::{ContextKind, ContextValue};
    match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => {
            arg.split([' ', '=', '[']).next() == Some(format!("--{long}").as_str())
        }
        _ => false,
    }
}

/// What a clap error says is wrong with a value, without clap's framing.
fn reason_of(e: &clap::Error) -> String {
    use std::error::Error;
    if let Some(source) = e.source() {
        return source.to_string();
    }
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Leaves out `--flag=` and `--flag ""` for flags that are unset by default, as nsqd does: an
/// empty string there is its default (`tls_cert = ""` in nsqd's example config).
pub(super) fn drop_unset(cmd: &Command, args: Vec<String>) -> Vec<String> {
    let unset_by_default = |long: &str| {
        cmd.get_arguments().any(|a| {
            (a.get_long() == Some(long) || a.get_all_aliases().is_some_and(|al| al.contains(&long)))
                && a.get_default_values().is_empty()
                && matches!(a.get_action(), ArgAction::Set)
                && a.get_num_args().is_none_or(|n| n.min_values() > 0)
        })
    };
    let mut out = Vec::with_capacity(args.len());
    let mut args = args.into_iter().peekable();
    while let Some(arg) = args.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(args.by_ref());
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            if let Some(long) = long.strip_suffix('=')
                && !long.contains('=')
                && unset_by_default(long)
            {
                continue;
            }
            if !long.contains('=')
                && args.peek().is_some_and(|next| next.is_empty())
                && unset_by_default(long)
            {
                args.next();
                continue;
            }
        }
        out.push(arg);
    }
    out
}
