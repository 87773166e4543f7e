//! A connection's writer task: drains the client's outbox to the socket.
//!
//! Responses and errors are written at once; messages wait until the buffer holds
//! `output_buffer_size` bytes, the client can take no more (RDY reached), or the
//! `output_buffer_timeout` ticker fires, as nsqd buffers them. Heartbeats go out every
//! `heartbeat_interval`. Whatever is pending when the connection closes is still written.

use super::client::{Client, Identity};
use bytes::BytesMut;
use proto::wire::frame::write_response;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, timeout};

/// How long the final flush of a closing connection may take.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

struct Settings {
    heartbeat: Option<Interval>,
    flush: Option<Interval>,
    buffer_size: usize,
    write_timeout: Option<Duration>,
}

impl Settings {
    fn new(identity: &Identity) -> Settings {
        let ticker = |period: Duration| {
            let mut i = interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        };
        Settings {
            heartbeat: identity.heartbeat_interval.map(ticker),
            flush: (!identity.output_buffer_timeout.is_zero())
                .then(|| ticker(identity.output_buffer_timeout)),
            buffer_size: identity.output_buffer_size.max(1),
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

pub(super) async fn run(mut socket: OwnedWriteHalf, client: Arc<Client>) {
    let mut settings = Settings::new(&client.identity());
    let mut writing = BytesMut::new();
    loop {
        let mut force = false;
        tokio::select! {
            _ = client.closed.cancelled() => break,
            _ = client.outbox.woken() => {}
            _ = tick(&mut settings.heartbeat) => {
                let mut out = client.outbox.lock();
                write_response(&mut out.buf, proto::wire::HEARTBEAT);
                force = true;
            }
            _ = tick(&mut settings.flush) => force = true,
        }
        {
            let mut out = client.outbox.lock();
            if out.settings_changed {
                out.settings_changed = false;
                settings = Settings::new(&client.identity());
            }
            let due = force || out.flush_now || out.buf.len() >= settings.buffer_size;
            if out.buf.is_empty() || !due {
                continue;
            }
            out.flush_now = false;
            std::mem::swap(&mut out.buf, &mut writing);
        }
        let written = match settings.write_timeout {
            Some(limit) => timeout(limit, socket.write_all(&writing)).await.ok(),
            None => Some(socket.write_all(&writing).await),
        };
        writing.clear();
        if !matches!(written, Some(Ok(()))) {
            tracing::debug!(client = client.id, "write failed or timed out; closing");
            client.close();
            return;
        }
    }
    let rest = std::mem::take(&mut client.outbox.lock().buf);
    let _ = timeout(CLOSE_FLUSH_TIMEOUT, async {
        socket.write_all(&rest).await?;
        socket.shutdown().await
    })
    .await;
}
