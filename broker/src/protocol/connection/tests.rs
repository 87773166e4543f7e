//! The connection driven over `tokio::io::duplex`: no sockets, the broker's queues in a
//! temporary directory, and the client's side spoken byte for byte with `proto::wire`.

use super::serve;
use crate::broker::Broker;
use crate::config::Options;
use crate::protocol::{Clients, ConnectionMetrics, Shared};
use bytes::{Bytes, BytesMut};
use prometheus::{IntCounter, IntGauge};
use proto::wire::{Command, Frame, MAGIC_V2, Message, MessageId, Name};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Long enough for any frame the broker sends at once, short enough to fail a test quickly.
const WAIT: Duration = Duration::from_secs(5);

struct Harness {
    shared: Arc<Shared>,
    _data: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(|_| {})
    }

    fn with(adjust: impl FnOnce(&mut Options)) -> Harness {
        let data = tempfile::tempdir().unwrap();
        let mut options = Options::for_tests(data.path());
        adjust(&mut options);
        let counter = |name: &str| IntCounter::new(name, "test").unwrap();
        let shared = Arc::new(Shared {
            broker: Arc::new(Broker::for_tests(options)),
            clients: Arc::new(Clients::default()),
            auth: None,
            tls: None,
            tls_required: false,
            metrics: ConnectionMetrics {
                open: IntGauge::new("open", "test").unwrap(),
                accepted: counter("accepted"),
                refused: counter("refused"),
            },
        });
        Harness {
            shared,
            _data: data,
        }
    }

    /// A client that has sent the magic, on a connection served in a task.
    async fn connect(&self) -> Client {
        let (mut near, far) = tokio::io::duplex(64 * 1024);
        let (reader, writer) = tokio::io::split(far);
        let peer = "127.0.0.1:4000".parse().unwrap();
        let served = tokio::spawn(serve(
            reader,
            writer,
            peer,
            self.shared.clone(),
            CancellationToken::new(),
        ));
        near.write_all(MAGIC_V2).await.unwrap();
        Client {
            stream: near,
            read: BytesMut::new(),
            served,
        }
    }

    /// A client subscribed to `topic`/`channel`.
    async fn subscribed(&self, topic: &str, channel: &str) -> Client {
        let mut c = self.connect().await;
        c.send_ok(&subscribe(topic, channel)).await;
        c
    }

    fn depth(&self, topic: &str) -> i64 {
        let topic = self.shared.broker.existing_topic(topic).unwrap();
        topic.stats(None, false, None).depth
    }
}

struct Client {
    stream: DuplexStream,
    read: BytesMut,
    served: JoinHandle<()>,
}

fn name(text: &str) -> Name {
    Name::new(text).unwrap()
}

fn publish(topic: &str, body: &'static [u8]) -> Command {
    Command::Pub {
        topic: name(topic),
        body: Bytes::from_static(body),
    }
}

fn subscribe(topic: &str, channel: &str) -> Command {
    Command::Sub {
        topic: name(topic),
        channel: name(channel),
    }
}

impl Client {
    async fn send(&mut self, command: &Command) {
        let mut buf = BytesMut::new();
        command.encode(&mut buf);
        self.stream.write_all(&buf).await.unwrap();
    }

    /// Sends a command the broker answers `OK`.
    async fn send_ok(&mut self, command: &Command) {
        self.send(command).await;
        self.expect_ok().await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` at the end of the stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.read, 1 << 20).unwrap() {
                return Some(frame);
            }
            let read = timeout(WAIT, self.stream.read_buf(&mut self.read)).await;
            if read.expect("no frame in time").unwrap() == 0 {
                return None;
            }
        }
    }

    async fn response(&mut self) -> Bytes {
        match self.frame().await {
            Some(Frame::Response(data)) => data,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    async fn expect_ok(&mut self) {
        assert_eq!(self.response().await, "OK");
    }

    /// The text of the next frame, an error.
    async fn error(&mut self) -> String {
        match self.frame().await {
            Some(Frame::Error(text)) => String::from_utf8(text.to_vec()).unwrap(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    async fn message(&mut self) -> Message {
        match self.frame().await {
            Some(Frame::Message(message)) => message,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The broker's error `want`, after which it ends the connection.
    async fn fatal(mut self, want: &str) {
        assert_eq!(self.error().await, want);
        self.closed().await;
    }

    /// Waits for the broker to end the connection.
    async fn closed(mut self) {
        assert_eq!(self.frame().await, None);
        timeout(WAIT, self.served).await.unwrap().unwrap();
    }

    async fn identify(&mut self, body: Value) -> Value {
        self.send(&Command::Identify(body.to_string().into())).await;
        serde_json::from_slice(&self.response().await).unwrap()
    }
}

#[tokio::test]
async fn a_bad_magic_is_refused_and_closed() {
    let h = Harness::new();
    let (mut near, far) = tokio::io::duplex(1024);
    let (reader, writer) = tokio::io::split(far);
    let peer = "127.0.0.1:4000".parse().unwrap();
    let served = tokio::spawn(serve(
        reader,
        writer,
        peer,
        h.shared.clone(),
        CancellationToken::new(),
    ));
    near.write_all(b"  V1").await.unwrap();
    let mut out = Vec::new();
    near.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"\x00\x00\x00\x12\x00\x00\x00\x01E_BAD_PROTOCOL");
    served.await.unwrap();
    assert_eq!(h.shared.metrics.accepted.get(), 0);
}

#[tokio::test]
async fn identify_negotiates_and_answers_json() {
    let h = Harness::new();
    let mut c = h.connect().await;
    let answer = c
        .identify(json!({"feature_negotiation": true, "client_id": "c1", "heartbeat_interval": 5000, "msg_timeout": 30000}))
        .await;
    assert_eq!(answer["max_rdy_count"], 2500);
    assert_eq!(answer["version"], "1.3.0");
    assert_eq!(answer["msg_timeout"], 30000);
    assert_eq!(answer["tls_v1"], false);
    assert_eq!(answer["auth_required"], false);
    // The client's settings are what `/stats` shows.
    let client = h.shared.clients.producers(None);
    assert!(client.is_none(), "nothing published yet");
    assert_eq!(h.shared.metrics.open.get(), 1);
    c.send(&Command::Identify(Bytes::from_static(b"not json")))
        .await;
    c.fatal("E_BAD_BODY IDENTIFY failed to decode JSON body")
        .await;
    assert_eq!(h.shared.metrics.open.get(), 0);
}

#[tokio::test]
async fn identify_without_negotiation_answers_ok() {
    let h = Harness::new();
    let mut c = h.connect().await;
    c.send_ok(&Command::Identify(
        json!({"client_id": "c"}).to_string().into(),
    ))
    .await;
}

#[tokio::test]
async fn pub_mpub_and_dpub_are_answered_ok_and_queued() {
    let h = Harness::new();
    let mut c = h.connect().await;
    c.send_ok(&publish("t", b"one")).await;
    c.send_ok(&Command::Mpub {
        topic: name("t"),
        bodies: vec![Bytes::from_static(b"two"), Bytes::from_static(b"three")],
    })
    .await;
    c.send_ok(&Command::Dpub {
        topic: name("t"),
        defer_ms: 60_000,
        body: Bytes::from_static(b"later"),
    })
    .await;
    // No channel yet: the topic holds all four.
    assert_eq!(h.depth("t"), 4);
    let producers = h.shared.clients.producers(Some("t")).unwrap();
    assert_eq!(producers[0].pub_counts[0].count, 4);
    // Several commands in one write are answered in order.
    let mut batch = BytesMut::new();
    publish("t", b"a").encode(&mut batch);
    Command::Nop.encode(&mut batch);
    publish("u", b"b").encode(&mut batch);
    c.send_raw(&batch).await;
    c.expect_ok().await;
    c.expect_ok().await;
    assert_eq!(h.depth("u"), 1);
}

/// A topic without channels holds PUBs one by one and MPUBs as runs of their batch, in memory
/// up to --mem-queue-size and on disk past it; its first channel gets them all, in order.
#[tokio::test]
async fn what_a_topic_holds_reaches_its_first_channel_in_order() {
    let h = Harness::with(|o| o.mem_queue_size = 5);
    let mut producer = h.connect().await;
    let mpub = |bodies: &[&'static [u8]]| Command::Mpub {
        topic: name("t"),
        bodies: bodies.iter().map(|b| Bytes::from_static(b)).collect(),
    };
    producer.send_ok(&publish("t", b"a")).await;
    producer.send_ok(&mpub(&[b"b", b"c", b"d"])).await;
    // One fits in memory, the rest of this batch and all after it go to disk.
    producer.send_ok(&mpub(&[b"e", b"f", b"g"])).await;
    producer.send_ok(&publish("t", b"h")).await;
    producer.send_ok(&mpub(&[b"i", b"j"])).await;
    assert_eq!(h.depth("t"), 10);
    let topic = h.shared.broker.existing_topic("t").unwrap();
    let peeked: Vec<String> = topic.peek(3).into_iter().map(|m| m.body).collect();
    assert_eq!(peeked, ["YQ==", "Yg==", "Yw=="]); // a, b, c in base64

    let mut c = h.subscribed("t", "ch").await;
    c.send(&Command::Rdy(20)).await;
    let mut bodies = Vec::new();
    for _ in 0..10 {
        let m = c.message().await;
        bodies.push(String::from_utf8(m.body.to_vec()).unwrap());
        c.send(&Command::Fin(m.id)).await;
    }
    assert_eq!(bodies, ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]);
    assert_eq!(h.depth("t"), 0);
}

#[tokio::test]
async fn bad_publishes_are_fatal_errors() {
    let h = Harness::new();
    let mut c = h.connect().await;
    c.send_raw(b"PUB a$b\n\x00\x00\x00\x01x").await;
    assert_eq!(
        c.error().await,
        "E_BAD_TOPIC PUB topic name \"a$b\" is not valid"
    );
    c.closed().await;
    let mut c = h.connect().await;
    c.send_raw(b"MPUB t\n\x00\x00\x00\x04\x00\x00\x00\x00")
        .await;
    c.fatal("E_BAD_BODY MPUB invalid message count 0").await;
    let mut c = h.connect().await;
    c.send_raw(b"NOPE\n").await;
    c.fatal("E_INVALID invalid command NOPE").await;
}

#[tokio::test]
async fn sub_rdy_fin_req_and_touch_drive_a_channel() {
    let h = Harness::new();
    let mut c = h.subscribed("t", "ch").await;
    let mut producer = h.connect().await;
    producer.send_ok(&publish("t", b"m1")).await;
    c.send(&Command::Rdy(1)).await;
    let first = c.message().await;
    assert_eq!((&first.body[..], first.attempts), (&b"m1"[..], 1));

    // REQ puts it back at once: it comes again with one more attempt.
    c.send(&Command::Req {
        id: first.id,
        timeout_ms: 0,
    })
    .await;
    let again = c.message().await;
    assert_eq!((again.id, again.attempts), (first.id, 2));
    // TOUCH is not answered when it works; FIN neither.
    c.send(&Command::Touch(again.id)).await;
    c.send(&Command::Fin(again.id)).await;
    // A FIN of a message not in flight is an error the connection survives.
    c.send(&Command::Fin(again.id)).await;
    assert_eq!(
        c.error().await,
        format!("E_FIN_FAILED FIN {} failed ID not in flight", again.id)
    );
    c.send(&Command::Touch(MessageId::from_u64(7))).await;
    assert!(c.error().await.starts_with("E_TOUCH_FAILED TOUCH"));
    c.send(&Command::Nop).await;
    let channel = h.shared.broker.existing_topic("t").unwrap();
    let stats = channel.stats(None, true, None);
    let ch = &stats.channels[0];
    assert_eq!((ch.in_flight_count, ch.requeue_count), (0, 1));
    let client = &ch.clients.as_ref().unwrap()[0];
    assert_eq!(
        (client.state, client.finish_count, client.requeue_count),
        (3, 1, 1)
    );
}

#[tokio::test]
async fn consecutive_fins_in_one_read_are_applied_together() {
    let h = Harness::new();
    let mut c = h.subscribed("t", "ch").await;
    let mut producer = h.connect().await;
    producer
        .send(&Command::Mpub {
            topic: name("t"),
            bodies: (0..5).map(|i| Bytes::from(vec![b'a' + i])).collect(),
        })
        .await;
    producer.expect_ok().await;
    c.send(&Command::Rdy(5)).await;
    let mut fins = BytesMut::new();
    for _ in 0..5 {
        Command::Fin(c.message().await.id).encode(&mut fins);
    }
    c.send_raw(&fins).await;
    // All five were finished: the client has room for the next message at once, which it
    // is sent before the OK of the PUB that brought it.
    c.send(&publish("t", b"after")).await;
    assert_eq!(c.message().await.body, "after");
    c.expect_ok().await;
}

#[tokio::test]
async fn commands_out_of_state_are_refused() {
    let h = Harness::new();
    for command in [
        Command::Rdy(1),
        Command::Fin(MessageId::from_u64(1)),
        Command::Cls,
    ] {
        let mut c = h.connect().await;
        let label = format!("{:?}", command.name());
        c.send(&command).await;
        let text = c.error().await;
        assert_eq!(
            text,
            format!(
                "E_INVALID cannot {} in current state",
                command.name().as_str()
            ),
            "{label}"
        );
        c.closed().await;
    }
    // SUB once only; IDENTIFY only before SUB.
    let mut c = h.subscribed("t", "ch").await;
    c.send(&subscribe("t", "other")).await;
    c.fatal("E_INVALID cannot SUB in current state").await;
    let mut c = h.subscribed("t", "ch").await;
    c.send(&Command::Identify(Bytes::from_static(b"{}"))).await;
    c.fatal("E_INVALID cannot IDENTIFY in current state").await;
    // AUTH without auth servers.
    let mut c = h.connect().await;
    c.send(&Command::Auth(Bytes::from_static(b"secret"))).await;
    c.fatal("E_AUTH_DISABLED AUTH disabled").await;
}

#[tokio::test]
async fn cls_closes_the_subscription_but_lets_messages_finish() {
    let h = Harness::new();
    let mut c = h.subscribed("t", "ch").await;
    let mut producer = h.connect().await;
    producer.send_ok(&publish("t", b"m")).await;
    c.send(&Command::Rdy(10)).await;
    let held = c.message().await;
    c.send(&Command::Cls).await;
    assert_eq!(c.response().await, "CLOSE_WAIT");
    // Closing: RDY is ignored, nothing more is delivered, FIN still works.
    c.send(&Command::Rdy(10)).await;
    producer.send_ok(&publish("t", b"not for c")).await;
    c.send(&Command::Fin(held.id)).await;
    c.send(&Command::Cls).await;
    c.fatal("E_INVALID cannot CLS in current state").await;
    let topic = h.shared.broker.existing_topic("t").unwrap();
    let ch = &topic.stats(None, false, None).channels[0];
    assert_eq!((ch.depth, ch.in_flight_count, ch.client_count), (1, 0, 0));
}

#[tokio::test]
async fn an_ephemeral_channel_goes_with_its_last_consumer() {
    let h = Harness::new();
    let c = h.subscribed("t", "ch#ephemeral").await;
    let topic = h.shared.broker.existing_topic("t").unwrap();
    assert!(topic.existing_channel("ch#ephemeral").is_some());
    drop(c.stream);
    timeout(WAIT, c.served).await.unwrap().unwrap();
    assert!(topic.existing_channel("ch#ephemeral").is_none());
}

#[tokio::test(start_paused = true)]
async fn heartbeats_are_sent_and_a_silent_client_is_dropped() {
    let h = Harness::new();
    let mut c = h.connect().await;
    let answer = c
        .identify(json!({"feature_negotiation": true, "heartbeat_interval": 1000}))
        .await;
    assert_eq!(answer["max_rdy_count"], 2500);
    let started = tokio::time::Instant::now();
    assert_eq!(c.response().await, "_heartbeat_");
    assert!(started.elapsed() >= Duration::from_secs(1));
    // A NOP answers nothing but counts as a command; two heartbeats of silence after it
    // end the connection.
    c.send(&Command::Nop).await;
    let quiet_since = tokio::time::Instant::now();
    assert_eq!(c.response().await, "_heartbeat_");
    while let Some(frame) = c.frame().await {
        assert_eq!(frame, Frame::Response(Bytes::from_static(b"_heartbeat_")));
    }
    assert!(quiet_since.elapsed() >= Duration::from_secs(2));
    timeout(WAIT, c.served).await.unwrap().unwrap();
}

#[tokio::test]
async fn sub_needs_heartbeats() {
    let h = Harness::new();
    let mut c = h.connect().await;
    c.send_ok(&Command::Identify(
        json!({"heartbeat_interval": -1}).to_string().into(),
    ))
    .await;
    c.send(&subscribe("t", "ch")).await;
    c.fatal("E_INVALID cannot SUB with heartbeats disabled")
        .await;
}

#[tokio::test]
async fn shutdown_closes_the_connection_cleanly() {
    let h = Harness::new();
    let (mut near, far) = tokio::io::duplex(1024);
    let (reader, writer) = tokio::io::split(far);
    let shutdown = CancellationToken::new();
    let peer = "127.0.0.1:4000".parse().unwrap();
    let served = tokio::spawn(serve(
        reader,
        writer,
        peer,
        h.shared.clone(),
        shutdown.clone(),
    ));
    near.write_all(MAGIC_V2).await.unwrap();
    let mut ok = Vec::new();
    let mut buf = BytesMut::new();
    publish("t", b"x").encode(&mut buf);
    near.write_all(&buf).await.unwrap();
    while ok.len() < 10 {
        near.read_buf(&mut ok).await.unwrap();
    }
    shutdown.cancel();
    let mut rest = Vec::new();
    timeout(WAIT, near.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    timeout(WAIT, served).await.unwrap().unwrap();
    assert!(h.shared.broker.existing_topic("t").is_some());
}
