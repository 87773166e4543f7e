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

/// Publishes numbered PUBs to topic `crash`, `window` outstanding at a time, until `limit`
/// numbers were acknowledged or the connection breaks (the broker was killed). Every `OK`
/// acknowledges the oldest outstanding PUB.
pub async fn produce(addr: SocketAddr, ledger: SharedLedger, window: usize, limit: u64) {
    let _ = produce_until_error(addr, &ledger, window, limit).await;
}

async fn produce_until_error(
    addr: SocketAddr,
    ledger: &SharedLedger,
    window: usize,
    limit: u64,
) -> Result<()> {
    let mut conn = NsqConn::connect(addr).await?;
    let mut outstanding = VecDeque::new();
    loop {
        let next = {
            let l = ledger.lock().expect("ledger");
            if l.acked.len() as u64 + outstanding.len() as u64 >= limit {
                None
            } else {
                Some(l.next)
            }
        };
        match next {
            Some(n) if outstanding.len() < window => {
                ledger.lock().expect("ledger").next = n + 1;
                outstanding.push_back(n);
                conn.send(&Command::Pub {
                    topic: topic(),
                    body: body(n).into(),
                })
                .await?;
            }
            _ if outstanding.is_empty() => return Ok(()),
            _ => match conn.next_non_heartbeat().await? {
                Frame::Response(r) if &r[..] == b"OK" => {
                    if let Some(n) = outstanding.pop_front() {
                        ledger.lock().expect("ledger").acked.insert(n);
                    }
                }
                other => bail!("PUB answered {other:?}"),
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
                let n = number(&m.body).unwrap_or(u64::MAX);
                ledger
                    .lock()
                    .expect("ledger")
                    .deliveries
                    .entry(n)
                    .or_default()
                    .push(m.attempts);
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
