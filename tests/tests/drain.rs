//! Draining and handing off, with the real binaries: brokers registered with a lookupd, real
//! NSQ connections. A draining broker refuses publishes, lets consumers take what is left,
//! hands what nobody takes to its peers (IDs, attempts and due times kept), and exits 0 when
//! empty; crashes during a handoff lose nothing.

use anyhow::{Context, Result, bail, ensure};
use proto::wire::{Command, Frame, MessageId, Name};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::lookupd::LookupdProcess;
use tests::{BrokerProcess, NsqConn, WAIT, http_request};

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

/// A broker registered with `lookupd`, with its data in a fresh directory.
fn broker(lookupd: &LookupdProcess, extra: &[&str]) -> Result<BrokerProcess> {
    let mut flags = vec![format!("--lookupd-grpc-address={}", lookupd.grpc_address)];
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    BrokerProcess::start(&flags)
}

/// The same broker again on its data directory (new ports).
fn restart(old: BrokerProcess, lookupd: &LookupdProcess, extra: &[&str]) -> Result<BrokerProcess> {
    let lookupd_flag = format!("--lookupd-grpc-address={}", lookupd.grpc_address);
    let mut flags = vec![lookupd_flag.as_str()];
    flags.extend_from_slice(extra);
    old.restart_on_new_ports(&flags)
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<tests::HttpResponse> {
    http_request(addr, method, path, body).await
}

async fn post_ok(addr: SocketAddr, path: &str) -> Result<()> {
    let resp = http(addr, "POST", path, b"").await?;
    ensure!(
        resp.status == 200,
        "{path}: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

async fn drain_state(addr: SocketAddr) -> Result<serde_json::Value> {
    http(addr, "GET", "/drain", b"").await?.json()
}

/// Waits for a broker registered with the lookupd to show in its `/nodes`.
async fn registered(lookupd: &LookupdProcess, brokers: usize) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let nodes = http(lookupd.http_address, "GET", "/nodes", b"")
            .await?
            .json()?;
        let count = nodes["producers"].as_array().map_or(0, Vec::len);
        if count >= brokers {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{count} of {brokers} brokers registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn numbered(prefix: &str, i: usize) -> Vec<u8> {
    format!("{prefix}-{i:06}").into_bytes()
}

async fn publish(addr: SocketAddr, topic: &str, bodies: &[Vec<u8>]) -> Result<()> {
    let mut p = NsqConn::connect(addr).await?;
    for chunk in bodies.chunks(200) {
        p.send(&Command::Mpub {
            topic: name(topic),
            bodies: chunk.iter().map(|b| b.clone().into()).collect(),
        })
        .await?;
        p.expect_response(b"OK").await?;
    }
    Ok(())
}

/// What a consumer got: per body, the IDs and attempts of its deliveries.
type Got = BTreeMap<Vec<u8>, Vec<(MessageId, u16)>>;

/// Consumes channel `channel` of `topic` (FINishing everything) until `quiet` passes with
/// nothing.
async fn consume(addr: SocketAddr, topic: &str, channel: &str, quiet: Duration) -> Result<Got> {
    let mut c = NsqConn::connect(addr).await?;
    c.identify(&serde_json::json!({"output_buffer_timeout": 25}))
        .await?;
    c.subscribe(topic, channel).await?;
    c.send(&Command::Rdy(500)).await?;
    let mut got = Got::new();
    loop {
        match c.next_frame_within(quiet).await {
            Ok(Frame::Message(m)) => {
                got.entry(m.body.to_vec())
                    .or_default()
                    .push((m.id, m.attempts));
                c.send(&Command::Fin(m.id)).await?;
            }
            Ok(Frame::Response(r)) if &r[..] == proto::wire::HEARTBEAT => {
                c.send(&Command::Nop).await?;
            }
            Ok(other) => bail!("consumer got {other:?}"),
            Err(e) if e.to_string().starts_with("no frame") => return Ok(got),
            Err(e) => return Err(e),
        }
    }
}

async fn channel_stats(addr: SocketAddr, topic: &str, channel: &str) -> Result<serde_json::Value> {
    let stats = http(
        addr,
        "GET",
        &format!("/stats?format=json&topic={topic}&channel={channel}"),
        b"",
    )
    .await?
    .json()?;
    Ok(stats["topics"][0]["channels"][0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_live_consumers_delivers_everything_once_and_exits_0() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let mut a = broker(&lookupd, &["--drain-timeout=30s"])?;
    let b = broker(&lookupd, &[])?;
    registered(&lookupd, 2).await?;
    let bodies: Vec<Vec<u8>> = (0..300).map(|i| numbered("live", i)).collect();
    // A producer connection that stays open across the drain.
    let mut producer = NsqConn::connect(a.tcp_address).await?;
    producer
        .send(&Command::Pub {
            topic: name("t"),
            body: "first".into(),
        })
        .await?;
    producer.expect_response(b"OK").await?;
    publish(a.tcp_address, "t", &bodies).await?;
    // A consumer taking its time: RDY 1, so most messages are still queued at the drain.
    let mut consumer = NsqConn::connect(a.tcp_address).await?;
    consumer
        .identify(&serde_json::json!({"output_buffer_timeout": 25}))
        .await?;
    consumer.subscribe("t", "c").await?;
    consumer.send(&Command::Rdy(1)).await?;
    let first = consumer.expect_message().await?;

    let resp = http(a.http_address, "PUT", "/config/drain", b"true").await?;
    ensure!(
        resp.status == 200 && resp.text() == "true",
        "{} {}",
        resp.status,
        resp.text()
    );
    // Readiness goes; liveness and health stay.
    ensure!(http(a.http_address, "GET", "/readyz", b"").await?.status == 503);
    ensure!(http(a.http_address, "GET", "/livez", b"").await?.status == 200);
    ensure!(http(a.http_address, "GET", "/ping", b"").await?.body == b"OK");
    let stats = http(a.http_address, "GET", "/stats?format=json", b"")
        .await?
        .json()?;
    ensure!(stats["drain"]["state"] == "draining", "{}", stats["drain"]);
    let info = http(a.http_address, "GET", "/info", b"").await?.json()?;
    ensure!(info["draining"] == true, "{info}");
    let text = http(a.http_address, "GET", "/stats", b"").await?.text();
    ensure!(text.contains("Draining: draining"), "{text}");
    let metrics = http(a.http_address, "GET", "/metrics", b"").await?.text();
    ensure!(metrics.contains("knsq_draining 1"), "no knsq_draining 1");

    // The idle producer connection was sent away; a new publish is refused, saying why.
    ensure!(
        producer.expect_closed().await.is_ok(),
        "the producer connection stayed open"
    );
    let mut late = NsqConn::connect(a.tcp_address).await?;
    late.send(&Command::Pub {
        topic: name("t"),
        body: "late".into(),
    })
    .await?;
    late.expect_error("E_PUB_FAILED PUB failed draining")
        .await?;
    let resp = http(a.http_address, "POST", "/pub?topic=t", b"late").await?;
    ensure!(
        resp.status == 503 && resp.text().contains("DRAINING"),
        "{}",
        resp.text()
    );
    let resp = http(a.http_address, "POST", "/topic/create?topic=new", b"").await?;
    ensure!(
        resp.status == 503,
        "a new topic while draining: {}",
        resp.text()
    );
    // … and the producer goes to the other broker.
    publish(b.tcp_address, "t", &[b"elsewhere".to_vec()]).await?;

    // The consumer takes everything left, each once.
    consumer.send(&Command::Fin(first.id)).await?;
    consumer.send(&Command::Rdy(100)).await?;
    let mut seen = HashSet::from([first.body.to_vec()]);
    while seen.len() < bodies.len() + 1 {
        let m = consumer.expect_message().await?;
        ensure!(
            seen.insert(m.body.to_vec()),
            "delivered twice: {:?}",
            m.body
        );
        consumer.send(&Command::Fin(m.id)).await?;
    }
    let status = a.wait_exit(Duration::from_secs(15))?;
    ensure!(status.success(), "the drained broker exited with {status}");
    let lookup = http(lookupd.http_address, "GET", "/lookup?topic=t", b"")
        .await?
        .json()?;
    ensure!(
        lookup["producers"].as_array().map_or(0, Vec::len) == 1,
        "the drained broker is still registered: {lookup}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_nobody_consumes_are_handed_off_with_ids_attempts_and_due_times() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let mut a = broker(&lookupd, &["--mem-queue-size=20"])?;
    let b = broker(&lookupd, &[])?;
    registered(&lookupd, 2).await?;
    // A channel without a consumer: 50 messages (30 of them on disk), 5 of them tried once.
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c1").await?;
    let bodies: Vec<Vec<u8>> = (0..50).map(|i| numbered("c1", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    let mut tried = BTreeMap::new();
    {
        let mut c = NsqConn::connect(a.tcp_address).await?;
        c.identify(&serde_json::json!({})).await?;
        c.subscribe("t", "c1").await?;
        c.send(&Command::Rdy(5)).await?;
        for _ in 0..5 {
            let m = c.expect_message().await?;
            tried.insert(m.body.to_vec(), m.id);
        }
        // Back to the queue, and not delivered again here.
        c.send(&Command::Rdy(0)).await?;
        for id in tried.values() {
            c.send(&Command::Req {
                id: *id,
                timeout_ms: 0,
            })
            .await?;
        }
        c.send(&Command::Cls).await?;
        c.expect_response(b"CLOSE_WAIT").await?;
    }
    // Deferred messages, due in four seconds.
    let mut p = NsqConn::connect(a.tcp_address).await?;
    for i in 0..3 {
        p.send(&Command::Dpub {
            topic: name("t"),
            defer_ms: 4000,
            body: numbered("later", i).into(),
        })
        .await?;
        p.expect_response(b"OK").await?;
    }
    let due = Instant::now() + Duration::from_millis(4000);
    // A topic without channels.
    let lonely: Vec<Vec<u8>> = (0..20).map(|i| numbered("lonely", i)).collect();
    publish(a.tcp_address, "t2", &lonely).await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // the consumer has left

    let before = channel_stats(a.http_address, "t", "c1").await?;
    ensure!(before["depth"] == 50, "{before}");
    let resp = http(a.http_address, "POST", "/drain", b"").await?.json()?;
    ensure!(resp["draining"] == true, "{resp}");
    let status = a.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "exited with {status}");

    let handed = channel_stats(b.http_address, "t", "c1").await?;
    ensure!(
        handed["depth"].as_i64().unwrap_or(0) + handed["deferred_count"].as_i64().unwrap_or(0)
            >= 50,
        "{handed}"
    );
    let got = consume(b.tcp_address, "t", "c1", Duration::from_secs(1)).await?;
    for body in &bodies {
        let deliveries = got
            .get(body)
            .with_context(|| format!("{:?} not handed off", String::from_utf8_lossy(body)))?;
        ensure!(
            deliveries.len() == 1,
            "{:?} delivered {} times",
            body,
            deliveries.len()
        );
        if let Some(id) = tried.get(body) {
            ensure!(deliveries[0].0 == *id, "the ID changed");
            ensure!(
                deliveries[0].1 == 2,
                "attempts {} after one try",
                deliveries[0].1
            );
        }
    }
    ensure!(
        Instant::now() < due,
        "the handoff took too long to check the due time"
    );
    // The deferred ones come at their time, not before.
    let late = consume(b.tcp_address, "t", "c1", Duration::from_secs(6)).await?;
    ensure!(Instant::now() + Duration::from_millis(100) >= due);
    ensure!(late.len() == 3, "{} deferred messages", late.len());
    // The topic's own queue went to the peer's topic, for channels made there.
    let got = consume(b.tcp_address, "t2", "late-channel", Duration::from_secs(1)).await?;
    ensure!(got.len() == 20, "{} of the topic's 20 messages", got.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_without_peers_is_blocked_says_why_and_finishes_when_one_comes() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let mut a = broker(&lookupd, &[])?;
    registered(&lookupd, 1).await?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    let bodies: Vec<Vec<u8>> = (0..100).map(|i| numbered("wait", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    post_ok(a.http_address, "/drain").await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let state = drain_state(a.http_address).await?;
        if state["state"] == "blocked" {
            let reason = state["reason"].as_str().unwrap_or_default();
            ensure!(reason.contains("no peer"), "{reason}");
            ensure!(state["remaining_messages"] == 100, "{state}");
            break;
        }
        ensure!(Instant::now() < deadline, "not blocked: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing was deleted meanwhile; a peer arrives and takes everything.
    ensure!(channel_stats(a.http_address, "t", "c").await?["depth"] == 100);
    let b = broker(&lookupd, &[])?;
    let status = a.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "exited with {status}");
    let got = consume(b.tcp_address, "t", "c", Duration::from_secs(1)).await?;
    ensure!(got.len() == 100, "{} of 100", got.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_messages_are_handed_off_in_bounded_memory() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let mut a = broker(&lookupd, &["--mem-queue-size=90000"])?;
    let b = broker(&lookupd, &[])?;
    registered(&lookupd, 2).await?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    let mut body = vec![b'x'; 200];
    let bodies: Vec<Vec<u8>> = (0..100_000)
        .map(|i| {
            body[..12].copy_from_slice(format!("{i:012}").as_bytes());
            body.clone()
        })
        .collect();
    publish(a.tcp_address, "t", &bodies).await?;
    let stats = channel_stats(a.http_address, "t", "c").await?;
    ensure!(stats["backend_depth"] == 10_000, "{stats}");
    let before = a.rss()?;
    let started = Instant::now();
    post_ok(a.http_address, "/drain").await?;
    let mut peak = before;
    while a.wait_exit(Duration::from_millis(20)).is_err() {
        peak = peak.max(a.rss().unwrap_or(0));
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "not done in 120 s"
        );
    }
    let took = started.elapsed();
    let stats = channel_stats(b.http_address, "t", "c").await?;
    ensure!(stats["depth"] == 100_000, "{stats}");
    eprintln!(
        "handed off 100,000 messages (10,000 on disk) in {took:?}: {:.0} msgs/s; RSS {} MB before, {} MB peak",
        100_000.0 / took.as_secs_f64(),
        before >> 20,
        peak >> 20
    );
    // Bounded: the handoff adds a few batches at most, not a copy of the queue.
    ensure!(
        peak <= before + (64 << 20),
        "RSS went from {before} to {peak}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_brokers_data_directory_is_handed_off_offline() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let mut a = broker(&lookupd, &["--mem-queue-size=10"])?;
    let b = broker(&lookupd, &[])?;
    registered(&lookupd, 2).await?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    let bodies: Vec<Vec<u8>> = (0..500).map(|i| numbered("offline", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    a.signal("TERM")?;
    ensure!(a.wait_exit(WAIT)?.success());
    let data = a.data.take().context("data dir")?;
    let out = std::process::Command::new(tests::binary_path("knsq-broker"))
        .arg("handoff")
        .arg(format!("--data-path={}", data.path().display()))
        .arg(format!("--lookupd-grpc-address={}", lookupd.grpc_address))
        .output()?;
    ensure!(
        out.status.success(),
        "handoff failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<String> = std::fs::read_dir(data.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(left.is_empty(), "left in the data directory: {left:?}");
    let got = consume(b.tcp_address, "t", "c", Duration::from_secs(1)).await?;
    ensure!(got.len() == 500, "{} of 500", got.len());
    Ok(())
}

/// Publishes `count` messages to `t:c` on a broker with no consumer, starts the drain, kills
/// `victim` (0: the sender, 1: the receiver) once some batches went over, restarts it, and
/// returns what the receiver's consumer got in the end.
async fn crash_during_handoff(victim: usize) -> Result<(usize, Got)> {
    let lookupd = LookupdProcess::start(&[])?;
    let flags = ["--mem-queue-size=0", "--sync-publish"];
    let mut a = broker(&lookupd, &flags)?;
    let mut b = broker(&lookupd, &flags)?;
    registered(&lookupd, 2).await?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    let count = 30_000;
    let bodies: Vec<Vec<u8>> = (0..count).map(|i| numbered("crash", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    post_ok(a.http_address, "/drain").await?;
    // Kill once a few batches were stored on the receiver.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let depth = channel_stats(b.http_address, "t", "c").await?["depth"]
            .as_i64()
            .unwrap_or(0);
        if depth >= 2000 {
            break;
        }
        ensure!(Instant::now() < deadline, "the handoff did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if victim == 0 {
        a.signal("KILL")?;
        a.wait_exit(WAIT)?;
        // The restarted sender drains again at once.
        let mut args: Vec<&str> = flags.to_vec();
        args.push("--sigterm=drain");
        let mut a = restart(a, &lookupd, &args)?;
        post_ok(a.http_address, "/drain").await?;
        ensure!(a.wait_exit(Duration::from_secs(60))?.success());
    } else {
        b.signal("KILL")?;
        b.wait_exit(WAIT)?;
        // The sender is blocked (no other peer) until the receiver is back.
        b = restart(b, &lookupd, &flags)?;
        ensure!(a.wait_exit(Duration::from_secs(60))?.success());
    }
    let got = consume(b.tcp_address, "t", "c", Duration::from_secs(2)).await?;
    Ok((count, got))
}

fn check_nothing_lost(count: usize, got: &Got, who: &str) -> Result<()> {
    let missing = (0..count)
        .filter(|&i| !got.contains_key(&numbered("crash", i)))
        .count();
    let duplicates: usize = got.values().map(|d| d.len() - 1).sum();
    eprintln!(
        "SIGKILL of the {who} during a handoff of {count}: {missing} lost, {duplicates} duplicates"
    );
    ensure!(missing == 0, "{missing} messages lost");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_during_a_handoff_loses_nothing() -> Result<()> {
    let (count, got) = crash_during_handoff(0).await?;
    check_nothing_lost(count, &got, "sender")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_during_a_handoff_loses_nothing() -> Result<()> {
    let (count, got) = crash_during_handoff(1).await?;
    check_nothing_lost(count, &got, "receiver")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_handoff_batch_is_refused_and_nothing_stored() -> Result<()> {
    use proto::cluster::v1::handoff_client::HandoffClient;
    use proto::cluster::v1::{HandedMessage, HandoffBatch};
    let mut b = BrokerProcess::start(&[])?;
    let handoff = b.wait_for_address("handoff: listening on ")?;
    let address = format!("http://127.0.0.1:{}", handoff.port());
    let channel = tonic::transport::Endpoint::from_shared(address)?
        .connect()
        .await?;
    let mut client = HandoffClient::new(channel);
    let bad = HandoffBatch {
        sequence: 1,
        sender: "test".into(),
        topic: "t".into(),
        channel: "c".into(),
        messages: vec![HandedMessage {
            id: vec![1, 2, 3].into(),
            timestamp: 0,
            attempts: 0,
            due_unix_ms: 0,
            body: b"x".to_vec().into(),
            dead_letter: false,
        }],
    };
    let mut acks = client
        .transfer(tokio_stream::iter(vec![bad]))
        .await?
        .into_inner();
    match acks.message().await {
        Err(status) => ensure!(
            status.code() == tonic::Code::InvalidArgument && status.message().contains("16"),
            "{status}"
        ),
        Ok(other) => bail!("a malformed batch was answered {other:?}"),
    }
    let stats = http(b.http_address, "GET", "/stats?format=json", b"")
        .await?
        .json()?;
    ensure!(
        stats["topics"].as_array().is_none_or(Vec::is_empty),
        "{stats}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_goes_lame_duck_then_drains_with_sigterm_drain() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let mut a = broker(&lookupd, &["--sigterm=drain", "--shutdown-delay=1s"])?;
    let b = broker(&lookupd, &[])?;
    registered(&lookupd, 2).await?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    ensure!(http(a.http_address, "GET", "/readyz", b"").await?.status == 200);
    a.signal("TERM")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Not ready at once, but still serving during the delay.
    let ready = http(a.http_address, "GET", "/readyz", b"").await?;
    ensure!(
        ready.status == 503 && ready.text() == "NOT READY - stopping",
        "{}",
        ready.text()
    );
    let bodies: Vec<Vec<u8>> = (0..10).map(|i| numbered("lame", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    ensure!(drain_state(a.http_address).await?["draining"] == false);
    // Then it drains, hands the messages off and exits 0.
    ensure!(a.wait_exit(Duration::from_secs(20))?.success());
    let got = consume(b.tcp_address, "t", "c", Duration::from_secs(1)).await?;
    ensure!(got.len() == 10, "{} of 10", got.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_goes_over_mutual_tls_to_listed_peers() -> Result<()> {
    let ca = tests::certs::TestCa::new()?;
    let server = ca.server("localhost")?;
    let client = ca.client("sender", "broker-a")?;
    let mut b = BrokerProcess::start(&[
        &format!("--handoff-tls-cert={}", server.cert.display()),
        &format!("--handoff-tls-key={}", server.key.display()),
        &format!("--handoff-tls-client-ca-file={}", ca.ca_file().display()),
    ])?;
    let port = b.wait_for_address("handoff: listening on ")?.port();
    let mut a = BrokerProcess::start(&[
        &format!("--handoff-peer=127.0.0.1:{port}"),
        &format!("--lookupd-tls-root-ca-file={}", ca.ca_file().display()),
        &format!("--lookupd-tls-cert={}", client.cert.display()),
        &format!("--lookupd-tls-key={}", client.key.display()),
        "--lookupd-tls-server-name=localhost",
    ])?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    let bodies: Vec<Vec<u8>> = (0..100).map(|i| numbered("tls", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    post_ok(a.http_address, "/drain").await?;
    ensure!(a.wait_exit(Duration::from_secs(20))?.success());
    let got = consume(b.tcp_address, "t", "c", Duration::from_secs(1)).await?;
    ensure!(got.len() == 100, "{} of 100", got.len());
    // A sender without a client certificate is refused by the same peer.
    let mut c = BrokerProcess::start(&[
        &format!("--handoff-peer=127.0.0.1:{port}"),
        &format!("--lookupd-tls-root-ca-file={}", ca.ca_file().display()),
        "--lookupd-tls-server-name=localhost",
    ])?;
    post_ok(c.http_address, "/topic/create?topic=t").await?;
    post_ok(c.http_address, "/channel/create?topic=t&channel=c").await?;
    publish(c.tcp_address, "t", &bodies[..1]).await?;
    post_ok(c.http_address, "/drain").await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let state = drain_state(c.http_address).await?;
        if state["state"] == "blocked" {
            break;
        }
        ensure!(Instant::now() < deadline, "not blocked: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        c.wait_exit(Duration::from_millis(100)).is_err(),
        "exited without handing off"
    );
    b.signal("TERM")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_topic_is_handed_off_after_the_drain_timeout() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let mut a = broker(&lookupd, &["--drain-timeout=1s"])?;
    let b = broker(&lookupd, &[])?;
    registered(&lookupd, 2).await?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    post_ok(a.http_address, "/topic/pause?topic=t").await?;
    let bodies: Vec<Vec<u8>> = (0..30).map(|i| numbered("paused", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    post_ok(a.http_address, "/drain").await?;
    ensure!(a.wait_exit(Duration::from_secs(20))?.success());
    // The peer's topic got them, for its channels.
    let got = consume(b.tcp_address, "t", "c", Duration::from_secs(1)).await?;
    ensure!(got.len() == 30, "{} of 30", got.len());
    Ok(())
}

/// SIGTERM while a batch is out with a peer that never answers: the shutdown puts the batch
/// back and persists it, so the broker restarted on its data directory still has every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_handoff_keeps_the_batch_out_with_the_peer() -> Result<()> {
    // A peer that accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = silent.local_addr()?.port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().flatten() {
            held.push(conn);
        }
    });
    let mut a = BrokerProcess::start(&[&format!("--handoff-peer=127.0.0.1:{port}")])?;
    post_ok(a.http_address, "/topic/create?topic=t").await?;
    post_ok(a.http_address, "/channel/create?topic=t&channel=c").await?;
    let bodies: Vec<Vec<u8>> = (0..100).map(|i| numbered("held", i)).collect();
    publish(a.tcp_address, "t", &bodies).await?;
    post_ok(a.http_address, "/drain").await?;
    // The batch is out, waiting for an ack that never comes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.signal("TERM")?;
    let status = a.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "exited with {status}");
    let b = a.restart_on_new_ports(&[])?;
    let depth = channel_stats(b.http_address, "t", "c").await?["depth"].clone();
    ensure!(depth == 100, "depth {depth} after the restart");
    Ok(())
}
