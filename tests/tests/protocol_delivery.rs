//! Message delivery over TCP: the message frame, fan-out, RDY, FIN/REQ/TOUCH, timeouts,
//! deferred publishing, CLS, disconnects, pause/empty/delete, ephemeral topics and channels,
//! sampling and e2e latency.

#[allow(dead_code)]
mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use proto::wire::{Frame, Message};
use serde_json::json;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;
use tests::{NsqConn, TestBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test]
async fn message_frame_bytes_and_fields() -> Result<()> {
    let b = TestBroker::start(|o| o.node_id = 777).await?;
    let mut s = TcpStream::connect(b.tcp_address()).await?;
    s.write_all(b"  V2SUB layout c\nRDY 1\n").await?;
    let mut ok = [0u8; 10];
    tokio::time::timeout(tests::WAIT, s.read_exact(&mut ok)).await??;
    assert_eq!(&ok, b"\x00\x00\x00\x06\x00\x00\x00\x00OK");

    let before = unix_ns();
    publish(&b, "layout", &[b"hello"]).await?;
    let after = unix_ns();
    let mut head = [0u8; 8];
    tokio::time::timeout(tests::WAIT, s.read_exact(&mut head)).await??;
    // size = 4 (type) + 8 (timestamp) + 2 (attempts) + 16 (id) + 5 (body); type 2.
    assert_eq!(head, [0, 0, 0, 35, 0, 0, 0, 2]);
    let mut data = [0u8; 31];
    tokio::time::timeout(tests::WAIT, s.read_exact(&mut data)).await??;
    let ts = i64::from_be_bytes(data[0..8].try_into()?);
    let attempts = u16::from_be_bytes(data[8..10].try_into()?);
    let id = std::str::from_utf8(&data[10..26])?;
    assert_eq!(&data[26..], b"hello");
    assert_eq!(attempts, 1, "first delivery counts as attempt 1");
    ensure!(
        ts >= before - 1_000_000_000 && ts <= after + 1_000_000_000,
        "timestamp {ts} not within a second of the publish ({before}..{after})"
    );
    ensure!(
        id.len() == 16
            && id
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "ID {id:?} is not 16 lowercase hex digits"
    );
    let raw = u64::from_str_radix(id, 16)?;
    assert_eq!((raw >> 12) & 0x3ff, 777, "node id bits of {id}");
    // The timestamp part is nsqd's: (unix_ns >> 20) - 1288834974288.
    let tick = (raw >> 22) as i64;
    let want_tick = (ts >> 20) - 1_288_834_974_288;
    ensure!(
        (tick - want_tick).abs() <= 2_000,
        "ID time {tick} far from the publish time {want_tick}"
    );
    Ok(())
}

#[tokio::test]
async fn ids_are_unique_increasing_and_carry_the_node_id() -> Result<()> {
    let b = TestBroker::start(|o| o.node_id = 5).await?;
    let mut c = consumer(&b, "t", "c", 100).await?;
    let bodies = publish_n(&b, "t", "m", 50).await?;
    let got = messages(&mut c, 50, true).await?;
    let ids: Vec<u64> = got.iter().map(id_value).collect::<Result<_>>()?;
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 50, "IDs repeat: {ids:x?}");
    ensure!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "IDs not increasing in publish order: {ids:x?}"
    );
    ensure!(ids.iter().all(|id| (id >> 12) & 0x3ff == 5), "{ids:x?}");
    let got_bodies: Vec<String> = got.iter().map(body).collect();
    assert_eq!(got_bodies, bodies);
    Ok(())
}

#[tokio::test]
async fn every_channel_gets_every_message_with_the_same_id() -> Result<()> {
    let b = broker().await?;
    let mut one = consumer(&b, "t", "one", 100).await?;
    let mut two = consumer(&b, "t", "two", 100).await?;
    let bodies = publish_n(&b, "t", "fan", 30).await?;
    let a = messages(&mut one, 30, true).await?;
    let z = messages(&mut two, 30, true).await?;
    let key = |ms: &[Message]| -> BTreeSet<(String, String)> {
        ms.iter().map(|m| (m.id.to_string(), body(m))).collect()
    };
    assert_eq!(
        key(&a),
        key(&z),
        "both channels see the same IDs and bodies"
    );
    let got: BTreeSet<String> = a.iter().map(body).collect();
    assert_eq!(got, bodies.into_iter().collect::<BTreeSet<_>>());
    for (x, y) in a.iter().zip(&z) {
        assert_eq!(x.timestamp, y.timestamp);
    }
    one.expect_nothing_for(ms(200)).await?;
    two.expect_nothing_for(ms(200)).await
}

#[tokio::test]
async fn messages_published_before_any_channel_go_to_the_first_one() -> Result<()> {
    let b = broker().await?;
    publish(&b, "t", &[b"early"]).await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    assert_eq!(body(&c.expect_message().await?), "early");
    Ok(())
}

/// Consumes until `total` distinct messages have been seen by all consumers together,
/// FINishing each; returns each consumer's bodies.
async fn share(conns: Vec<NsqConn>, total: usize) -> Result<Vec<Vec<String>>> {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut c in conns {
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while seen.load(std::sync::atomic::Ordering::SeqCst) < total {
                match c.next_frame_within(ms(300)).await {
                    Ok(Frame::Message(m)) => {
                        fin(&mut c, &m).await?;
                        mine.push(body(&m));
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(Frame::Response(r)) if &r[..] == b"_heartbeat_" => {}
                    Ok(other) => bail!("unexpected frame {other:?}"),
                    Err(e) if e.to_string().starts_with("no frame") => {}
                    Err(e) => return Err(e),
                }
            }
            anyhow::Ok(mine)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            tokio::time::timeout(Duration::from_secs(8), t)
                .await
                .context("consumers did not see every message in time")???,
        );
    }
    Ok(out)
}

#[tokio::test]
async fn consumers_of_one_channel_share_its_messages() -> Result<()> {
    let b = broker().await?;
    let first = consumer(&b, "t", "c", 5).await?;
    let second = consumer(&b, "t", "c", 5).await?;
    wait_for_stats(&b, "both consumers ready", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| {
            c["clients"]
                .as_array()
                .is_some_and(|cs| cs.len() == 2 && cs.iter().all(|c| c["ready_count"] == 5))
        })
    })
    .await?;
    let bodies = publish_n(&b, "t", "s", 60).await?;
    let got = share(vec![first, second], 60).await?;
    ensure!(
        got.iter().all(|g| !g.is_empty()),
        "one consumer got nothing: {:?}",
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let all: Vec<&String> = got.iter().flatten().collect();
    let union: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), union.len(), "a message went to both consumers");
    assert_eq!(
        union,
        bodies.iter().collect::<BTreeSet<_>>(),
        "the consumers together got every message"
    );
    Ok(())
}

#[tokio::test]
async fn rdy_zero_pauses_delivery_and_rdy_resumes_it() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish(&b, "t", &[b"first"]).await?;
    let m = c.expect_message().await?;
    fin(&mut c, &m).await?;
    c.send_raw(b"RDY 0\n").await?;
    sync(&mut c).await?;
    publish(&b, "t", &[b"second"]).await?;
    c.expect_nothing_for(ms(600)).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["depth"], 1, "{ch}");
    assert_eq!(ch["clients"][0]["ready_count"], 0, "{ch}");
    // RDY without a count means 1.
    c.send_raw(b"RDY\n").await?;
    assert_eq!(body(&c.expect_message().await?), "second");
    Ok(())
}

#[tokio::test]
async fn in_flight_never_exceeds_rdy() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 3).await?;
    publish_n(&b, "t", "m", 10).await?;
    let first = messages(&mut c, 3, false).await?;
    c.expect_nothing_for(ms(500)).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["in_flight_count"], 3, "{ch}");
    assert_eq!(ch["depth"], 7, "{ch}");
    assert_eq!(ch["clients"][0]["in_flight_count"], 3, "{ch}");
    assert_eq!(ch["clients"][0]["ready_count"], 3, "{ch}");
    // Each FIN frees exactly one slot.
    fin(&mut c, &first[0]).await?;
    let next = c.expect_message().await?;
    c.expect_nothing_for(ms(400)).await?;
    // Lowering RDY below in-flight stops delivery until in-flight drops below it.
    c.send_raw(b"RDY 2\n").await?;
    fin(&mut c, &first[1]).await?;
    c.expect_nothing_for(ms(400)).await?;
    fin(&mut c, &first[2]).await?;
    let more = c.expect_message().await?;
    c.expect_nothing_for(ms(400)).await?;
    assert_ne!(next.id, more.id);
    Ok(())
}

#[tokio::test]
async fn req_zero_redelivers_with_attempts_two() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish(&b, "t", &[b"again"]).await?;
    let m = c.expect_message().await?;
    assert_eq!(m.attempts, 1);
    c.send_raw(format!("REQ {} 0\n", m.id).as_bytes()).await?;
    let again = c.expect_message().await?;
    assert_eq!(again.id, m.id);
    assert_eq!(again.attempts, 2);
    assert_eq!(
        again.timestamp, m.timestamp,
        "the publish time survives a requeue"
    );
    assert_eq!(again.body, m.body);
    // Every delivery counts another attempt.
    c.send_raw(format!("REQ {} 0\n", m.id).as_bytes()).await?;
    let again = c.expect_message().await?;
    assert_eq!((again.id, again.attempts), (m.id, 3));
    fin(&mut c, &again).await?;
    sync(&mut c).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["requeue_count"], 2, "{ch}");
    assert_eq!(ch["clients"][0]["requeue_count"], 2, "{ch}");
    assert_eq!(ch["clients"][0]["finish_count"], 1, "{ch}");
    assert_eq!(ch["in_flight_count"], 0, "{ch}");
    Ok(())
}

#[tokio::test]
async fn req_with_delay_redelivers_no_earlier_than_the_delay() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish(&b, "t", &[b"later"]).await?;
    let m = c.expect_message().await?;
    let sent = Instant::now();
    c.send_raw(format!("REQ {} 1500\n", m.id).as_bytes())
        .await?;
    sync(&mut c).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["deferred_count"], 1, "{ch}");
    assert_eq!(ch["in_flight_count"], 0, "{ch}");
    let again = c.expect_message().await?;
    let waited = sent.elapsed();
    ensure!(
        waited >= ms(1400) && waited <= Duration::from_secs(5),
        "REQ 1500 redelivered after {waited:?}"
    );
    assert_eq!((again.id, again.attempts), (m.id, 2));
    Ok(())
}

#[tokio::test]
async fn req_delay_above_max_req_timeout_is_clamped() -> Result<()> {
    let b = TestBroker::start(|o| o.max_req_timeout = Duration::from_secs(1)).await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish(&b, "t", &[b"clamped"]).await?;
    let m = c.expect_message().await?;
    let sent = Instant::now();
    c.send_raw(format!("REQ {} 60000\n", m.id).as_bytes())
        .await?;
    // Not an error: the delay is cut to --max-req-timeout (1 s).
    let again = c.expect_message().await?;
    let waited = sent.elapsed();
    ensure!(
        waited >= ms(900) && waited <= Duration::from_secs(4),
        "REQ 60000 with max-req-timeout 1s redelivered after {waited:?}"
    );
    assert_eq!((again.id, again.attempts), (m.id, 2));
    Ok(())
}

#[tokio::test]
async fn dpub_is_delivered_no_earlier_than_its_defer() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 5).await?;
    let mut p = b.connect().await?;
    let sent = Instant::now();
    p.send_raw(&dpub_cmd("t", 1500, b"deferred")).await?;
    p.expect_response(b"OK").await?;
    p.send_raw(&pub_cmd("t", b"now")).await?;
    p.expect_response(b"OK").await?;
    // The undeferred message overtakes the deferred one.
    assert_eq!(body(&c.expect_message().await?), "now");
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["deferred_count"], 1, "{ch}");
    let m = c.expect_message().await?;
    let waited = sent.elapsed();
    assert_eq!(body(&m), "deferred");
    assert_eq!(m.attempts, 1);
    ensure!(
        waited >= ms(1400) && waited <= Duration::from_secs(5),
        "DPUB 1500 delivered after {waited:?}"
    );
    Ok(())
}

#[tokio::test]
async fn msg_timeout_from_identify_redelivers_with_attempts_plus_one() -> Result<()> {
    let b = broker().await?;
    let mut c = subscribe(&b, "t", "c", Some(json!({"msg_timeout": 1000}))).await?;
    rdy_cmd(&mut c, 1).await?;
    publish(&b, "t", &[b"slow"]).await?;
    let m = c.expect_message().await?;
    let delivered = Instant::now();
    let again = c.expect_message().await?;
    let waited = delivered.elapsed();
    ensure!(
        waited >= ms(900) && waited <= Duration::from_secs(5),
        "msg_timeout 1000 redelivered after {waited:?}"
    );
    assert_eq!((again.id, again.attempts), (m.id, 2));
    assert_eq!(again.timestamp, m.timestamp);
    fin(&mut c, &again).await?;
    sync(&mut c).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["timeout_count"], 1, "{ch}");
    assert_eq!(ch["requeue_count"], 0, "a timeout is not a REQ: {ch}");
    assert_eq!(ch["in_flight_count"], 0, "{ch}");
    Ok(())
}

#[tokio::test]
async fn msg_timeout_option_redelivers_and_counts_timeouts() -> Result<()> {
    let b = TestBroker::start(|o| o.msg_timeout = Duration::from_secs(1)).await?;
    let mut c = consumer(&b, "t", "c", 2).await?;
    publish(&b, "t", &[b"a", b"b"]).await?;
    let first = messages(&mut c, 2, false).await?;
    let delivered = Instant::now();
    let again = messages(&mut c, 2, false).await?;
    ensure!(
        delivered.elapsed() >= ms(900),
        "redelivered after {:?}",
        delivered.elapsed()
    );
    let ids = |ms: &[Message]| ms.iter().map(|m| m.id).collect::<BTreeSet<_>>();
    assert_eq!(ids(&first), ids(&again));
    ensure!(again.iter().all(|m| m.attempts == 2), "{again:?}");
    // A FIN of the old delivery is a FIN of the same (re-delivered) ID.
    for m in &again {
        fin(&mut c, m).await?;
    }
    sync(&mut c).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["timeout_count"], 2, "{ch}");
    Ok(())
}

#[tokio::test]
async fn touch_extends_the_deadline() -> Result<()> {
    let b = broker().await?;
    let mut c = subscribe(&b, "t", "c", Some(json!({"msg_timeout": 1000}))).await?;
    rdy_cmd(&mut c, 1).await?;
    publish(&b, "t", &[b"touched"]).await?;
    let m = c.expect_message().await?;
    let delivered = Instant::now();
    // Keep touching every 400 ms for 2.4 s: well past the 1 s timeout.
    while delivered.elapsed() < ms(2400) {
        match c.next_frame_within(ms(400)).await {
            Err(e) if e.to_string().starts_with("no frame") => {}
            Ok(Frame::Response(r)) if &r[..] == b"_heartbeat_" => {}
            Ok(other) => bail!(
                "got {other:?} {:?} after delivery while touching",
                delivered.elapsed()
            ),
            Err(e) => return Err(e),
        }
        c.send_raw(format!("TOUCH {}\n", m.id).as_bytes()).await?;
    }
    // Still in flight for this client: FIN works.
    fin(&mut c, &m).await?;
    sync(&mut c).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["timeout_count"], 0, "{ch}");
    assert_eq!(ch["clients"][0]["finish_count"], 1, "{ch}");

    // Without touching, the next message times out after about 1 s.
    publish(&b, "t", &[b"untouched"]).await?;
    let n = c.expect_message().await?;
    let start = Instant::now();
    c.send_raw(format!("TOUCH {}\n", n.id).as_bytes()).await?;
    let again = c.expect_message().await?;
    ensure!(
        start.elapsed() >= ms(900),
        "touched message redelivered after {:?}",
        start.elapsed()
    );
    assert_eq!((again.id, again.attempts), (n.id, 2));
    Ok(())
}

#[tokio::test]
async fn touch_cannot_extend_past_max_msg_timeout_since_delivery() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.msg_timeout = Duration::from_secs(1);
        o.max_msg_timeout = Duration::from_secs(2);
    })
    .await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish(&b, "t", &[b"capped"]).await?;
    let m = c.expect_message().await?;
    let delivered = Instant::now();
    let again = loop {
        match c.next_frame_within(ms(300)).await {
            Ok(Frame::Message(again)) => break again,
            Err(e) if e.to_string().starts_with("no frame") => {}
            Ok(Frame::Response(r)) if &r[..] == b"_heartbeat_" => {}
            // A TOUCH racing with the expiry is refused, harmlessly.
            Ok(Frame::Error(e)) if e.starts_with(b"E_TOUCH_FAILED") => {}
            Ok(other) => bail!("unexpected {other:?}"),
            Err(e) => return Err(e),
        }
        ensure!(
            delivered.elapsed() < Duration::from_secs(6),
            "TOUCH kept the message for more than 6 s"
        );
        c.send_raw(format!("TOUCH {}\n", m.id).as_bytes()).await?;
    };
    let waited = delivered.elapsed();
    ensure!(
        waited >= ms(1800) && waited <= Duration::from_secs(5),
        "touched message timed out {waited:?} after delivery, max-msg-timeout 2 s"
    );
    assert_eq!((again.id, again.attempts), (m.id, 2));
    Ok(())
}

#[tokio::test]
async fn after_cls_held_messages_can_still_be_finished() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 3).await?;
    publish_n(&b, "t", "m", 3).await?;
    let held = messages(&mut c, 3, false).await?;
    c.send_raw(b"CLS\n").await?;
    c.expect_response(b"CLOSE_WAIT").await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["clients"][0]["state"], 4, "{ch}");
    assert_eq!(ch["clients"][0]["ready_count"], 0, "{ch}");
    // FIN, REQ and TOUCH still work in the closing state; RDY is ignored without error.
    fin(&mut c, &held[0]).await?;
    c.send_raw(format!("TOUCH {}\n", held[1].id).as_bytes())
        .await?;
    fin(&mut c, &held[1]).await?;
    c.send_raw(format!("REQ {} 0\n", held[2].id).as_bytes())
        .await?;
    c.send_raw(b"RDY 10\n").await?;
    sync(&mut c).await?;
    // No more messages for a closing consumer, not even the requeued one.
    publish(&b, "t", &[b"not for you"]).await?;
    c.expect_nothing_for(ms(500)).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["clients"][0]["finish_count"], 2, "{ch}");
    assert_eq!(ch["depth"], 2, "{ch}");
    // The server leaves closing the socket to the client.
    c.send_raw(b"NOP\n").await?;
    sync(&mut c).await
}

#[tokio::test]
async fn disconnect_leaves_messages_in_flight_until_they_time_out() -> Result<()> {
    let b = broker().await?;
    let mut gone = subscribe(&b, "t", "c", Some(json!({"msg_timeout": 1500}))).await?;
    rdy_cmd(&mut gone, 1).await?;
    publish(&b, "t", &[b"orphan"]).await?;
    let m = gone.expect_message().await?;
    let delivered = Instant::now();
    let mut heir = consumer(&b, "t", "c", 1).await?;
    drop(gone);
    let stats = wait_for_stats(&b, "the first consumer gone", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["client_count"] == 1)
    })
    .await?;
    let ch = channel_stats(&stats, "t", "c").unwrap();
    assert_eq!(ch["in_flight_count"], 1, "{ch}");
    let again = heir.expect_message().await?;
    let waited = delivered.elapsed();
    ensure!(
        waited >= ms(1400) && waited <= Duration::from_secs(6),
        "orphaned message redelivered {waited:?} after delivery (msg_timeout 1.5 s)"
    );
    assert_eq!((again.id, again.attempts), (m.id, 2));
    assert_eq!(body(&again), "orphan");
    Ok(())
}

#[tokio::test]
async fn topic_pause_holds_messages_in_the_topic() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 10).await?;
    publish(&b, "t", &[b"before"]).await?;
    let held = c.expect_message().await?;
    post(&b, "/topic/pause?topic=t").await?;
    publish(&b, "t", &[b"during"]).await?;
    c.expect_nothing_for(ms(500)).await?;
    let stats = b.stats().await?;
    let t = topic_stats(&stats, "t").unwrap();
    assert_eq!(t["paused"], true, "{t}");
    assert_eq!(t["depth"], 1, "{t}");
    // Messages already in flight can be finished while paused.
    fin(&mut c, &held).await?;
    sync(&mut c).await?;
    post(&b, "/topic/unpause?topic=t").await?;
    assert_eq!(body(&c.expect_message().await?), "during");
    let stats = b.stats().await?;
    assert_eq!(topic_stats(&stats, "t").unwrap()["paused"], false);
    Ok(())
}

#[tokio::test]
async fn channel_pause_holds_messages_in_the_channel() -> Result<()> {
    let b = broker().await?;
    let mut paused = consumer(&b, "t", "paused", 10).await?;
    let mut other = consumer(&b, "t", "other", 10).await?;
    publish(&b, "t", &[b"before"]).await?;
    let held = paused.expect_message().await?;
    other.expect_message().await?;
    post(&b, "/channel/pause?topic=t&channel=paused").await?;
    publish(&b, "t", &[b"during"]).await?;
    // Only the paused channel holds it back.
    assert_eq!(body(&other.expect_message().await?), "during");
    paused.expect_nothing_for(ms(500)).await?;
    let ch = channel(&b, "t", "paused").await?;
    assert_eq!(ch["paused"], true, "{ch}");
    assert_eq!(ch["depth"], 1, "{ch}");
    fin(&mut paused, &held).await?;
    sync(&mut paused).await?;
    post(&b, "/channel/unpause?topic=t&channel=paused").await?;
    assert_eq!(body(&paused.expect_message().await?), "during");
    assert_eq!(channel(&b, "t", "paused").await?["paused"], false);
    Ok(())
}

#[tokio::test]
async fn channel_empty_drops_queued_and_in_flight_messages() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish_n(&b, "t", "m", 4).await?;
    let m = c.expect_message().await?;
    wait_for_stats(&b, "3 queued", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["depth"] == 3)
    })
    .await?;
    post(&b, "/channel/empty?topic=t&channel=c").await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["depth"], 0, "{ch}");
    assert_eq!(ch["in_flight_count"], 0, "{ch}");
    // The emptied in-flight message is gone: its FIN fails, harmlessly.
    fin(&mut c, &m).await?;
    c.expect_error(&format!(
        "E_FIN_FAILED FIN {} failed ID not in flight",
        m.id
    ))
    .await?;
    c.send_raw(b"RDY 10\n").await?;
    c.expect_nothing_for(ms(400)).await?;
    // The consumer's in-flight count was reset: new messages flow.
    publish(&b, "t", &[b"fresh"]).await?;
    assert_eq!(body(&c.expect_message().await?), "fresh");
    Ok(())
}

#[tokio::test]
async fn topic_empty_drops_messages_waiting_in_the_topic() -> Result<()> {
    let b = broker().await?;
    publish(&b, "t", &[b"a", b"b", b"c"]).await?;
    let stats = b.stats().await?;
    assert_eq!(topic_stats(&stats, "t").unwrap()["depth"], 3);
    post(&b, "/topic/empty?topic=t").await?;
    let stats = b.stats().await?;
    assert_eq!(topic_stats(&stats, "t").unwrap()["depth"], 0);
    let mut c = consumer(&b, "t", "c", 10).await?;
    c.expect_nothing_for(ms(400)).await?;
    publish(&b, "t", &[b"d"]).await?;
    assert_eq!(body(&c.expect_message().await?), "d");
    Ok(())
}

#[tokio::test]
async fn deleting_a_topic_closes_its_consumers() -> Result<()> {
    let b = broker().await?;
    let mut one = consumer(&b, "t", "one", 1).await?;
    let mut two = consumer(&b, "t", "two", 1).await?;
    let mut bystander = consumer(&b, "u", "c", 1).await?;
    post(&b, "/topic/delete?topic=t").await?;
    one.expect_closed().await?;
    two.expect_closed().await?;
    let stats = b.stats().await?;
    ensure!(topic_stats(&stats, "t").is_none(), "{stats}");
    // Other topics are untouched.
    publish(&b, "u", &[b"still"]).await?;
    assert_eq!(body(&bystander.expect_message().await?), "still");
    Ok(())
}

#[tokio::test]
async fn deleting_a_channel_closes_its_consumers() -> Result<()> {
    let b = broker().await?;
    let mut gone = consumer(&b, "t", "gone", 1).await?;
    let mut kept = consumer(&b, "t", "kept", 1).await?;
    post(&b, "/channel/delete?topic=t&channel=gone").await?;
    gone.expect_closed().await?;
    publish(&b, "t", &[b"still"]).await?;
    assert_eq!(body(&kept.expect_message().await?), "still");
    let stats = b.stats().await?;
    ensure!(channel_stats(&stats, "t", "gone").is_none(), "{stats}");
    Ok(())
}

#[tokio::test]
async fn ephemeral_channel_goes_with_its_last_consumer() -> Result<()> {
    let b = broker().await?;
    let first = consumer(&b, "t", "c#ephemeral", 1).await?;
    let second = consumer(&b, "t", "c#ephemeral", 1).await?;
    let _durable = consumer(&b, "t", "durable", 1).await?;
    channel(&b, "t", "c#ephemeral").await?;
    drop(first);
    wait_for_stats(&b, "one ephemeral consumer left", |s| {
        channel_stats(s, "t", "c#ephemeral").is_some_and(|c| c["client_count"] == 1)
    })
    .await?;
    drop(second);
    wait_for_stats(&b, "the ephemeral channel gone", |s| {
        channel_stats(s, "t", "c#ephemeral").is_none()
    })
    .await?;
    // The (durable) topic and its durable channel stay.
    let stats = b.stats().await?;
    ensure!(channel_stats(&stats, "t", "durable").is_some(), "{stats}");
    Ok(())
}

#[tokio::test]
async fn ephemeral_topic_goes_with_its_last_channel() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "e#ephemeral", "c#ephemeral", 1).await?;
    publish(&b, "e#ephemeral", &[b"fleeting"]).await?;
    assert_eq!(body(&c.expect_message().await?), "fleeting");
    let stats = b.stats().await?;
    ensure!(topic_stats(&stats, "e#ephemeral").is_some(), "{stats}");
    drop(c);
    wait_for_stats(&b, "the ephemeral topic gone", |s| {
        topic_stats(s, "e#ephemeral").is_none()
    })
    .await?;
    // A durable topic does not go with its last ephemeral channel.
    let d = consumer(&b, "durable", "c#ephemeral", 1).await?;
    drop(d);
    let stats = wait_for_stats(&b, "the ephemeral channel of the durable topic gone", |s| {
        channel_stats(s, "durable", "c#ephemeral").is_none()
    })
    .await?;
    ensure!(topic_stats(&stats, "durable").is_some(), "{stats}");
    Ok(())
}

async fn sampled(b: &TestBroker, topic: &str, rate: i64, n: usize) -> Result<usize> {
    let mut c = subscribe(b, topic, "c", Some(json!({"sample_rate": rate}))).await?;
    rdy_cmd(&mut c, 2500).await?;
    publish_n(b, topic, "s", n).await?;
    let got = drain(&mut c, ms(800), true).await?;
    let ids: HashSet<_> = got.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), got.len(), "sampling delivered a message twice");
    // Sampled-out messages are consumed, not left queued or in flight.
    let stats = wait_for_stats(b, "every delivered message finished", |s| {
        channel_stats(s, topic, "c").is_some_and(|c| c["in_flight_count"] == 0)
    })
    .await?;
    let ch = channel_stats(&stats, topic, "c").unwrap();
    assert_eq!(ch["depth"], 0, "{ch}");
    assert_eq!(ch["clients"][0]["sample_rate"], rate, "{ch}");
    Ok(got.len())
}

#[tokio::test]
async fn sample_rate_delivers_about_that_share() -> Result<()> {
    let b = broker().await?;
    let half = sampled(&b, "half", 50, 400).await?;
    ensure!(
        (120..=280).contains(&half),
        "sample_rate 50 delivered {half} of 400"
    );
    let all = sampled(&b, "all", 0, 200).await?;
    assert_eq!(all, 200, "sample_rate 0 delivers everything");
    Ok(())
}

#[tokio::test]
async fn e2e_latency_percentiles_appear_after_fins() -> Result<()> {
    let b = TestBroker::start(|o| o.e2e_processing_latency_percentiles = vec![0.5, 0.99]).await?;
    let mut c = consumer(&b, "t", "c", 10).await?;
    publish_n(&b, "t", "e", 10).await?;
    tokio::time::sleep(ms(50)).await;
    messages(&mut c, 10, true).await?;
    sync(&mut c).await?;
    let stats = b.stats().await?;
    let ch = channel_stats(&stats, "t", "c").unwrap();
    let e2e = &ch["e2e_processing_latency"];
    assert_eq!(e2e["count"], 10, "{e2e}");
    let pcts = e2e["percentiles"].as_array().expect("percentiles");
    let quantiles: Vec<f64> = pcts.iter().filter_map(|p| p["quantile"].as_f64()).collect();
    // nsqd's order, highest first, whatever order the flag gave them in.
    assert_eq!(quantiles, [0.99, 0.5], "{e2e}");
    for p in pcts {
        let v = p["value"].as_f64().unwrap_or(0.0);
        // Latency is in nanoseconds: at least the 50 ms wait, and under a minute.
        ensure!(
            (10_000_000.0..60e9).contains(&v),
            "percentile {p} out of range"
        );
    }
    let topic = &topic_stats(&stats, "t").unwrap()["e2e_processing_latency"];
    assert_eq!(topic["count"], 10, "{topic}");
    assert_eq!(topic["percentiles"].as_array().map(Vec::len), Some(2));

    // Without percentiles configured, nothing is tracked.
    let plain = broker().await?;
    let mut c = consumer(&plain, "t", "c", 1).await?;
    publish(&plain, "t", &[b"x"]).await?;
    messages(&mut c, 1, true).await?;
    sync(&mut c).await?;
    let ch = channel(&plain, "t", "c").await?;
    assert_eq!(
        ch["e2e_processing_latency"],
        json!({"count": 0, "percentiles": null})
    );
    Ok(())
}

#[tokio::test]
async fn every_command_succeeds_with_its_documented_reply() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    // IDENTIFY → OK.
    c.send_raw(&identify_cmd(&json!({"client_id": "all"})))
        .await?;
    c.expect_response(b"OK").await?;
    // NOP → nothing.
    c.send_raw(b"NOP\n").await?;
    // SUB → OK.
    c.send_raw(b"SUB t c\n").await?;
    c.expect_response(b"OK").await?;
    // PUB, MPUB, DPUB → OK, also on a subscribed connection.
    c.send_raw(&pub_cmd("t", b"p")).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&mpub_cmd("t", &[b"m1", b"m2"])).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&dpub_cmd("t", 100, b"d")).await?;
    c.expect_response(b"OK").await?;
    // The codec's own encoding is what the broker reads.
    let mut out = bytes::BytesMut::new();
    let topic = proto::wire::Name::new("t").expect("valid");
    proto::wire::Command::Pub {
        topic,
        body: bytes::Bytes::from_static(b"codec"),
    }
    .encode(&mut out);
    c.send_raw(&out).await?;
    c.expect_response(b"OK").await?;
    // RDY → nothing but messages.
    c.send_raw(b"RDY 5\n").await?;
    let mut got = messages(&mut c, 5, false).await?;
    got.sort_by_key(body);
    let bodies: Vec<String> = got.iter().map(body).collect();
    assert_eq!(bodies, ["codec", "d", "m1", "m2", "p"]);
    // FIN, REQ, TOUCH → nothing.
    fin(&mut c, &got[0]).await?;
    c.send_raw(format!("TOUCH {}\n", got[1].id).as_bytes())
        .await?;
    c.send_raw(format!("REQ {} 5000\n", got[1].id).as_bytes())
        .await?;
    for m in &got[2..] {
        fin(&mut c, m).await?;
    }
    c.send_raw(b"NOP\n").await?;
    sync(&mut c).await?;
    // CLS → CLOSE_WAIT.
    c.send_raw(b"CLS\n").await?;
    c.expect_response(b"CLOSE_WAIT").await?;
    // AUTH → fatal E_AUTH_DISABLED (no auth server configured).
    let mut a = b.connect().await?;
    a.send_raw(&sized("AUTH", b"secret")).await?;
    expect_fatal(&mut a, "E_AUTH_DISABLED AUTH disabled").await
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    let mut all = identify_cmd(&json!({"feature_negotiation": false}));
    all.extend_from_slice(b"NOP\n");
    all.extend(pub_cmd("t", b"1"));
    all.extend(mpub_cmd("t", &[b"2", b"3"]));
    all.extend_from_slice(b"SUB t c\nRDY 3\n");
    c.send_raw(&all).await?;
    for _ in 0..4 {
        c.expect_response(b"OK").await?;
    }
    let got: Vec<String> = messages(&mut c, 3, true).await?.iter().map(body).collect();
    assert_eq!(got, ["1", "2", "3"]);
    sync(&mut c).await
}

#[tokio::test]
async fn a_big_message_arrives_whole() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    publish(&b, "t", &[&big]).await?;
    let m = c.expect_message().await?;
    assert_eq!(m.body.len(), big.len());
    assert!(m.body[..] == big[..], "body corrupted");
    Ok(())
}

#[tokio::test]
async fn commands_split_across_writes_are_reassembled() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 10).await?;
    let mut p = b.connect().await?;
    let mut all = mpub_cmd("t", &[b"one", b"two", b"three"]);
    all.extend(pub_cmd("t", b"four"));
    all.extend(dpub_cmd("t", 0, b"five"));
    for byte in &all {
        p.send_raw(std::slice::from_ref(byte)).await?;
        tokio::task::yield_now().await;
    }
    for _ in 0..3 {
        p.expect_response(b"OK").await?;
    }
    let got: Vec<String> = messages(&mut c, 5, true).await?.iter().map(body).collect();
    assert_eq!(got, ["one", "two", "three", "four", "five"]);
    Ok(())
}

#[tokio::test]
async fn mpub_declared_body_size_is_not_cross_checked() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 10).await?;
    // Declared 100 bytes, but the one message takes 9: like nsqd, the messages are read by
    // their own sizes and the next command follows them.
    let mut bytes = b"MPUB t\n".to_vec();
    bytes.extend_from_slice(&100u32.to_be_bytes());
    bytes.extend_from_slice(&1u32.to_be_bytes());
    bytes.extend_from_slice(&1u32.to_be_bytes());
    bytes.extend_from_slice(b"x");
    bytes.extend(pub_cmd("t", b"y"));
    let mut p = b.connect().await?;
    p.send_raw(&bytes).await?;
    p.expect_response(b"OK").await?;
    p.expect_response(b"OK").await?;
    let got: Vec<String> = messages(&mut c, 2, true).await?.iter().map(body).collect();
    assert_eq!(got, ["x", "y"]);
    Ok(())
}

#[tokio::test]
async fn batched_fins_are_each_applied_in_order() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 3).await?;
    publish_n(&b, "t", "m", 3).await?;
    let got = messages(&mut c, 3, false).await?;
    // One write: FIN, FIN of an unknown ID, FIN, FIN of the same ID again, then a REQ of
    // an ID FINished just before it.
    let batch = format!(
        "FIN {a}\nFIN {UNKNOWN_ID}\nFIN {b}\nFIN {a}\nREQ {b} 0\nFIN {c}\n",
        a = got[0].id,
        b = got[1].id,
        c = got[2].id
    );
    c.send_raw(batch.as_bytes()).await?;
    c.expect_error(&format!(
        "E_FIN_FAILED FIN {UNKNOWN_ID} failed ID not in flight"
    ))
    .await?;
    c.expect_error(&format!(
        "E_FIN_FAILED FIN {} failed ID not in flight",
        got[0].id
    ))
    .await?;
    c.expect_error(&format!(
        "E_REQ_FAILED REQ {} failed ID not in flight",
        got[1].id
    ))
    .await?;
    sync(&mut c).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["clients"][0]["finish_count"], 3, "{ch}");
    assert_eq!(ch["in_flight_count"], 0, "{ch}");
    assert_eq!(ch["depth"], 0, "{ch}");
    Ok(())
}

#[tokio::test]
async fn commands_before_a_fatal_error_take_effect() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 2).await?;
    publish_n(&b, "t", "m", 2).await?;
    let got = messages(&mut c, 2, false).await?;
    c.send_raw(format!("FIN {}\nFIN {}\nBOGUS\n", got[0].id, got[1].id).as_bytes())
        .await?;
    expect_fatal(&mut c, "E_INVALID invalid command BOGUS").await?;
    let stats = wait_for_stats(&b, "the consumer gone", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["client_count"] == 0)
    })
    .await?;
    let ch = channel_stats(&stats, "t", "c").unwrap();
    assert_eq!(ch["in_flight_count"], 0, "both FINs applied: {ch}");
    assert_eq!(ch["depth"], 0, "{ch}");
    Ok(())
}

#[tokio::test]
async fn a_response_flushes_buffered_messages_ahead_of_it() -> Result<()> {
    let b = broker().await?;
    let mut c = subscribe(
        &b,
        "t",
        "c",
        Some(json!({"output_buffer_timeout": 5000, "output_buffer_size": 65536})),
    )
    .await?;
    rdy_cmd(&mut c, 10).await?;
    wait_for_stats(&b, "RDY 10", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["clients"][0]["ready_count"] == 10)
    })
    .await?;
    publish(&b, "t", &[b"buffered"]).await?;
    tokio::time::sleep(ms(200)).await;
    let asked = Instant::now();
    c.send_raw(&pub_cmd("other", b"x")).await?;
    match c.next_frame().await? {
        Frame::Message(m) => assert_eq!(body(&m), "buffered"),
        other => bail!("expected the buffered message first, got {other:?}"),
    }
    c.expect_response(b"OK").await?;
    ensure!(
        asked.elapsed() < ms(1500),
        "response and buffered message took {:?} (buffer timeout 5 s)",
        asked.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn empty_rdy_and_req_timeout_parse_as_zero() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish(&b, "t", &[b"a"]).await?;
    let m = c.expect_message().await?;
    // nsqd's base-10 parser reads an empty parameter as 0.
    c.send_raw(format!("REQ {} \n", m.id).as_bytes()).await?;
    let again = c.expect_message().await?;
    assert_eq!(again.attempts, 2);
    assert_eq!(again.id, m.id);
    c.send_raw(b"RDY \n").await?;
    fin(&mut c, &again).await?;
    sync(&mut c).await?;
    publish(&b, "t", &[b"b"]).await?;
    c.expect_nothing_for(ms(400)).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["clients"][0]["ready_count"], 0, "{ch}");
    Ok(())
}

#[tokio::test]
async fn publishing_after_the_topic_was_deleted_recreates_it() -> Result<()> {
    let b = broker().await?;
    let mut p = b.connect().await?;
    p.send_raw(&pub_cmd("t", b"old")).await?;
    p.expect_response(b"OK").await?;
    post(&b, "/topic/delete?topic=t").await?;
    // The same publisher connection publishes again: a new, empty topic takes it.
    p.send_raw(&pub_cmd("t", b"new")).await?;
    p.expect_response(b"OK").await?;
    let stats = b.stats().await?;
    let t = topic_stats(&stats, "t").unwrap();
    assert_eq!(t["message_count"], 1, "{t}");
    let mut c = consumer(&b, "t", "c", 10).await?;
    let got: Vec<String> = drain(&mut c, ms(500), true)
        .await?
        .iter()
        .map(body)
        .collect();
    assert_eq!(got, ["new"]);
    Ok(())
}

#[tokio::test]
async fn ephemeral_queues_drop_what_does_not_fit_in_memory() -> Result<()> {
    let b = TestBroker::start(|o| o.mem_queue_size = 5).await?;
    // An ephemeral channel of a durable topic, with RDY 0.
    let mut c = subscribe(&b, "t", "c#ephemeral", None).await?;
    let mut p = b.connect().await?;
    for i in 0..8 {
        p.send_raw(&pub_cmd("t", format!("m{i}").as_bytes()))
            .await?;
        p.expect_response(b"OK").await?;
    }
    assert_eq!(channel(&b, "t", "c#ephemeral").await?["depth"], 5);
    rdy_cmd(&mut c, 10).await?;
    let got: Vec<String> = drain(&mut c, ms(500), true)
        .await?
        .iter()
        .map(body)
        .collect();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);

    // An ephemeral topic without channels keeps what fits, too.
    for i in 0..8 {
        p.send_raw(&pub_cmd("e#ephemeral", format!("e{i}").as_bytes()))
            .await?;
        p.expect_response(b"OK").await?;
    }
    let stats = b.stats().await?;
    assert_eq!(topic_stats(&stats, "e#ephemeral").unwrap()["depth"], 5);
    Ok(())
}

#[tokio::test]
async fn an_overlong_command_line_closes_the_connection() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    // nsqd reads a command line into a 16 KiB buffer; a longer line ends the connection.
    c.send_raw(&vec![b'A'; 20 * 1024]).await?;
    loop {
        match c.next_frame().await {
            Ok(Frame::Error(e)) if e.starts_with(b"E_INVALID") => continue,
            Ok(other) => bail!("expected the connection to close, got {other:?}"),
            Err(e) if e.to_string().contains("closed") => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test]
async fn a_new_channel_gets_only_messages_published_after_it() -> Result<()> {
    let b = broker().await?;
    let mut one = consumer(&b, "t", "one", 10).await?;
    publish(&b, "t", &[b"before"]).await?;
    assert_eq!(body(&one.expect_message().await?), "before");
    let mut two = consumer(&b, "t", "two", 10).await?;
    publish(&b, "t", &[b"after"]).await?;
    assert_eq!(body(&one.expect_message().await?), "after");
    assert_eq!(body(&two.expect_message().await?), "after");
    two.expect_nothing_for(ms(300)).await
}

#[tokio::test]
async fn dpub_before_any_channel_keeps_its_delay() -> Result<()> {
    let b = broker().await?;
    let mut p = b.connect().await?;
    let sent = Instant::now();
    p.send_raw(&dpub_cmd("t", 1000, b"deferred early")).await?;
    p.expect_response(b"OK").await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    let m = c.expect_message().await?;
    let waited = sent.elapsed();
    assert_eq!(body(&m), "deferred early");
    ensure!(
        waited >= ms(900) && waited <= Duration::from_secs(5),
        "DPUB 1000 published before any channel arrived after {waited:?}"
    );
    Ok(())
}

#[tokio::test]
async fn ephemeral_topic_goes_when_its_last_channel_is_deleted() -> Result<()> {
    let b = broker().await?;
    // A durable channel of an ephemeral topic outlives its consumer...
    let c = consumer(&b, "e#ephemeral", "durable", 1).await?;
    drop(c);
    wait_for_stats(&b, "the consumer gone", |s| {
        channel_stats(s, "e#ephemeral", "durable").is_some_and(|c| c["client_count"] == 0)
    })
    .await?;
    // ...but deleting it deletes the ephemeral topic with it, as nsqd does.
    post(&b, "/channel/delete?topic=e%23ephemeral&channel=durable").await?;
    wait_for_stats(&b, "the ephemeral topic gone", |s| {
        topic_stats(s, "e#ephemeral").is_none()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_timed_out_message_belongs_to_its_next_consumer() -> Result<()> {
    let b = broker().await?;
    let mut first = subscribe(&b, "t", "c", Some(json!({"msg_timeout": 1000}))).await?;
    rdy_cmd(&mut first, 1).await?;
    publish(&b, "t", &[b"moved"]).await?;
    let m = first.expect_message().await?;
    first.send_raw(b"RDY 0\n").await?;
    sync(&mut first).await?;
    // After the timeout nobody is ready: the message waits in the channel, not in flight.
    wait_for_stats(&b, "the message requeued by its timeout", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["depth"] == 1 && c["timeout_count"] == 1)
    })
    .await?;
    fin(&mut first, &m).await?;
    first
        .expect_error(&format!(
            "E_FIN_FAILED FIN {} failed ID not in flight",
            m.id
        ))
        .await?;
    let mut second = consumer(&b, "t", "c", 1).await?;
    let again = second.expect_message().await?;
    assert_eq!((again.id, again.attempts), (m.id, 2));
    // The first consumer no longer owns it; the second does.
    fin(&mut first, &m).await?;
    first
        .expect_error(&format!(
            "E_FIN_FAILED FIN {} failed client does not own message",
            m.id
        ))
        .await?;
    fin(&mut second, &again).await?;
    sync(&mut second).await
}

#[tokio::test]
async fn a_requeued_message_spilled_to_disk_keeps_attempts_and_timestamp() -> Result<()> {
    let b = TestBroker::start(|o| o.mem_queue_size = 2).await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    publish(&b, "t", &[b"first"]).await?;
    let m = c.expect_message().await?;
    // Fill the channel's memory queue (the consumer is busy with `first`), then requeue
    // `first` behind them: it goes to the disk queue.
    publish(&b, "t", &[b"x", b"y", b"z"]).await?;
    c.send_raw(format!("REQ {} 0\n", m.id).as_bytes()).await?;
    let got = messages(&mut c, 4, true).await?;
    let again = got
        .iter()
        .find(|g| g.id == m.id)
        .context("the requeued message never came back")?;
    assert_eq!(again.attempts, 2);
    assert_eq!(again.timestamp, m.timestamp);
    assert_eq!(body(again), "first");
    let mut bodies: Vec<String> = got.iter().map(body).collect();
    bodies.sort();
    assert_eq!(bodies, ["first", "x", "y", "z"]);
    Ok(())
}

#[tokio::test]
async fn dpub_through_the_topic_disk_queue_keeps_its_delay() -> Result<()> {
    // No memory queue: the deferred message waits in the topic's disk queue until a channel
    // exists (nsqd loses the delay there, nsqio/nsq#1375; knsq keeps it).
    let b = TestBroker::start(|o| o.mem_queue_size = 0).await?;
    let mut p = b.connect().await?;
    let sent = Instant::now();
    p.send_raw(&dpub_cmd("t", 1000, b"deferred on disk"))
        .await?;
    p.expect_response(b"OK").await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    let m = c.expect_message().await?;
    let waited = sent.elapsed();
    assert_eq!(body(&m), "deferred on disk");
    ensure!(
        waited >= ms(900) && waited <= Duration::from_secs(5),
        "DPUB 1000 through disk arrived after {waited:?}"
    );
    Ok(())
}

#[tokio::test]
async fn empty_also_drops_what_was_spilled_to_disk() -> Result<()> {
    let b = TestBroker::start(|o| o.mem_queue_size = 2).await?;
    // Channel: 5 queued with RDY 0, 3 of them on disk.
    let mut c = subscribe(&b, "t", "c", None).await?;
    publish_n(&b, "t", "c", 5).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(
        (ch["depth"].clone(), ch["backend_depth"].clone()),
        (json!(5), json!(3)),
        "{ch}"
    );
    post(&b, "/channel/empty?topic=t&channel=c").await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(
        (ch["depth"].clone(), ch["backend_depth"].clone()),
        (json!(0), json!(0)),
        "{ch}"
    );
    rdy_cmd(&mut c, 10).await?;
    c.expect_nothing_for(ms(400)).await?;

    // Topic without channels: 5 waiting, 3 on disk.
    publish_n(&b, "u", "u", 5).await?;
    let stats = b.stats().await?;
    let t = topic_stats(&stats, "u").unwrap();
    assert_eq!(
        (t["depth"].clone(), t["backend_depth"].clone()),
        (json!(5), json!(3)),
        "{t}"
    );
    post(&b, "/topic/empty?topic=u").await?;
    let stats = b.stats().await?;
    let t = topic_stats(&stats, "u").unwrap();
    assert_eq!(
        (t["depth"].clone(), t["backend_depth"].clone()),
        (json!(0), json!(0)),
        "{t}"
    );
    let mut u = consumer(&b, "u", "c", 10).await?;
    u.expect_nothing_for(ms(400)).await?;
    Ok(())
}

#[tokio::test]
async fn deleted_queues_do_not_come_back_with_their_disk_contents() -> Result<()> {
    let b = TestBroker::start(|o| o.mem_queue_size = 0).await?;
    // A topic without channels keeps everything on disk.
    publish(&b, "t", &[b"old topic 1", b"old topic 2"]).await?;
    post(&b, "/topic/delete?topic=t").await?;
    publish(&b, "t", &[b"new topic"]).await?;
    let mut c = consumer(&b, "t", "c", 10).await?;
    let got: Vec<String> = drain(&mut c, ms(500), true)
        .await?
        .iter()
        .map(body)
        .collect();
    assert_eq!(got, ["new topic"]);

    // A channel with a disk backlog, deleted and subscribed again.
    let d = subscribe(&b, "t", "d", None).await?;
    publish(&b, "t", &[b"old channel 1", b"old channel 2"]).await?;
    assert_eq!(drain(&mut c, ms(300), true).await?.len(), 2);
    post(&b, "/channel/delete?topic=t&channel=d").await?;
    drop(d);
    let mut d = consumer(&b, "t", "d", 10).await?;
    d.expect_nothing_for(ms(400)).await?;
    publish(&b, "t", &[b"new channel"]).await?;
    assert_eq!(body(&d.expect_message().await?), "new channel");
    Ok(())
}
