//! IDENTIFY negotiation, heartbeats, the read deadline and output buffering, over TCP.

#[allow(dead_code)]
mod common;

use anyhow::{Result, bail, ensure};
use common::*;
use proto::wire::Frame;
use serde_json::{Value, json};
use std::time::Duration;
use tests::{NsqConn, TestBroker};
use tokio::time::Instant;

/// The 15 keys of nsqd 1.3's feature-negotiation response.
const RESPONSE_KEYS: [&str; 15] = [
    "max_rdy_count",
    "version",
    "max_msg_timeout",
    "msg_timeout",
    "tls_v1",
    "deflate",
    "deflate_level",
    "max_deflate_level",
    "snappy",
    "sample_rate",
    "auth_required",
    "output_buffer_size",
    "output_buffer_timeout",
    "topology_region",
    "topology_zone",
];

async fn negotiate(c: &mut NsqConn, json: Value) -> Result<Value> {
    match c.identify(&json).await? {
        Frame::Response(r) => Ok(serde_json::from_slice(&r)?),
        other => bail!("IDENTIFY {json} answered {other:?}"),
    }
}

#[tokio::test]
async fn identify_without_feature_negotiation_answers_ok() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    c.send_raw(&identify_cmd(&json!({"client_id": "plain"})))
        .await?;
    c.expect_response(b"OK").await?;
    // feature_negotiation false is the same as absent; an empty object too.
    let mut c = b.connect().await?;
    c.send_raw(&identify_cmd(&json!({"feature_negotiation": false})))
        .await?;
    c.expect_response(b"OK").await?;
    let mut c = b.connect().await?;
    c.send_raw(&sized("IDENTIFY", b"{}")).await?;
    c.expect_response(b"OK").await?;
    // State stays init: a second IDENTIFY is not refused, and SUB follows.
    c.send_raw(&sized("IDENTIFY", b"{}")).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(b"SUB t c\n").await?;
    c.expect_response(b"OK").await
}

#[tokio::test]
async fn identify_with_feature_negotiation_answers_every_field() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    let resp = negotiate(&mut c, json!({"feature_negotiation": true})).await?;
    let obj = resp.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = RESPONSE_KEYS.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "{resp}");
    assert_eq!(
        resp,
        json!({
            "max_rdy_count": 2500,
            "version": "1.3.0",
            "max_msg_timeout": 900000,
            "msg_timeout": 60000,
            "tls_v1": false,
            "deflate": false,
            "deflate_level": 6,
            "max_deflate_level": 6,
            "snappy": false,
            "sample_rate": 0,
            "auth_required": false,
            "output_buffer_size": 16384,
            "output_buffer_timeout": 250,
            "topology_region": "",
            "topology_zone": "",
        })
    );
    // Without TLS or compression there is no upgrade `OK`: the connection goes on.
    c.send_raw(b"SUB t c\n").await?;
    c.expect_response(b"OK").await
}

#[tokio::test]
async fn negotiated_values_are_reflected() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_rdy_count = 200;
        o.max_msg_timeout = Duration::from_secs(120);
        o.msg_timeout = Duration::from_secs(30);
    })
    .await?;
    let mut c = b.connect().await?;
    let resp = negotiate(
        &mut c,
        json!({
            "feature_negotiation": true,
            "msg_timeout": 5000,
            "sample_rate": 42,
            "output_buffer_size": 1024,
            "output_buffer_timeout": 100,
            "heartbeat_interval": 5000,
        }),
    )
    .await?;
    assert_eq!(resp["max_rdy_count"], 200, "{resp}");
    assert_eq!(resp["max_msg_timeout"], 120000, "{resp}");
    assert_eq!(resp["msg_timeout"], 5000, "{resp}");
    assert_eq!(resp["sample_rate"], 42, "{resp}");
    assert_eq!(resp["output_buffer_size"], 1024, "{resp}");
    assert_eq!(resp["output_buffer_timeout"], 100, "{resp}");

    // Defaults come from the options.
    let mut c = b.connect().await?;
    let resp = negotiate(&mut c, json!({"feature_negotiation": true})).await?;
    assert_eq!(resp["msg_timeout"], 30000, "{resp}");

    // output_buffer_size -1 turns buffering off: size 1, timeout 0.
    let mut c = b.connect().await?;
    let resp = negotiate(
        &mut c,
        json!({"feature_negotiation": true, "output_buffer_size": -1, "output_buffer_timeout": 500}),
    )
    .await?;
    assert_eq!(resp["output_buffer_size"], 1, "{resp}");
    assert_eq!(resp["output_buffer_timeout"], 0, "{resp}");

    // output_buffer_timeout -1 means no timed flush; the size stays.
    let mut c = b.connect().await?;
    let resp = negotiate(
        &mut c,
        json!({"feature_negotiation": true, "output_buffer_timeout": -1}),
    )
    .await?;
    assert_eq!(resp["output_buffer_size"], 16384, "{resp}");
    assert_eq!(resp["output_buffer_timeout"], 0, "{resp}");

    // Requests for TLS and for one compression are answered "off" by a broker without a
    // certificate and with --snappy=false --deflate=false, and the connection goes on
    // without any upgrade.
    let b = TestBroker::start(|o| {
        o.tls.snappy = false;
        o.tls.deflate = false;
    })
    .await?;
    for ask in [
        json!({"feature_negotiation": true, "tls_v1": true, "snappy": true}),
        json!({"feature_negotiation": true, "deflate": true, "deflate_level": 9}),
    ] {
        let mut c = b.connect().await?;
        let resp = negotiate(&mut c, ask).await?;
        assert_eq!(resp["tls_v1"], false, "{resp}");
        assert_eq!(resp["snappy"], false, "{resp}");
        assert_eq!(resp["deflate"], false, "{resp}");
        c.send_raw(b"SUB t c\n").await?;
        c.expect_response(b"OK").await?;
    }
    Ok(())
}

#[tokio::test]
async fn asking_for_deflate_and_snappy_together_is_fatal_only_when_negotiating() -> Result<()> {
    let b = broker().await?;
    // nsqd answers OK before its conflict check without feature negotiation, and upgrades
    // nothing.
    let mut c = b.connect().await?;
    c.send_raw(&identify_cmd(&json!({"deflate": true, "snappy": true})))
        .await?;
    c.expect_response(b"OK").await?;
    c.send_raw(b"SUB t c\n").await?;
    c.expect_response(b"OK").await?;

    let mut c = b.connect().await?;
    c.send_raw(&identify_cmd(
        &json!({"feature_negotiation": true, "deflate": true, "snappy": true}),
    ))
    .await?;
    expect_fatal(
        &mut c,
        "E_IDENTIFY_FAILED cannot enable both deflate and snappy compression",
    )
    .await
}

#[tokio::test]
async fn identify_ignores_unknown_keys_and_nulls_and_matches_keys_case_insensitively() -> Result<()>
{
    let b = broker().await?;
    let mut c = b.connect().await?;
    let resp = negotiate(
        &mut c,
        json!({
            "feature_negotiation": true,
            "short_id": "legacy",
            "long_id": "legacy.example",
            "something_new": {"nested": [1, 2, 3]},
            "hostname": null,
            "heartbeat_interval": null,
            "sample_rate": null,
            "MSG_TIMEOUT": 7000,
            "User_Agent": "knsq-tests/1.0",
            "client_id": "c1",
        }),
    )
    .await?;
    assert_eq!(resp["msg_timeout"], 7000, "{resp}");
    assert_eq!(resp["sample_rate"], 0, "{resp}");

    // pynsq's IDENTIFY as it is sent, answered with a plain OK.
    let mut p = b.connect().await?;
    p.send_raw(&identify_cmd(&json!({
        "short_id": "host", "long_id": "host.local", "client_id": "host",
        "hostname": "host.local", "heartbeat_interval": 30000, "feature_negotiation": false,
        "tls_v1": false, "snappy": false, "deflate": false, "deflate_level": 6,
        "output_buffer_size": null, "output_buffer_timeout": null, "sample_rate": 0,
        "user_agent": "pynsq/0.9.1",
    })))
    .await?;
    p.expect_response(b"OK").await?;

    // What the client told shows in /stats once it subscribes.
    c.send_raw(b"SUB t c\n").await?;
    c.expect_response(b"OK").await?;
    let ch = channel(&b, "t", "c").await?;
    let client = &ch["clients"][0];
    assert_eq!(client["client_id"], "c1", "{client}");
    assert_eq!(client["user_agent"], "knsq-tests/1.0", "{client}");
    assert_eq!(client["state"], 3, "{client}");
    assert_eq!(client["version"], "V2", "{client}");
    Ok(())
}

#[tokio::test]
async fn identify_defaults_show_in_stats() -> Result<()> {
    let b = broker().await?;
    let mut c = subscribe(&b, "t", "c", None).await?;
    rdy_cmd(&mut c, 7).await?;
    let stats = wait_for_stats(&b, "RDY 7", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["clients"][0]["ready_count"] == 7)
    })
    .await?;
    let client = &channel_stats(&stats, "t", "c").unwrap()["clients"][0];
    // Without IDENTIFY, client_id and hostname default to the remote IP.
    assert_eq!(client["client_id"], "127.0.0.1", "{client}");
    assert_eq!(client["hostname"], "127.0.0.1", "{client}");
    assert_eq!(client["sample_rate"], 0, "{client}");
    Ok(())
}

#[tokio::test]
async fn heartbeats_arrive_every_interval() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    let start = Instant::now();
    c.send_raw(&identify_cmd(&json!({"heartbeat_interval": 1000})))
        .await?;
    c.expect_response(b"OK").await?;
    let mut last = start;
    for i in 0..3 {
        match c.next_frame_within(Duration::from_secs(3)).await? {
            Frame::Response(r) if &r[..] == b"_heartbeat_" => {}
            other => bail!("expected heartbeat {i}, got {other:?}"),
        }
        let gap = last.elapsed();
        ensure!(
            gap >= Duration::from_millis(600),
            "heartbeat {i} only {gap:?} after the previous one"
        );
        last = Instant::now();
        // Answering keeps the connection alive past the 2-interval read deadline.
        c.send_raw(b"NOP\n").await?;
    }
    let total = start.elapsed();
    ensure!(
        total >= Duration::from_millis(2700) && total <= Duration::from_secs(7),
        "three 1 s heartbeats took {total:?}"
    );
    sync(&mut c).await
}

#[tokio::test]
async fn heartbeats_go_to_subscribed_consumers_too() -> Result<()> {
    let b = broker().await?;
    let mut c = subscribe(&b, "t", "c", Some(json!({"heartbeat_interval": 1000}))).await?;
    rdy_cmd(&mut c, 1).await?;
    match c.next_frame_within(Duration::from_secs(3)).await? {
        Frame::Response(r) if &r[..] == b"_heartbeat_" => {}
        other => bail!("expected a heartbeat, got {other:?}"),
    }
    c.send_raw(b"NOP\n").await?;
    publish(&b, "t", &[b"between beats"]).await?;
    assert_eq!(body(&c.expect_message().await?), "between beats");
    Ok(())
}

#[tokio::test]
async fn silent_client_is_closed_after_two_heartbeat_intervals() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    let start = Instant::now();
    c.send_raw(&identify_cmd(&json!({"heartbeat_interval": 1000})))
        .await?;
    c.expect_response(b"OK").await?;
    let mut beats = 0;
    loop {
        match c.next_frame_within(Duration::from_secs(6)).await {
            Ok(Frame::Response(r)) if &r[..] == b"_heartbeat_" => beats += 1,
            Ok(other) => bail!("expected heartbeats then close, got {other:?}"),
            Err(e) if e.to_string().contains("closed") => break,
            Err(e) => return Err(e),
        }
    }
    let closed = start.elapsed();
    ensure!(
        closed >= Duration::from_millis(1800) && closed <= Duration::from_secs(6),
        "closed {closed:?} after IDENTIFY, expected about 2 s"
    );
    ensure!(
        beats >= 1,
        "expected at least one heartbeat before the close"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_answering_heartbeats_stays_connected() -> Result<()> {
    let b = broker().await?;
    let mut c = subscribe(&b, "t", "c", Some(json!({"heartbeat_interval": 1000}))).await?;
    let start = Instant::now();
    // Any command resets the read deadline; keep talking for longer than 2 intervals.
    while start.elapsed() < Duration::from_millis(3500) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.send_raw(b"NOP\n").await?;
    }
    rdy_cmd(&mut c, 1).await?;
    publish(&b, "t", &[b"still here"]).await?;
    assert_eq!(body(&c.expect_message().await?), "still here");
    Ok(())
}

/// A consumer with these IDENTIFY settings, subscribed to `topic`/`c` with `RDY rdy`; returns
/// the connection and when the IDENTIFY was sent.
async fn buffered_consumer(
    b: &TestBroker,
    topic: &str,
    identify: Value,
    rdy: u64,
) -> Result<(NsqConn, Instant)> {
    let start = Instant::now();
    let mut c = subscribe(b, topic, "c", Some(identify)).await?;
    rdy_cmd(&mut c, rdy).await?;
    wait_for_stats(b, "the RDY count", |s| {
        channel_stats(s, topic, "c").is_some_and(|c| c["clients"][0]["ready_count"] == rdy)
    })
    .await?;
    Ok((c, start))
}

#[tokio::test]
async fn output_buffer_timeout_delays_a_lone_message() -> Result<()> {
    let b = broker().await?;
    let (mut c, identified) = buffered_consumer(
        &b,
        "t",
        json!({"output_buffer_timeout": 1000, "output_buffer_size": 65536}),
        10,
    )
    .await?;
    let published = Instant::now();
    // Delivered by no connection's task (HTTP), a lone message waits for the flush timer.
    publish_http(&b, "t", b"buffered").await?;
    let m = c.expect_message().await?;
    let since_identify = identified.elapsed();
    assert_eq!(body(&m), "buffered");
    // The flush timer runs from the IDENTIFY; the message waited in the buffer for it.
    ensure!(
        since_identify >= Duration::from_millis(900),
        "a lone buffered message arrived {since_identify:?} after IDENTIFY (output_buffer_timeout 1 s)"
    );
    ensure!(
        published.elapsed() <= Duration::from_secs(5),
        "message took {:?}",
        published.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_published_message_leaves_when_its_publisher_has_nothing_more_ready() -> Result<()> {
    // knsq goes past nsqd here: a PUB's message is written out once the publisher's
    // connection has handled all it read, not after the output buffer timeout.
    let b = broker().await?;
    let (mut c, _) = buffered_consumer(
        &b,
        "t",
        json!({"output_buffer_timeout": 5000, "output_buffer_size": 65536}),
        10,
    )
    .await?;
    let published = Instant::now();
    publish(&b, "t", &[b"at once"]).await?;
    assert_eq!(body(&c.expect_message().await?), "at once");
    ensure!(
        published.elapsed() < Duration::from_millis(1500),
        "a PUB's message took {:?} (buffer timeout 5 s)",
        published.elapsed()
    );
    // An MPUB's messages leave together, in one go.
    publish_n(&b, "t", "m", 5).await?;
    let got = messages(&mut c, 5, false).await?;
    assert_eq!(got.len(), 5);
    ensure!(
        published.elapsed() < Duration::from_millis(3000),
        "an MPUB's messages took {:?} (buffer timeout 5 s)",
        published.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn output_buffer_size_minus_one_sends_at_once() -> Result<()> {
    let b = broker().await?;
    let (mut c, _) = buffered_consumer(
        &b,
        "t",
        json!({"output_buffer_size": -1, "output_buffer_timeout": 1000}),
        10,
    )
    .await?;
    let published = Instant::now();
    publish(&b, "t", &[b"unbuffered"]).await?;
    let m = c.expect_message().await?;
    assert_eq!(body(&m), "unbuffered");
    ensure!(
        published.elapsed() < Duration::from_millis(600),
        "unbuffered message took {:?}",
        published.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn output_buffer_timeout_minus_one_with_a_full_buffer_sends_at_once() -> Result<()> {
    let b = broker().await?;
    // No timed flush, but a 64-byte buffer: one 100-byte message fills it.
    let (mut c, _) = buffered_consumer(
        &b,
        "t",
        json!({"output_buffer_timeout": -1, "output_buffer_size": 64}),
        10,
    )
    .await?;
    let published = Instant::now();
    publish(&b, "t", &[&[b'z'; 100]]).await?;
    let m = c.expect_message().await?;
    assert_eq!(m.body.len(), 100);
    ensure!(
        published.elapsed() < Duration::from_millis(600),
        "message filling the buffer took {:?}",
        published.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn buffer_is_flushed_when_in_flight_reaches_rdy() -> Result<()> {
    let b = broker().await?;
    let (mut c, _) = buffered_consumer(
        &b,
        "t",
        json!({"output_buffer_timeout": 5000, "output_buffer_size": 65536}),
        3,
    )
    .await?;
    let published = Instant::now();
    publish_n(&b, "t", "m", 3).await?;
    let got = messages(&mut c, 3, false).await?;
    assert_eq!(got.len(), 3);
    ensure!(
        published.elapsed() < Duration::from_millis(1500),
        "messages reaching RDY took {:?} (buffer timeout 5 s)",
        published.elapsed()
    );
    // RDY 1 and a single message: flushed at once as well.
    let (mut one, _) = buffered_consumer(
        &b,
        "t2",
        json!({"output_buffer_timeout": 5000, "output_buffer_size": 65536}),
        1,
    )
    .await?;
    let published = Instant::now();
    publish(&b, "t2", &[b"single"]).await?;
    assert_eq!(body(&one.expect_message().await?), "single");
    ensure!(
        published.elapsed() < Duration::from_millis(1500),
        "message reaching RDY 1 took {:?} (buffer timeout 5 s)",
        published.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn default_output_buffer_timeout_flushes_within_250ms_or_so() -> Result<()> {
    let b = broker().await?;
    let (mut c, _) = buffered_consumer(&b, "t", json!({}), 10).await?;
    let published = Instant::now();
    publish(&b, "t", &[b"default"]).await?;
    assert_eq!(body(&c.expect_message().await?), "default");
    ensure!(
        published.elapsed() < Duration::from_secs(2),
        "message with the default 250 ms buffer timeout took {:?}",
        published.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn identify_ranges_follow_the_options() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_heartbeat_interval = Duration::from_secs(5);
        o.max_output_buffer_size = 1024;
        o.min_output_buffer_timeout = Duration::from_millis(100);
        o.max_output_buffer_timeout = Duration::from_secs(2);
        o.max_msg_timeout = Duration::from_secs(90);
    })
    .await?;
    for (field, bad, what) in [
        ("heartbeat_interval", 5001, "heartbeat interval"),
        ("output_buffer_size", 1025, "output buffer size"),
        ("output_buffer_timeout", 99, "output buffer timeout"),
        ("output_buffer_timeout", 2001, "output buffer timeout"),
        ("msg_timeout", 90001, "msg timeout"),
    ] {
        let mut c = b.connect().await?;
        c.send_raw(&identify_cmd(&json!({ field: bad }))).await?;
        expect_fatal(
            &mut c,
            &format!("E_BAD_BODY IDENTIFY {what} ({bad}) is invalid"),
        )
        .await?;
    }
    let mut c = b.connect().await?;
    let resp = negotiate(
        &mut c,
        json!({
            "Feature_Negotiation": true,
            "heartbeat_interval": 5000,
            "output_buffer_size": 1024,
            "output_buffer_timeout": 100,
            "msg_timeout": 90000,
        }),
    )
    .await?;
    assert_eq!(resp["max_msg_timeout"], 90000, "{resp}");
    assert_eq!(resp["msg_timeout"], 90000, "{resp}");
    assert_eq!(resp["output_buffer_size"], 1024, "{resp}");
    assert_eq!(resp["output_buffer_timeout"], 100, "{resp}");
    Ok(())
}

/// A consumer of `t`/`c` with a 5 s output buffer timeout and RDY 10 holding one buffered
/// message (checked not to have arrived yet).
async fn holding_one_buffered_message(b: &TestBroker) -> Result<NsqConn> {
    let (mut c, _) = buffered_consumer(
        b,
        "t",
        json!({"output_buffer_timeout": 5000, "output_buffer_size": 65536}),
        10,
    )
    .await?;
    // Over HTTP: a PUB's message would leave as soon as its publisher's task was done.
    publish_http(b, "t", b"held in the buffer").await?;
    wait_for_stats(b, "the message in flight", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["in_flight_count"] == 1)
    })
    .await?;
    c.expect_nothing_for(Duration::from_millis(300)).await?;
    Ok(c)
}

#[tokio::test]
async fn rdy_zero_flushes_buffered_messages() -> Result<()> {
    let b = broker().await?;
    let mut c = holding_one_buffered_message(&b).await?;
    // Not ready any more: nsqd flushes the buffer at once.
    let asked = Instant::now();
    c.send_raw(b"RDY 0\n").await?;
    assert_eq!(body(&c.expect_message().await?), "held in the buffer");
    ensure!(
        asked.elapsed() < Duration::from_millis(1500),
        "buffered message arrived {:?} after RDY 0 (buffer timeout 5 s)",
        asked.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn channel_pause_flushes_buffered_messages() -> Result<()> {
    let b = broker().await?;
    let mut c = holding_one_buffered_message(&b).await?;
    let asked = Instant::now();
    post(&b, "/channel/pause?topic=t&channel=c").await?;
    assert_eq!(body(&c.expect_message().await?), "held in the buffer");
    ensure!(
        asked.elapsed() < Duration::from_millis(1500),
        "buffered message arrived {:?} after the channel was paused (buffer timeout 5 s)",
        asked.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn output_buffer_timeout_minus_one_leaves_a_lone_message_to_the_next_flush() -> Result<()> {
    // nsqd stops the flush ticker for output_buffer_timeout -1 (messagePump: a new ticker
    // only `if identifyData.OutputBufferTimeout > 0`): with room left below RDY and a
    // buffer that is not full, a lone message goes out with the next heartbeat.
    let b = broker().await?;
    let (mut c, _) = buffered_consumer(
        &b,
        "t",
        json!({"output_buffer_timeout": -1, "heartbeat_interval": 1000}),
        10,
    )
    .await?;
    let published = Instant::now();
    publish(&b, "t", &[b"lone"]).await?;
    match c.next_frame_within(Duration::from_secs(4)).await? {
        Frame::Message(m) => assert_eq!(body(&m), "lone"),
        other => bail!("expected the message, got {other:?}"),
    }
    let waited = published.elapsed();
    let arrived = Instant::now();
    match c.next_frame().await? {
        Frame::Response(r) if &r[..] == b"_heartbeat_" => {}
        other => bail!("expected the heartbeat that flushed the message, got {other:?}"),
    }
    // Written together: the heartbeat is right behind the message.
    ensure!(
        arrived.elapsed() < Duration::from_millis(300),
        "the heartbeat came {:?} after the message: the message was not held for it",
        arrived.elapsed()
    );
    ensure!(
        waited <= Duration::from_secs(3),
        "lone message took {waited:?} with 1 s heartbeats"
    );
    Ok(())
}
