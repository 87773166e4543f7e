//! Helpers shared by the byte-level TCP protocol tests (`protocol_*.rs`): raw command bytes,
//! subscribe/publish shortcuts, fatal-error checks and `/stats` lookups.
//!
//! Every test binary uses a different subset of these, hence the `dead_code` allowance on
//! the `mod common;` lines.

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::{BufMut, BytesMut};
use proto::wire::{Frame, Message};
use serde_json::Value;
use std::time::Duration;
use tests::{NsqConn, TestBroker, WAIT};
use tokio::time::Instant;

/// A well-formed message ID that is never in flight.
pub(crate) const UNKNOWN_ID: &str = "0123456789abcdef";

/// A command line followed by a size-prefixed body, as PUB, DPUB, IDENTIFY and AUTH send.
pub(crate) fn sized(line: &str, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_slice(line.as_bytes());
    out.put_u8(b'\n');
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    out.to_vec()
}

/// A command line followed by a raw 4-byte big-endian size and nothing else: for the size
/// checks, which nsqd makes before reading any body (so no unread bytes are left behind).
pub(crate) fn line_and_size(line: &str, size: i32) -> Vec<u8> {
    let mut out = line.as_bytes().to_vec();
    out.push(b'\n');
    out.extend_from_slice(&size.to_be_bytes());
    out
}

pub(crate) fn pub_cmd(topic: &str, body: &[u8]) -> Vec<u8> {
    sized(&format!("PUB {topic}"), body)
}

pub(crate) fn dpub_cmd(topic: &str, defer_ms: u64, body: &[u8]) -> Vec<u8> {
    sized(&format!("DPUB {topic} {defer_ms}"), body)
}

pub(crate) fn mpub_cmd(topic: &str, bodies: &[&[u8]]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_slice(format!("MPUB {topic}\n").as_bytes());
    let size: usize = 4 + bodies.iter().map(|b| 4 + b.len()).sum::<usize>();
    out.put_u32(size as u32);
    out.put_u32(bodies.len() as u32);
    for body in bodies {
        out.put_u32(body.len() as u32);
        out.put_slice(body);
    }
    out.to_vec()
}

pub(crate) fn identify_cmd(json: &Value) -> Vec<u8> {
    sized("IDENTIFY", json.to_string().as_bytes())
}

/// A broker with nsqd's defaults.
pub(crate) async fn broker() -> Result<TestBroker> {
    TestBroker::start(|_| {}).await
}

/// A connection that has sent IDENTIFY (when given; answered `OK`) and `SUB topic channel`.
pub(crate) async fn subscribe(
    b: &TestBroker,
    topic: &str,
    channel: &str,
    identify: Option<Value>,
) -> Result<NsqConn> {
    let mut c = b.connect().await?;
    if let Some(json) = identify {
        match c.identify(&json).await? {
            Frame::Response(r) if &r[..] == b"OK" => {}
            other => bail!("IDENTIFY {json} answered {other:?}"),
        }
    }
    c.send_raw(format!("SUB {topic} {channel}\n").as_bytes())
        .await?;
    c.expect_response(b"OK")
        .await
        .with_context(|| format!("SUB {topic} {channel}"))?;
    Ok(c)
}

/// A subscribed connection with `RDY rdy` sent.
pub(crate) async fn consumer(
    b: &TestBroker,
    topic: &str,
    channel: &str,
    rdy: u64,
) -> Result<NsqConn> {
    let mut c = subscribe(b, topic, channel, None).await?;
    rdy_cmd(&mut c, rdy).await?;
    Ok(c)
}

pub(crate) async fn rdy_cmd(c: &mut NsqConn, count: u64) -> Result<()> {
    c.send_raw(format!("RDY {count}\n").as_bytes()).await
}

pub(crate) async fn fin(c: &mut NsqConn, m: &Message) -> Result<()> {
    c.send_raw(format!("FIN {}\n", m.id).as_bytes()).await
}

/// Publishes each body with PUB on a fresh connection, each answered `OK`.
pub(crate) async fn publish(b: &TestBroker, topic: &str, bodies: &[&[u8]]) -> Result<()> {
    let mut c = b.connect().await?;
    for body in bodies {
        c.send_raw(&pub_cmd(topic, body)).await?;
        c.expect_response(b"OK")
            .await
            .with_context(|| format!("PUB {topic}"))?;
    }
    Ok(())
}

/// Publishes one body with the HTTP API's `/pub`. Unlike a PUB, it is delivered by no
/// connection's task, so it waits in a consumer's output buffer for the buffer timeout.
pub(crate) async fn publish_http(b: &TestBroker, topic: &str, body: &[u8]) -> Result<()> {
    let resp = b.http("POST", &format!("/pub?topic={topic}"), body).await?;
    ensure!(resp.status == 200, "/pub: {} {}", resp.status, resp.text());
    Ok(())
}

/// Publishes `n` messages `"<prefix>-<i>"` in one MPUB; returns their bodies.
pub(crate) async fn publish_n(
    b: &TestBroker,
    topic: &str,
    prefix: &str,
    n: usize,
) -> Result<Vec<String>> {
    let bodies: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let refs: Vec<&[u8]> = bodies.iter().map(|s| s.as_bytes()).collect();
    let mut c = b.connect().await?;
    c.send_raw(&mpub_cmd(topic, &refs)).await?;
    c.expect_response(b"OK").await.context("MPUB")?;
    Ok(bodies)
}

/// Proves every command sent before it was executed without an error: a PUB to a scratch
/// topic is answered `OK`, and any error frame from an earlier command would come first.
/// Only for connections that expect no message meanwhile.
pub(crate) async fn sync(c: &mut NsqConn) -> Result<()> {
    c.send_raw(&pub_cmd("sync", b"x")).await?;
    c.expect_response(b"OK").await.context("sync PUB")
}

/// The error frame `want`, then the broker closes the connection.
pub(crate) async fn expect_fatal(c: &mut NsqConn, want: &str) -> Result<()> {
    c.expect_error(want).await?;
    c.expect_closed()
        .await
        .with_context(|| format!("connection still open after fatal {want:?}"))
}

/// The next `n` messages (heartbeats skipped), FINished when `finish`.
pub(crate) async fn messages(c: &mut NsqConn, n: usize, finish: bool) -> Result<Vec<Message>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let m = c
            .expect_message()
            .await
            .with_context(|| format!("message {} of {n}", i + 1))?;
        if finish {
            fin(c, &m).await?;
        }
        out.push(m);
    }
    Ok(out)
}

/// Messages until none arrives for `quiet`, FINished when `finish`.
pub(crate) async fn drain(c: &mut NsqConn, quiet: Duration, finish: bool) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    loop {
        match c.next_frame_within(quiet).await {
            Ok(Frame::Message(m)) => {
                if finish {
                    fin(c, &m).await?;
                }
                out.push(m);
            }
            Ok(Frame::Response(r)) if &r[..] == proto::wire::HEARTBEAT => continue,
            Ok(other) => bail!("expected messages, got {other:?}"),
            Err(e) if e.to_string().starts_with("no frame") => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

/// The message ID as the 64-bit number its 16 hex digits spell.
pub(crate) fn id_value(m: &Message) -> Result<u64> {
    let text = std::str::from_utf8(&m.id.0)?;
    ensure!(
        text.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "message ID {text:?} is not 16 lowercase hex digits"
    );
    Ok(u64::from_str_radix(text, 16)?)
}

pub(crate) fn unix_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A `POST` to the broker's HTTP API that must answer 200.
pub(crate) async fn post(b: &TestBroker, path: &str) -> Result<()> {
    let resp = b.http("POST", path, b"").await?;
    ensure!(
        resp.status == 200,
        "POST {path}: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

pub(crate) fn topic_stats<'a>(stats: &'a Value, topic: &str) -> Option<&'a Value> {
    stats["topics"]
        .as_array()?
        .iter()
        .find(|t| t["topic_name"] == topic)
}

pub(crate) fn channel_stats<'a>(stats: &'a Value, topic: &str, channel: &str) -> Option<&'a Value> {
    topic_stats(stats, topic)?["channels"]
        .as_array()?
        .iter()
        .find(|c| c["channel_name"] == channel)
}

/// The channel's stats, which must exist.
pub(crate) async fn channel(b: &TestBroker, topic: &str, channel: &str) -> Result<Value> {
    let stats = b.stats().await?;
    channel_stats(&stats, topic, channel)
        .cloned()
        .ok_or_else(|| anyhow!("no channel {topic}:{channel} in /stats: {stats}"))
}

/// Polls `/stats` until `ready` holds, for at most [`WAIT`]; returns the stats that passed.
pub(crate) async fn wait_for_stats(
    b: &TestBroker,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = b.stats().await?;
        if ready(&stats) {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            bail!("/stats never showed {what}: {stats}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
