//! How a knsq server binary runs, so each `main` only parses its flags and names its server:
//! checked options (a bad one exits with status 2 and the flag's name), logs on stderr at
//! `--log-level`, each line starting with `--log-prefix` (which names the process, as nsqd's
//! `[nsqd] ` does, rather than the module of the shared crate a line came from), warnings
//! about flags accepted but deprecated or not used, a multi-threaded runtime, the server until
//! it stops, and the exit status.

use crate::flags::ConfigError;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, fmt, prelude::*, reload};

/// Changes the process's log level at runtime (the broker's `PUT /config/log_level`).
pub type LogLevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the shared `main` reads of a server's checked options.
pub trait ServerOptions {
    /// nsqd's level: `debug`, `info`, `warn`, `error` or `fatal`.
    fn log_level(&self) -> &str;
    /// nsqd's `--log-prefix`: what every log line starts with.
    fn log_prefix(&self) -> &str;
    /// nsqd's deprecated `--verbose`: accepted, warned about, ignored.
    fn verbose(&self) -> bool;
    /// Said once at start, when logging has begun: flags accepted but deprecated, or that
    /// knsq does not use, and what takes their place.
    fn startup_warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Runs the server `serve` builds from `checked` options; `name` prefixes what is said on
/// stderr before logging starts and after it ends.
pub fn run<C, F, E>(
    name: &str,
    checked: Result<C, ConfigError>,
    serve: impl FnOnce(C, LogLevelSetter) -> F,
) -> ExitCode
where
    C: ServerOptions,
    F: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let options = match checked {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let set_log_level = init_logging(options.log_level(), options.log_prefix());
    if options.verbose() {
        tracing::warn!("--verbose is deprecated and ignored; use --log-level=debug");
    }
    for warning in options.startup_warnings() {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(options, set_log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {}", crate::with_sources(&e));
            ExitCode::FAILURE
        }
    }
}

/// nsqd's levels on tracing's; `fatal` logs errors only. The HTTP and gRPC stacks log their
/// own chatter at debug, which says nothing about knsq.
fn filter_for(level: &str) -> EnvFilter {
    let level = if level == "fatal" { "error" } else { level };
    EnvFilter::new(format!("{level},hyper=warn,h2=warn,tonic=warn"))
}

fn init_logging(level: &str, prefix: &str) -> LogLevelSetter {
    let (filter, handle) = reload::Layer::new(filter_for(level));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .event_format(Prefixed {
                    prefix: prefix.to_string(),
                    inner: fmt::format().with_target(false),
                }),
        )
        .init();
    Arc::new(move |level: &str| {
        handle
            .modify(|f| *f = filter_for(level))
            .map_err(|e| e.to_string())
    })
}

/// A log line format that starts every line with the process's `--log-prefix`.
struct Prefixed<F> {
    prefix: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        writer.write_str(&self.prefix)?;
        self.inner.format_event(ctx, writer, event)
    }
}
