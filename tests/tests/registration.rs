//! Brokers registering with lookupds (issue 4): what consumers see in `/lookup` as brokers
//! come, change, die, freeze and move between lookupds, against lookupds in this process and
//! the real binaries.

use anyhow::{Context, Result, ensure};
use proto::wire::{Command, Name};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::lookupd::{LookupdProcess, TestLookupd, eventually, lookup, lookup_producers};
use tests::{BrokerProcess, NsqConn, TestBroker, http_post_ok, http_request};

/// The identity `/lookup` gives a broker: `broadcast_address:tcp_port`.
fn producer(tcp: SocketAddr) -> String {
    format!("127.0.0.1:{}", tcp.port())
}

fn sorted(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list
}

/// A broker in this process registered with the lookupds at `grpc`.
async fn broker_with(grpc: &[SocketAddr]) -> Result<TestBroker> {
    let grpc: Vec<String> = grpc.iter().map(ToString::to_string).collect();
    TestBroker::start(move |o| o.lookupd_grpc_addresses = grpc).await
}

/// Waits until `/lookup?topic=` of `http` lists exactly `want` (sorted).
async fn expect_producers(http: SocketAddr, topic: &str, want: &[String]) -> Result<()> {
    let want = sorted(want.to_vec());
    eventually(
        &format!("/lookup?topic={topic} on {http} lists {want:?}"),
        || {
            let want = want.clone();
            async move { Ok(sorted(lookup_producers(http, topic).await?) == want) }
        },
    )
    .await
}

/// `GET /channels?topic=` of a lookupd.
async fn lookupd_channels(http: SocketAddr, topic: &str) -> Result<Vec<String>> {
    let resp = http_request(http, "GET", &format!("/channels?topic={topic}"), b"").await?;
    let body = resp.json()?;
    Ok(body["channels"]
        .as_array()
        .context("channels")?
        .iter()
        .filter_map(|c| c.as_str().map(String::from))
        .collect())
}

/// The producers `/debug` lists for a channel's registration (none when it is not there).
async fn channel_producers(http: SocketAddr, topic: &str, channel: &str) -> Result<Vec<String>> {
    let debug = http_request(http, "GET", "/debug", b"").await?.json()?;
    let key = format!("channel:{topic}:{channel}");
    Ok(debug[&key]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}:{}",
                p["broadcast_address"].as_str().unwrap_or("?"),
                p["tcp_port"]
            )
        })
        .collect())
}

async fn expect_channels(http: SocketAddr, topic: &str, want: &[&str]) -> Result<()> {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(&format!("/channels?topic={topic} lists {want:?}"), || {
        let want = want.clone();
        async move { Ok(sorted(lookupd_channels(http, topic).await?) == want) }
    })
    .await
}

/// A TCP connection subscribed to `topic`/`channel`.
async fn subscriber(tcp: SocketAddr, topic: &str, channel: &str) -> Result<NsqConn> {
    let mut conn = NsqConn::connect(tcp).await?;
    conn.send(&Command::Sub {
        topic: Name::new(topic).context("topic name")?,
        channel: Name::new(channel).context("channel name")?,
    })
    .await?;
    conn.expect_response(b"OK").await?;
    conn.send(&Command::Rdy(1)).await?;
    Ok(conn)
}

/// One message published over TCP (which creates the topic if needed).
async fn tcp_publish(tcp: SocketAddr, topic: &str, body: &'static [u8]) -> Result<()> {
    let mut conn = NsqConn::connect(tcp).await?;
    conn.send(&Command::Pub {
        topic: Name::new(topic).context("topic name")?,
        body: bytes::Bytes::from_static(body),
    })
    .await?;
    conn.expect_response(b"OK").await
}

/// `{channel: depth}` of a topic in a broker's `/stats`.
async fn channel_depths(http: SocketAddr, topic: &str) -> Result<Vec<(String, i64)>> {
    let resp = http_request(
        http,
        "GET",
        &format!("/stats?format=json&topic={topic}"),
        b"",
    )
    .await?;
    let stats: Value = resp.json()?;
    let mut depths = Vec::new();
    for t in stats["topics"].as_array().into_iter().flatten() {
        for c in t["channels"].as_array().into_iter().flatten() {
            depths.push((
                c["channel_name"].as_str().unwrap_or_default().to_string(),
                c["depth"].as_i64().unwrap_or(-1),
            ));
        }
    }
    Ok(depths)
}

/// The value of one sample of a broker's `/metrics`, if present.
async fn metric(http: SocketAddr, sample: &str) -> Result<Option<f64>> {
    let resp = http_request(http, "GET", "/metrics", b"").await?;
    Ok(resp
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_and_channels_appear_in_lookup_and_follow_changes() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let broker = broker_with(&[lookupd.grpc_address()]).await?;
    let http = lookupd.http_address();
    let me = producer(broker.tcp_address());

    http_post_ok(broker.http_address(), "/topic/create?topic=orders", b"").await?;
    http_post_ok(
        broker.http_address(),
        "/channel/create?topic=orders&channel=billing",
        b"",
    )
    .await?;
    let _consumer = subscriber(broker.tcp_address(), "orders", "audit#ephemeral").await?;
    expect_producers(http, "orders", std::slice::from_ref(&me)).await?;
    expect_channels(http, "orders", &["audit#ephemeral", "billing"]).await?;
    let found = lookup(http, "orders").await?.context("orders is known")?;
    let p = &found["producers"][0];
    ensure!(p["http_port"] == broker.http_address().port(), "{found}");
    ensure!(p["version"] == "1.3.0", "{found}");

    ensure!(channel_producers(http, "orders", "billing").await? == std::slice::from_ref(&me));

    // Changes follow: a channel deleted (nsqlookupd keeps listing a channel without producers
    // until it is deleted there, so /debug shows the unregistration), the ephemeral channel
    // gone with its consumer, a topic deleted.
    http_post_ok(
        broker.http_address(),
        "/channel/delete?topic=orders&channel=billing",
        b"",
    )
    .await?;
    eventually("billing has no producer", || async {
        Ok(channel_producers(http, "orders", "billing")
            .await?
            .is_empty())
    })
    .await?;
    drop(_consumer);
    expect_channels(http, "orders", &["billing"]).await?;
    http_post_ok(broker.http_address(), "/topic/delete?topic=orders", b"").await?;
    expect_producers(http, "orders", &[]).await?;

    let sample = format!(
        "knsq_lookupd_connected{{address=\"{}\"}}",
        lookupd.grpc_address()
    );
    ensure!(metric(broker.http_address(), &sample).await? == Some(1.0));
    broker.stop().await?;
    lookupd.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_with_sigkill_disappears_from_lookup_at_once() -> Result<()> {
    // The default inactivity timeout (5 min): only the stream's end can explain the removal.
    let lookupd = LookupdProcess::start(&[])?;
    let grpc = format!("--lookupd-grpc-address={}", lookupd.grpc_address);
    let mut broker = BrokerProcess::start(&[&grpc])?;
    let other = BrokerProcess::start(&[&grpc])?;
    http_post_ok(broker.http_address, "/topic/create?topic=t", b"").await?;
    http_post_ok(other.http_address, "/topic/create?topic=t", b"").await?;
    let both = [producer(broker.tcp_address), producer(other.tcp_address)];
    expect_producers(lookupd.http_address, "t", &both).await?;

    broker.signal("KILL")?;
    broker.wait_exit(Duration::from_secs(5))?;
    let killed = Instant::now();
    expect_producers(lookupd.http_address, "t", &both[1..]).await?;
    ensure!(
        killed.elapsed() < Duration::from_secs(3),
        "took {:?}",
        killed.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_whose_heartbeats_stop_disappears_after_the_inactivity_timeout() -> Result<()> {
    let lookupd = LookupdProcess::start(&["--inactive-producer-timeout=2s"])?;
    let grpc = format!("--lookupd-grpc-address={}", lookupd.grpc_address);
    let broker = BrokerProcess::start(&[&grpc, "--lookupd-heartbeat-interval=200ms"])?;
    http_post_ok(broker.http_address, "/topic/create?topic=t", b"").await?;
    let me = [producer(broker.tcp_address)];
    expect_producers(lookupd.http_address, "t", &me).await?;

    // Heartbeats keep a live broker listed well past the timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(lookup_producers(lookupd.http_address, "t").await? == me);

    // Frozen: the connection stays open, but nothing is said.
    broker.signal("STOP")?;
    let stopped = Instant::now();
    let gone = expect_producers(lookupd.http_address, "t", &[]).await;
    let hidden_after = stopped.elapsed();
    broker.signal("CONT")?;
    gone?;
    ensure!(
        hidden_after >= Duration::from_millis(1500),
        "hidden after {hidden_after:?}, before the 2s timeout"
    );
    // Speaking again (its next heartbeat) brings it back.
    expect_producers(lookupd.http_address, "t", &me).await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_broker_registers_again_after_a_lookupd_restart() -> Result<()> {
    let mut lookupd = LookupdProcess::start(&[])?;
    let (grpc, http) = (lookupd.grpc_address, lookupd.http_address);
    let brokers = [broker_with(&[grpc]).await?, broker_with(&[grpc]).await?];
    for b in &brokers {
        http_post_ok(b.http_address(), "/topic/create?topic=t", b"").await?;
    }
    let all: Vec<String> = brokers.iter().map(|b| producer(b.tcp_address())).collect();
    expect_producers(http, "t", &all).await?;

    lookupd.signal("KILL")?;
    lookupd.wait_exit(Duration::from_secs(5))?;
    drop(lookupd);
    let args = [
        format!("--grpc-address={grpc}"),
        format!("--http-address={http}"),
        "--broadcast-address=127.0.0.1".to_string(),
    ];
    // Within seconds: expect_producers waits at most tests::WAIT.
    let _restarted = LookupdProcess::spawn(&args, &[])?;
    expect_producers(http, "t", &all).await?;
    for b in brokers {
        b.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_lookupds_both_answer_with_the_full_view() -> Result<()> {
    let lookupds = [
        TestLookupd::start(|_| {}).await?,
        TestLookupd::start(|_| {}).await?,
    ];
    let grpc: Vec<SocketAddr> = lookupds.iter().map(TestLookupd::grpc_address).collect();
    let a = broker_with(&grpc).await?;
    let b = broker_with(&grpc).await?;
    http_post_ok(a.http_address(), "/topic/create?topic=shared", b"").await?;
    http_post_ok(b.http_address(), "/topic/create?topic=shared", b"").await?;
    http_post_ok(
        a.http_address(),
        "/channel/create?topic=shared&channel=one",
        b"",
    )
    .await?;
    http_post_ok(
        b.http_address(),
        "/channel/create?topic=shared&channel=two",
        b"",
    )
    .await?;
    http_post_ok(b.http_address(), "/topic/create?topic=only-b", b"").await?;
    let both = [producer(a.tcp_address()), producer(b.tcp_address())];
    for l in &lookupds {
        expect_producers(l.http_address(), "shared", &both).await?;
        expect_producers(l.http_address(), "only-b", &both[1..]).await?;
        expect_channels(l.http_address(), "shared", &["one", "two"]).await?;
    }
    // A broker that shuts down leaves both at once.
    a.stop().await?;
    for l in &lookupds {
        expect_producers(l.http_address(), "shared", &both[1..]).await?;
    }
    b.stop().await?;
    for l in lookupds {
        l.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_started_later_precreates_the_channels_known_elsewhere() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let grpc = lookupd.grpc_address();
    let first = broker_with(&[grpc]).await?;
    http_post_ok(first.http_address(), "/topic/create?topic=events", b"").await?;
    http_post_ok(
        first.http_address(),
        "/channel/create?topic=events&channel=archive",
        b"",
    )
    .await?;
    http_post_ok(
        first.http_address(),
        "/channel/create?topic=events&channel=index",
        b"",
    )
    .await?;
    let _ephemeral = subscriber(first.tcp_address(), "events", "live#ephemeral").await?;
    expect_channels(
        lookupd.http_address(),
        "events",
        &["archive", "index", "live#ephemeral"],
    )
    .await?;

    // A new broker, registered (it lists a topic of its own), gets its first message on
    // "events" over TCP; another over HTTP.
    for over_http in [false, true] {
        let later = broker_with(&[grpc]).await?;
        http_post_ok(later.http_address(), "/topic/create?topic=mine", b"").await?;
        expect_producers(
            lookupd.http_address(),
            "mine",
            &[producer(later.tcp_address())],
        )
        .await?;
        if over_http {
            http_post_ok(later.http_address(), "/pub?topic=events", b"hello").await?;
        } else {
            tcp_publish(later.tcp_address(), "events", b"hello").await?;
        }
        let depths = channel_depths(later.http_address(), "events").await?;
        ensure!(
            depths == [("archive".to_string(), 1), ("index".to_string(), 1)],
            "over_http={over_http}: {depths:?}"
        );
        // And it registers what it created.
        let both = sorted(vec![
            producer(first.tcp_address()),
            producer(later.tcp_address()),
        ]);
        expect_producers(lookupd.http_address(), "events", &both).await?;
        later.stop().await?;
    }
    first.stop().await?;
    lookupd.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn tombstoning_a_topic_hides_the_broker_for_the_tombstone_lifetime() -> Result<()> {
    let lifetime = Duration::from_secs(2);
    let lookupd = TestLookupd::start(|o| o.tombstone_lifetime = lifetime).await?;
    let grpc = lookupd.grpc_address();
    let (a, b) = (broker_with(&[grpc]).await?, broker_with(&[grpc]).await?);
    http_post_ok(a.http_address(), "/topic/create?topic=t", b"").await?;
    http_post_ok(b.http_address(), "/topic/create?topic=t", b"").await?;
    let both = [producer(a.tcp_address()), producer(b.tcp_address())];
    expect_producers(lookupd.http_address(), "t", &both).await?;

    let node = format!("127.0.0.1:{}", a.http_address().port());
    http_post_ok(
        lookupd.http_address(),
        &format!("/topic/tombstone?topic=t&node={node}"),
        b"",
    )
    .await?;
    let tombstoned = Instant::now();
    ensure!(lookup_producers(lookupd.http_address(), "t").await? == both[1..]);
    // Still hidden a while later (heartbeats and new channels do not lift it)...
    http_post_ok(a.http_address(), "/channel/create?topic=t&channel=c", b"").await?;
    tokio::time::sleep(lifetime / 2).await;
    ensure!(lookup_producers(lookupd.http_address(), "t").await? == both[1..]);
    // ...and listed again once the tombstone has expired.
    expect_producers(lookupd.http_address(), "t", &both).await?;
    ensure!(tombstoned.elapsed() >= lifetime - Duration::from_millis(200));
    a.stop().await?;
    b.stop().await?;
    lookupd.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn put_config_nsqlookupd_tcp_addresses_moves_the_registration() -> Result<()> {
    let l1 = TestLookupd::start(|_| {}).await?;
    let l2 = TestLookupd::start(|_| {}).await?;
    let broker = broker_with(&[l1.grpc_address()]).await?;
    http_post_ok(broker.http_address(), "/topic/create?topic=t", b"").await?;
    let me = [producer(broker.tcp_address())];
    expect_producers(l1.http_address(), "t", &me).await?;
    ensure!(lookup_producers(l2.http_address(), "t").await?.is_empty());

    let body = serde_json::to_vec(&[l2.grpc_address().to_string()])?;
    let resp = http_request(
        broker.http_address(),
        "PUT",
        "/config/nsqlookupd_tcp_addresses",
        &body,
    )
    .await?;
    ensure!(resp.status == 200, "{}", resp.text());
    ensure!(resp.json()? == serde_json::json!([l2.grpc_address().to_string()]));
    expect_producers(l2.http_address(), "t", &me).await?;
    expect_producers(l1.http_address(), "t", &[]).await?;

    // Both, then none.
    let body = serde_json::to_vec(&[l1.grpc_address().to_string(), l2.grpc_address().to_string()])?;
    http_request(
        broker.http_address(),
        "PUT",
        "/config/nsqlookupd_tcp_addresses",
        &body,
    )
    .await?;
    expect_producers(l1.http_address(), "t", &me).await?;
    expect_producers(l2.http_address(), "t", &me).await?;
    http_request(
        broker.http_address(),
        "PUT",
        "/config/nsqlookupd_tcp_addresses",
        b"[]",
    )
    .await?;
    expect_producers(l1.http_address(), "t", &[]).await?;
    expect_producers(l2.http_address(), "t", &[]).await?;
    broker.stop().await?;
    l1.stop().await?;
    l2.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lookupd_down_at_broker_start_is_retried_while_the_broker_serves() -> Result<()> {
    // A free port, with nothing listening on it yet.
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let broker = broker_with(&[grpc]).await?;
    http_post_ok(broker.http_address(), "/pub?topic=early", b"served").await?;
    let mut conn = subscriber(broker.tcp_address(), "early", "c").await?;
    ensure!(conn.expect_message().await?.body.as_ref() == b"served");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sample = format!("knsq_lookupd_connected{{address=\"{grpc}\"}}");
    ensure!(metric(broker.http_address(), &sample).await? == Some(0.0));

    let lookupd = TestLookupd::start(|o| o.grpc_address = grpc.to_string()).await?;
    // What the broker created while the lookupd was down is in its snapshot.
    expect_producers(
        lookupd.http_address(),
        "early",
        &[producer(broker.tcp_address())],
    )
    .await?;
    expect_channels(lookupd.http_address(), "early", &["c"]).await?;
    ensure!(metric(broker.http_address(), &sample).await? == Some(1.0));
    let reconnects = format!("knsq_lookupd_reconnects_total{{address=\"{grpc}\"}}");
    ensure!(
        metric(broker.http_address(), &reconnects)
            .await?
            .unwrap_or(0.0)
            >= 1.0
    );
    drop(conn);
    broker.stop().await?;
    lookupd.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_lookupd_holds_up_no_publisher_and_new_topics_for_a_second_at_most() -> Result<()>
{
    let lookupd = LookupdProcess::start(&[])?;
    let broker = broker_with(&[lookupd.grpc_address]).await?;
    http_post_ok(broker.http_address(), "/topic/create?topic=hot", b"").await?;
    expect_producers(
        lookupd.http_address,
        "hot",
        &[producer(broker.tcp_address())],
    )
    .await?;

    lookupd.signal("STOP")?;
    let frozen = async {
        // Publishing to an existing topic never waits for a lookupd.
        let started = Instant::now();
        let mut conn = NsqConn::connect(broker.tcp_address()).await?;
        for _ in 0..200 {
            conn.send(&Command::Pub {
                topic: Name::new("hot").context("name")?,
                body: bytes::Bytes::from_static(b"x"),
            })
            .await?;
            conn.expect_response(b"OK").await?;
        }
        http_post_ok(
            broker.http_address(),
            "/channel/create?topic=hot&channel=new",
            b"",
        )
        .await?;
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // A new topic asks the (silent) lookupd for its channels, one second at most.
        let started = Instant::now();
        tcp_publish(broker.tcp_address(), "fresh", b"x").await?;
        ensure!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        Ok(())
    }
    .await;
    lookupd.signal("CONT")?;
    frozen?;
    // What happened meanwhile reaches the lookupd once it runs again.
    expect_producers(
        lookupd.http_address,
        "fresh",
        &[producer(broker.tcp_address())],
    )
    .await?;
    expect_channels(lookupd.http_address, "hot", &["new"]).await?;
    broker.stop().await
}
