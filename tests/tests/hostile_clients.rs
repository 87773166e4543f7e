//! The real `knsq-broker` under hostile HTTP clients: thousands of slowloris connections (a
//! header byte now and then, never a whole request) do not keep `/ping`, a producer or a
//! consumer from being served.

use anyhow::{Result, bail, ensure};
use proto::wire::{Command, Frame, Name};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tests::{BrokerProcess, NsqConn, http_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a connection that sends an incomplete request head, a header line every `pace`, and
/// opens another whenever the broker closes it; counts the closes.
async fn slowloris(
    addr: SocketAddr,
    pace: Duration,
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicU64>,
    lifetimes: Arc<std::sync::Mutex<Vec<Duration>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(pace).await;
            continue;
        };
        let opened = Instant::now();
        if stream
            .write_all(b"GET /ping HTTP/1.1\r\nHost: slow\r\n")
            .await
            .is_err()
        {
            continue;
        }
        let mut buf = [0u8; 256];
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::select! {
                read = stream.read(&mut buf) => {
                    // The broker answered (408) or closed: this one is done.
                    if matches!(read, Ok(0) | Err(_)) {
                        closed.fetch_add(1, Ordering::Relaxed);
                        lifetimes.lock().expect("lifetimes").push(opened.elapsed());
                        break;
                    }
                }
                _ = tokio::time::sleep(pace) => {
                    if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}

/// A producer publishing over TCP and a consumer finishing what it gets, for `run`; returns
/// how many messages went through.
async fn producer_and_consumer(tcp: SocketAddr, run: Duration) -> Result<u64> {
    let mut consumer = NsqConn::connect(tcp).await?;
    // The shortest output buffer timeout, so that each message arrives within 25 ms.
    consumer
        .identify(&serde_json::json!({"output_buffer_timeout": 25}))
        .await?;
    consumer.subscribe("t", "c").await?;
    consumer.send(&Command::Rdy(100)).await?;
    let mut producer = NsqConn::connect(tcp).await?;
    let end = Instant::now() + run;
    let mut received = 0;
    let mut sent = 0u64;
    while Instant::now() < end {
        producer
            .send(&Command::Pub {
                topic: Name::new("t").expect("name"),
                body: format!("m{sent}").into_bytes().into(),
            })
            .await?;
        producer.expect_response(b"OK").await?;
        sent += 1;
        match consumer.next_frame_within(Duration::from_secs(5)).await? {
            Frame::Message(m) => {
                consumer.send(&Command::Fin(m.id)).await?;
                received += 1;
            }
            Frame::Response(r) if &r[..] == proto::wire::HEARTBEAT => {
                consumer.send(&Command::Nop).await?;
            }
            other => bail!("consumer got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(received)
}

/// Runs `slow` slowloris clients against a broker started with `flags` while `/ping`, an
/// HTTP publisher, and a TCP producer and consumer are served beside them; returns the worst
/// `/ping`, the messages that went through, and how long the broker let slow connections live.
async fn served_beside_slow_clients(
    flags: &[&str],
    slow: usize,
    ping_within: Duration,
) -> Result<(Duration, u64, Vec<Duration>)> {
    let broker = BrokerProcess::start(flags)?;
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicU64::new(0));
    let lifetimes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..slow {
        tasks.push(tokio::spawn(slowloris(
            broker.http_address,
            Duration::from_millis(500),
            stop.clone(),
            closed.clone(),
            lifetimes.clone(),
        )));
    }
    // Let them pile up, then be served for ten seconds beside them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let clients = tokio::spawn(producer_and_consumer(
        broker.tcp_address,
        Duration::from_secs(10),
    ));
    let mut worst = Duration::ZERO;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let start = Instant::now();
        let ping = tokio::time::timeout(
            ping_within,
            http_request(broker.http_address, "GET", "/ping", b""),
        )
        .await;
        worst = worst.max(start.elapsed());
        match ping {
            Ok(Ok(resp)) => ensure!(resp.status == 200 && resp.body == b"OK", "{}", resp.text()),
            Ok(Err(e)) => bail!("/ping failed beside slow clients: {e}"),
            Err(_) => bail!("/ping not answered within {ping_within:?} beside slow clients"),
        }
        let publish = tokio::time::timeout(
            ping_within,
            http_request(broker.http_address, "POST", "/pub?topic=http", b"hello"),
        )
        .await;
        match publish {
            Ok(resp) => {
                let resp = resp?;
                ensure!(resp.status == 200, "{}", resp.text());
            }
            Err(_) => bail!("/pub not answered within {ping_within:?} beside slow clients"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let received = clients.await??;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    let lifetimes = std::mem::take(&mut *lifetimes.lock().expect("lifetimes"));
    eprintln!(
        "{slow} slow clients: worst /ping {worst:?}, {received} messages through, {} slow connections closed by the broker",
        closed.load(Ordering::Relaxed)
    );
    Ok((worst, received, lifetimes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_slowloris_clients_do_not_stop_ping_or_clients() -> Result<()> {
    let (_, received, lifetimes) =
        served_beside_slow_clients(&["--http-header-timeout=3s"], 3000, Duration::from_secs(2))
            .await?;
    ensure!(received > 100, "only {received} messages went through");
    // Every slow connection is closed at the header timeout, none kept for ever.
    ensure!(
        lifetimes.len() >= 3000,
        "only {} slow connections closed",
        lifetimes.len()
    );
    let longest = lifetimes.iter().max().copied().unwrap_or_default();
    ensure!(
        longest < Duration::from_secs(6),
        "a slow connection lived {longest:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_idle_connections_make_room() -> Result<()> {
    // Fewer places than slow clients: new clients get the place of the longest-idle one.
    let (_, received, _) = served_beside_slow_clients(
        &["--http-header-timeout=30s", "--http-max-connections=100"],
        300,
        Duration::from_secs(5),
    )
    .await?;
    ensure!(received > 100, "only {received} messages went through");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_sent_too_slowly_is_refused() -> Result<()> {
    let broker = BrokerProcess::start(&["--http-body-timeout=1s"])?;
    let mut stream = TcpStream::connect(broker.http_address).await?;
    stream
        .write_all(b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response);
    ensure!(text.starts_with("HTTP/1.1 408"), "{text}");
    ensure!(text.contains(r#"{"message":"BODY_TIMEOUT"}"#), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_are_refused_and_idle_connections_closed() -> Result<()> {
    let broker = BrokerProcess::start(&["--http-header-timeout=1s"])?;
    let mut stream = TcpStream::connect(broker.http_address).await?;
    let mut request = b"GET /ping HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        request.extend_from_slice(format!("X-Big-{i}: {}\r\n", "y".repeat(60)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    ensure!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    // A keep-alive connection left idle is closed after the header timeout.
    let mut idle = TcpStream::connect(broker.http_address).await?;
    idle.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await?;
    ensure!(String::from_utf8_lossy(&buf[..n]).ends_with("OK"));
    let start = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await??;
    ensure!(n == 0, "expected the idle connection to be closed");
    ensure!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    Ok(())
}

/// A separate process (Python, so that its own descriptor limit holds the sockets) that
/// opens `count` NSQ connections to `addr`, sends the magic on each and keeps them open.
fn idle_connections(addr: SocketAddr, count: usize) -> Result<std::process::Child> {
    let script = r#"
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(count):
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"  V2")
        held.append(s)
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(3600)
"#;
    Ok(std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .arg(count.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_idle_connections_and_few_descriptors_do_not_stop_the_broker() -> Result<()>
{
    // The broker gets 2048 file descriptors; 20,000 connections come in.
    let data = tempfile::tempdir()?;
    let bin = tests::binary_path("knsq-broker");
    let command = format!(
        "ulimit -n 2048 && exec {} --tcp-address=127.0.0.1:0 --http-address=127.0.0.1:0 --data-path={}",
        bin.display(),
        data.path().display()
    );
    let mut broker = tests::ChildProcess::spawn_command("sh", &["-c".to_string(), command])?;
    let tcp = broker.wait_for_address("TCP: listening on ")?;
    let http = broker.wait_for_address("HTTP: listening on ")?;
    // The well-behaved clients were there first.
    let clients = tokio::spawn(producer_and_consumer(tcp, Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut idle: Vec<std::process::Child> = Vec::new();
    for _ in 0..2 {
        idle.push(idle_connections(tcp, 10_000)?);
    }
    let end = Instant::now() + Duration::from_secs(18);
    let mut topics = 0;
    while Instant::now() < end {
        let ping = tokio::time::timeout(
            Duration::from_secs(2),
            http_request(http, "GET", "/ping", b""),
        )
        .await;
        match ping {
            Ok(Ok(resp)) => ensure!(resp.status == 200 && resp.body == b"OK", "{}", resp.text()),
            other => bail!("/ping not answered beside idle connections: {other:?}"),
        }
        // New topics still get their disk queues: descriptors are kept back for files.
        topics += 1;
        let resp = http_request(http, "POST", &format!("/pub?topic=new{topics}"), b"x").await?;
        ensure!(resp.status == 200, "{}", resp.text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let received = clients.await??;
    for mut child in idle {
        let _ = child.kill();
        let _ = child.wait();
    }
    let metrics = http_request(http, "GET", "/metrics", b"").await?.text();
    let refused: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("knsq_tcp_connections_refused_total ")?
                .parse()
                .ok()
        })
        .unwrap_or_default();
    eprintln!(
        "20,000 idle connections at 2048 descriptors: {received} messages through, {refused} refused"
    );
    ensure!(received > 200, "only {received} messages went through");
    ensure!(refused > 10_000.0, "only {refused} connections refused");
    Ok(())
}
