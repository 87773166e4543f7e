//! Restarts and crashes of the real `knsq-broker` binary: what was acknowledged is never lost.

use anyhow::{Result, ensure};
use proto::wire::{Command, Name};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tests::{BrokerProcess, NsqConn, WAIT, http_request};

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

async fn consumer(addr: std::net::SocketAddr, rdy: u64) -> Result<NsqConn> {
    let mut c = NsqConn::connect(addr).await?;
    c.identify(&serde_json::json!({})).await?;
    c.send(&Command::Sub {
        topic: name("t"),
        channel: name("c"),
    })
    .await?;
    c.expect_response(b"OK").await?;
    c.send(&Command::Rdy(rdy)).await?;
    Ok(c)
}

/// Receives until `wanted` distinct bodies arrived (FINishing each), or fails after WAIT of
/// silence; returns how many deliveries it took.
async fn drain(c: &mut NsqConn, wanted: &HashSet<Vec<u8>>) -> Result<usize> {
    let mut seen = HashSet::new();
    let mut deliveries = 0;
    while seen.len() < wanted.len() {
        let m = c.expect_message().await?;
        deliveries += 1;
        ensure!(wanted.contains(&m.body[..]), "unexpected body {:?}", m.body);
        seen.insert(m.body.to_vec());
        c.send(&Command::Fin(m.id)).await?;
    }
    Ok(deliveries)
}

async fn publish_all(addr: std::net::SocketAddr, bodies: &[Vec<u8>]) -> Result<()> {
    let mut p = NsqConn::connect(addr).await?;
    for chunk in bodies.chunks(10) {
        p.send(&Command::Mpub {
            topic: name("t"),
            bodies: chunk.iter().map(|b| b.clone().into()).collect(),
        })
        .await?;
        p.expect_response(b"OK").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_with_sync_publish_loses_nothing_acknowledged_even_in_flight() -> Result<()> {
    let flags = [
        "--sync-publish",
        "--mem-queue-size=10",
        "--max-bytes-per-file=4096",
    ];
    let broker = BrokerProcess::start(&flags)?;
    let bodies: Vec<Vec<u8>> = (0..300)
        .map(|i| format!("msg-{i:04}").into_bytes())
        .collect();
    // A consumer takes 20 messages and never finishes them: they are in flight at the crash.
    let mut holder = consumer(broker.tcp_address, 20).await?;
    publish_all(broker.tcp_address, &bodies).await?;
    let mut in_flight = Vec::new();
    for _ in 0..20 {
        in_flight.push(holder.expect_message().await?.body.to_vec());
    }
    broker.signal("KILL")?;
    drop(holder);
    let broker = broker.restart(&flags)?;
    let wanted: HashSet<Vec<u8>> = bodies.into_iter().collect();
    let mut c = consumer(broker.tcp_address, 100).await?;
    let deliveries = drain(&mut c, &wanted).await?;
    ensure!(deliveries >= wanted.len());
    for body in in_flight {
        ensure!(wanted.contains(&body));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_keeps_queued_in_flight_and_deferred_messages_with_their_due_time() -> Result<()> {
    let broker = BrokerProcess::start(&["--mem-queue-size=5"])?;
    let queued: Vec<Vec<u8>> = (0..50).map(|i| format!("q{i}").into_bytes()).collect();
    let mut holder = consumer(broker.tcp_address, 3).await?;
    publish_all(broker.tcp_address, &queued).await?;
    for _ in 0..3 {
        holder.expect_message().await?;
    }
    let mut p = NsqConn::connect(broker.tcp_address).await?;
    p.send(&Command::Dpub {
        topic: name("t"),
        defer_ms: 3000,
        body: "later".into(),
    })
    .await?;
    p.expect_response(b"OK").await?;
    let due = Instant::now() + Duration::from_millis(3000);
    broker.signal("TERM")?;
    let mut broker = broker;
    ensure!(broker.wait_exit(WAIT)?.success());
    let broker = broker.restart(&[])?;
    let wanted: HashSet<Vec<u8>> = queued.into_iter().collect();
    let mut c = consumer(broker.tcp_address, 100).await?;
    let deliveries = drain(&mut c, &wanted).await?;
    ensure!(
        deliveries == wanted.len(),
        "{deliveries} deliveries, duplicates after a clean restart"
    );
    let m = c.next_non_heartbeat().await?;
    ensure!(
        Instant::now() + Duration::from_millis(50) >= due,
        "deferred message came early"
    );
    match m {
        proto::wire::Frame::Message(m) => ensure!(&m.body[..] == b"later"),
        other => anyhow::bail!("expected the deferred message, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_broker_on_the_same_data_path_refuses_to_start() -> Result<()> {
    let first = BrokerProcess::start(&[])?;
    let dir = first
        .data
        .as_ref()
        .map(|d| d.path().display().to_string())
        .unwrap_or_default();
    let out = std::process::Command::new(tests::binary_path("knsq-broker"))
        .args([
            "--tcp-address=127.0.0.1:0",
            "--http-address=127.0.0.1:0",
            &format!("--data-path={dir}"),
        ])
        .output()?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("in use by another knsq-broker"),
        "stderr: {stderr}"
    );
    let resp = http_request(first.http_address, "GET", "/ping", b"").await?;
    ensure!(resp.status == 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_torn_tail_after_a_crash_is_cut_and_the_rest_served() -> Result<()> {
    let broker = BrokerProcess::start(&["--mem-queue-size=0"])?;
    let bodies: Vec<Vec<u8>> = (0..20).map(|i| format!("keep-{i}").into_bytes()).collect();
    publish_all(broker.tcp_address, &bodies).await?;
    broker.signal("KILL")?;
    let dir = broker
        .data
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_default();
    // A crash in the middle of a write leaves half a record at the end of the segment.
    let segment = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.to_string_lossy().ends_with(".dat") && p.to_string_lossy().contains("t.diskqueue")
        })
        .ok_or_else(|| anyhow::anyhow!("no segment file"))?;
    let mut file = std::fs::OpenOptions::new().append(true).open(&segment)?;
    std::io::Write::write_all(&mut file, &[0, 0, 0, 200, 1, 2, 3, 4, 9, 9])?;
    drop(file);
    let broker = broker.restart(&[])?;
    let wanted: HashSet<Vec<u8>> = bodies.into_iter().collect();
    let mut c = consumer(broker.tcp_address, 100).await?;
    drain(&mut c, &wanted).await?;
    let resp = http_request(broker.http_address, "GET", "/ping", b"").await?;
    ensure!(resp.status == 200 && resp.body == b"OK");
    Ok(())
}
