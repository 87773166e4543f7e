//! The publishing side: PUB (batch 1) or MPUB from one prebuilt buffer, waiting for each
//! batch's `OK` (or keeping up to `--pipeline` batches unacknowledged).

use super::conn::{Conn, describe};
use super::{Budget, Outcome};
use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use proto::wire::command::Name;
use proto::wire::{Command, Frame};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

/// What every writer connection of a run shares.
pub(crate) struct WriterPlan {
    /// The topics batches go to in turn (one unless `--topics`).
    pub(crate) topics: Vec<Name>,
    pub(crate) body: Bytes,
    pub(crate) batch: u64,
    pub(crate) pipeline: usize,
    /// Time between two batches of one connection, when the rate is limited.
    pub(crate) interval: Option<Duration>,
    /// The encoded command for a whole batch to each topic, built once.
    pub(crate) full: Vec<Bytes>,
}

impl WriterPlan {
    pub(crate) fn new(
        topics: Vec<Name>,
        size: u32,
        batch: u32,
        pipeline: u32,
        rate: Option<u64>,
        connections: u32,
    ) -> Self {
        let body: Bytes = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let full = topics
            .iter()
            .map(|topic| publish_command(topic, &body, u64::from(batch)))
            .collect();
        let interval = rate.map(|rate| {
            let per_conn = rate as f64 / f64::from(connections);
            Duration::from_secs_f64(f64::from(batch) / per_conn)
        });
        WriterPlan {
            topics,
            body,
            batch: u64::from(batch),
            pipeline: pipeline as usize,
            interval,
            full,
        }
    }
}

/// `PUB` for one message, `MPUB` for more, encoded with the codec.
pub(crate) fn publish_command(topic: &Name, body: &Bytes, n: u64) -> Bytes {
    let cmd = if n == 1 {
        Command::Pub {
            topic: topic.clone(),
            body: body.clone(),
        }
    } else {
        Command::Mpub {
            topic: topic.clone(),
            bodies: vec![body.clone(); n as usize],
        }
    };
    let mut buf = BytesMut::new();
    cmd.encode(&mut buf);
    buf.freeze()
}

/// Publishes until `stop`, then waits for outstanding acknowledgements until `abort`. What
/// was acknowledged before a failure is kept, with the error.
pub(crate) async fn run(
    conn: Conn,
    plan: Arc<WriterPlan>,
    index: usize,
    budget: Arc<Budget>,
    stop: CancellationToken,
    abort: CancellationToken,
) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = publish(conn, &plan, index, &budget, &stop, &abort, &mut out).await {
        out.error = Some(e);
    }
    out
}

async fn publish(
    mut conn: Conn,
    plan: &WriterPlan,
    index: usize,
    budget: &Budget,
    stop: &CancellationToken,
    abort: &CancellationToken,
    out: &mut Outcome,
) -> Result<()> {
    let mut inflight: VecDeque<(Instant, u64)> = VecDeque::with_capacity(plan.pipeline);
    let mut next_due = Instant::now();
    let mut sending = true;
    let mut batches = 0usize;
    loop {
        while sending && inflight.len() < plan.pipeline {
            if stop.is_cancelled() {
                sending = false;
                break;
            }
            if let Some(interval) = plan.interval {
                if next_due > Instant::now() {
                    tokio::select! {
                        _ = sleep_until(next_due) => {}
                        _ = stop.cancelled() => { sending = false; break; }
                    }
                }
                next_due += interval;
            }
            let n = budget.take(plan.batch);
            if n == 0 {
                sending = false;
                break;
            }
            // Connections start on different topics and go round them a batch at a time.
            let topic = (index + batches) % plan.topics.len();
            batches += 1;
            // The last, partial batch of a --count run is built when it is needed, once.
            let tail;
            let command = if n == plan.batch {
                &plan.full[topic]
            } else {
                tail = publish_command(&plan.topics[topic], &plan.body, n);
                &tail
            };
            let sent_at = Instant::now();
            tokio::select! {
                biased;
                written = conn.write_now(command) => written?,
                // A broker that stopped reading must not hold the run past its grace time.
                _ = abort.cancelled() => return Ok(()),
            }
            inflight.push_back((sent_at, n));
        }
        if inflight.is_empty() {
            break;
        }
        let frame = tokio::select! {
            biased;
            frame = conn.read_frame() => frame.context("waiting for OK")?,
            _ = abort.cancelled() => break,
        };
        match frame {
            Frame::Response(b) if b[..] == *proto::wire::OK => {
                let Some((sent_at, n)) = inflight.pop_front() else {
                    bail!("OK with no batch outstanding");
                };
                let now = Instant::now();
                out.latency.record_duration(now - sent_at);
                out.msgs += n;
                out.last = Some(now);
            }
            other => bail!("publishing: {}", describe(&other)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_commands_are_prebuilt_exactly() {
        let topic = Name::new("t").unwrap();
        let body = Bytes::from_static(b"ab");
        assert_eq!(
            &publish_command(&topic, &body, 1)[..],
            b"PUB t\n\x00\x00\x00\x02ab"
        );
        assert_eq!(
            &publish_command(&topic, &body, 2)[..],
            b"MPUB t\n\x00\x00\x00\x10\x00\x00\x00\x02\x00\x00\x00\x02ab\x00\x00\x00\x02ab"
        );
    }

    #[test]
    fn plan_builds_body_and_pacing() {
        let plan = WriterPlan::new(vec![Name::new("t").unwrap()], 200, 200, 1, Some(10_000), 2);
        assert_eq!(plan.body.len(), 200);
        // 10k msgs/s over 2 connections in batches of 200: 25 batches/s each.
        assert_eq!(plan.interval, Some(Duration::from_millis(40)));
        assert_eq!(plan.full[0].len(), "MPUB t\n".len() + 8 + 200 * 204);
    }
}
