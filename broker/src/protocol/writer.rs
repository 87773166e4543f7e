//! A connection's writer task: the timers, and the socket when it is full.
//!
//! Frames are written by whoever produces them (see [`Outbox`](super::outbox::Outbox)). This
//! task sends a heartbeat every `heartbeat_interval`, flushes buffered messages every
//! `output_buffer_timeout` as nsqd's ticker does (the ticker runs only while messages wait), waits for a full socket to drain (closing
//! the connection if it does not within the heartbeat interval, nsqd's write deadline), and
//! writes what is left when the connection closes.

use super::client::{Client, Identity};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, timeout};

/// How long the last frames of a closing connection may take to leave.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

struct Timers {
    heartbeat: Option<Interval>,
    flush: Option<Interval>,
    write_timeout: Option<Duration>,
}

impl Timers {
    fn new(identity: &Identity) -> Timers {
        let ticker = |period: Duration, missed: MissedTickBehavior| {
            let mut i = interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(missed);
            i
        };
        Timers {
            heartbeat: identity
                .heartbeat_interval
                .map(|p| ticker(p, MissedTickBehavior::Delay)),
            // Polled only while messages wait; ticks missed meanwhile are skipped, so the
            // flush keeps nsqd's ticker phase (half the timeout on average, not all of it).
            flush: (!identity.output_buffer_timeout.is_zero())
                .then(|| ticker(identity.output_buffer_timeout, MissedTickBehavior::Skip)),
            write_timeout: identity.heartbeat_interval,
        }
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Waits for a full socket to take the buffered frames. False when it did not drain within
/// `limit`; true when it drained or the connection is closing anyway.
async fn drain(client: &Client, limit: Option<Duration>) -> bool {
    let out = &client.outbox;
    while out.is_stalled() {
        let writable = async {
            match limit {
                Some(limit) => timeout(limit, out.writable()).await.is_ok(),
                None => {
                    out.writable().await;
                    true
                }
            }
        };
        let drained = tokio::select! {
            _ = client.closed.cancelled() => return true,
            drained = writable => drained,
        };
        if !drained {
            return false;
        }
        out.flush();
    }
    true
}

pub(super) async fn run(client: Arc<Client>) {
    let out = &client.outbox;
    let mut timers = Timers::new(&client.identity());
    loop {
        let waiting = out.is_waiting();
        tokio::select! {
            _ = client.closed.cancelled() => break,
            _ = client.settings_changed.notified() => {
                let identity = client.identity();
                out.set_buffering(
                    identity.output_buffer_size,
                    !identity.output_buffer_timeout.is_zero(),
                );
                timers = Timers::new(&identity);
            }
            _ = tick(&mut timers.heartbeat) => out.heartbeat(),
            // A channel queued messages on an upgraded connection for this task to encode.
            _ = out.handed_off() => out.flush(),
            _ = tick(&mut timers.flush), if waiting => out.flush(),
            // Messages started waiting: go round again to run the flush timer.
            _ = out.waiting(), if !waiting => {}
            _ = out.stall() => {
                if !drain(&client, timers.write_timeout).await {
                    tracing::info!("client stopped reading; closing");
                    client.close();
                }
            }
        }
    }
    let _ = timeout(CLOSE_FLUSH_TIMEOUT, async {
        out.close();
        while out.is_stalled() {
            out.writable().await;
            out.flush();
        }
    })
    .await;
    out.shutdown();
}
