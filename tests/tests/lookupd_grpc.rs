//! The lookupd's gRPC registration API against a lookupd on port 0, seen through its
//! nsqlookupd HTTP API as clients see it.

use anyhow::Result;
use proto::cluster::v1::broker_message::Kind;
use proto::cluster::v1::{
    BrokerMessage, Identify, RegisterChannel, UnregisterChannel, UnregisterTopic,
};
use serde_json::json;
use std::time::Duration;
use tests::lookupd::{
    RegistrationStream, TestLookupd, eventually, heartbeat, identify, lookup_producers,
    register_channel, register_topic, snapshot, topic_channels,
};
use tonic::Code;

#[tokio::test]
async fn identify_snapshot_and_events_show_in_lookup() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let (mut broker, identified) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(4150, 4151)).await?;
    assert_eq!(identified.broadcast_address, "127.0.0.1");
    assert_eq!(
        identified.grpc_port,
        u32::from(lookupd.grpc_address().port())
    );
    assert_eq!(
        identified.http_port,
        u32::from(lookupd.http_address().port())
    );
    assert!(!identified.version.is_empty());

    assert_eq!(
        broker
            .acked(snapshot(&[
                ("orders", &["billing", "audit"]),
                ("empty", &[])
            ]))
            .await?,
        2
    );
    let found = lookupd.lookup("orders").await?.expect("orders registered");
    assert_eq!(found["channels"], json!(["audit", "billing"]));
    let producer = &found["producers"][0];
    assert_eq!(producer["broadcast_address"], "127.0.0.1");
    assert_eq!(
        (
            producer["tcp_port"].as_u64(),
            producer["http_port"].as_u64()
        ),
        (Some(4150), Some(4151))
    );
    assert_eq!(producer["hostname"], "test-broker");
    assert_eq!(producer["version"], "0.1.0");
    assert!(
        producer["remote_address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(lookupd.lookup("empty").await?.is_some());

    assert_eq!(broker.acked(register_channel("clicks", "stats")).await?, 3);
    assert_eq!(broker.acked(register_topic("views")).await?, 4);
    let topics = lookupd.http("GET", "/topics").await?.json()?;
    assert_eq!(
        topics,
        json!({ "topics": ["clicks", "empty", "orders", "views"] })
    );

    let unregister = Kind::UnregisterChannel(UnregisterChannel {
        topic: "orders".into(),
        channel: "audit".into(),
    });
    broker.acked(unregister).await?;
    let unregister = Kind::UnregisterTopic(UnregisterTopic {
        topic: "views".into(),
    });
    broker.acked(unregister).await?;
    assert_eq!(broker.acked(heartbeat()).await?, 7);
    // Keys stay as nsqlookupd keeps them; the producer is gone from the unregistered topic.
    assert_eq!(
        lookup_producers(lookupd.http_address(), "views").await?,
        Vec::<String>::new()
    );
    assert_eq!(
        lookup_producers(lookupd.http_address(), "orders").await?,
        ["127.0.0.1:4150"]
    );
    let nodes = lookupd.http("GET", "/nodes").await?.json()?;
    assert_eq!(
        nodes["producers"][0]["topics"],
        json!(["clicks", "empty", "orders"])
    );
    assert_eq!(
        nodes["producers"][0]["tombstones"],
        json!([false, false, false])
    );
    lookupd.stop().await
}

#[tokio::test]
async fn a_dropped_stream_removes_the_broker_at_once() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let http = lookupd.http_address();
    let (mut kept, _) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(4150, 4151)).await?;
    kept.acked(register_topic("t")).await?;
    let (mut dropped, _) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(5150, 5151)).await?;
    dropped
        .acked(snapshot(&[("t", &["c"]), ("only#ephemeral", &[])]))
        .await?;
    assert_eq!(
        lookup_producers(http, "t").await?,
        ["127.0.0.1:4150", "127.0.0.1:5150"]
    );

    let dropped_at = std::time::Instant::now();
    drop(dropped);
    eventually("the dropped broker leaves /lookup", || async {
        Ok(lookup_producers(http, "t").await? == ["127.0.0.1:4150"])
    })
    .await?;
    assert!(
        dropped_at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        dropped_at.elapsed()
    );
    // The ephemeral topic went with its only producer; the channel key stays.
    assert!(lookupd.lookup("only#ephemeral").await?.is_none());
    assert_eq!(
        lookupd.lookup("t").await?.unwrap()["channels"],
        json!(["c"])
    );

    // A broker that closes its side cleanly leaves the same way.
    kept.half_close();
    assert!(
        kept.next().await?.is_none(),
        "the lookupd ends the stream cleanly"
    );
    eventually("the leaving broker is gone from /nodes", || async {
        let nodes = lookupd.http("GET", "/nodes").await?.json()?;
        Ok(nodes == json!({ "producers": [] }))
    })
    .await?;
    lookupd.stop().await
}

/// Sends `first` (after an Identify when `identify_first`) and returns the status that ends
/// the stream.
async fn refused(
    lookupd: &TestLookupd,
    identify_first: bool,
    message: BrokerMessage,
) -> Result<tonic::Status> {
    let mut stream = if identify_first {
        RegistrationStream::identified(lookupd.grpc_address(), identify(4150, 4151))
            .await?
            .0
    } else {
        RegistrationStream::open(lookupd.grpc_address()).await?
    };
    stream.send_message(message).await?;
    stream.expect_status().await
}

fn message(kind: Kind) -> BrokerMessage {
    BrokerMessage { kind: Some(kind) }
}

fn identify_with(change: impl FnOnce(&mut Identify)) -> BrokerMessage {
    let mut m = identify(4150, 4151);
    change(&mut m);
    message(Kind::Identify(m))
}

#[tokio::test]
async fn malformed_messages_are_refused_with_invalid_argument() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let cases: Vec<(bool, BrokerMessage, &str)> = vec![
        (
            false,
            message(register_topic("t")),
            "the first message of a stream must be identify, got register_topic",
        ),
        (
            false,
            message(heartbeat()),
            "the first message of a stream must be identify, got heartbeat",
        ),
        (
            false,
            BrokerMessage { kind: None },
            "message has no kind: set one of identify, snapshot, register_topic, unregister_topic, register_channel, unregister_channel, heartbeat",
        ),
        (
            false,
            identify_with(|m| m.broadcast_address.clear()),
            "identify.broadcast_address is required",
        ),
        (
            false,
            identify_with(|m| m.tcp_port = 0),
            "identify.tcp_port must be in 1-65535, got 0",
        ),
        (
            false,
            identify_with(|m| m.http_port = 0),
            "identify.http_port must be in 1-65535, got 0",
        ),
        (
            false,
            identify_with(|m| m.tcp_port = 65536),
            "identify.tcp_port must be in 1-65535, got 65536",
        ),
        (
            false,
            identify_with(|m| m.version.clear()),
            "identify.version is required",
        ),
        (
            false,
            identify_with(|m| m.node_id = 5000),
            "identify.node_id must be in [0,1024), got 5000",
        ),
        (
            true,
            identify_with(|_| {}),
            "identify was already sent on this stream",
        ),
        (
            true,
            message(register_topic("bad topic")),
            r#"register_topic.topic "bad topic" is not a valid topic name"#,
        ),
        (
            true,
            message(register_topic("")),
            "register_topic.topic is required",
        ),
        (
            true,
            message(Kind::RegisterChannel(RegisterChannel {
                topic: "t".into(),
                channel: "".into(),
            })),
            "register_channel.channel is required",
        ),
        (
            true,
            message(register_channel("t", "c$")),
            r#"register_channel.channel "c$" is not a valid channel name"#,
        ),
        (
            true,
            message(snapshot(&[
                ("ok", &["fine"]),
                ("x#ephemeral#ephemeral", &[]),
            ])),
            r##"snapshot.topics[1].topic "x#ephemeral#ephemeral" is not a valid topic name"##,
        ),
    ];
    for (identify_first, message, want) in cases {
        let status = refused(&lookupd, identify_first, message).await?;
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, want)
        );
    }
    // Refused streams leave nothing behind.
    eventually("refused brokers are removed", || async {
        Ok(lookupd.http("GET", "/nodes").await?.json()? == json!({ "producers": [] }))
    })
    .await?;
    assert!(
        lookupd.lookup("ok").await?.is_none(),
        "the bad snapshot was not applied"
    );
    lookupd.stop().await
}

#[tokio::test]
async fn topic_channels_answers_every_known_channel() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let grpc = lookupd.grpc_address();
    let (mut a, _) = RegistrationStream::identified(grpc, identify(4150, 4151)).await?;
    a.acked(snapshot(&[("t", &["from-a", "tmp#ephemeral"])]))
        .await?;
    let (mut b, _) = RegistrationStream::identified(grpc, identify(5150, 5151)).await?;
    b.acked(register_channel("t", "from-b")).await?;
    let created = lookupd
        .http("POST", "/channel/create?topic=t&channel=from-http")
        .await?;
    assert_eq!(created.status, 200);

    assert_eq!(
        topic_channels(grpc, "t").await?.map_err(|s| s.to_string()),
        Ok(vec![
            "from-a".into(),
            "from-b".into(),
            "from-http".into(),
            "tmp#ephemeral".into()
        ])
    );
    assert_eq!(
        topic_channels(grpc, "unknown")
            .await?
            .map_err(|s| s.to_string()),
        Ok(vec![])
    );
    let status = topic_channels(grpc, "no/slashes").await?.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            r#"topic "no/slashes" is not a valid topic name"#
        )
    );
    let status = topic_channels(grpc, "").await?.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "topic is required")
    );
    lookupd.stop().await
}

#[tokio::test]
async fn a_newer_stream_of_the_same_broker_takes_over() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let grpc = lookupd.grpc_address();
    let (mut old, _) = RegistrationStream::identified(grpc, identify(4150, 4151)).await?;
    old.acked(register_topic("t")).await?;
    let (mut new, _) = RegistrationStream::identified(grpc, identify(4150, 4151)).await?;
    let status = old.expect_status().await?;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status.message(),
        "superseded by a newer stream of the same broker"
    );
    // The old stream's end does not unregister the broker: the new stream owns it now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        lookup_producers(lookupd.http_address(), "t").await?,
        ["127.0.0.1:4150"]
    );
    new.acked(snapshot(&[("u", &[])])).await?;
    assert_eq!(
        lookup_producers(lookupd.http_address(), "t").await?,
        Vec::<String>::new()
    );
    assert_eq!(
        lookup_producers(lookupd.http_address(), "u").await?,
        ["127.0.0.1:4150"]
    );
    lookupd.stop().await
}

#[tokio::test]
async fn silent_brokers_are_hidden_until_they_speak_again() -> Result<()> {
    let lookupd = TestLookupd::start(|o| {
        o.inactive_producer_timeout = Duration::from_secs(1);
    })
    .await?;
    let http = lookupd.http_address();
    let (mut broker, _) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(4150, 4151)).await?;
    broker.acked(register_topic("t")).await?;
    assert_eq!(lookup_producers(http, "t").await?, ["127.0.0.1:4150"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lookup_producers(http, "t").await?, Vec::<String>::new());
    let nodes = lookupd.http("GET", "/nodes").await?.json()?;
    assert_eq!(nodes, json!({ "producers": [] }));
    broker.acked(heartbeat()).await?;
    assert_eq!(lookup_producers(http, "t").await?, ["127.0.0.1:4150"]);
    lookupd.stop().await
}

#[tokio::test]
async fn tombstoned_brokers_are_hidden_for_the_tombstone_lifetime() -> Result<()> {
    let lookupd = TestLookupd::start(|o| {
        o.tombstone_lifetime = Duration::from_secs(1);
    })
    .await?;
    let http = lookupd.http_address();
    let (mut a, _) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(4150, 4151)).await?;
    let (mut b, _) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(5150, 5151)).await?;
    a.acked(register_topic("t")).await?;
    b.acked(register_topic("t")).await?;
    let resp = lookupd
        .http("POST", "/topic/tombstone?topic=t&node=127.0.0.1:4151")
        .await?;
    assert_eq!(resp.status, 200);
    assert_eq!(lookup_producers(http, "t").await?, ["127.0.0.1:5150"]);
    let nodes = lookupd.http("GET", "/nodes").await?.json()?;
    assert_eq!(nodes["producers"][0]["tombstones"], json!([true]));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        lookup_producers(http, "t").await?,
        ["127.0.0.1:4150", "127.0.0.1:5150"]
    );
    lookupd.stop().await
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let (mut broker, _) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(4150, 4151)).await?;
    let stop = tokio::spawn(lookupd.stop());
    let status = broker.expect_status().await?;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokio::time::timeout(Duration::from_secs(5), stop).await???;
    Ok(())
}

#[tokio::test]
async fn metrics_count_streams_messages_and_calls() -> Result<()> {
    let lookupd = TestLookupd::start(|_| {}).await?;
    let (mut broker, _) =
        RegistrationStream::identified(lookupd.grpc_address(), identify(4150, 4151)).await?;
    broker.acked(register_channel("t", "c")).await?;
    broker.acked(heartbeat()).await?;
    topic_channels(lookupd.grpc_address(), "t")
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    let mut bad = RegistrationStream::open(lookupd.grpc_address()).await?;
    bad.send(heartbeat()).await?;
    bad.expect_status().await?;
    let expected = [
        "knsq_lookupd_grpc_streams 1",
        "knsq_lookupd_brokers 1",
        "knsq_lookupd_topics 1",
        "knsq_lookupd_channels 1",
        r#"knsq_lookupd_grpc_messages_total{kind="identify"} 1"#,
        r#"knsq_lookupd_grpc_messages_total{kind="register_channel"} 1"#,
        r#"knsq_lookupd_grpc_messages_total{kind="heartbeat"} 2"#,
        r#"knsq_lookupd_grpc_requests_total{code="Ok",method="TopicChannels"} 1"#,
        r#"knsq_lookupd_grpc_requests_total{code="InvalidArgument",method="Register"} 1"#,
        r#"knsq_lookupd_grpc_request_duration_seconds_count{method="TopicChannels"} 1"#,
    ];
    eventually("the metrics show the streams and calls", || async {
        let text = lookupd.http("GET", "/metrics").await?.text();
        Ok(expected.iter().all(|line| text.lines().any(|l| l == *line)))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; expected {expected:#?}"))?;
    drop(broker);
    lookupd.stop().await
}
