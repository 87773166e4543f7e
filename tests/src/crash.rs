//! A publish/consume workload that survives its broker being killed: a producer pipelining
//! numbered PUBs and a consumer FINishing everything, both keeping a ledger of what the broker
//! acknowledged, delivered and was told was finished. Crash tests run it against a real broker
//! they SIGKILL at random moments, restart on the same data directory, and finally check that
//! every acknowledged message arrived.

use crate::NsqConn;
use anyhow::{Result, bail};
use proto::wire::{Command, Frame, Name};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes in every body, as in NSQ's published benchmarks.
pub const BODY_LEN: usize = 200;

/// What the broker did with the numbered messages, across all its lives.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The next number to publish.
    pub next: u64,
    /// Numbers the broker answered `OK` for.
    pub acked: BTreeSet<u64>,
    /// Deliveries of each number, with the attempts each delivery carried.
    pub deliveries: BTreeMap<u64, Vec<u16>>,
    /// Numbers a FIN was sent for (it may not have reached the broker before a kill).
    pub fin_sent: BTreeSet<u64>,
}

impl Ledger {
    /// Count a delivery of the message carrying `body`, with the attempts it carried.
    pub fn delivered(&mut self, body: &[u8], attempts: u16) -> u64 {
        let n = number(body).unwrap_or(u64::MAX);
        self.deliveries.entry(n).or_default().push(attempts);
        n
    }
}

/// A body carrying `n`, padded to [`BODY_LEN`].
pub fn body(n: u64) -> Vec<u8> {
    let mut b = format!("crash-{n:012}-").into_bytes();
    b.resize(BODY_LEN, b'x');
    b
}

/// The number a body carries.
pub fn number(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body.get(6..18)?).ok()?.parse().ok()
}

impl Ledger {
    /// Acknowledged numbers never delivered.
    pub fn lost(&self) -> Vec<u64> {
        self.acked
            .iter()
            .filter(|n| !self.deliveries.contains_key(n))
            .copied()
            .collect()
    }

    /// Deliveries beyond the first of each number.
    pub fn redeliveries(&self) -> usize {
        self.deliveries.values().map(|d| d.len() - 1).sum()
    }

    /// Redeliveries of numbers whose FIN had been sent before the redelivery.
    pub fn redelivered_after_fin(&self) -> usize {
        // Deliveries after the first one, of messages finished the first time.
        self.deliveries
            .iter()
            .filter(|(n, _)| self.fin_sent.contains(n))
            .map(|(_, d)| d.len() - 1)
            .sum()
    }

    /// Redeliveries that carried attempts 1, so the client could not tell them from a first
    /// delivery.
    pub fn redeliveries_with_attempts_1(&self) -> usize {
        self.deliveries
            .values()
            .map(|d| d.iter().skip(1).filter(|&&a| a <= 1).count())
            .sum()
    }
}

pub type SharedLedger = Arc<Mutex<Ledger>>;

fn topic() -> Name {
    Name::new("crash").expect("valid name")
}

/// How a producer publishes: `batch` bodies per command (PUB when 1, MPUB otherwise),
/// `window` commands outstanding at a time, until `limit` messages were acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Publishing {
    pub batch: u64,
    pub window: usize,
    pub limit: u64,
}

/// Publishes numbered messages to topic `crash` until the limit was acknowledged or the
/// connection breaks (the broker was killed). Every `OK` acknowledges the oldest outstanding
/// command.
pub async fn produce(addr: SocketAddr, ledger: SharedLedger, how: Publishing) {
    let _ = produce_until_error(addr, &ledger, how).await;
}

async fn produce_until_error(
    addr: SocketAddr,
    ledger: &SharedLedger,
    how: Publishing,
) -> Result<()> {
    let mut conn = NsqConn::connect(addr).await?;
    let mut outstanding: VecDeque<std::ops::Range<u64>> = VecDeque::new();
    loop {
        let next = {
            let mut l = ledger.lock().expect("ledger");
            let pending: u64 = outstanding.iter().map(|r| r.end - r.start).sum();
            if l.acked.len() as u64 + pending >= how.limit || outstanding.len() >= how.window {
                None
            } else {
                let start = l.next;
                l.next += how.batch;
                Some(start..start + how.batch)
            }
        };
        match next {
            Some(numbers) => {
                let command = if how.batch == 1 {
                    Command::Pub {
                        topic: topic(),
                        body: body(numbers.start).into(),
                    }
                } else {
                    Command::Mpub {
                        topic: topic(),
                        bodies: numbers.clone().map(|n| body(n).into()).collect(),
                    }
                };
                outstanding.push_back(numbers);
                conn.send(&command).await?;
            }
            None if outstanding.is_empty() => return Ok(()),
            None => match conn.next_non_heartbeat().await? {
                Frame::Response(r) if &r[..] == b"OK" => {
                    if let Some(numbers) = outstanding.pop_front() {
                        ledger.lock().expect("ledger").acked.extend(numbers);
                    }
                }
                other => bail!("publish answered {other:?}"),
            },
        }
    }
}

/// Consumes channel `c` of topic `crash` with `rdy`, FINishing every message, until the
/// connection breaks or nothing arrives for `idle`.
pub async fn consume(addr: SocketAddr, ledger: SharedLedger, rdy: u64, idle: Duration) {
    let _ = consume_until_error(addr, &ledger, rdy, idle).await;
}

async fn consume_until_error(
    addr: SocketAddr,
    ledger: &SharedLedger,
    rdy: u64,
    idle: Duration,
) -> Result<()> {
    let mut conn = NsqConn::connect(addr).await?;
    conn.identify(&serde_json::json!({})).await?;
    conn.subscribe("crash", "c").await?;
    conn.send(&Command::Rdy(rdy)).await?;
    loop {
        let frame = match conn.next_frame_within(idle).await {
            Ok(frame) => frame,
            Err(e) if e.to_string().starts_with("no frame") => return Ok(()),
            Err(e) => return Err(e),
        };
        match frame {
            Frame::Message(m) => {
                let n = ledger
                    .lock()
                    .expect("ledger")
                    .delivered(&m.body, m.attempts);
                conn.send(&Command::Fin(m.id)).await?;
                ledger.lock().expect("ledger").fin_sent.insert(n);
            }
            Frame::Response(r) if &r[..] == proto::wire::HEARTBEAT => {
                conn.send(&Command::Nop).await?;
            }
            other => bail!("consumer got {other:?}"),
        }
    }
}
