//! nsqd's HTTP API as knsq serves it: every endpoint's success and error responses (status,
//! body, headers), the effects of the admin endpoints on real consumers, and `/stats` field by
//! field after a known sequence of publishes, deliveries, FINs, REQs, timeouts and defers.
//!
//! Each test starts its own broker on loopback port 0.

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use proto::wire::{Command, Frame, Message, Name};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;
use tests::{HttpResponse, NsqConn, TestBroker, WAIT};

const V1: &str = "nsq; version=1.0";
const JSON: &str = "application/json; charset=utf-8";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn broker() -> Result<TestBroker> {
    TestBroker::start(|_| {}).await
}

fn name(text: &str) -> Name {
    Name::new(text).unwrap_or_else(|| panic!("{text:?} is not a valid name"))
}

/// An nsqd V1 error: the status, the exact body `{"message":"TEXT"}` and both headers.
fn check_error(resp: &HttpResponse, status: u16, message: &str, what: &str) -> Result<()> {
    ensure!(
        resp.status == status,
        "{what}: status {} with body {:?}, want {status} {message}",
        resp.status,
        resp.text()
    );
    ensure!(
        resp.text() == format!(r#"{{"message":"{message}"}}"#),
        "{what}: body {:?}, want message {message}",
        resp.text()
    );
    ensure!(
        resp.header("content-type") == Some(JSON),
        "{what}: content-type {:?}",
        resp.header("content-type")
    );
    ensure!(
        resp.header("x-nsq-content-type") == Some(V1),
        "{what}: x-nsq-content-type {:?}",
        resp.header("x-nsq-content-type")
    );
    Ok(())
}

async fn expect_error(
    b: &TestBroker,
    method: &str,
    path: &str,
    body: &[u8],
    status: u16,
    message: &str,
) -> Result<()> {
    let resp = b.http(method, path, body).await?;
    check_error(&resp, status, message, &format!("{method} {path}"))
}

/// A V1 success with a plain body (`OK` for publishes, empty for admin actions).
fn check_ok(resp: &HttpResponse, body: &str, what: &str) -> Result<()> {
    ensure!(
        resp.status == 200,
        "{what}: status {} with body {:?}",
        resp.status,
        resp.text()
    );
    ensure!(
        resp.text() == body,
        "{what}: body {:?}, want {body:?}",
        resp.text()
    );
    ensure!(
        resp.header("x-nsq-content-type") == Some(V1),
        "{what}: x-nsq-content-type {:?}",
        resp.header("x-nsq-content-type")
    );
    Ok(())
}

async fn expect_ok(
    b: &TestBroker,
    method: &str,
    path: &str,
    body: &[u8],
    want: &str,
) -> Result<()> {
    let resp = b.http(method, path, body).await?;
    check_ok(&resp, want, &format!("{method} {path}"))
}

/// A V1 JSON success, parsed.
fn check_json(resp: &HttpResponse, what: &str) -> Result<Value> {
    ensure!(
        resp.status == 200,
        "{what}: status {} with body {:?}",
        resp.status,
        resp.text()
    );
    ensure!(
        resp.header("content-type") == Some(JSON),
        "{what}: content-type {:?}",
        resp.header("content-type")
    );
    ensure!(
        resp.header("x-nsq-content-type") == Some(V1),
        "{what}: x-nsq-content-type {:?}",
        resp.header("x-nsq-content-type")
    );
    resp.json()
}

async fn get_json(b: &TestBroker, path: &str) -> Result<Value> {
    let resp = b.http("GET", path, b"").await?;
    check_json(&resp, &format!("GET {path}"))
}

/// `/stats?format=json` plus `extra` query parameters (each starting with `&`).
async fn stats(b: &TestBroker, extra: &str) -> Result<Value> {
    get_json(b, &format!("/stats?format=json{extra}")).await
}

/// Polls `/stats?format=json` until `ready` holds, for at most [`WAIT`].
async fn stats_when(b: &TestBroker, what: &str, ready: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = stats(b, "").await?;
        if ready(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("stats never showed {what}: {s:#}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn topic<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["topics"]
        .as_array()?
        .iter()
        .find(|t| t["topic_name"] == name)
}

fn channel<'a>(s: &'a Value, topic_name: &str, name: &str) -> Option<&'a Value> {
    topic(s, topic_name)?["channels"]
        .as_array()?
        .iter()
        .find(|c| c["channel_name"] == name)
}

fn field(s: &Value, topic_name: &str, channel_name: &str, key: &str) -> Value {
    channel(s, topic_name, channel_name).map_or(Value::Null, |c| c[key].clone())
}

fn names<'a>(list: &'a Value, key: &str) -> Vec<&'a str> {
    list.as_array()
        .map(|l| l.iter().filter_map(|v| v[key].as_str()).collect())
        .unwrap_or_default()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn key_set(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|k| k.to_string()).collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A connection that has identified (without feature negotiation, so the answer is `OK`).
async fn identified(b: &TestBroker, identify: Value) -> Result<NsqConn> {
    let mut conn = b.connect().await?;
    match conn.identify(&identify).await? {
        Frame::Response(r) if &r[..] == b"OK" => Ok(conn),
        other => bail!("IDENTIFY answered {other:?}"),
    }
}

/// An identified connection subscribed to `topic`/`channel`, with RDY 0.
async fn subscriber(
    b: &TestBroker,
    topic_name: &str,
    channel_name: &str,
    identify: Value,
) -> Result<NsqConn> {
    let mut conn = identified(b, identify).await?;
    conn.subscribe(topic_name, channel_name).await?;
    Ok(conn)
}

async fn consumer(
    b: &TestBroker,
    topic_name: &str,
    channel_name: &str,
    rdy: u64,
) -> Result<NsqConn> {
    let mut conn = subscriber(
        b,
        topic_name,
        channel_name,
        json!({"client_id": "consumer"}),
    )
    .await?;
    conn.send(&Command::Rdy(rdy)).await?;
    Ok(conn)
}

async fn tcp_publish(conn: &mut NsqConn, topic_name: &str, body: &str) -> Result<()> {
    conn.send(&Command::Pub {
        topic: name(topic_name),
        body: Bytes::copy_from_slice(body.as_bytes()),
    })
    .await?;
    conn.expect_response(b"OK").await
}

async fn receive(conn: &mut NsqConn, n: usize) -> Result<Vec<Message>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(conn.expect_message().await?);
    }
    Ok(out)
}

fn bodies(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

/// A binary `/mpub` body: `[4B count]([4B size][body])*`.
fn mpub_body(msgs: &[&[u8]]) -> Vec<u8> {
    let mut out = (msgs.len() as u32).to_be_bytes().to_vec();
    for m in msgs {
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// /ping, /info, routing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ping_answers_ok() -> Result<()> {
    let b = broker().await?;
    let resp = b.http("GET", "/ping", b"").await?;
    ensure!(resp.status == 200, "status {}", resp.status);
    ensure!(resp.text() == "OK", "body {:?}", resp.text());
    b.stop().await
}

#[tokio::test]
async fn info_reports_every_field_with_the_real_ports() -> Result<()> {
    let before = unix_now();
    let b = broker().await?;
    let info = get_json(&b, "/info").await?;
    ensure!(
        keys(&info)
            == key_set(&[
                "version",
                "broadcast_address",
                "hostname",
                "http_port",
                "tcp_port",
                "start_time",
                "max_heartbeat_interval",
                "max_output_buffer_size",
                "max_output_buffer_timeout",
                "max_deflate_level",
                "topology_zone",
                "topology_region",
            ]),
        "keys of {info}"
    );
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let start = info["start_time"].as_i64().context("start_time")?;
    ensure!((before..=unix_now()).contains(&start), "start_time {start}");
    let mut rest = info.clone();
    rest["start_time"] = json!(0);
    let want = json!({
        "version": "1.3.0",
        "broadcast_address": "127.0.0.1",
        "hostname": hostname.trim(),
        "http_port": b.http_address().port(),
        "tcp_port": b.tcp_address().port(),
        "start_time": 0,
        "max_heartbeat_interval": 60_000_000_000u64,
        "max_output_buffer_size": 65536,
        "max_output_buffer_timeout": 30_000_000_000u64,
        "max_deflate_level": 6,
        "topology_zone": "",
        "topology_region": "",
    });
    ensure!(rest == want, "/info {info:#}\nwant {want:#}");
    ensure!(
        stats(&b, "").await?["start_time"] == start,
        "/stats start_time differs from /info"
    );
    b.stop().await
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_get_nsqd_errors() -> Result<()> {
    let b = broker().await?;
    for path in [
        "/nope",
        "/topic",
        "/channel/nope",
        "/put",
        "/create_topic",
        "/",
    ] {
        expect_error(&b, "GET", path, b"", 404, "NOT_FOUND").await?;
    }
    expect_error(&b, "POST", "/topic/nope?topic=t", b"", 404, "NOT_FOUND").await?;
    for (method, path) in [
        ("GET", "/pub?topic=t"),
        ("GET", "/mpub?topic=t"),
        ("POST", "/ping"),
        ("POST", "/info"),
        ("POST", "/stats"),
        ("GET", "/topic/create?topic=t"),
        ("PUT", "/topic/delete?topic=t"),
        ("GET", "/channel/pause?topic=t&channel=c"),
        ("POST", "/config/log_level"),
        ("DELETE", "/config/log_level"),
    ] {
        expect_error(&b, method, path, b"x", 405, "METHOD_NOT_ALLOWED").await?;
    }
    // A refused GET /pub published nothing.
    ensure!(
        stats(&b, "").await?["topics"] == json!([]),
        "a topic appeared"
    );
    b.stop().await
}

// ---------------------------------------------------------------------------------------------
// /pub
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn pub_delivers_to_a_subscriber_and_creates_the_topic() -> Result<()> {
    let b = broker().await?;
    expect_ok(&b, "POST", "/pub?topic=fresh", b"first", "OK").await?;
    let s = stats(&b, "").await?;
    let t = topic(&s, "fresh").context("the topic was not auto-created")?;
    ensure!(
        t["message_count"] == 1 && t["message_bytes"] == 5 && t["depth"] == 1,
        "{t}"
    );

    let mut c = consumer(&b, "events", "ch", 10).await?;
    expect_ok(&b, "POST", "/pub?topic=events", b"hello world", "OK").await?;
    let msg = c.expect_message().await?;
    ensure!(&msg.body[..] == b"hello world", "body {:?}", msg.body);
    ensure!(msg.attempts == 1, "attempts {}", msg.attempts);
    // Bodies are bytes, not text: a NUL and a newline arrive as sent.
    expect_ok(&b, "POST", "/pub?topic=events", b"a\0b\nc", "OK").await?;
    ensure!(&c.expect_message().await?.body[..] == b"a\0b\nc");
    b.stop().await
}

#[tokio::test]
async fn pub_argument_errors() -> Result<()> {
    let b = broker().await?;
    expect_error(&b, "POST", "/pub", b"x", 400, "MISSING_ARG_TOPIC").await?;
    expect_error(&b, "POST", "/pub?channel=c", b"x", 400, "MISSING_ARG_TOPIC").await?;
    let long = "t".repeat(65);
    for bad in [
        "",
        "bad!topic",
        "a+b",
        "a%2Fb",
        long.as_str(),
        "x%23ephemeralnot",
    ] {
        let path = format!("/pub?topic={bad}");
        expect_error(&b, "POST", &path, b"x", 400, "INVALID_TOPIC").await?;
    }
    for bad in ["topic=%zz", "topic=ok&x=%4", "topic=ok;x=1"] {
        let path = format!("/pub?{bad}");
        expect_error(&b, "POST", &path, b"x", 400, "INVALID_REQUEST").await?;
    }
    // The body is checked before the query, as in nsqd.
    expect_error(&b, "POST", "/pub?topic=t", b"", 400, "MSG_EMPTY").await?;
    expect_error(&b, "POST", "/pub", b"", 400, "MSG_EMPTY").await?;
    expect_error(&b, "POST", "/pub?topic=%zz", b"", 400, "MSG_EMPTY").await?;
    // 64 characters and the ephemeral suffix are valid.
    let max = "t".repeat(64);
    expect_ok(&b, "POST", &format!("/pub?topic={max}"), b"x", "OK").await?;
    expect_ok(&b, "POST", "/pub?topic=a.b_c-D9", b"x", "OK").await?;
    expect_ok(&b, "POST", "/pub?topic=e%23ephemeral", b"x", "OK").await?;
    ensure!(
        stats(&b, "").await?["topics"].as_array().map(Vec::len) == Some(3),
        "only the three valid publishes create topics"
    );
    b.stop().await
}

#[tokio::test]
async fn pub_message_size_limit() -> Result<()> {
    let b = TestBroker::start(|o| o.max_msg_size = 16).await?;
    expect_ok(&b, "POST", "/pub?topic=t", &[b'x'; 16], "OK").await?;
    expect_error(&b, "POST", "/pub?topic=t", &[b'x'; 17], 413, "MSG_TOO_BIG").await?;
    expect_error(
        &b,
        "POST",
        "/pub?topic=t",
        &[b'x'; 4096],
        413,
        "MSG_TOO_BIG",
    )
    .await?;
    // Too big wins over a missing topic: the body is read first.
    expect_error(&b, "POST", "/pub", &[b'x'; 17], 413, "MSG_TOO_BIG").await?;
    let s = stats(&b, "").await?;
    ensure!(
        topic(&s, "t").context("topic t")?["message_count"] == 1,
        "{s}"
    );
    b.stop().await
}

#[tokio::test]
async fn pub_defer() -> Result<()> {
    let b = TestBroker::start(|o| o.max_req_timeout = Duration::from_secs(1)).await?;
    for bad in ["-1", "abc", "1.5", "", "1001", "99999999999999999999"] {
        let path = format!("/pub?topic=t&defer={bad}");
        expect_error(&b, "POST", &path, b"x", 400, "INVALID_DEFER").await?;
    }
    let mut c = consumer(&b, "t", "c", 10).await?;
    // defer=0 and defer=max-req-timeout are both in range.
    expect_ok(&b, "POST", "/pub?topic=t&defer=0", b"now", "OK").await?;
    ensure!(&c.expect_message().await?.body[..] == b"now");
    expect_ok(&b, "POST", "/pub?topic=t&defer=1000", b"later", "OK").await?;
    let s = stats(&b, "").await?;
    ensure!(
        field(&s, "t", "c", "deferred_count") == 1 && field(&s, "t", "c", "depth") == 0,
        "{s}"
    );
    c.expect_nothing_for(Duration::from_millis(500)).await?;
    let msg = c.expect_message().await?;
    ensure!(&msg.body[..] == b"later");
    let s = stats(&b, "").await?;
    ensure!(
        field(&s, "t", "c", "deferred_count") == 0 && field(&s, "t", "c", "message_count") == 2,
        "{s}"
    );
    b.stop().await
}

/// Beyond `--mem-queue-size`, messages wait in the disk queue: nothing is refused, and
/// `backend_depth` counts what is on disk.
#[tokio::test]
async fn pub_beyond_the_memory_queue_goes_to_disk() -> Result<()> {
    let b = TestBroker::start(|o| o.mem_queue_size = 2).await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"1", "OK").await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"2", "OK").await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"3", "OK").await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"4\n5", "OK").await?;
    let s = stats(&b, "").await?;
    let t = topic(&s, "t").context("topic t")?;
    ensure!(t["depth"] == 5 && t["backend_depth"] == 3, "{t}");
    ensure!(t["message_count"] == 5, "{t}");
    let mut c = consumer(&b, "t", "c", 100).await?;
    ensure!(bodies(&receive(&mut c, 5).await?) == ["1", "2", "3", "4", "5"]);
    b.stop().await
}

// ---------------------------------------------------------------------------------------------
// /mpub
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn mpub_text_mode_splits_lines_and_drops_empty_ones() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 100).await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"one\n\ntwo\nthree\n\n", "OK").await?;
    ensure!(bodies(&receive(&mut c, 3).await?) == ["one", "two", "three"]);
    // binary=false and binary=0 are text mode too; a last line without newline counts.
    expect_ok(
        &b,
        "POST",
        "/mpub?topic=t&binary=false",
        b"four\nfive",
        "OK",
    )
    .await?;
    expect_ok(&b, "POST", "/mpub?topic=t&binary=0", b"\nsix", "OK").await?;
    ensure!(bodies(&receive(&mut c, 3).await?) == ["four", "five", "six"]);
    c.expect_nothing_for(Duration::from_millis(100)).await?;
    // Only empty lines: nothing to publish, still OK.
    expect_ok(&b, "POST", "/mpub?topic=t", b"\n\n", "OK").await?;
    let s = stats(&b, "").await?;
    let t = topic(&s, "t").context("topic t")?;
    ensure!(t["message_count"] == 6, "{t}");
    ensure!(t["message_bytes"] == 3 + 3 + 5 + 4 + 4 + 3, "{t}");
    b.stop().await
}

#[tokio::test]
async fn mpub_text_mode_size_limits() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_msg_size = 8;
        o.max_body_size = 32;
    })
    .await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"12345678\nabc", "OK").await?;
    expect_error(
        &b,
        "POST",
        "/mpub?topic=t",
        b"ok\n123456789\nok",
        413,
        "MSG_TOO_BIG",
    )
    .await?;
    // Exactly max-body-size is accepted; one byte more is not.
    let body = b"1234567\n1234567\n1234567\n1234567\n";
    ensure!(body.len() == 32);
    expect_ok(&b, "POST", "/mpub?topic=t", body, "OK").await?;
    expect_error(
        &b,
        "POST",
        "/mpub?topic=t",
        b"1234567\n1234567\n1234567\n12345678\n",
        413,
        "BODY_TOO_BIG",
    )
    .await?;
    // The declared length is checked before anything else, the topic included.
    expect_error(&b, "POST", "/mpub", &[b'\n'; 40], 413, "BODY_TOO_BIG").await?;
    expect_error(
        &b,
        "POST",
        "/mpub?topic=t&binary=true",
        &[0; 40],
        413,
        "BODY_TOO_BIG",
    )
    .await?;
    let s = stats(&b, "").await?;
    ensure!(
        topic(&s, "t").context("topic t")?["message_count"] == 6,
        "{s}"
    );
    b.stop().await
}

#[tokio::test]
async fn mpub_argument_errors() -> Result<()> {
    let b = broker().await?;
    expect_error(&b, "POST", "/mpub", b"a\nb", 400, "MISSING_ARG_TOPIC").await?;
    expect_error(
        &b,
        "POST",
        "/mpub?topic=bad!",
        b"a\nb",
        400,
        "INVALID_TOPIC",
    )
    .await?;
    expect_error(&b, "POST", "/mpub?topic=", b"a\nb", 400, "INVALID_TOPIC").await?;
    expect_error(
        &b,
        "POST",
        "/mpub?topic=%zz",
        b"a\nb",
        400,
        "INVALID_REQUEST",
    )
    .await?;
    b.stop().await
}

#[tokio::test]
async fn mpub_binary_mode() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 100).await?;
    let body = mpub_body(&[b"a\nb", b"\0c"]);
    // true, 1 and any value nsqd does not know as a boolean all mean binary.
    for flag in ["true", "1", "yes", "TRUE", "", "2"] {
        expect_ok(
            &b,
            "POST",
            &format!("/mpub?topic=t&binary={flag}"),
            &body,
            "OK",
        )
        .await?;
        let got: Vec<Bytes> = receive(&mut c, 2)
            .await?
            .into_iter()
            .map(|m| m.body)
            .collect();
        ensure!(got == [&b"a\nb"[..], &b"\0c"[..]], "binary={flag}: {got:?}");
    }
    // Bytes after the last counted message are not read.
    let mut trailing = mpub_body(&[b"x"]);
    trailing.extend_from_slice(b"garbage");
    expect_ok(&b, "POST", "/mpub?topic=t&binary=true", &trailing, "OK").await?;
    ensure!(&c.expect_message().await?.body[..] == b"x");
    c.expect_nothing_for(Duration::from_millis(100)).await?;
    b.stop().await
}

#[tokio::test]
async fn mpub_binary_mode_errors() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_msg_size = 8;
        o.max_body_size = 64;
    })
    .await?;
    let path = "/mpub?topic=t&binary=true";
    // Message count: unreadable, zero, negative, more than the body could hold.
    expect_error(&b, "POST", path, b"", 413, "BAD_BODY").await?;
    expect_error(&b, "POST", path, b"\0\0", 413, "BAD_BODY").await?;
    expect_error(&b, "POST", path, &mpub_body(&[]), 413, "BAD_BODY").await?;
    expect_error(&b, "POST", path, &[0xff; 4], 413, "BAD_BODY").await?;
    let mut too_many = 13u32.to_be_bytes().to_vec(); // (64 - 4) / 5 = 12 at most
    too_many.extend_from_slice(&mpub_body(&[&b"m"[..]; 12])[4..]);
    expect_error(&b, "POST", path, &too_many, 413, "BAD_BODY").await?;
    // Messages: too big, empty, size missing, body cut short.
    expect_error(
        &b,
        "POST",
        path,
        &mpub_body(&[b"123456789"]),
        413,
        "BAD_MESSAGE",
    )
    .await?;
    expect_error(
        &b,
        "POST",
        path,
        &mpub_body(&[b"ok", b""]),
        413,
        "BAD_MESSAGE",
    )
    .await?;
    let mut short = 2u32.to_be_bytes().to_vec();
    short.extend_from_slice(&mpub_body(&[b"ok"])[4..]);
    expect_error(&b, "POST", path, &short, 413, "BAD_MESSAGE").await?;
    let mut cut = mpub_body(&[b"12345678"]);
    cut.truncate(cut.len() - 3);
    expect_error(&b, "POST", path, &cut, 413, "BAD_MESSAGE").await?;
    // The largest message and the largest count are fine.
    expect_ok(&b, "POST", path, &mpub_body(&[b"12345678"]), "OK").await?;
    expect_ok(&b, "POST", path, &mpub_body(&[&b"m"[..]; 12]), "OK").await?;
    let s = stats(&b, "").await?;
    ensure!(
        topic(&s, "t").context("topic t")?["message_count"] == 13,
        "{s}"
    );
    b.stop().await
}

// ---------------------------------------------------------------------------------------------
// /topic/*
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn topic_endpoint_errors() -> Result<()> {
    let b = broker().await?;
    for action in ["create", "delete", "empty", "pause", "unpause"] {
        let base = format!("/topic/{action}");
        expect_error(&b, "POST", &base, b"", 400, "MISSING_ARG_TOPIC").await?;
        expect_error(
            &b,
            "POST",
            &format!("{base}?channel=x"),
            b"",
            400,
            "MISSING_ARG_TOPIC",
        )
        .await?;
        // The topic is a query parameter; a body does not count.
        expect_error(&b, "POST", &base, b"topic=t", 400, "MISSING_ARG_TOPIC").await?;
        expect_error(
            &b,
            "POST",
            &format!("{base}?topic=%zz"),
            b"",
            400,
            "INVALID_REQUEST",
        )
        .await?;
        // create and empty validate the name; delete and (un)pause only look it up.
        let invalid = match action {
            "create" | "empty" => (400, "INVALID_TOPIC"),
            _ => (404, "TOPIC_NOT_FOUND"),
        };
        expect_error(
            &b,
            "POST",
            &format!("{base}?topic=bad!"),
            b"",
            invalid.0,
            invalid.1,
        )
        .await?;
        if action != "create" {
            expect_error(
                &b,
                "POST",
                &format!("{base}?topic=nope"),
                b"",
                404,
                "TOPIC_NOT_FOUND",
            )
            .await?;
        }
    }
    ensure!(
        stats(&b, "").await?["topics"] == json!([]),
        "no topic was created"
    );
    b.stop().await
}

#[tokio::test]
async fn topic_create_is_idempotent() -> Result<()> {
    let b = broker().await?;
    expect_ok(&b, "POST", "/topic/create?topic=made", b"", "").await?;
    expect_ok(&b, "POST", "/pub?topic=made", b"x", "OK").await?;
    expect_ok(&b, "POST", "/topic/create?topic=made", b"", "").await?;
    expect_ok(&b, "POST", "/topic/create?topic=other%23ephemeral", b"", "").await?;
    let s = stats(&b, "").await?;
    ensure!(
        names(&s["topics"], "topic_name") == ["made", "other#ephemeral"],
        "{s}"
    );
    let t = topic(&s, "made").context("made")?;
    ensure!(
        t["depth"] == 1 && t["message_count"] == 1 && t["channels"] == json!([]),
        "{t}"
    );
    b.stop().await
}

#[tokio::test]
async fn topic_delete_removes_it_and_disconnects_its_consumers() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "doomed", "ch", 1).await?;
    expect_ok(&b, "POST", "/mpub?topic=doomed", b"1\n2\n3", "OK").await?;
    c.expect_message().await?;
    expect_ok(&b, "POST", "/topic/create?topic=kept", b"", "").await?;
    expect_ok(&b, "POST", "/topic/delete?topic=doomed", b"", "").await?;
    c.expect_closed().await?;
    let s = stats(&b, "").await?;
    ensure!(names(&s["topics"], "topic_name") == ["kept"], "{s}");
    expect_error(
        &b,
        "POST",
        "/topic/delete?topic=doomed",
        b"",
        404,
        "TOPIC_NOT_FOUND",
    )
    .await?;
    // Publishing again makes a new, empty topic.
    expect_ok(&b, "POST", "/pub?topic=doomed", b"again", "OK").await?;
    let s = stats(&b, "").await?;
    let t = topic(&s, "doomed").context("doomed")?;
    ensure!(t["message_count"] == 1 && t["channels"] == json!([]), "{t}");
    b.stop().await
}

#[tokio::test]
async fn topic_empty_drops_what_waits_in_the_topic() -> Result<()> {
    let b = broker().await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"1\n2\n3", "OK").await?;
    expect_ok(&b, "POST", "/topic/empty?topic=t", b"", "").await?;
    let s = stats(&b, "").await?;
    let t = topic(&s, "t").context("topic t")?;
    ensure!(t["depth"] == 0 && t["message_count"] == 3, "{t}");
    // Nothing is left to reach a channel created afterwards.
    let mut c = consumer(&b, "t", "late", 10).await?;
    c.expect_nothing_for(Duration::from_millis(200)).await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"4", "OK").await?;
    ensure!(&c.expect_message().await?.body[..] == b"4");
    b.stop().await
}

#[tokio::test]
async fn topic_pause_holds_messages_until_unpause() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 10).await?;
    expect_ok(&b, "POST", "/topic/pause?topic=t", b"", "").await?;
    expect_ok(&b, "POST", "/topic/pause?topic=t", b"", "").await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"1\n2", "OK").await?;
    c.expect_nothing_for(Duration::from_millis(300)).await?;
    let s = stats(&b, "").await?;
    let t = topic(&s, "t").context("topic t")?;
    ensure!(t["paused"] == true && t["depth"] == 2, "{t}");
    ensure!(
        field(&s, "t", "c", "depth") == 0 && field(&s, "t", "c", "paused") == false,
        "{s}"
    );
    expect_ok(&b, "POST", "/topic/unpause?topic=t", b"", "").await?;
    ensure!(bodies(&receive(&mut c, 2).await?) == ["1", "2"]);
    let s = stats(&b, "").await?;
    let t = topic(&s, "t").context("topic t")?;
    ensure!(t["paused"] == false && t["depth"] == 0, "{t}");
    b.stop().await
}

// ---------------------------------------------------------------------------------------------
// /channel/*
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn channel_endpoint_errors() -> Result<()> {
    let b = broker().await?;
    expect_ok(&b, "POST", "/topic/create?topic=t", b"", "").await?;
    for action in ["create", "delete", "empty", "pause", "unpause"] {
        let base = format!("/channel/{action}");
        let err = |q: &str, status, text| {
            let path = format!("{base}{q}");
            let b = &b;
            async move { expect_error(b, "POST", &path, b"", status, text).await }
        };
        err("", 400, "MISSING_ARG_TOPIC").await?;
        err("?channel=c", 400, "MISSING_ARG_TOPIC").await?;
        err("?topic=bad!&channel=c", 400, "INVALID_ARG_TOPIC").await?;
        err("?topic=&channel=c", 400, "INVALID_ARG_TOPIC").await?;
        err("?topic=t", 400, "MISSING_ARG_CHANNEL").await?;
        err("?topic=t&channel=bad!", 400, "INVALID_ARG_CHANNEL").await?;
        err("?topic=t&channel=", 400, "INVALID_ARG_CHANNEL").await?;
        err("?topic=nope&channel=c", 404, "TOPIC_NOT_FOUND").await?;
        err("?topic=%zz&channel=c", 400, "INVALID_REQUEST").await?;
        // Names are checked before the topic is looked up.
        err("?topic=nope&channel=bad!", 400, "INVALID_ARG_CHANNEL").await?;
        if action != "create" {
            err("?topic=t&channel=nope", 404, "CHANNEL_NOT_FOUND").await?;
        }
    }
    let s = stats(&b, "").await?;
    ensure!(names(&s["topics"], "topic_name") == ["t"], "{s}");
    ensure!(topic(&s, "t").context("t")?["channels"] == json!([]), "{s}");
    b.stop().await
}

#[tokio::test]
async fn channel_create_receives_later_messages() -> Result<()> {
    let b = broker().await?;
    expect_ok(&b, "POST", "/topic/create?topic=t", b"", "").await?;
    expect_ok(&b, "POST", "/channel/create?topic=t&channel=b", b"", "").await?;
    expect_ok(&b, "POST", "/channel/create?topic=t&channel=a", b"", "").await?;
    expect_ok(&b, "POST", "/channel/create?topic=t&channel=a", b"", "").await?;
    expect_ok(
        &b,
        "POST",
        "/channel/create?topic=t&channel=e%23ephemeral",
        b"",
        "",
    )
    .await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"1\n2", "OK").await?;
    let s = stats(&b, "").await?;
    let t = topic(&s, "t").context("t")?;
    ensure!(
        names(&t["channels"], "channel_name") == ["a", "b", "e#ephemeral"],
        "{t}"
    );
    for c in ["a", "b"] {
        ensure!(
            field(&s, "t", c, "depth") == 2 && field(&s, "t", c, "message_count") == 2,
            "{s}"
        );
    }
    let mut c = consumer(&b, "t", "a", 10).await?;
    ensure!(bodies(&receive(&mut c, 2).await?) == ["1", "2"]);
    b.stop().await
}

#[tokio::test]
async fn channel_delete_removes_it_and_disconnects_its_consumers() -> Result<()> {
    let b = broker().await?;
    let mut gone = consumer(&b, "t", "gone", 10).await?;
    let mut kept = consumer(&b, "t", "kept", 10).await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"1", "OK").await?;
    gone.expect_message().await?;
    kept.expect_message().await?;
    expect_ok(&b, "POST", "/channel/delete?topic=t&channel=gone", b"", "").await?;
    gone.expect_closed().await?;
    let s = stats(&b, "").await?;
    ensure!(
        names(&topic(&s, "t").context("t")?["channels"], "channel_name") == ["kept"],
        "{s}"
    );
    expect_error(
        &b,
        "POST",
        "/channel/delete?topic=t&channel=gone",
        b"",
        404,
        "CHANNEL_NOT_FOUND",
    )
    .await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"2", "OK").await?;
    ensure!(&kept.expect_message().await?.body[..] == b"2");
    b.stop().await
}

#[tokio::test]
async fn channel_empty_drops_queued_and_in_flight_messages() -> Result<()> {
    let b = broker().await?;
    let mut c = consumer(&b, "t", "c", 1).await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"1\n2\n3", "OK").await?;
    c.expect_message().await?;
    stats_when(&b, "one in flight and two queued", |s| {
        field(s, "t", "c", "in_flight_count") == 1 && field(s, "t", "c", "depth") == 2
    })
    .await?;
    expect_ok(&b, "POST", "/channel/empty?topic=t&channel=c", b"", "").await?;
    let s = stats(&b, "").await?;
    let ch = channel(&s, "t", "c").context("channel")?;
    ensure!(
        ch["depth"] == 0 && ch["in_flight_count"] == 0 && ch["deferred_count"] == 0,
        "{ch}"
    );
    ensure!(ch["message_count"] == 3, "{ch}");
    ensure!(ch["clients"][0]["in_flight_count"] == 0, "{ch}");
    // The consumer's RDY is free again: the next message arrives.
    expect_ok(&b, "POST", "/pub?topic=t", b"4", "OK").await?;
    ensure!(&c.expect_message().await?.body[..] == b"4");
    b.stop().await
}

#[tokio::test]
async fn channel_pause_holds_delivery_until_unpause() -> Result<()> {
    let b = broker().await?;
    let mut paused = consumer(&b, "t", "paused", 10).await?;
    let mut other = consumer(&b, "t", "other", 10).await?;
    expect_ok(&b, "POST", "/channel/pause?topic=t&channel=paused", b"", "").await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"1\n2", "OK").await?;
    ensure!(bodies(&receive(&mut other, 2).await?) == ["1", "2"]);
    paused
        .expect_nothing_for(Duration::from_millis(300))
        .await?;
    let s = stats(&b, "").await?;
    ensure!(
        field(&s, "t", "paused", "paused") == true && field(&s, "t", "paused", "depth") == 2,
        "{s}"
    );
    ensure!(field(&s, "t", "other", "paused") == false, "{s}");
    ensure!(topic(&s, "t").context("t")?["paused"] == false, "{s}");
    expect_ok(
        &b,
        "POST",
        "/channel/unpause?topic=t&channel=paused",
        b"",
        "",
    )
    .await?;
    ensure!(bodies(&receive(&mut paused, 2).await?) == ["1", "2"]);
    let s = stats(&b, "").await?;
    ensure!(field(&s, "t", "paused", "paused") == false, "{s}");
    b.stop().await
}

// ---------------------------------------------------------------------------------------------
// /config/:opt
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn config_get() -> Result<()> {
    let b = TestBroker::start(|o| o.mem_queue_size = 123).await?;
    ensure!(get_json(&b, "/config/mem_queue_size").await? == 123);
    ensure!(get_json(&b, "/config/msg_timeout").await? == 60_000_000_000u64);
    ensure!(get_json(&b, "/config/max_msg_size").await? == 1_048_576);
    ensure!(get_json(&b, "/config/max_req_timeout").await? == 3_600_000_000_000u64);
    ensure!(get_json(&b, "/config/broadcast_address").await? == "127.0.0.1");
    ensure!(get_json(&b, "/config/log_level").await? == "info");
    for bad in ["nope", "mem-queue-size", "MemQueueSize", "MEM_QUEUE_SIZE"] {
        expect_error(
            &b,
            "GET",
            &format!("/config/{bad}"),
            b"",
            400,
            "INVALID_OPTION",
        )
        .await?;
    }
    b.stop().await
}

#[tokio::test]
async fn config_put_log_level() -> Result<()> {
    let b = broker().await?;
    let put = |body: &'static [u8]| b.http("PUT", "/config/log_level", body);
    ensure!(check_json(&put(b"debug").await?, "PUT debug")? == "debug");
    ensure!(get_json(&b, "/config/log_level").await? == "debug");
    // Level names are case-insensitive, as lg.ParseLogLevel's are.
    ensure!(check_json(&put(b"WARN").await?, "PUT WARN")? == "warn");
    check_error(&put(b"loud").await?, 400, "INVALID_VALUE", "PUT loud")?;
    check_error(&put(b"").await?, 413, "INVALID_VALUE", "PUT empty")?;
    ensure!(
        get_json(&b, "/config/log_level").await? == "warn",
        "a refused PUT changed it"
    );
    // Only log_level (and nsqlookupd_tcp_addresses) can be changed.
    expect_error(
        &b,
        "PUT",
        "/config/mem_queue_size",
        b"5",
        400,
        "INVALID_OPTION",
    )
    .await?;
    expect_error(&b, "PUT", "/config/nope", b"5", 400, "INVALID_OPTION").await?;
    // An empty body is refused before the option is looked at.
    expect_error(
        &b,
        "PUT",
        "/config/mem_queue_size",
        b"",
        413,
        "INVALID_VALUE",
    )
    .await?;
    ensure!(get_json(&b, "/config/mem_queue_size").await? == 10000);
    b.stop().await
}

#[tokio::test]
async fn config_put_value_larger_than_max_msg_size_is_refused() -> Result<()> {
    let b = TestBroker::start(|o| o.max_msg_size = 4).await?;
    expect_error(
        &b,
        "PUT",
        "/config/log_level",
        b"debug",
        413,
        "INVALID_VALUE",
    )
    .await?;
    ensure!(
        check_json(
            &b.http("PUT", "/config/log_level", b"warn").await?,
            "PUT warn"
        )? == "warn"
    );
    b.stop().await
}

/// The spec's other runtime option: a JSON array of lookupd addresses, readable and settable.
#[tokio::test]
async fn config_nsqlookupd_tcp_addresses() -> Result<()> {
    let b = broker().await?;
    ensure!(get_json(&b, "/config/nsqlookupd_tcp_addresses").await? == json!([]));
    let put = b
        .http(
            "PUT",
            "/config/nsqlookupd_tcp_addresses",
            br#"["127.0.0.1:4160"]"#,
        )
        .await?;
    ensure!(check_json(&put, "PUT addresses")? == json!(["127.0.0.1:4160"]));
    ensure!(get_json(&b, "/config/nsqlookupd_tcp_addresses").await? == json!(["127.0.0.1:4160"]));
    expect_error(
        &b,
        "PUT",
        "/config/nsqlookupd_tcp_addresses",
        b"not json",
        400,
        "INVALID_VALUE",
    )
    .await?;
    expect_error(
        &b,
        "PUT",
        "/config/nsqlookupd_tcp_addresses",
        br#"{"not": "a list"}"#,
        400,
        "INVALID_VALUE",
    )
    .await?;
    expect_error(
        &b,
        "PUT",
        "/config/nsqlookupd_tcp_addresses",
        b"",
        413,
        "INVALID_VALUE",
    )
    .await?;
    ensure!(get_json(&b, "/config/nsqlookupd_tcp_addresses").await? == json!(["127.0.0.1:4160"]));
    b.stop().await
}

// ---------------------------------------------------------------------------------------------
// /stats
// ---------------------------------------------------------------------------------------------

const TOPIC_KEYS: &[&str] = &[
    "topic_name",
    "channels",
    "depth",
    "backend_depth",
    "message_count",
    "message_bytes",
    "paused",
    "e2e_processing_latency",
];

const CLIENT_KEYS: &[&str] = &[
    "client_id",
    "hostname",
    "version",
    "remote_address",
    "state",
    "ready_count",
    "in_flight_count",
    "message_count",
    "finish_count",
    "requeue_count",
    "connect_ts",
    "sample_rate",
    "deflate",
    "snappy",
    "user_agent",
    "topology_zone",
    "topology_region",
    "tls",
    "tls_cipher_suite",
    "tls_version",
    "tls_negotiated_protocol",
    "tls_negotiated_protocol_is_mutual",
];

const MEMORY_KEYS: &[&str] = &[
    "heap_objects",
    "heap_idle_bytes",
    "heap_in_use_bytes",
    "heap_released_bytes",
    "gc_pause_usec_100",
    "gc_pause_usec_99",
    "gc_pause_usec_95",
    "next_gc_bytes",
    "gc_total_runs",
];

fn no_e2e() -> Value {
    json!({"count": 0, "percentiles": null})
}

/// A client's stats without the fields that depend on the connection (checked apart).
fn client_without_connection(client: &Value, since: i64) -> Result<Value> {
    let addr: std::net::SocketAddr = client["remote_address"]
        .as_str()
        .context("remote_address")?
        .parse()?;
    ensure!(addr.ip().is_loopback(), "remote_address {addr}");
    let ts = client["connect_ts"].as_i64().context("connect_ts")?;
    ensure!((since..=unix_now()).contains(&ts), "connect_ts {ts}");
    let mut rest = client.clone();
    let obj = rest.as_object_mut().context("client is an object")?;
    obj.remove("remote_address");
    obj.remove("connect_ts");
    Ok(rest)
}

fn client_stats(id: &str, host: &str, agent: &str, state: i32, counts: [u64; 5]) -> Value {
    let [ready, in_flight, messages, finished, requeued] = counts;
    json!({
        "client_id": id,
        "hostname": host,
        "version": "V2",
        "state": state,
        "ready_count": ready,
        "in_flight_count": in_flight,
        "message_count": messages,
        "finish_count": finished,
        "requeue_count": requeued,
        "sample_rate": 0,
        "deflate": false,
        "snappy": false,
        "user_agent": agent,
        "topology_zone": "",
        "topology_region": "",
        "tls": false,
        "tls_cipher_suite": "",
        "tls_version": "",
        "tls_negotiated_protocol": "",
        "tls_negotiated_protocol_is_mutual": false,
    })
}

fn find_client<'a>(clients: &'a Value, id: &str) -> Result<&'a Value> {
    clients
        .as_array()
        .and_then(|l| l.iter().find(|c| c["client_id"] == id))
        .with_context(|| format!("no client {id} in {clients}"))
}

/// Publishes, consumes, FINs, REQs (now and later) and lets one message time out, then checks
/// every field of `/stats?format=json` and its filters.
#[tokio::test]
async fn stats_json_field_by_field() -> Result<()> {
    let since = unix_now();
    let b = broker().await?;

    // Topic "orders" with channels "audit" (no consumer, paused) and "work".
    expect_ok(&b, "POST", "/topic/create?topic=orders", b"", "").await?;
    expect_ok(
        &b,
        "POST",
        "/channel/create?topic=orders&channel=work",
        b"",
        "",
    )
    .await?;
    expect_ok(
        &b,
        "POST",
        "/channel/create?topic=orders&channel=audit",
        b"",
        "",
    )
    .await?;
    expect_ok(
        &b,
        "POST",
        "/channel/pause?topic=orders&channel=audit",
        b"",
        "",
    )
    .await?;

    // Five messages over TCP from a producer, one over HTTP.
    let mut producer = identified(
        &b,
        json!({"client_id": "prod", "hostname": "prodhost", "user_agent": "knsq-test/1"}),
    )
    .await?;
    for i in 0..5 {
        tcp_publish(&mut producer, "orders", &format!("msg-{i}")).await?;
    }
    expect_ok(&b, "POST", "/pub?topic=orders", b"http!", "OK").await?;

    // Topic "lonely": two HTTP messages, no channel, paused.
    expect_ok(&b, "POST", "/pub?topic=lonely", b"x1", "OK").await?;
    expect_ok(&b, "POST", "/pub?topic=lonely", b"x22", "OK").await?;
    expect_ok(&b, "POST", "/topic/pause?topic=lonely", b"", "").await?;

    // c1 takes four messages, FINs two, requeues one now and one in a minute.
    let mut c1 = subscriber(
        &b,
        "orders",
        "work",
        json!({"client_id": "c1", "hostname": "h1", "user_agent": "ua/1"}),
    )
    .await?;
    c1.send(&Command::Rdy(4)).await?;
    let got = receive(&mut c1, 4).await?;
    ensure!(
        bodies(&got) == ["msg-0", "msg-1", "msg-2", "msg-3"],
        "{:?}",
        bodies(&got)
    );
    c1.send(&Command::Rdy(0)).await?;
    c1.send(&Command::Fin(got[0].id)).await?;
    c1.send(&Command::Fin(got[1].id)).await?;
    c1.send(&Command::Req {
        id: got[2].id,
        timeout_ms: 0,
    })
    .await?;
    c1.send(&Command::Req {
        id: got[3].id,
        timeout_ms: 60_000,
    })
    .await?;
    stats_when(&b, "c1's FINs and REQs", |s| {
        field(s, "orders", "work", "requeue_count") == 2
            && field(s, "orders", "work", "deferred_count") == 1
            && field(s, "orders", "work", "in_flight_count") == 0
    })
    .await?;

    // c2 (msg_timeout 1 s) lets msg-4 time out, then takes the next one and holds it.
    let mut c2 = subscriber(
        &b,
        "orders",
        "work",
        json!({"client_id": "c2", "hostname": "h2", "user_agent": "ua/2", "msg_timeout": 1000}),
    )
    .await?;
    c2.send(&Command::Rdy(1)).await?;
    ensure!(&c2.expect_message().await?.body[..] == b"msg-4");
    c2.send(&Command::Rdy(0)).await?;
    stats_when(&b, "a timeout", |s| {
        field(s, "orders", "work", "timeout_count") == 1
    })
    .await?;
    c2.send(&Command::Rdy(1)).await?;
    ensure!(&c2.expect_message().await?.body[..] == b"http!");
    let s = stats_when(&b, "c2 holding one message", |s| {
        field(s, "orders", "work", "in_flight_count") == 1
            && channel(s, "orders", "work")
                .and_then(|c| find_client(&c["clients"], "c2").ok())
                .is_some_and(|c| c["ready_count"] == 1 && c["in_flight_count"] == 1)
    })
    .await?;

    // Top level.
    ensure!(
        keys(&s)
            == key_set(&[
                "version",
                "health",
                "start_time",
                "topics",
                "memory",
                "producers"
            ]),
        "top-level keys {:?}",
        keys(&s)
    );
    ensure!(s["version"] == "1.3.0" && s["health"] == "OK", "{s}");
    let start = s["start_time"].as_i64().context("start_time")?;
    ensure!((since..=unix_now()).contains(&start), "start_time {start}");
    ensure!(
        keys(&s["memory"]) == key_set(MEMORY_KEYS),
        "memory {}",
        s["memory"]
    );
    for k in MEMORY_KEYS {
        ensure!(s["memory"][k].is_u64(), "memory.{k} = {}", s["memory"][k]);
    }
    ensure!(
        names(&s["topics"], "topic_name") == ["lonely", "orders"],
        "topics sorted by name"
    );

    // Topics.
    let lonely = topic(&s, "lonely").context("lonely")?;
    ensure!(
        keys(lonely) == key_set(TOPIC_KEYS),
        "topic keys {:?}",
        keys(lonely)
    );
    let want = json!({
        "topic_name": "lonely",
        "channels": [],
        "depth": 2,
        "backend_depth": 0,
        "message_count": 2,
        "message_bytes": 5,
        "paused": true,
        "e2e_processing_latency": no_e2e(),
    });
    ensure!(*lonely == want, "lonely {lonely:#}\nwant {want:#}");

    let orders = topic(&s, "orders").context("orders")?;
    let mut rest = orders.clone();
    rest["channels"] = Value::Null;
    let want = json!({
        "topic_name": "orders",
        "channels": null,
        "depth": 0,
        "backend_depth": 0,
        "message_count": 6,
        "message_bytes": 5 * 5 + 5,
        "paused": false,
        "e2e_processing_latency": no_e2e(),
    });
    ensure!(rest == want, "orders {orders:#}\nwant {want:#}");
    ensure!(
        names(&orders["channels"], "channel_name") == ["audit", "work"],
        "channels sorted"
    );

    // Channels.
    let audit = channel(&s, "orders", "audit").context("audit")?;
    let want = json!({
        "channel_name": "audit",
        "depth": 6,
        "backend_depth": 0,
        "in_flight_count": 0,
        "deferred_count": 0,
        "message_count": 6,
        "requeue_count": 0,
        "timeout_count": 0,
        "client_count": 0,
        "clients": [],
        "paused": true,
        "e2e_processing_latency": no_e2e(),
    });
    ensure!(*audit == want, "audit {audit:#}\nwant {want:#}");

    let work = channel(&s, "orders", "work").context("work")?;
    let mut rest = work.clone();
    rest["clients"] = Value::Null;
    let want = json!({
        "channel_name": "work",
        "depth": 2,              // msg-2 (REQ 0) and msg-4 (timed out)
        "backend_depth": 0,
        "in_flight_count": 1,    // http! at c2
        "deferred_count": 1,     // msg-3 (REQ 60 s)
        "message_count": 6,
        "requeue_count": 2,
        "timeout_count": 1,
        "client_count": 2,
        "clients": null,
        "paused": false,
        "e2e_processing_latency": no_e2e(),
    });
    ensure!(rest == want, "work {work:#}\nwant {want:#}");

    // Clients.
    ensure!(
        work["clients"].as_array().map(Vec::len) == Some(2),
        "{work}"
    );
    for (id, host, agent, counts) in [
        ("c1", "h1", "ua/1", [0, 0, 4, 2, 2]),
        ("c2", "h2", "ua/2", [1, 1, 2, 0, 0]),
    ] {
        let c = find_client(&work["clients"], id)?;
        ensure!(keys(c) == key_set(CLIENT_KEYS), "client keys {:?}", keys(c));
        let want = client_stats(id, host, agent, 3, counts);
        let got = client_without_connection(c, since)?;
        ensure!(got == want, "client {id} {c:#}\nwant {want:#}");
    }

    // Producers: the TCP publisher only, with its count for the one topic it used.
    let producers = s["producers"].as_array().context("producers")?;
    ensure!(producers.len() == 1, "producers {producers:?}");
    let p = &producers[0];
    let mut want_keys = key_set(CLIENT_KEYS);
    want_keys.insert("pub_counts".into());
    ensure!(keys(p) == want_keys, "producer keys {:?}", keys(p));
    let mut want = client_stats("prod", "prodhost", "knsq-test/1", 0, [0; 5]);
    want["pub_counts"] = json!([{"topic": "orders", "count": 5}]);
    let got = client_without_connection(p, since)?;
    ensure!(got == want, "producer {p:#}\nwant {want:#}");

    // Filters.
    let f = stats(&b, "&topic=orders").await?;
    ensure!(names(&f["topics"], "topic_name") == ["orders"], "{f}");
    ensure!(
        f["topics"][0] == *orders,
        "topic filter changed the topic's stats"
    );
    let f = stats(&b, "&topic=orders&channel=work").await?;
    ensure!(names(&f["topics"], "topic_name") == ["orders"], "{f}");
    ensure!(
        names(&f["topics"][0]["channels"], "channel_name") == ["work"],
        "{f}"
    );
    let f = stats(&b, "&channel=audit").await?;
    ensure!(
        names(&f["topics"], "topic_name") == ["orders"],
        "lonely has no audit: {f}"
    );
    ensure!(
        names(&f["topics"][0]["channels"], "channel_name") == ["audit"],
        "{f}"
    );
    let f = stats(&b, "&topic=orders&channel=nope").await?;
    ensure!(
        f["topics"] == json!([]),
        "unknown channel omits the topic: {f}"
    );
    let f = stats(&b, "&topic=nope").await?;
    ensure!(
        f.get("topics") == Some(&Value::Null),
        "unknown topic gives null: {f}"
    );
    let f = stats(&b, "&topic=&channel=").await?;
    ensure!(
        names(&f["topics"], "topic_name") == ["lonely", "orders"],
        "empty filters: {f}"
    );

    for off in ["false", "0"] {
        let f = stats(&b, &format!("&include_clients={off}")).await?;
        ensure!(
            f["producers"].is_null(),
            "include_clients={off}: producers {}",
            f["producers"]
        );
        let work = channel(&f, "orders", "work").context("work")?;
        ensure!(
            work["clients"].is_null() && work["client_count"] == 2,
            "{work}"
        );
        ensure!(f["memory"].is_object(), "{f}");
    }
    for on in ["true", "1", "yes", ""] {
        let f = stats(&b, &format!("&include_clients={on}")).await?;
        ensure!(
            f["producers"].as_array().map(Vec::len) == Some(1),
            "include_clients={on}"
        );
    }
    for off in ["false", "0"] {
        let f = stats(&b, &format!("&include_mem={off}")).await?;
        ensure!(
            f.get("memory").is_none(),
            "include_mem={off} still has memory: {f}"
        );
        ensure!(f["producers"].is_array(), "{f}");
    }
    let f = stats(&b, "&include_mem=maybe").await?;
    ensure!(f["memory"].is_object(), "{f}");
    expect_error(
        &b,
        "GET",
        "/stats?format=json&topic=%zz",
        b"",
        400,
        "INVALID_REQUEST",
    )
    .await?;

    drop((producer, c1, c2));
    b.stop().await
}

/// nsqd builds `producers` from a nil slice, so it is `null` when no TCP client has published,
/// and `GetStats` returns early for an unknown topic, leaving producers `null` too
/// (`nsqd/stats.go` GetStats).
#[tokio::test]
async fn stats_producers_null_like_nsqd() -> Result<()> {
    let b = broker().await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"x", "OK").await?;
    let s = stats(&b, "").await?;
    ensure!(
        s.get("producers") == Some(&Value::Null),
        "no producer: {}",
        s["producers"]
    );
    let mut p = identified(&b, json!({"client_id": "p"})).await?;
    tcp_publish(&mut p, "t", "y").await?;
    let s = stats(&b, "&topic=nope").await?;
    ensure!(
        s.get("producers") == Some(&Value::Null),
        "unknown topic: {}",
        s["producers"]
    );
    b.stop().await
}

/// nsqd passes the `topic` filter to each client's stats, so a producer's `pub_counts` holds
/// that topic's count, or nothing (`nsqd/client_v2.go` Stats).
#[tokio::test]
async fn stats_pub_counts_follow_the_topic_filter() -> Result<()> {
    let b = broker().await?;
    let mut p = identified(&b, json!({"client_id": "p"})).await?;
    tcp_publish(&mut p, "first", "1").await?;
    tcp_publish(&mut p, "second", "2").await?;
    tcp_publish(&mut p, "second", "3").await?;
    let s = stats(&b, "").await?;
    ensure!(
        s["producers"][0]["pub_counts"].as_array().map(Vec::len) == Some(1),
        "{s}"
    );
    let s = stats(&b, "&topic=second").await?;
    ensure!(
        s["producers"][0]["pub_counts"] == json!([{"topic": "second", "count": 2}]),
        "{}",
        s["producers"]
    );
    b.stop().await
}

#[tokio::test]
async fn stats_pub_counts_hold_one_topic_and_ignore_http() -> Result<()> {
    let b = broker().await?;
    let mut p = identified(&b, json!({"client_id": "p"})).await?;
    let mut idle = identified(&b, json!({"client_id": "idle"})).await?;
    expect_ok(&b, "POST", "/pub?topic=t", b"x", "OK").await?;
    let s = stats(&b, "").await?;
    ensure!(
        names(&s["producers"], "client_id").is_empty(),
        "nobody published over TCP: {s}"
    );
    tcp_publish(&mut p, "t", "1").await?;
    p.send(&Command::Mpub {
        topic: name("t"),
        bodies: vec![Bytes::from_static(b"2"), Bytes::from_static(b"3")],
    })
    .await?;
    p.expect_response(b"OK").await?;
    tcp_publish(&mut p, "u", "4").await?;
    let s = stats(&b, "").await?;
    ensure!(names(&s["producers"], "client_id") == ["p"], "{s}");
    let counts = s["producers"][0]["pub_counts"]
        .as_array()
        .context("pub_counts")?;
    ensure!(counts.len() == 1, "nsqd reports one topic only: {counts:?}");
    ensure!(
        counts[0] == json!({"topic": "t", "count": 3})
            || counts[0] == json!({"topic": "u", "count": 1}),
        "{counts:?}"
    );
    idle.send(&Command::Nop).await?;
    b.stop().await
}

#[tokio::test]
async fn stats_e2e_latency_when_percentiles_are_configured() -> Result<()> {
    let b = TestBroker::start(|o| o.e2e_processing_latency_percentiles = vec![0.99, 0.5]).await?;
    expect_ok(&b, "POST", "/topic/create?topic=t", b"", "").await?;
    expect_ok(&b, "POST", "/channel/create?topic=t&channel=c", b"", "").await?;
    let s = stats(&b, "").await?;
    let e2e = &channel(&s, "t", "c").context("c")?["e2e_processing_latency"];
    ensure!(e2e["count"] == 0, "{e2e}");
    let quantiles: Vec<f64> = e2e["percentiles"]
        .as_array()
        .context("percentiles are a list once configured")?
        .iter()
        .filter_map(|p| p["quantile"].as_f64())
        .collect();
    ensure!(quantiles == [0.99, 0.5], "{e2e}");

    let mut c = consumer(&b, "t", "c", 10).await?;
    expect_ok(&b, "POST", "/mpub?topic=t", b"1\n2\n3", "OK").await?;
    for m in receive(&mut c, 3).await? {
        c.send(&Command::Fin(m.id)).await?;
    }
    let s = stats_when(&b, "three e2e samples", |s| {
        field(s, "t", "c", "e2e_processing_latency")["count"] == 3
    })
    .await?;
    for (what, e2e) in [
        (
            "channel",
            &channel(&s, "t", "c").context("c")?["e2e_processing_latency"],
        ),
        (
            "topic",
            &topic(&s, "t").context("t")?["e2e_processing_latency"],
        ),
    ] {
        ensure!(
            keys(e2e) == key_set(&["count", "percentiles"]),
            "{what} {e2e}"
        );
        ensure!(e2e["count"] == 3, "{what} {e2e}");
        let list = e2e["percentiles"].as_array().context("percentiles")?;
        ensure!(list.len() == 2, "{what} {e2e}");
        for (p, q) in list.iter().zip([0.99, 0.5]) {
            ensure!(keys(p) == key_set(&["quantile", "value"]), "{what} {p}");
            ensure!(p["quantile"].as_f64() == Some(q), "{what} {p}");
            let ns = p["value"].as_f64().context("value")?;
            ensure!(
                ns > 0.0 && ns < 10e9,
                "{what}: {ns} ns is not a plausible latency"
            );
        }
    }
    b.stop().await
}

#[tokio::test]
async fn stats_text_format() -> Result<()> {
    let b = broker().await?;
    expect_ok(&b, "POST", "/mpub?topic=alpha", b"1\n2", "OK").await?;
    expect_ok(&b, "POST", "/topic/pause?topic=alpha", b"", "").await?;
    expect_ok(&b, "POST", "/topic/create?topic=beta", b"", "").await?;
    expect_ok(&b, "POST", "/channel/create?topic=beta&channel=c1", b"", "").await?;
    expect_ok(&b, "POST", "/channel/pause?topic=beta&channel=c1", b"", "").await?;
    let mut cons = subscriber(
        &b,
        "beta",
        "c2",
        json!({"client_id": "cons", "hostname": "cons-host", "user_agent": "test-ua/1.0"}),
    )
    .await?;
    cons.send(&Command::Rdy(1)).await?;
    let mut prod = identified(
        &b,
        json!({"client_id": "prod", "hostname": "prod-host", "user_agent": "test-ua/2.0"}),
    )
    .await?;
    for i in 0..3 {
        tcp_publish(&mut prod, "beta", &i.to_string()).await?;
    }
    cons.expect_message().await?;
    stats_when(&b, "the delivery", |s| {
        field(s, "beta", "c2", "in_flight_count") == 1
    })
    .await?;

    let resp = b.http("GET", "/stats", b"").await?;
    check_ok(&resp, &resp.text(), "GET /stats")?;
    ensure!(
        resp.header("content-type") != Some(JSON),
        "text stats served as JSON"
    );
    let text = resp.text();
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let find = |want: &str| {
        lines
            .iter()
            .position(|l| *l == want)
            .with_context(|| format!("no line {want:?} in\n{text}"))
    };
    find("Health: OK")?;
    find("Memory:")?;
    ensure!(
        lines.iter().any(|l| l.starts_with("uptime ")),
        "no uptime in\n{text}"
    );
    let alpha = find("*P [alpha          ] depth: 2     be-depth: 0     msgs: 2        e2e%:")?;
    let beta = find("   [beta           ] depth: 0     be-depth: 0     msgs: 3        e2e%:")?;
    let c1 = find(
        "   *P [c1                       ] depth: 3     be-depth: 0     inflt: 0    def: 0    re-q: 0     timeout: 0     msgs: 3        e2e%:",
    )?;
    let c2 = find(
        "      [c2                       ] depth: 2     be-depth: 0     inflt: 1    def: 0    re-q: 0     timeout: 0     msgs: 3        e2e%:",
    )?;
    ensure!(
        alpha < beta && beta < c1 && c1 < c2,
        "topics and channels out of order:\n{text}"
    );
    let client = lines.get(c2 + 1).context("no client line")?;
    ensure!(
        client.starts_with("        [V2 cons-host:")
            && client.contains(" test-ua/1.0")
            && client.contains("] state: 3 inflt: 1    rdy: 1    fin: 0        re-q: 0        msgs: 1        connected: "),
        "client line {client:?}"
    );
    let producers = find("Producers:")?;
    let producer = lines.get(producers + 1).context("no producer line")?;
    ensure!(
        producer.starts_with("   [V2 prod-host:")
            && producer.contains(" test-ua/2.0")
            && producer.contains("] msgs: 3        topics: beta=3 connected: "),
        "producer line {producer:?}"
    );

    // Without memory and clients; format=text and unknown formats are text too.
    for query in [
        "?include_mem=false&include_clients=false",
        "?format=text&include_mem=0&include_clients=0",
    ] {
        let text = b.http("GET", &format!("/stats{query}"), b"").await?.text();
        ensure!(!text.contains("Memory:"), "{query}: memory in\n{text}");
        ensure!(
            text.contains("\nProducers: None"),
            "{query}: producers in\n{text}"
        );
        ensure!(!text.contains("[V2 "), "{query}: clients in\n{text}");
        ensure!(text.contains("*P [alpha "), "{query}:\n{text}");
    }
    let text = b.http("GET", "/stats?topic=nope", b"").await?.text();
    ensure!(text.contains("\nTopics: None"), "unknown topic:\n{text}");
    drop((cons, prod));
    b.stop().await
}

/// nsqd's text header is `nsqd v1.3.0 (built w/goX)`, then `start_time <RFC3339>` (`printStats`).
#[tokio::test]
async fn stats_text_header_like_nsqd() -> Result<()> {
    let b = broker().await?;
    let text = b.http("GET", "/stats", b"").await?.text();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    ensure!(first.starts_with("nsqd v1.3.0 "), "first line {first:?}");
    let start = lines.next().unwrap_or_default();
    let stamp = start.strip_prefix("start_time ").context("no start_time")?;
    let bytes = stamp.as_bytes();
    ensure!(
        bytes.len() >= 20
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes[10] == b'T'
            && bytes[13] == b':',
        "start_time {stamp:?} is not RFC3339"
    );
    b.stop().await
}
