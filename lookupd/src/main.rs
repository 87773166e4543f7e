//! `knsq-lookupd`: parse flags, then run the lookupd until SIGTERM or SIGINT.

use lookupd::{Config, Listeners, LookupdError, Options};
use server_kit::process::LogLevelSetter;
use server_kit::signals::watch_signals;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let options = Options::from_args(std::env::args()).unwrap_or_else(|e| e.exit());
    server_kit::process::run("knsq-lookupd", options.validate(), serve)
}

/// The lookupd has no runtime log level setting; the setter goes unused.
async fn serve(config: Config, _: LogLevelSetter) -> Result<(), LookupdError> {
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone());
    let listeners = Listeners::bind(&config.options).await?;
    tokio::spawn(signals);
    lookupd::run(config, listeners, shutdown).await
}
