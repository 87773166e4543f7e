//! `knsq-lookupd`: parse flags, set up logging and signals, run the lookupd.

use broker::signals::watch_signals;
use lookupd::{Listeners, Options};
use std::io::IsTerminal;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let options = match Options::from_args(std::env::args()) {
        Ok(options) => options,
        Err(e) => e.exit(),
    };
    if let Err(e) = options.validate() {
        eprintln!("knsq-lookupd: {e}");
        return ExitCode::from(2);
    }
    if options.verbose {
        eprintln!("knsq-lookupd: --verbose is deprecated and ignored; use --log-level=debug");
    }
    init_logging(&options.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("knsq-lookupd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("knsq-lookupd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(options: Options) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&options).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    lookupd::run(options, listeners, shutdown).await?;
    Ok(())
}

/// nsqlookupd's levels on tracing's; `fatal` logs errors only.
fn init_logging(level: &str) {
    let level = if level == "fatal" { "error" } else { level };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(format!(
            "{level},hyper=warn,h2=warn,tonic=warn"
        )))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
