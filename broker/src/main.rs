//! `knsq-broker`: parse flags, set up logging and signals, run the broker.

use broker::signals::watch_signals;
use broker::{Listeners, LogLevelSetter, Options};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt, prelude::*, reload};

fn main() -> ExitCode {
    let options = match Options::from_args(std::env::args()) {
        Ok(options) => options,
        Err(e) => e.exit(),
    };
    if let Err(e) = options.validate() {
        eprintln!("knsq-broker: {e}");
        return ExitCode::from(2);
    }
    if options.verbose {
        eprintln!("knsq-broker: --verbose is deprecated and ignored; use --log-level=debug");
    }
    let set_log_level = init_logging(&options.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("knsq-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(options, set_log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("knsq-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(options: Options, set_log_level: LogLevelSetter) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&options).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    broker::run(options, listeners, shutdown, Some(set_log_level)).await?;
    Ok(())
}

/// nsqd's levels on tracing's; `fatal` logs errors only.
fn filter_for(level: &str) -> EnvFilter {
    let level = if level == "fatal" { "error" } else { level };
    EnvFilter::new(format!("{level},hyper=warn,h2=warn"))
}

fn init_logging(level: &str) -> LogLevelSetter {
    let (filter, handle) = reload::Layer::new(filter_for(level));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    Arc::new(move |level: &str| {
        handle
            .modify(|f| *f = filter_for(level))
            .map_err(|e| e.to_string())
    })
}
