//! The real `knsq-broker` binary: flags, signals and restarts.

use anyhow::Result;
use proto::wire::{Command, Frame, Name};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};
use tests::{BrokerProcess, NsqConn, binary_path, http_request};
use tokio::io::AsyncWriteExt;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

async fn subscribed(addr: std::net::SocketAddr, identify: serde_json::Value) -> Result<NsqConn> {
    let mut conn = NsqConn::connect(addr).await?;
    conn.identify(&identify).await?;
    conn.send(&Command::Sub {
        topic: name("t"),
        channel: name("c"),
    })
    .await?;
    conn.expect_response(b"OK").await?;
    Ok(conn)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_clients_cleanly_and_exits_zero() -> Result<()> {
    let mut broker = BrokerProcess::start(&[])?;
    let mut consumer = subscribed(broker.tcp_address, serde_json::json!({})).await?;
    let resp = http_request(broker.http_address, "POST", "/pub?topic=t", b"x").await?;
    assert_eq!(resp.status, 200);
    broker.signal("TERM")?;
    // The client sees an orderly end of stream, not a reset.
    consumer.expect_closed().await?;
    let status = broker.wait_exit(Duration::from_secs(5))?;
    assert!(status.success(), "exit status {status}");
    broker.wait_for_log("knsq-broker stopped")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once_while_shutdown_waits() -> Result<()> {
    let mut broker = BrokerProcess::start(&["--shutdown-timeout=60s"])?;
    // An HTTP publish whose body never finishes keeps the clean shutdown waiting: in-flight
    // requests are allowed to complete.
    let mut slow = tokio::net::TcpStream::connect(broker.http_address).await?;
    let head = "POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc";
    slow.write_all(head.as_bytes()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.signal("TERM")?;
    broker.wait_for_log("shutting down")?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        broker.wait_exit(Duration::from_millis(10)).is_err(),
        "shutdown should still wait for the request"
    );
    let second = Instant::now();
    broker.signal("TERM")?;
    let status = broker.wait_exit(Duration::from_secs(2))?;
    assert!(second.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_that_stopped_reading_does_not_hold_up_shutdown() -> Result<()> {
    let mut broker = BrokerProcess::start(&["--shutdown-timeout=60s"])?;
    let mut stuck = subscribed(
        broker.tcp_address,
        serde_json::json!({"heartbeat_interval": 60000}),
    )
    .await?;
    stuck.send(&Command::Rdy(2500)).await?;
    let body = vec![b'x'; 64 * 1024];
    for _ in 0..100 {
        let r = http_request(broker.http_address, "POST", "/pub?topic=t", &body).await?;
        assert_eq!(r.status, 200);
    }
    let started = Instant::now();
    broker.signal("TERM")?;
    let status = broker.wait_exit(Duration::from_secs(5))?;
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(stuck);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn go_flag_syntax_is_accepted() -> Result<()> {
    let data = tempfile::tempdir()?;
    let args: Vec<String> = [
        "-tcp-address=127.0.0.1:0",
        "-http-address",
        "127.0.0.1:0",
        &format!("-data-path={}", data.path().display()),
        "--mem-queue-size",
        "7",
        "-verbose",
        "--msg-timeout=1m30s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let broker = BrokerProcess::spawn(&args)?;
    let resp = http_request(broker.http_address, "GET", "/config/mem_queue_size", b"").await?;
    assert_eq!(resp.text(), "7");
    let resp = http_request(broker.http_address, "GET", "/config/msg_timeout", b"").await?;
    assert_eq!(resp.text(), "90000000000");
    Ok(())
}

fn run_with(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Process::new(binary_path("knsq-broker"))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn bad_flags_are_startup_errors_naming_the_flag() -> Result<()> {
    for (args, flag) in [
        (&["--msg-timeout=abc"][..], "--msg-timeout"),
        (&["--mem-queue-size=-1"][..], "--mem-queue-size"),
        (&["--node-id=5000"][..], "--node-id"),
        (
            &["--e2e-processing-latency-percentile=2"][..],
            "--e2e-processing-latency-percentile",
        ),
        (&["--no-such-flag"][..], "--no-such-flag"),
        (&["--tcp-address=256.0.0.1:1"][..], "--tcp-address"),
    ] {
        let mut all = vec!["--http-address=127.0.0.1:0"];
        all.extend_from_slice(args);
        let (code, stderr) = run_with(&all)?;
        assert_ne!(code, Some(0), "{args:?} should fail");
        assert!(
            stderr.contains(flag),
            "{args:?}: stderr does not name {flag}: {stderr}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_broker_restarts_at_once_on_the_same_ports() -> Result<()> {
    let first = BrokerProcess::start(&[])?;
    let (tcp, http) = (first.tcp_address, first.http_address);
    let data = tempfile::tempdir()?;
    // A client connection left open makes the old socket linger after the kill.
    let _conn = NsqConn::connect(tcp).await?;
    drop(first);
    for round in 0..5 {
        let started = Instant::now();
        let args = vec![
            format!("--tcp-address={tcp}"),
            format!("--http-address={http}"),
            format!("--data-path={}", data.path().display()),
        ];
        let broker = BrokerProcess::spawn(&args)?;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "round {round} slow to start"
        );
        let mut conn = NsqConn::connect(tcp).await?;
        match conn.identify(&serde_json::json!({})).await? {
            Frame::Response(r) => assert_eq!(&r[..], b"OK"),
            other => panic!("unexpected {other:?}"),
        }
        broker.signal("KILL")?;
        drop(broker);
    }
    Ok(())
}
