//! knsq's `/metrics` as a real Prometheus server stores it, and as `promtool check metrics`
//! judges it.
//!
//! Needs `prometheus` and `promtool` on `PATH` (`scripts/install-prometheus.sh`). Without them
//! the tests fail when `CI` is set and are skipped, saying so, otherwise.

use anyhow::{Result, bail, ensure};
use bytes::Bytes;
use proto::wire::{Command, Frame, Name};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tests::prometheus::{PrometheusServer, promtool_check, tools};
use tests::{NsqConn, TestBroker, WAIT};

/// How long Prometheus may take to start and scrape the broker for the first time.
const SCRAPED_WITHIN: Duration = Duration::from_secs(20);

async fn metrics_body(b: &TestBroker) -> Result<Vec<u8>> {
    let resp = b.http("GET", "/metrics", b"").await?;
    ensure!(resp.status == 200, "/metrics answered {}", resp.status);
    let ct = resp.header("content-type").unwrap_or_default();
    ensure!(
        ct.starts_with("text/plain; version=0.0.4"),
        "content-type {ct:?}"
    );
    Ok(resp.body)
}

fn name(text: &str) -> Name {
    Name::new(text).unwrap_or_else(|| panic!("{text:?} is not a valid name"))
}

async fn post(b: &TestBroker, path: &str, body: &[u8]) -> Result<()> {
    let resp = b.http("POST", path, body).await?;
    ensure!(
        resp.status == 200,
        "POST {path}: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

async fn identified(b: &TestBroker, identify: Value) -> Result<NsqConn> {
    let mut conn = b.connect().await?;
    match conn.identify(&identify).await? {
        Frame::Response(r) if &r[..] == b"OK" => Ok(conn),
        other => bail!("IDENTIFY answered {other:?}"),
    }
}

async fn subscriber(
    b: &TestBroker,
    topic: &str,
    channel: &str,
    identify: Value,
) -> Result<NsqConn> {
    let mut conn = identified(b, identify).await?;
    conn.subscribe(topic, channel).await?;
    Ok(conn)
}

/// Polls the broker's `/stats` until `ready` holds.
async fn settled(b: &TestBroker, what: &str, ready: impl Fn(&Value) -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = b.stats().await?;
        if ready(&s) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the broker never showed {what}: {s:#}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One FIN recorded, where e2e latency is tracked at all.
fn e2e_sampled(e2e: &Value) -> bool {
    e2e["percentiles"].is_null() || e2e["count"] == 1
}

fn channel_field(s: &Value, topic: &str, channel: &str, key: &str) -> Value {
    s["topics"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["topic_name"] == topic))
        .and_then(|t| t["channels"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["channel_name"] == channel))
        .map_or(Value::Null, |c| c[key].clone())
}

/// Known traffic: topic `orders` (6 messages) with channels `work` (one consumer that FINs,
/// requeues now and later, and holds one), `slow` (one consumer whose message timed out) and
/// `audit` (paused, no consumer); topic `idle` (2 messages, paused, no channel). Returns the
/// connections, which must stay open.
async fn traffic(b: &TestBroker) -> Result<Vec<NsqConn>> {
    post(b, "/topic/create?topic=orders", b"").await?;
    for c in ["work", "slow", "audit"] {
        post(b, &format!("/channel/create?topic=orders&channel={c}"), b"").await?;
    }
    post(b, "/channel/pause?topic=orders&channel=audit", b"").await?;
    let mut producer = identified(b, json!({"client_id": "producer"})).await?;
    for i in 0..5 {
        producer
            .send(&Command::Pub {
                topic: name("orders"),
                body: Bytes::from(format!("message-{i}")),
            })
            .await?;
        producer.expect_response(b"OK").await?;
    }
    post(b, "/pub?topic=orders", b"http").await?;
    post(b, "/mpub?topic=idle", b"a\nb").await?;
    post(b, "/topic/pause?topic=idle", b"").await?;

    let mut work = subscriber(b, "orders", "work", json!({"client_id": "work"})).await?;
    work.send(&Command::Rdy(4)).await?;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(work.expect_message().await?);
    }
    work.send(&Command::Rdy(0)).await?;
    work.send(&Command::Fin(got[0].id)).await?;
    work.send(&Command::Req {
        id: got[1].id,
        timeout_ms: 0,
    })
    .await?;
    work.send(&Command::Req {
        id: got[2].id,
        timeout_ms: 60_000,
    })
    .await?;

    let mut slow = subscriber(
        b,
        "orders",
        "slow",
        json!({"client_id": "slow", "msg_timeout": 1000}),
    )
    .await?;
    slow.send(&Command::Rdy(1)).await?;
    slow.expect_message().await?;
    slow.send(&Command::Rdy(0)).await?;

    settled(b, "the FIN, REQs and timeout", |s| {
        channel_field(s, "orders", "work", "requeue_count") == 2
            && channel_field(s, "orders", "work", "in_flight_count") == 1
            && e2e_sampled(&channel_field(
                s,
                "orders",
                "work",
                "e2e_processing_latency",
            ))
            && channel_field(s, "orders", "slow", "timeout_count") == 1
    })
    .await?;
    Ok(vec![producer, work, slow])
}

#[tokio::test]
async fn prometheus_scrapes_and_stores_the_broker_metrics() -> Result<()> {
    let Some(tools) = tools() else {
        return Ok(());
    };
    let b = TestBroker::start(|o| o.e2e_processing_latency_percentiles = vec![0.99, 0.5]).await?;
    let conns = traffic(&b).await?;
    let prom = PrometheusServer::start(&tools.prometheus, b.http_address())?;

    // Wait for the first scrape of everything above.
    let deadline = tokio::time::Instant::now() + SCRAPED_WITHIN;
    let messages = loop {
        let got = prom.query("nsq_topic_messages_total").await;
        if let Ok(series) = &got
            && series.len() == 2
        {
            break series.clone();
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "Prometheus did not store nsq_topic_messages_total within {SCRAPED_WITHIN:?} \
                 (last answer {got:?}); its log:\n{}",
                prom.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let by_topic: BTreeMap<&str, f64> = messages
        .iter()
        .map(|(l, v)| (l.get("topic").map_or("", String::as_str), *v))
        .collect();
    ensure!(
        by_topic == BTreeMap::from([("idle", 2.0), ("orders", 6.0)]),
        "nsq_topic_messages_total {messages:?}"
    );

    ensure!(
        prom.value(r#"up{job="knsq"}"#).await? == 1.0,
        "target not up"
    );
    let bytes = (5 * "message-0".len() + "http".len()) as f64;
    for (promql, want) in [
        (r#"nsq_topic_message_bytes_total{topic="orders"}"#, bytes),
        (r#"nsq_topic_message_bytes_total{topic="idle"}"#, 2.0),
        (r#"nsq_topic_depth{topic="orders"}"#, 0.0),
        (r#"nsq_topic_depth{topic="idle"}"#, 2.0),
        (r#"nsq_topic_backend_depth{topic="orders"}"#, 0.0),
        (r#"nsq_topic_paused{topic="orders"}"#, 0.0),
        (r#"nsq_topic_paused{topic="idle"}"#, 1.0),
        // work: message-4, http and message-1 (REQ 0) queued, message-3 held,
        // message-2 deferred (REQ 60 s).
        (r#"nsq_channel_depth{topic="orders",channel="work"}"#, 3.0),
        (
            r#"nsq_channel_in_flight{topic="orders",channel="work"}"#,
            1.0,
        ),
        (
            r#"nsq_channel_deferred{topic="orders",channel="work"}"#,
            1.0,
        ),
        (
            r#"nsq_channel_messages_total{topic="orders",channel="work"}"#,
            6.0,
        ),
        (
            r#"nsq_channel_requeued_total{topic="orders",channel="work"}"#,
            2.0,
        ),
        (
            r#"nsq_channel_timed_out_total{topic="orders",channel="work"}"#,
            0.0,
        ),
        (r#"nsq_channel_clients{topic="orders",channel="work"}"#, 1.0),
        (r#"nsq_channel_paused{topic="orders",channel="work"}"#, 0.0),
        (
            r#"nsq_channel_backend_depth{topic="orders",channel="work"}"#,
            0.0,
        ),
        // slow: its one delivery timed out and went back to the queue.
        (r#"nsq_channel_depth{topic="orders",channel="slow"}"#, 6.0),
        (
            r#"nsq_channel_in_flight{topic="orders",channel="slow"}"#,
            0.0,
        ),
        (
            r#"nsq_channel_timed_out_total{topic="orders",channel="slow"}"#,
            1.0,
        ),
        (
            r#"nsq_channel_requeued_total{topic="orders",channel="slow"}"#,
            0.0,
        ),
        (r#"nsq_channel_clients{topic="orders",channel="slow"}"#, 1.0),
        // audit: paused, nobody reading.
        (r#"nsq_channel_depth{topic="orders",channel="audit"}"#, 6.0),
        (
            r#"nsq_channel_messages_total{topic="orders",channel="audit"}"#,
            6.0,
        ),
        (
            r#"nsq_channel_clients{topic="orders",channel="audit"}"#,
            0.0,
        ),
        (r#"nsq_channel_paused{topic="orders",channel="audit"}"#, 1.0),
        // producer, work and slow.
        ("knsq_tcp_connections", 3.0),
        ("knsq_tcp_connections_total", 3.0),
        (r#"knsq_build_info{nsqd_version="1.3.0"}"#, 1.0),
    ] {
        let got = prom.value(promql).await?;
        ensure!(got == want, "{promql} = {got}, want {want}");
    }
    ensure!(
        prom.query(r#"nsq_channel_depth{topic="idle"}"#)
            .await?
            .is_empty(),
        "a topic without channels has no channel series"
    );
    let rss = prom.value("process_resident_memory_bytes").await?;
    ensure!(rss > 0.0, "process_resident_memory_bytes = {rss}");

    // One FIN on work: a small positive latency at each configured quantile.
    for scope in [r#"topic="orders""#, r#"topic="orders",channel="work""#] {
        let metric = if scope.contains("channel") {
            "nsq_channel_e2e_processing_latency_seconds"
        } else {
            "nsq_topic_e2e_processing_latency_seconds"
        };
        let series = prom.query(&format!("{metric}{{{scope}}}")).await?;
        let quantiles: Vec<&str> = series
            .iter()
            .filter_map(|(l, _)| l.get("quantile").map(String::as_str))
            .collect();
        ensure!(
            quantiles.len() == 2 && quantiles.contains(&"0.99") && quantiles.contains(&"0.5"),
            "{metric}{{{scope}}}: {series:?}"
        );
        for (labels, seconds) in &series {
            ensure!(
                *seconds > 0.0 && *seconds < 10.0,
                "{metric} {labels:?} = {seconds}"
            );
        }
    }

    // What Prometheus recorded from the TYPE lines.
    for (metric, kind) in [
        ("nsq_topic_messages_total", "counter"),
        ("nsq_topic_message_bytes_total", "counter"),
        ("nsq_channel_messages_total", "counter"),
        ("nsq_channel_requeued_total", "counter"),
        ("nsq_channel_timed_out_total", "counter"),
        ("knsq_tcp_connections_total", "counter"),
        ("nsq_topic_depth", "gauge"),
        ("nsq_channel_depth", "gauge"),
        ("nsq_channel_in_flight", "gauge"),
        ("nsq_channel_paused", "gauge"),
        ("knsq_tcp_connections", "gauge"),
    ] {
        let got = prom.metric_type(metric).await?;
        ensure!(got == kind, "{metric} is a {got}, want {kind}");
    }

    // A later change shows up in the next scrapes.
    post(&b, "/pub?topic=idle", b"c").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while prom
        .value(r#"nsq_topic_messages_total{topic="idle"}"#)
        .await?
        != 3.0
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "a new publish never reached Prometheus"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    drop(prom);
    drop(conns);
    b.stop().await
}

#[tokio::test]
async fn promtool_accepts_the_metrics() -> Result<()> {
    let Some(tools) = tools() else {
        return Ok(());
    };
    let b = TestBroker::start(|_| {}).await?;
    // Before any topic, then with every kind of series present.
    let (code, said) = promtool_check(&tools.promtool, &metrics_body(&b).await?)?;
    ensure!(
        code == 0 && said.trim().is_empty(),
        "promtool exit {code}: {said}"
    );
    let conns = traffic(&b).await?;
    let body = metrics_body(&b).await?;
    let (code, said) = promtool_check(&tools.promtool, &body)?;
    ensure!(
        code == 0 && said.trim().is_empty(),
        "promtool exit {code}: {said}\n{}",
        String::from_utf8_lossy(&body)
    );
    drop(conns);
    b.stop().await
}

/// The e2e latency gauges carry a `quantile` label, which Prometheus reserves for summaries.
#[tokio::test]
async fn promtool_accepts_the_e2e_latency_metrics() -> Result<()> {
    let Some(tools) = tools() else {
        return Ok(());
    };
    let b = TestBroker::start(|o| o.e2e_processing_latency_percentiles = vec![0.99, 0.5]).await?;
    let conns = traffic(&b).await?;
    let body = metrics_body(&b).await?;
    let (code, said) = promtool_check(&tools.promtool, &body)?;
    ensure!(
        code == 0 && said.trim().is_empty(),
        "promtool exit {code}: {said}"
    );
    drop(conns);
    b.stop().await
}
