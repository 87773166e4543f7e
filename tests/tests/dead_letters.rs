//! Server-side maximum of attempts and dead-letter topics: what reaches a channel's limit moves,
//! once, with its ID and body, to the dead-letter topic and is not delivered again; where it
//! came from can be read without consuming it; a redrive puts it back into the one channel it
//! came from. Brokers in this process, except where a restart or a crash is the point.

use anyhow::{Context, Result, bail, ensure};
use proto::wire::{Command, Frame, Message, MessageId};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tests::{BrokerProcess, HttpResponse, NsqConn, TestBroker, http_post_ok, http_request};
use tokio::time::Instant;

async fn call(http: SocketAddr, method: &str, path: &str) -> Result<HttpResponse> {
    http_request(http, method, path, b"").await
}

/// A request that must answer 200 with JSON.
async fn json(http: SocketAddr, method: &str, path: &str) -> Result<Value> {
    let resp = call(http, method, path).await?;
    ensure!(
        resp.status == 200,
        "{method} {path}: {} {}",
        resp.status,
        resp.text()
    );
    resp.json()
}

/// An nsqd-style error: the status and `{"message":"TEXT"}`.
async fn expect_error(
    http: SocketAddr,
    method: &str,
    path: &str,
    status: u16,
    message: &str,
) -> Result<()> {
    let resp = call(http, method, path).await?;
    ensure!(
        resp.status == status && resp.text() == format!(r#"{{"message":"{message}"}}"#),
        "{method} {path}: {} {}, want {status} {message}",
        resp.status,
        resp.text()
    );
    Ok(())
}

async fn create_channel(http: SocketAddr, topic: &str, channel: &str) -> Result<()> {
    http_post_ok(http, &format!("/topic/create?topic={topic}"), b"").await?;
    let channel = format!("/channel/create?topic={topic}&channel={channel}");
    http_post_ok(http, &channel, b"").await
}

async fn publish(http: SocketAddr, topic: &str, bodies: &[String]) -> Result<()> {
    let body = bodies.join("\n");
    let resp = http_request(
        http,
        "POST",
        &format!("/mpub?topic={topic}"),
        body.as_bytes(),
    )
    .await?;
    ensure!(resp.status == 200, "mpub: {} {}", resp.status, resp.text());
    Ok(())
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

async fn consumer(tcp: SocketAddr, topic: &str, channel: &str, rdy: u64) -> Result<NsqConn> {
    let mut c = NsqConn::connect(tcp).await?;
    c.identify(&serde_json::json!({})).await?;
    c.subscribe(topic, channel).await?;
    c.send(&Command::Rdy(rdy)).await?;
    Ok(c)
}

async fn req(c: &mut NsqConn, m: &Message) -> Result<()> {
    c.send(&Command::Req {
        id: m.id,
        timeout_ms: 0,
    })
    .await
}

/// REQs every delivery until no message arrives for `quiet`; returns the deliveries.
async fn req_everything(c: &mut NsqConn, quiet: Duration) -> Result<Vec<Message>> {
    let mut got = Vec::new();
    loop {
        match c.next_frame_within(quiet).await {
            Ok(Frame::Message(m)) => {
                req(c, &m).await?;
                got.push(m);
            }
            Ok(Frame::Response(r)) if &r[..] == proto::wire::HEARTBEAT => {}
            Ok(other) => bail!("unexpected frame {other:?}"),
            Err(e) if e.to_string().starts_with("no frame") => return Ok(got),
            Err(e) => return Err(e),
        }
    }
}

/// FINs deliveries until `n` arrived.
async fn take(c: &mut NsqConn, n: usize) -> Result<Vec<Message>> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = c
            .expect_message()
            .await
            .with_context(|| format!("after {} of {n} messages", got.len()))?;
        c.send(&Command::Fin(m.id)).await?;
        got.push(m);
    }
    Ok(got)
}

fn body_text(m: &Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

async fn channel_stats(http: SocketAddr, topic: &str, channel: &str) -> Result<Value> {
    let stats = json(http, "GET", &format!("/stats?format=json&topic={topic}")).await?;
    let channels = stats["topics"][0]["channels"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    channels
        .into_iter()
        .find(|c| c["channel_name"] == channel)
        .with_context(|| format!("no channel {topic}/{channel} in {stats}"))
}

async fn topic_stats(http: SocketAddr, topic: &str) -> Result<Value> {
    let stats = json(http, "GET", &format!("/stats?format=json&topic={topic}")).await?;
    let t = stats["topics"][0].clone();
    ensure!(t["topic_name"] == topic, "no topic {topic} in {stats}");
    Ok(t)
}

/// Polls until `check` holds for the channel's stats, or fails after 10 s.
async fn wait_channel(
    http: SocketAddr,
    topic: &str,
    channel: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = channel_stats(http, topic, channel).await;
        if let Ok(s) = &stats
            && check(s)
        {
            return stats;
        }
        if Instant::now() > deadline {
            bail!("{what}: still {stats:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(http: SocketAddr, sample: &str) -> Result<f64> {
    let text = call(http, "GET", "/metrics").await?.text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no sample {sample} in /metrics"))
}

/// The first `count` messages of a topic (`channel` None) or channel, as `/…/peek` shows them.
async fn peek(
    http: SocketAddr,
    topic: &str,
    channel: Option<&str>,
    count: usize,
) -> Result<Vec<Value>> {
    let path = match channel {
        Some(c) => format!("/channel/peek?topic={topic}&channel={c}&count={count}"),
        None => format!("/topic/peek?topic={topic}&count={count}"),
    };
    let v = json(http, "GET", &path).await?;
    Ok(v["messages"].as_array().cloned().unwrap_or_default())
}

fn decode_base64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap_or(0) as u32;
        bits = bits << 6 | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

fn id_text(id: &MessageId) -> String {
    String::from_utf8_lossy(&id.0).into_owned()
}

#[tokio::test]
async fn messages_at_the_limit_move_once_to_the_default_topic_and_are_not_delivered_again()
-> Result<()> {
    let b = TestBroker::start(|o| o.max_attempts = 3).await?;
    let http = b.http_address();
    let sent = bodies("poison", 5);
    create_channel(http, "orders", "billing").await?;
    publish(http, "orders", &sent).await?;

    let mut c = consumer(b.tcp_address(), "orders", "billing", 10).await?;
    let got = req_everything(&mut c, Duration::from_millis(500)).await?;
    let mut per_id: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for m in &got {
        per_id.entry(id_text(&m.id)).or_default().push(m.attempts);
    }
    ensure!(per_id.len() == 5, "deliveries: {per_id:?}");
    for (id, attempts) in &per_id {
        ensure!(
            attempts == &[1, 2, 3],
            "message {id} delivered with attempts {attempts:?}"
        );
    }

    let stats = wait_channel(http, "orders", "billing", "5 dead-lettered", |s| {
        s["dead_lettered_count"] == 5
    })
    .await?;
    ensure!(
        stats["max_attempts"] == 3 && stats["dead_letter_topic"] == "orders.billing.dlq",
        "{stats}"
    );
    ensure!(
        stats["depth"] == 0 && stats["in_flight_count"] == 0,
        "{stats}"
    );
    ensure!(
        metric(
            http,
            r#"nsq_channel_dead_lettered_total{channel="billing",topic="orders"}"#
        )
        .await?
            == 5.0
    );
    ensure!(
        metric(
            http,
            r#"nsq_channel_max_attempts{channel="billing",topic="orders"}"#
        )
        .await?
            == 3.0
    );
    let text = call(http, "GET", "/stats").await?.text();
    ensure!(
        text.contains("dead-letter: max-attempts: 3 -> orders.billing.dlq dead-lettered: 5"),
        "{text}"
    );
    let dlq = topic_stats(http, "orders.billing.dlq").await?;
    ensure!(dlq["depth"] == 5 && dlq["message_count"] == 5, "{dlq}");

    // Held in the dead-letter topic, in order, with where each came from.
    let peeked = peek(http, "orders.billing.dlq", None, 10).await?;
    let bodies_seen: Vec<String> = peeked
        .iter()
        .map(|m| {
            String::from_utf8(decode_base64(m["body"].as_str().unwrap_or(""))).unwrap_or_default()
        })
        .collect();
    ensure!(bodies_seen == sent, "peeked bodies {bodies_seen:?}");
    for m in &peeked {
        let origin = &m["dead_letter"];
        ensure!(
            origin["topic"] == "orders" && origin["channel"] == "billing",
            "{m}"
        );
        ensure!(
            origin["attempts"] == 3 && origin["reason"] == "requeued",
            "{m}"
        );
        ensure!(
            origin["failed_at"].as_i64().unwrap_or(0) > 1_700_000_000_000_000_000,
            "{m}"
        );
        ensure!(per_id.contains_key(m["id"].as_str().unwrap_or("")), "{m}");
    }
    // Peeking took nothing.
    ensure!(topic_stats(http, "orders.billing.dlq").await?["depth"] == 5);
    c.expect_nothing_for(Duration::from_millis(300)).await?;

    // A consumer of the dead-letter topic gets the original bodies and IDs, never the envelope.
    let mut d = consumer(b.tcp_address(), "orders.billing.dlq", "inspect", 10).await?;
    let dead = take(&mut d, 5).await?;
    let dead_ids: BTreeSet<String> = dead.iter().map(|m| id_text(&m.id)).collect();
    ensure!(
        dead_ids == per_id.keys().cloned().collect(),
        "dead-letter IDs {dead_ids:?}"
    );
    ensure!(dead.iter().map(body_text).collect::<Vec<_>>() == sent);
    ensure!(dead.iter().all(|m| m.attempts == 1));
    b.stop().await
}

#[tokio::test]
async fn timeouts_count_and_the_origin_says_so() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_attempts = 2;
        o.msg_timeout = Duration::from_millis(100);
    })
    .await?;
    let http = b.http_address();
    create_channel(http, "t", "slow").await?;
    publish(http, "t", &["late".to_string()]).await?;
    let mut c = consumer(b.tcp_address(), "t", "slow", 1).await?;
    // Never answered: delivered twice, timing out each time.
    ensure!(c.expect_message().await?.attempts == 1);
    ensure!(c.expect_message().await?.attempts == 2);
    c.expect_nothing_for(Duration::from_millis(400)).await?;
    let stats = channel_stats(http, "t", "slow").await?;
    ensure!(
        stats["timeout_count"] == 2 && stats["dead_lettered_count"] == 1,
        "{stats}"
    );
    let peeked = peek(http, "t.slow.dlq", None, 1).await?;
    ensure!(peeked.len() == 1, "{peeked:?}");
    let origin = &peeked[0]["dead_letter"];
    ensure!(
        origin["reason"] == "timed_out" && origin["attempts"] == 2,
        "{origin}"
    );
    b.stop().await
}

#[tokio::test]
async fn per_channel_settings_are_checked_and_apply_to_that_channel_only() -> Result<()> {
    let b = TestBroker::start(|_| {}).await?;
    let http = b.http_address();
    create_channel(http, "t", "picky").await?;
    create_channel(http, "t", "easy").await?;
    create_channel(http, "t", "tmp%23ephemeral").await?;

    let config = |q: &str| format!("/channel/config?{q}");
    for (q, status, message) in [
        ("channel=picky&max_attempts=2", 400, "MISSING_ARG_TOPIC"),
        ("topic=t&max_attempts=2", 400, "MISSING_ARG_CHANNEL"),
        (
            "topic=nope&channel=picky&max_attempts=2",
            404,
            "TOPIC_NOT_FOUND",
        ),
        (
            "topic=t&channel=nope&max_attempts=2",
            404,
            "CHANNEL_NOT_FOUND",
        ),
        (
            "topic=t&channel=picky&max_attempts=65536",
            400,
            "INVALID_ARG_MAX_ATTEMPTS",
        ),
        (
            "topic=t&channel=picky&max_attempts=-1",
            400,
            "INVALID_ARG_MAX_ATTEMPTS",
        ),
        (
            "topic=t&channel=picky&max_attempts=two",
            400,
            "INVALID_ARG_MAX_ATTEMPTS",
        ),
        (
            "topic=t&channel=picky&max_attempts=2&dead_letter_topic=a$b",
            400,
            "INVALID_ARG_DEAD_LETTER_TOPIC",
        ),
        (
            &format!("topic=t&channel=picky&dead_letter_topic={}", "x".repeat(65)),
            400,
            "INVALID_ARG_DEAD_LETTER_TOPIC",
        ),
        (
            "topic=t&channel=picky&dead_letter_topic=d%23ephemeral",
            400,
            "EPHEMERAL_DEAD_LETTER_TOPIC",
        ),
        (
            "topic=t&channel=picky&max_attempts=2&dead_letter_topic=t",
            400,
            "DEAD_LETTER_TOPIC_IS_SOURCE",
        ),
    ] {
        expect_error(http, "POST", &config(q), status, message).await?;
    }
    // Nothing was changed by the refused requests.
    let shown = json(http, "GET", &config("topic=t&channel=picky")).await?;
    ensure!(
        shown["max_attempts"] == 0 && shown["dead_letter_topic"] == "t.picky.dlq",
        "{shown}"
    );
    ensure!(shown["configured"]["max_attempts"].is_null(), "{shown}");
    ensure!(
        channel_stats(http, "t", "picky")
            .await?
            .get("max_attempts")
            .is_none(),
        "no limit, no field"
    );

    let set = json(
        http,
        "POST",
        &config("topic=t&channel=picky&max_attempts=2&dead_letter_topic=poison"),
    )
    .await?;
    ensure!(
        set["max_attempts"] == 2 && set["dead_letter_topic"] == "poison",
        "{set}"
    );
    ensure!(
        set["configured"]["max_attempts"] == 2
            && set["configured"]["dead_letter_topic"] == "poison",
        "{set}"
    );
    // An ephemeral channel takes settings too, for as long as it lives.
    json(
        http,
        "POST",
        &config("topic=t&channel=tmp%23ephemeral&max_attempts=1"),
    )
    .await?;

    let sent = bodies("m", 3);
    publish(http, "t", &sent).await?;
    let mut picky = consumer(b.tcp_address(), "t", "picky", 10).await?;
    let got = req_everything(&mut picky, Duration::from_millis(400)).await?;
    ensure!(
        got.len() == 6 && got.iter().all(|m| m.attempts <= 2),
        "picky got {}",
        got.len()
    );
    // The other channel has no limit: its copies go past two attempts.
    let mut easy = consumer(b.tcp_address(), "t", "easy", 10).await?;
    let mut done = 0;
    while done < 3 {
        let m = easy.expect_message().await?;
        if m.attempts < 3 {
            req(&mut easy, &m).await?;
        } else {
            easy.send(&Command::Fin(m.id)).await?;
            done += 1;
        }
    }
    ensure!(
        channel_stats(http, "t", "easy")
            .await?
            .get("dead_lettered_count")
            .is_none()
    );
    ensure!(topic_stats(http, "poison").await?["depth"] == 3);
    let stats = json(http, "GET", "/stats?format=json&topic=t.picky.dlq").await?;
    ensure!(
        stats["topics"].is_null(),
        "the default topic is not used: {stats}"
    );

    // Back to the defaults: no limit, the default topic.
    let reset = json(
        http,
        "POST",
        &config("topic=t&channel=picky&max_attempts=default&dead_letter_topic="),
    )
    .await?;
    ensure!(
        reset["max_attempts"] == 0 && reset["dead_letter_topic"] == "t.picky.dlq",
        "{reset}"
    );
    ensure!(reset["dead_lettered_count"] == 3, "{reset}");
    b.stop().await
}

#[tokio::test]
async fn a_lower_limit_catches_queued_messages_and_dead_letters_are_never_dead_lettered()
-> Result<()> {
    let b = TestBroker::start(|_| {}).await?;
    let http = b.http_address();
    create_channel(http, "t", "c").await?;
    publish(http, "t", &["slow".to_string()]).await?;
    let mut c = consumer(b.tcp_address(), "t", "c", 1).await?;
    let first = c.expect_message().await?;
    req(&mut c, &first).await?;
    let second = c.expect_message().await?;
    ensure!(second.attempts == 2);
    c.send(&Command::Req {
        id: second.id,
        timeout_ms: 300,
    })
    .await?;
    // While it waits for its delay, the limit drops to what it already had.
    json(
        http,
        "POST",
        "/channel/config?topic=t&channel=c&max_attempts=2",
    )
    .await?;
    c.expect_nothing_for(Duration::from_millis(600)).await?;
    let peeked = peek(http, "t.c.dlq", None, 1).await?;
    ensure!(
        peeked.len() == 1 && peeked[0]["dead_letter"]["reason"] == "over_limit",
        "{peeked:?}"
    );

    // The dead-letter topic's channels have the same default limit (here: a channel config),
    // but a dead letter is retried there forever.
    create_channel(http, "t.c.dlq", "inspect").await?;
    json(
        http,
        "POST",
        "/channel/config?topic=t.c.dlq&channel=inspect&max_attempts=1",
    )
    .await?;
    let mut d = consumer(b.tcp_address(), "t.c.dlq", "inspect", 1).await?;
    for attempt in 1..=4 {
        let m = d.expect_message().await?;
        ensure!(m.attempts == attempt && m.body == "slow", "{m:?}");
        req(&mut d, &m).await?;
    }
    ensure!(channel_stats(http, "t.c.dlq", "inspect").await?["dead_lettered_count"] == 0);
    b.stop().await
}

#[tokio::test]
async fn redrive_returns_messages_to_the_channel_they_came_from_only() -> Result<()> {
    let b = TestBroker::start(|o| o.max_attempts = 1).await?;
    let http = b.http_address();
    create_channel(http, "t", "failing").await?;
    create_channel(http, "t", "fine").await?;
    let sent = bodies("r", 10);
    publish(http, "t", &sent).await?;
    let mut fine = consumer(b.tcp_address(), "t", "fine", 10).await?;
    take(&mut fine, 10).await?;
    let mut failing = consumer(b.tcp_address(), "t", "failing", 10).await?;
    ensure!(
        req_everything(&mut failing, Duration::from_millis(300))
            .await?
            .len()
            == 10
    );
    wait_channel(http, "t", "failing", "10 dead letters", |s| {
        s["dead_lettered_count"] == 10
    })
    .await?;
    drop(failing);

    // Redrive needs a channel of the dead-letter topic; it takes everything the topic held.
    expect_error(
        http,
        "POST",
        "/channel/redrive?topic=t.failing.dlq&channel=replay",
        404,
        "CHANNEL_NOT_FOUND",
    )
    .await?;
    expect_error(
        http,
        "POST",
        "/channel/redrive?topic=nope&channel=replay",
        404,
        "TOPIC_NOT_FOUND",
    )
    .await?;
    create_channel(http, "t.failing.dlq", "replay").await?;
    for (q, status, message) in [
        ("topic=t.failing.dlq&channel=nope", 404, "CHANNEL_NOT_FOUND"),
        (
            "topic=t.failing.dlq&channel=replay&count=0",
            400,
            "INVALID_ARG_COUNT",
        ),
        (
            "topic=t.failing.dlq&channel=replay&rate=x",
            400,
            "INVALID_ARG_RATE",
        ),
    ] {
        expect_error(
            http,
            "POST",
            &format!("/channel/redrive?{q}"),
            status,
            message,
        )
        .await?;
    }
    // The consumer is fixed: no limit any more.
    json(
        http,
        "POST",
        "/channel/config?topic=t&channel=failing&max_attempts=0",
    )
    .await?;
    let moved = json(
        http,
        "POST",
        "/channel/redrive?topic=t.failing.dlq&channel=replay&count=4",
    )
    .await?;
    ensure!(moved["moved"] == 4, "{moved}");
    ensure!(channel_stats(http, "t.failing.dlq", "replay").await?["depth"] == 6);
    let started = Instant::now();
    let moved = json(
        http,
        "POST",
        "/channel/redrive?topic=t.failing.dlq&channel=replay&rate=20",
    )
    .await?;
    ensure!(moved["moved"] == 6, "{moved}");
    ensure!(
        started.elapsed() >= Duration::from_millis(250),
        "6 at 20/s took {:?}",
        started.elapsed()
    );

    let mut fixed = consumer(b.tcp_address(), "t", "failing", 10).await?;
    let back = take(&mut fixed, 10).await?;
    ensure!(
        back.iter().map(body_text).collect::<Vec<_>>() == sent,
        "order kept"
    );
    ensure!(
        back.iter().all(|m| m.attempts == 1),
        "attempts reset: {back:?}"
    );
    fine.expect_nothing_for(Duration::from_millis(300)).await?;
    ensure!(channel_stats(http, "t", "fine").await?["message_count"] == 10);
    ensure!(channel_stats(http, "t.failing.dlq", "replay").await?["depth"] == 0);
    b.stop().await
}

#[tokio::test]
async fn redrive_into_a_channel_that_is_gone_moves_nothing() -> Result<()> {
    let b = TestBroker::start(|o| o.max_attempts = 1).await?;
    let http = b.http_address();
    create_channel(http, "t", "gone").await?;
    publish(http, "t", &bodies("g", 3)).await?;
    let mut c = consumer(b.tcp_address(), "t", "gone", 10).await?;
    req_everything(&mut c, Duration::from_millis(300)).await?;
    drop(c);
    create_channel(http, "t.gone.dlq", "replay").await?;
    wait_channel(http, "t.gone.dlq", "replay", "3 dead letters", |s| {
        s["depth"] == 3
    })
    .await?;
    http_post_ok(http, "/channel/delete?topic=t&channel=gone", b"").await?;
    expect_error(
        http,
        "POST",
        "/channel/redrive?topic=t.gone.dlq&channel=replay",
        404,
        "ORIGIN_CHANNEL_NOT_FOUND",
    )
    .await?;
    ensure!(channel_stats(http, "t.gone.dlq", "replay").await?["depth"] == 3);
    // Messages published straight to a dead-letter topic have no origin to go back to.
    create_channel(http, "t.gone.dlq", "other").await?;
    publish(http, "t.gone.dlq", &["plain".to_string()]).await?;
    let peeked = peek(http, "t.gone.dlq", Some("other"), 5).await?;
    ensure!(
        peeked.len() == 1 && peeked[0]["dead_letter"].is_null(),
        "{peeked:?}"
    );
    expect_error(
        http,
        "POST",
        "/channel/redrive?topic=t.gone.dlq&channel=other",
        400,
        "NOT_A_DEAD_LETTER",
    )
    .await?;
    ensure!(channel_stats(http, "t.gone.dlq", "other").await?["depth"] == 1);
    b.stop().await
}

#[tokio::test]
async fn a_shared_dead_letter_topic_keeps_both_copies_of_one_message_apart() -> Result<()> {
    let b = TestBroker::start(|o| o.max_attempts = 1).await?;
    let http = b.http_address();
    for c in ["a", "b"] {
        create_channel(http, "t", c).await?;
        json(
            http,
            "POST",
            &format!("/channel/config?topic=t&channel={c}&dead_letter_topic=shared"),
        )
        .await?;
    }
    create_channel(http, "shared", "all").await?;
    publish(http, "t", &["both".to_string()]).await?;
    for c in ["a", "b"] {
        let mut conn = consumer(b.tcp_address(), "t", c, 1).await?;
        ensure!(
            req_everything(&mut conn, Duration::from_millis(200))
                .await?
                .len()
                == 1
        );
    }
    let peeked = peek(http, "shared", Some("all"), 5).await?;
    let origins: BTreeSet<String> = peeked
        .iter()
        .map(|m| m["dead_letter"]["channel"].to_string())
        .collect();
    ensure!(
        peeked.len() == 2 && peeked[0]["id"] == peeked[1]["id"],
        "{peeked:?}"
    );
    ensure!(origins.len() == 2, "{origins:?}");

    // One ID in flight at a time: the second copy comes once the first is finished.
    let mut all = consumer(b.tcp_address(), "shared", "all", 2).await?;
    let first = all.expect_message().await?;
    all.expect_nothing_for(Duration::from_millis(300)).await?;
    all.send(&Command::Fin(first.id)).await?;
    let second = all.expect_message().await?;
    ensure!(second.id == first.id && second.body == "both");
    // Back to the queue, and no more deliveries; over the limit of 1, but never dead-lettered.
    all.send(&Command::Rdy(0)).await?;
    req(&mut all, &second).await?;
    wait_channel(http, "shared", "all", "the copy queued", |s| {
        s["depth"] == 1
    })
    .await?;
    drop(all);

    // Redrive sends the copy left (the second) back to its own channel only.
    let home = peeked[1]["dead_letter"]["channel"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let elsewhere = if home == "a" { "b" } else { "a" };
    let moved = json(http, "POST", "/channel/redrive?topic=shared&channel=all").await?;
    ensure!(moved["moved"] == 1, "{moved}");
    wait_channel(http, "t", &home, "the copy back home", |s| s["depth"] == 1).await?;
    ensure!(channel_stats(http, "t", elsewhere).await?["depth"] == 0);
    b.stop().await
}

#[tokio::test]
async fn a_restart_keeps_limits_counts_and_dead_letters() -> Result<()> {
    let mut b = BrokerProcess::start(&["--max-attempts=4"])?;
    let http = b.http_address;
    create_channel(http, "t", "own").await?;
    create_channel(http, "t", "default").await?;
    json(
        http,
        "POST",
        "/channel/config?topic=t&channel=own&max_attempts=1&dead_letter_topic=t-dead",
    )
    .await?;
    publish(http, "t", &bodies("k", 4)).await?;
    let mut c = consumer(b.tcp_address, "t", "own", 10).await?;
    ensure!(
        req_everything(&mut c, Duration::from_millis(300))
            .await?
            .len()
            == 4
    );
    wait_channel(http, "t", "own", "4 dead letters", |s| {
        s["dead_lettered_count"] == 4
    })
    .await?;
    drop(c);
    b.signal("TERM")?;
    ensure!(b.wait_exit(Duration::from_secs(10))?.success());

    let b = b.restart(&["--max-attempts=4"])?;
    let own = json(http, "GET", "/channel/config?topic=t&channel=own").await?;
    ensure!(
        own["max_attempts"] == 1
            && own["dead_letter_topic"] == "t-dead"
            && own["dead_lettered_count"] == 4,
        "{own}"
    );
    let other = json(http, "GET", "/channel/config?topic=t&channel=default").await?;
    ensure!(
        other["max_attempts"] == 4 && other["configured"]["max_attempts"].is_null(),
        "{other}"
    );
    ensure!(
        metric(
            http,
            r#"nsq_channel_dead_lettered_total{channel="own",topic="t"}"#
        )
        .await?
            == 4.0
    );
    ensure!(topic_stats(http, "t-dead").await?["depth"] == 4);
    // The flag changes for channels without their own limit.
    let mut b = b;
    b.signal("TERM")?;
    ensure!(b.wait_exit(Duration::from_secs(10))?.success());
    let b = b.restart(&[])?;
    let other = json(http, "GET", "/channel/config?topic=t&channel=default").await?;
    ensure!(other["max_attempts"] == 0, "{other}");
    ensure!(json(http, "GET", "/channel/config?topic=t&channel=own").await?["max_attempts"] == 1);
    drop(b);
    Ok(())
}

/// Under --sync-publish, a crash at any moment while messages are being dead-lettered loses
/// none: each ends up in the dead-letter topic (duplicates allowed, at least once).
#[tokio::test]
async fn sigkill_while_dead_lettering_under_sync_publish_loses_nothing() -> Result<()> {
    const PER_ROUND: usize = 500;
    let flags = ["--sync-publish", "--max-attempts=2", "--mem-queue-size=100"];
    let mut b = BrokerProcess::start(&flags)?;
    let http = b.http_address;
    create_channel(http, "t", "c").await?;
    let mut sent = Vec::new();
    // Each round publishes more, lets a consumer REQ everything, and crashes the broker a
    // different time into it.
    for (round, kill_after_ms) in [5u64, 20, 45, 80, 10, 150].into_iter().enumerate() {
        let new = bodies(&format!("crash{round}"), PER_ROUND);
        for chunk in new.chunks(100) {
            publish(http, "t", chunk).await?;
        }
        sent.extend(new);
        let mut c = consumer(b.tcp_address, "t", "c", 50).await?;
        let reqs = tokio::spawn(async move {
            let _ = req_everything(&mut c, Duration::from_secs(5)).await;
        });
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        b.signal("KILL")?;
        b.wait_exit(Duration::from_secs(10))?;
        reqs.abort();
        b = b
            .restart(&flags)
            .with_context(|| format!("restart after crash {round}"))?;
        let left = channel_stats(http, "t", "c").await?;
        println!(
            "crash {round} at {kill_after_ms} ms: {} of {} still in the channel",
            left["depth"],
            sent.len()
        );
    }
    // Finish the job: everything left reaches the limit.
    let mut c = consumer(b.tcp_address, "t", "c", 50).await?;
    req_everything(&mut c, Duration::from_secs(1)).await?;
    wait_channel(http, "t", "c", "the channel empty", |s| {
        s["depth"] == 0 && s["in_flight_count"] == 0 && s["deferred_count"] == 0
    })
    .await?;
    create_channel(http, "t.c.dlq", "check").await?;
    let depth = channel_stats(http, "t.c.dlq", "check").await?["depth"]
        .as_u64()
        .unwrap_or(0) as usize;
    ensure!(
        depth >= sent.len(),
        "only {depth} dead letters for {} messages",
        sent.len()
    );
    let mut d = consumer(b.tcp_address, "t.c.dlq", "check", 100).await?;
    let dead = take(&mut d, depth).await?;
    let seen: BTreeSet<String> = dead.iter().map(body_text).collect();
    let lost: Vec<&String> = sent.iter().filter(|s| !seen.contains(*s)).collect();
    ensure!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    println!(
        "{} messages, {} dead letters ({} duplicates)",
        sent.len(),
        dead.len(),
        dead.len() - seen.len()
    );
    Ok(())
}

/// A draining broker hands its dead letters off with their origin: on the peer they are still
/// dead letters, delivered without their envelope, and can be redriven there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_handed_off_by_a_drain_keep_their_origin() -> Result<()> {
    let lookupd = tests::lookupd::LookupdProcess::start(&[])?;
    let registered = format!("--lookupd-grpc-address={}", lookupd.grpc_address);
    let mut a = BrokerProcess::start(&[&registered, "--max-attempts=1"])?;
    let b = BrokerProcess::start(&[&registered])?;
    create_channel(a.http_address, "t", "c").await?;
    let sent = bodies("handed", 4);
    publish(a.http_address, "t", &sent).await?;
    let mut c = consumer(a.tcp_address, "t", "c", 10).await?;
    ensure!(
        req_everything(&mut c, Duration::from_millis(300))
            .await?
            .len()
            == 4
    );
    drop(c);
    ensure!(topic_stats(a.http_address, "t.c.dlq").await?["depth"] == 4);
    // The peer must be known to the lookupd before the drain looks for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = json(lookupd.http_address, "GET", "/nodes").await?;
        if nodes["producers"].as_array().map_or(0, Vec::len) >= 2 {
            break;
        }
        ensure!(Instant::now() < deadline, "brokers not registered: {nodes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    json(a.http_address, "POST", "/drain").await?;
    ensure!(a.wait_exit(Duration::from_secs(20))?.success());

    let peeked = peek(b.http_address, "t.c.dlq", None, 10).await?;
    ensure!(peeked.len() == 4, "{peeked:?}");
    for m in &peeked {
        let origin = &m["dead_letter"];
        ensure!(
            origin["topic"] == "t" && origin["channel"] == "c" && origin["attempts"] == 1,
            "{m}"
        );
    }
    create_channel(b.http_address, "t", "c").await?;
    create_channel(b.http_address, "t.c.dlq", "replay").await?;
    let moved = json(
        b.http_address,
        "POST",
        "/channel/redrive?topic=t.c.dlq&channel=replay",
    )
    .await?;
    ensure!(moved["moved"] == 4, "{moved}");
    let mut fixed = consumer(b.tcp_address, "t", "c", 10).await?;
    let back = take(&mut fixed, 4).await?;
    ensure!(
        back.iter().map(body_text).collect::<Vec<_>>() == sent,
        "bodies without envelope"
    );
    Ok(())
}
