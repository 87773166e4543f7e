//! `knsq-broker`: parse flags, then run the broker until SIGTERM or SIGINT.

use broker::{BrokerError, Config, Listeners, LogLevelSetter, Options};
use server_kit::signals::watch_signals;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let options = Options::from_args(std::env::args()).unwrap_or_else(|e| e.exit());
    server_kit::process::run("knsq-broker", options.validate(), serve)
}

async fn serve(config: Config, set_log_level: LogLevelSetter) -> Result<(), BrokerError> {
    let listeners = Listeners::bind(&config.options).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    broker::run(config, listeners, shutdown, Some(set_log_level)).await
}
