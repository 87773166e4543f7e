//! `knsq-bench`: NSQ load generator in the manner of nsq's `bench_writer` and `bench_reader`.
//!
//! ```text
//! knsq-bench writer --batch-size 200 --size 200 --runfor 10s   # MPUB
//! knsq-bench writer --batch-size 1 --size 200 --runfor 10s     # PUB one at a time
//! knsq-bench reader --rdy 2500 --size 200 --runfor 10s         # consume
//! knsq-bench both --rate 50000 --batch-size 1                  # end-to-end latency at 50k/s
//! knsq-bench floor --address 127.0.0.1:4170                    # the round-trip floor server
//! ```

#[path = "../bench/mod.rs"]
mod bench;

use bench::args::{Cli, Mode};
use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = match &cli.mode {
        Mode::Floor(floor) => {
            return match bench::floor::serve(&floor.address) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("knsq-bench: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Mode::Writer(o) | Mode::Reader(o) | Mode::Both(o) => o,
    };
    // One thread per connection, up to one per core: a single ping-pong connection runs
    // cheapest on a current-thread runtime, with no cross-thread wakeups.
    let connections: usize = cli
        .mode
        .sides()
        .iter()
        .map(|&side| opts.connections_of(side) as usize)
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = opts.threads.unwrap_or(connections.min(cores)).max(1);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("knsq-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = CancellationToken::new();
    let result = runtime.block_on(async {
        let ctrl_c = root.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                ctrl_c.cancel();
            }
        });
        bench::run(&cli.mode, root).await
    });
    match result {
        Ok(reports) => {
            let mut code = ExitCode::SUCCESS;
            for r in reports {
                println!("{}", if opts.json { r.json() } else { r.text() });
                if r.error.is_some() {
                    code = ExitCode::FAILURE;
                }
            }
            code
        }
        Err(e) => {
            eprintln!("knsq-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
