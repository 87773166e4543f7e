//! `knsq-broker`: parse flags, then run the broker until SIGTERM or SIGINT; or, as
//! `knsq-broker handoff …`, hand a stopped broker's data directory off to its peers.

use broker::{BrokerError, Config, Listeners, LogLevelSetter, Options};
use server_kit::signals::watch_signals;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// jemalloc rather than the system allocator: glibc's arenas kept what queued messages freed
/// (a broker that held 1M messages stayed at its peak RSS after they were consumed), while
/// jemalloc's background thread returns pages that stay unused for a few seconds to the OS
/// (its decay; `_RJEM_MALLOC_CONF` tunes it). docs/performance.md has the measurements.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "handoff") {
        args.remove(1);
        let options = Options::from_args(args).unwrap_or_else(|e| e.exit());
        return server_kit::process::run("knsq-broker handoff", options.validate(), handoff);
    }
    let options = Options::from_args(args).unwrap_or_else(|e| e.exit());
    server_kit::process::run("knsq-broker", options.validate(), serve)
}

async fn serve(config: Config, set_log_level: LogLevelSetter) -> Result<(), BrokerError> {
    let stop = CancellationToken::new();
    let signals = watch_signals(stop.clone());
    let listeners = Listeners::bind(&config.options).await?;
    tokio::spawn(signals);
    broker::run(config, listeners, stop, Some(set_log_level)).await
}

async fn handoff(config: Config, _: LogLevelSetter) -> Result<(), BrokerError> {
    broker::handoff_offline(config).await
}
