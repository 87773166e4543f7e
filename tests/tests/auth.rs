//! Authorization through an auth server (`--auth-http-address`): AUTH, the checks on SUB and
//! the publishes, TTL expiry and re-query, an auth server that is down or hangs, POST
//! requests, and what `/stats` and IDENTIFY report. The auth server is a small HTTP/1.1
//! server in this file, on 127.0.0.1 port 0, whose answer a test can change.

#[allow(dead_code)]
mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use proto::wire::Frame;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tests::{NsqConn, TestBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One request the auth server received.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    /// Path and query string.
    target: String,
    content_type: Option<String>,
    body: String,
}

impl Recorded {
    /// The form fields, from the query string (GET) or the body (POST).
    fn fields(&self) -> Vec<(String, String)> {
        let encoded = match self.method.as_str() {
            "POST" => self.body.clone(),
            _ => self
                .target
                .split_once('?')
                .map(|(_, q)| q.to_string())
                .unwrap_or_default(),
        };
        encoded
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), unescape(v))
            })
            .collect()
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

fn unescape(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the auth server answers: a status and a body.
#[derive(Debug, Clone)]
enum Answer {
    Reply(u16, String),
    /// Accept the request and never answer.
    Hang,
}

struct AuthServer {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl AuthServer {
    async fn start(answer: Answer) -> Result<AuthServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (a, r) = (answer.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, a.clone(), r.clone()));
            }
        });
        Ok(AuthServer {
            addr,
            answer,
            requests,
            task,
        })
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (headers, then a Content-Length body), records it and answers.
async fn serve(
    mut stream: TcpStream,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let header = |name: &str| {
        head.split("\r\n").find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    requests.lock().unwrap().push(Recorded {
        method,
        target,
        content_type: header("content-type"),
        body: String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned(),
    });
    let answer = answer.lock().unwrap().clone();
    match answer {
        Answer::Reply(status, body) => {
            let response = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
}

/// An answer granting `permissions` on topics matching `topic` and channels matching
/// `channels`, for `ttl` seconds.
fn grant(ttl: i64, topic: &str, channels: &[&str], permissions: &[&str]) -> Answer {
    Answer::Reply(
        200,
        json!({
            "ttl": ttl,
            "identity": "alice",
            "identity_url": "http://id.example/alice",
            "authorizations": [{"topic": topic, "channels": channels, "permissions": permissions}],
        })
        .to_string(),
    )
}

async fn auth_broker(
    servers: &[String],
    configure: impl FnOnce(&mut broker::Options),
) -> Result<TestBroker> {
    let servers = servers.to_vec();
    TestBroker::start(move |o| {
        o.auth_http_addresses = servers;
        configure(o);
    })
    .await
}

/// Sends `AUTH secret` and returns the JSON response.
async fn auth(c: &mut NsqConn, secret: &str) -> Result<Value> {
    c.send_raw(&sized("AUTH", secret.as_bytes())).await?;
    match c.next_non_heartbeat().await? {
        Frame::Response(r) => Ok(serde_json::from_slice(&r)?),
        other => bail!("AUTH answered {other:?}"),
    }
}

/// A connection that has authenticated with `secret`.
async fn authed(b: &TestBroker, secret: &str) -> Result<NsqConn> {
    let mut c = b.connect().await?;
    auth(&mut c, secret).await?;
    Ok(c)
}

fn field(r: &Recorded, name: &str) -> Option<String> {
    r.fields()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[tokio::test]
async fn auth_queries_the_server_and_reports_the_identity() -> Result<()> {
    let server = AuthServer::start(grant(3600, "^orders$", &[".*"], &["publish"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut c = b.connect().await?;
    let resp = auth(&mut c, "s3cr&t =x").await?;
    assert_eq!(
        resp,
        json!({"identity": "alice", "identity_url": "http://id.example/alice", "permission_count": 1})
    );
    let requests = server.requests();
    ensure!(requests.len() == 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path(), "/auth");
    // Go's url.Values.Encode order.
    let names: Vec<String> = r.fields().into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["common_name", "remote_ip", "secret", "tls"]);
    assert_eq!(field(r, "secret").as_deref(), Some("s3cr&t =x"));
    assert_eq!(field(r, "remote_ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(field(r, "tls").as_deref(), Some("false"));
    assert_eq!(field(r, "common_name").as_deref(), Some(""));
    // A second AUTH is refused.
    c.send_raw(&sized("AUTH", b"again")).await?;
    expect_fatal(&mut c, "E_INVALID AUTH already set").await
}

#[tokio::test]
async fn pipelined_commands_wait_for_the_auth_server_in_order() -> Result<()> {
    // With --sync-publish the answers of publishes are held, and must still come out in order
    // around the auth server's answers.
    for sync_publish in [false, true] {
        let server = AuthServer::start(grant(3600, "^ok", &[".*"], &["publish"])).await?;
        let b = auth_broker(&[server.addr.to_string()], |o| {
            o.sync_publish = sync_publish
        })
        .await?;
        let mut c = b.connect().await?;
        let mut batch = sized("AUTH", b"secret");
        batch.extend(pub_cmd("ok_1", b"a"));
        batch.extend(mpub_cmd("ok_2", &[b"b", b"c"]));
        batch.extend(pub_cmd("denied", b"d"));
        batch.extend(pub_cmd("ok_1", b"never"));
        c.send_raw(&batch).await?;
        match c.next_non_heartbeat().await? {
            Frame::Response(r) => {
                let v: Value = serde_json::from_slice(&r)?;
                assert_eq!(v["permission_count"], 1, "{v}");
            }
            other => bail!("AUTH answered {other:?}"),
        }
        c.expect_response(b"OK").await?;
        c.expect_response(b"OK").await?;
        expect_fatal(
            &mut c,
            r#"E_UNAUTHORIZED AUTH failed for PUB on "denied" """#,
        )
        .await?;
        let stats = b.stats().await?;
        assert_eq!(
            topic_stats(&stats, "ok_1").context("ok_1")?["message_count"],
            1
        );
        assert_eq!(
            topic_stats(&stats, "ok_2").context("ok_2")?["message_count"],
            2
        );
        b.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn identify_says_auth_is_required() -> Result<()> {
    let server = AuthServer::start(grant(60, ".*", &[".*"], &["publish"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut c = b.connect().await?;
    match c.identify(&json!({"feature_negotiation": true})).await? {
        Frame::Response(r) => {
            let v: Value = serde_json::from_slice(&r)?;
            assert_eq!(v["auth_required"], true, "{v}");
        }
        other => bail!("IDENTIFY answered {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn commands_before_auth_are_refused() -> Result<()> {
    let server = AuthServer::start(grant(60, ".*", &[".*"], &["publish", "subscribe"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let cases: [(Vec<u8>, &str); 4] = [
        (pub_cmd("t", b"m"), "E_AUTH_FIRST AUTH required before PUB"),
        (
            mpub_cmd("t", &[b"a", b"b"]),
            "E_AUTH_FIRST AUTH required before MPUB",
        ),
        (
            dpub_cmd("t", 10, b"m"),
            "E_AUTH_FIRST AUTH required before DPUB",
        ),
        (
            b"SUB t c\n".to_vec(),
            "E_AUTH_FIRST AUTH required before SUB",
        ),
    ];
    for (command, want) in cases {
        let mut c = b.connect().await?;
        c.send_raw(&command).await?;
        expect_fatal(&mut c, want).await?;
    }
    // MPUB is refused before its body is read: the line alone gets the error, after the
    // topic name is checked (nsqd's order).
    let mut c = b.connect().await?;
    c.send_raw(b"MPUB t\n").await?;
    expect_fatal(&mut c, "E_AUTH_FIRST AUTH required before MPUB").await?;
    let mut c = b.connect().await?;
    c.send_raw(b"MPUB b$d\n").await?;
    expect_fatal(
        &mut c,
        r#"E_BAD_TOPIC E_BAD_TOPIC MPUB topic name "b$d" is not valid"#,
    )
    .await?;
    ensure!(
        server.requests().is_empty(),
        "nothing to ask the auth server"
    );
    Ok(())
}

#[tokio::test]
async fn allowed_and_denied_publishes() -> Result<()> {
    let server = AuthServer::start(grant(3600, "^orders", &[".*"], &["publish"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut c = authed(&b, "secret").await?;
    c.send_raw(&pub_cmd("orders", b"one")).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&mpub_cmd("orders_eu", &[b"two", b"three"]))
        .await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&dpub_cmd("orders", 5, b"four")).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&pub_cmd("payments", b"no")).await?;
    expect_fatal(
        &mut c,
        r#"E_UNAUTHORIZED AUTH failed for PUB on "payments" """#,
    )
    .await?;
    // The denied publish created nothing.
    let stats = b.stats().await?;
    ensure!(topic_stats(&stats, "payments").is_none(), "{stats}");
    assert_eq!(
        topic_stats(&stats, "orders").context("orders")?["message_count"],
        2
    );

    // A denied MPUB is refused on its line, before the body arrives.
    let mut c = authed(&b, "secret").await?;
    c.send_raw(b"MPUB payments\n").await?;
    expect_fatal(
        &mut c,
        r#"E_UNAUTHORIZED AUTH failed for MPUB on "payments" """#,
    )
    .await?;
    let mut c = authed(&b, "secret").await?;
    c.send_raw(&dpub_cmd("payments", 1, b"x")).await?;
    expect_fatal(
        &mut c,
        r#"E_UNAUTHORIZED AUTH failed for DPUB on "payments" """#,
    )
    .await?;
    // Publish permission does not allow SUB.
    let mut c = authed(&b, "secret").await?;
    c.send_raw(b"SUB orders c\n").await?;
    expect_fatal(
        &mut c,
        r#"E_UNAUTHORIZED AUTH failed for SUB on "orders" "c""#,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn publish_needs_a_channel_expression_matching_nothing() -> Result<()> {
    let server = AuthServer::start(grant(3600, ".*", &["^c$"], &["publish"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut c = authed(&b, "secret").await?;
    c.send_raw(&pub_cmd("t", b"m")).await?;
    expect_fatal(&mut c, r#"E_UNAUTHORIZED AUTH failed for PUB on "t" """#).await
}

#[tokio::test]
async fn allowed_and_denied_subscriptions() -> Result<()> {
    let server = AuthServer::start(grant(
        3600,
        "^events$",
        &["^audit", "^ops$"],
        &["subscribe"],
    ))
    .await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut sub = authed(&b, "reader").await?;
    sub.send_raw(b"SUB events audit_1\n").await?;
    sub.expect_response(b"OK").await?;
    rdy_cmd(&mut sub, 1).await?;
    // Another client with publish rights feeds the topic.
    server.set(grant(3600, "^events$", &[".*"], &["publish"]));
    let mut publisher = authed(&b, "writer").await?;
    publisher.send_raw(&pub_cmd("events", b"hello")).await?;
    publisher.expect_response(b"OK").await?;
    let m = sub.expect_message().await?;
    assert_eq!(body(&m), "hello");

    server.set(grant(
        3600,
        "^events$",
        &["^audit", "^ops$"],
        &["subscribe"],
    ));
    let mut c = authed(&b, "reader").await?;
    c.send_raw(b"SUB events opsx\n").await?;
    expect_fatal(
        &mut c,
        r#"E_UNAUTHORIZED AUTH failed for SUB on "events" "opsx""#,
    )
    .await?;
    let mut c = authed(&b, "reader").await?;
    c.send_raw(b"SUB other audit\n").await?;
    expect_fatal(
        &mut c,
        r#"E_UNAUTHORIZED AUTH failed for SUB on "other" "audit""#,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_expired_ttl_asks_again_and_sees_the_new_permissions() -> Result<()> {
    let server = AuthServer::start(grant(1, "^first$", &[".*"], &["publish"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut c = authed(&b, "rotating").await?;
    c.send_raw(&pub_cmd("first", b"1")).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&pub_cmd("second", b"no")).await?;
    expect_fatal(
        &mut c,
        r#"E_UNAUTHORIZED AUTH failed for PUB on "second" """#,
    )
    .await?;
    let mut other = authed(&b, "rotating").await?;

    // The server's answer changes; the cached one holds until the TTL is over.
    server.set(grant(60, "^second$", &[".*"], &["publish"]));
    other.send_raw(&pub_cmd("first", b"2")).await?;
    other.expect_response(b"OK").await?;
    let before = server.requests().len();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    other.send_raw(&pub_cmd("second", b"3")).await?;
    other.expect_response(b"OK").await?;
    assert_eq!(server.requests().len(), before + 1, "one re-query");
    let again = server.requests().last().cloned().context("a request")?;
    assert_eq!(field(&again, "secret").as_deref(), Some("rotating"));
    other.send_raw(&pub_cmd("first", b"4")).await?;
    expect_fatal(
        &mut other,
        r#"E_UNAUTHORIZED AUTH failed for PUB on "first" """#,
    )
    .await?;
    assert_eq!(
        server.requests().len(),
        before + 1,
        "the new answer is cached"
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_re_query_is_auth_failed() -> Result<()> {
    let server = AuthServer::start(grant(1, ".*", &[".*"], &["publish", "subscribe"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut c = authed(&b, "secret").await?;
    c.send_raw(&pub_cmd("t", b"1")).await?;
    c.expect_response(b"OK").await?;
    server.set(Answer::Reply(500, "oops".into()));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.send_raw(b"SUB t c\n").await?;
    expect_fatal(&mut c, "E_AUTH_FAILED AUTH failed").await
}

#[tokio::test]
async fn bad_answers_fail_auth() -> Result<()> {
    let server = AuthServer::start(Answer::Reply(403, r#"{"message":"nope"}"#.into())).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let bad = [
        Answer::Reply(403, r#"{"message":"nope"}"#.into()),
        Answer::Reply(200, "not json".into()),
        grant(60, ".*", &[".*"], &["admin"]),
        grant(60, "(", &[".*"], &["publish"]),
        grant(60, ".*", &["["], &["publish"]),
        grant(0, ".*", &[".*"], &["publish"]),
    ];
    for answer in bad {
        server.set(answer.clone());
        let mut c = b.connect().await?;
        c.send_raw(&sized("AUTH", b"secret")).await?;
        expect_fatal(&mut c, "E_AUTH_FAILED AUTH failed")
            .await
            .with_context(|| format!("{answer:?}"))?;
    }
    server.set(Answer::Reply(
        200,
        json!({"ttl": 60, "identity": "nobody", "authorizations": []}).to_string(),
    ));
    let mut c = b.connect().await?;
    c.send_raw(&sized("AUTH", b"secret")).await?;
    expect_fatal(&mut c, "E_UNAUTHORIZED AUTH no authorizations found").await
}

#[tokio::test]
async fn an_auth_server_that_is_down_fails_auth_quickly() -> Result<()> {
    // A port nobody listens on: connections are refused at once.
    let down = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let b = auth_broker(&[down.to_string()], |_| {}).await?;
    let mut c = b.connect().await?;
    let started = Instant::now();
    c.send_raw(&sized("AUTH", b"secret")).await?;
    expect_fatal(&mut c, "E_AUTH_FAILED AUTH failed").await?;
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // Other clients are not affected.
    let mut other = b.connect().await?;
    other.send_raw(b"NOP\n").await?;
    other.send_raw(&pub_cmd("t", b"m")).await?;
    expect_fatal(&mut other, "E_AUTH_FIRST AUTH required before PUB").await
}

#[tokio::test]
async fn an_auth_server_that_hangs_times_out() -> Result<()> {
    let server = AuthServer::start(Answer::Hang).await?;
    let b = auth_broker(&[server.addr.to_string()], |o| {
        o.http_client_request_timeout = Duration::from_millis(300);
    })
    .await?;
    let mut c = b.connect().await?;
    let started = Instant::now();
    c.send_raw(&sized("AUTH", b"secret")).await?;
    expect_fatal(&mut c, "E_AUTH_FAILED AUTH failed").await?;
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn another_server_answers_when_one_is_down() -> Result<()> {
    let down = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let server = AuthServer::start(grant(60, ".*", &[".*"], &["publish"])).await?;
    let servers = [down.to_string(), format!("http://{}/auth", server.addr)];
    let b = auth_broker(&servers, |_| {}).await?;
    // Whichever server is tried first, every AUTH ends at the one that is up.
    for _ in 0..4 {
        let mut c = authed(&b, "secret").await?;
        c.send_raw(&pub_cmd("t", b"m")).await?;
        c.expect_response(b"OK").await?;
    }
    assert_eq!(server.requests().len(), 4);
    Ok(())
}

#[tokio::test]
async fn post_sends_a_form() -> Result<()> {
    let server = AuthServer::start(grant(60, ".*", &[".*"], &["publish"])).await?;
    let url = format!("http://{}/v1/authorize", server.addr);
    let b = auth_broker(&[url], |o| o.auth_http_request_method = "post".into()).await?;
    let mut c = authed(&b, "form secret").await?;
    c.send_raw(&pub_cmd("t", b"m")).await?;
    c.expect_response(b"OK").await?;
    let requests = server.requests();
    ensure!(requests.len() == 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/v1/authorize");
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        r.body,
        "common_name=&remote_ip=127.0.0.1&secret=form+secret&tls=false"
    );
    Ok(())
}

#[tokio::test]
async fn stats_show_who_authenticated() -> Result<()> {
    let server = AuthServer::start(grant(3600, ".*", &[".*"], &["publish", "subscribe"])).await?;
    let b = auth_broker(&[server.addr.to_string()], |_| {}).await?;
    let mut sub = authed(&b, "secret").await?;
    sub.send_raw(b"SUB t c\n").await?;
    sub.expect_response(b"OK").await?;
    let mut publisher = authed(&b, "secret").await?;
    publisher.send_raw(&pub_cmd("t", b"m")).await?;
    publisher.expect_response(b"OK").await?;

    let stats = b.stats().await?;
    let client = &channel_stats(&stats, "t", "c").context("channel t/c")?["clients"][0];
    assert_eq!(client["authed"], true, "{client}");
    assert_eq!(client["auth_identity"], "alice");
    assert_eq!(client["auth_identity_url"], "http://id.example/alice");
    let producer = &stats["producers"][0];
    assert_eq!(producer["authed"], true, "{producer}");

    // Without auth the three fields are left out, as nsqd's omitempty does.
    let plain = broker().await?;
    let _c = subscribe(&plain, "t", "c", None).await?;
    let stats = plain.stats().await?;
    let client = &channel_stats(&stats, "t", "c").context("channel t/c")?["clients"][0];
    for key in ["authed", "auth_identity", "auth_identity_url"] {
        ensure!(client.get(key).is_none(), "{key} in {client}");
    }
    Ok(())
}

#[tokio::test]
async fn https_auth_servers_need_a_usable_root_ca_file_when_one_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let not_pem = dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "not a certificate\n")?;
    for (ca_file, why) in [
        (dir.path().join("missing.pem"), "missing.pem"),
        (not_pem, "no PEM certificate"),
    ] {
        let servers = ["https://localhost:1/auth".to_string()];
        let err = match auth_broker(&servers, |o| o.tls.tls_root_ca_file = Some(ca_file)).await {
            Ok(_) => bail!("the broker started"),
            Err(e) => e.to_string(),
        };
        ensure!(
            err.contains("--tls-root-ca-file") && err.contains(why),
            "{err}"
        );
    }
    // Only the URL scheme is checked: anything else is no auth server.
    let err = match auth_broker(&["ftp://auth.example/auth".into()], |_| {}).await {
        Ok(_) => bail!("the broker started"),
        Err(e) => e.to_string(),
    };
    ensure!(err.contains("--auth-http-address"), "{err}");
    Ok(())
}

#[tokio::test]
async fn tls_clients_tell_the_auth_server_their_certificate_name() -> Result<()> {
    let server = AuthServer::start(grant(3600, ".*", &[".*"], &["publish"])).await?;
    let ca = tests::certs::TestCa::new()?;
    let cert = ca.server("broker")?;
    let ca_file = ca.ca_file().to_path_buf();
    let b = auth_broker(&[server.addr.to_string()], |o| {
        o.tls.tls_cert = Some(cert.cert.clone());
        o.tls.tls_key = Some(cert.key.clone());
        o.tls.tls_client_auth_policy = Some(broker::config::ClientAuthPolicy::RequireVerify);
        o.tls.tls_root_ca_file = Some(ca_file);
    })
    .await?;
    let identity = ca.client("client", "orders-service")?;
    let mut c = b.connect().await?;
    c.upgrade(
        &json!({"feature_negotiation": true, "tls_v1": true}),
        Some(ca.client_config(Some(&identity))?),
    )
    .await?;
    auth(&mut c, "token").await?;
    let requests = server.requests();
    ensure!(requests.len() == 1, "{requests:?}");
    assert_eq!(field(&requests[0], "tls").as_deref(), Some("true"));
    assert_eq!(
        field(&requests[0], "common_name").as_deref(),
        Some("orders-service")
    );
    Ok(())
}

/// An HTTPS front for an [`AuthServer`]: it ends TLS with a certificate for `localhost` and
/// 127.0.0.1 from `ca` and passes the bytes on, so the server records the requests as ever.
struct HttpsFront {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpsFront {
    async fn start(backend: SocketAddr, ca: &tests::certs::TestCa) -> Result<HttpsFront> {
        let (certs, key) = ca.server("auth")?.load()?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that refuses the certificate ends here.
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Ok(HttpsFront { addr, task })
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/auth", self.addr.port())
    }
}

impl Drop for HttpsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn https_auth_servers_trusted_through_the_root_ca_file_answer() -> Result<()> {
    let ca = tests::certs::TestCa::new()?;
    let server = AuthServer::start(grant(3600, "^orders$", &[".*"], &["publish"])).await?;
    let front = HttpsFront::start(server.addr, &ca).await?;
    let ca_file = ca.ca_file().to_path_buf();
    let b = auth_broker(&[front.url()], |o| o.tls.tls_root_ca_file = Some(ca_file)).await?;
    let mut c = b.connect().await?;
    let answer = auth(&mut c, "s3cret").await?;
    assert_eq!(answer["identity"], "alice");
    c.send_raw(&pub_cmd("orders", b"m")).await?;
    c.expect_response(b"OK").await?;
    // The same request as over http://.
    let requests = server.requests();
    ensure!(requests.len() == 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path(), "/auth");
    assert_eq!(r.content_type, None);
    assert_eq!(field(r, "secret").as_deref(), Some("s3cret"));
    assert_eq!(field(r, "remote_ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(field(r, "tls").as_deref(), Some("false"));
    assert_eq!(field(r, "common_name").as_deref(), Some(""));
    Ok(())
}

#[tokio::test]
async fn an_https_auth_server_with_an_untrusted_certificate_fails_auth_quickly() -> Result<()> {
    let server_ca = tests::certs::TestCa::new()?;
    let trusted_ca = tests::certs::TestCa::new()?;
    let server = AuthServer::start(grant(3600, ".*", &[".*"], &["publish"])).await?;
    let front = HttpsFront::start(server.addr, &server_ca).await?;
    let ca_file = trusted_ca.ca_file().to_path_buf();
    let b = auth_broker(&[front.url()], |o| o.tls.tls_root_ca_file = Some(ca_file)).await?;
    let mut c = b.connect().await?;
    let started = Instant::now();
    c.send_raw(&sized("AUTH", b"secret")).await?;
    expect_fatal(&mut c, "E_AUTH_FAILED AUTH failed").await?;
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    ensure!(server.requests().is_empty(), "{:?}", server.requests());
    Ok(())
}
