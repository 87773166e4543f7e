//! `--max-connections`: past it a client is told why and closed, the refusal is counted, and
//! room that frees up is used again.

use anyhow::Result;
use proto::wire::Command;
use std::time::Duration;
use tests::{NsqConn, TestBroker};

/// The value of an unlabelled metric on `/metrics`.
async fn metric(broker: &TestBroker, name: &str) -> Result<f64> {
    let text = broker.http("GET", "/metrics", b"").await?.text();
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .ok_or_else(|| anyhow::anyhow!("no {name} in /metrics"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or_default().parse()?)
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_politely_and_counted() -> Result<()> {
    let broker = TestBroker::start(|o| o.max_connections = 2).await?;
    let mut first = broker.connect().await?;
    let mut second = broker.connect().await?;
    // Both are served.
    first
        .send(&Command::Identify(r#"{"client_id":"first"}"#.into()))
        .await?;
    first.expect_response(b"OK").await?;
    second
        .send(&Command::Pub {
            topic: proto::wire::Name::new("t").unwrap(),
            body: "x".into(),
        })
        .await?;
    second.expect_response(b"OK").await?;

    let mut third = broker.connect().await?;
    third
        .expect_error("E_INVALID too many connections (at most 2)")
        .await?;
    third.expect_closed().await?;
    assert_eq!(
        metric(&broker, "knsq_tcp_connections_refused_total").await?,
        1.0
    );
    assert_eq!(metric(&broker, "knsq_tcp_connections").await?, 2.0);

    // A connection that ends makes room for the next one.
    drop(first);
    let mut served = false;
    for _ in 0..50 {
        let mut next = NsqConn::connect(broker.tcp_address()).await?;
        next.send(&Command::Identify(r#"{"client_id":"next"}"#.into()))
            .await?;
        match next.next_frame_within(Duration::from_secs(2)).await {
            Ok(proto::wire::Frame::Response(ok)) if &ok[..] == b"OK" => {
                served = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(served, "a connection should be served once one closed");
    broker.stop().await
}
