//! The consuming side: SUB, RDY once, then FIN every message, one write per read.

use super::conn::{Conn, MAX_FRAME};
use super::{Budget, Outcome};
use anyhow::{Result, bail};
use proto::wire::command::Name;
use proto::wire::{Command, Frame};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Subscribes `conn` and opens it for `rdy` messages in flight.
pub(crate) async fn subscribe(
    conn: &mut Conn,
    topic: &Name,
    channel: &Name,
    rdy: u64,
) -> Result<()> {
    Command::Sub {
        topic: topic.clone(),
        channel: channel.clone(),
    }
    .encode(&mut conn.wbuf);
    conn.flush().await?;
    conn.expect_ok("SUB").await?;
    Command::Rdy(rdy).encode(&mut conn.wbuf);
    conn.flush().await
}

fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Consumes until `stop` (or until the shared budget of messages is used up, which cancels
/// `stop` for every reader).
pub(crate) async fn run(conn: Conn, budget: Arc<Budget>, stop: CancellationToken) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = consume(conn, &budget, &stop, &mut out).await {
        out.error = Some(e);
    }
    out
}

async fn consume(
    mut conn: Conn,
    budget: &Budget,
    stop: &CancellationToken,
    out: &mut Outcome,
) -> Result<()> {
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        // One clock reading per read: every message in it arrived at the same moment.
        let now = now_unix_nanos();
        let mut n = 0u64;
        while let Some(frame) = Frame::decode(&mut conn.rbuf, MAX_FRAME)? {
            match frame {
                Frame::Message(m) => {
                    out.latency
                        .record(u64::try_from(now - m.timestamp).unwrap_or(0));
                    Command::Fin(m.id).encode(&mut conn.wbuf);
                    n += 1;
                }
                Frame::Response(b) if b[..] == *proto::wire::HEARTBEAT => {
                    Command::Nop.encode(&mut conn.wbuf);
                }
                Frame::Response(_) => {}
                Frame::Error(e) => {
                    let text = String::from_utf8_lossy(&e);
                    // FIN of a message the broker already timed out: not fatal, keep going.
                    if !text.starts_with("E_FIN_FAILED") {
                        bail!("consuming: error {text:?}");
                    }
                }
            }
        }
        conn.flush().await?;
        if n > 0 {
            out.msgs += n;
            out.last = Some(Instant::now());
            if budget.consume(n) {
                stop.cancel();
            }
        }
        if stop.is_cancelled() {
            break;
        }
        tokio::select! {
            biased;
            _ = &mut cancelled => break,
            r = conn.fill() => r?,
        }
    }
    Ok(())
}
