//! Every endpoint and error of the HTTP API, through the router without a socket.

use super::router;
use crate::directory::{Directory, LookupdInfo};
use crate::metrics::Metrics;
use crate::registry::{Lifetimes, PeerInfo, Registry};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tower::ServiceExt;

struct Reply {
    status: StatusCode,
    nsq_header: Option<String>,
    content_type: Option<String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Asserts nsqlookupd's V1 error: the status, `{"message": …}` and the header.
    fn assert_error(&self, status: StatusCode, message: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.json(), json!({ "message": message }));
        assert_eq!(self.nsq_header.as_deref(), Some("nsq; version=1.0"));
    }

    /// Asserts an empty V1 success.
    fn assert_done(&self) {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        assert_eq!(self.body, "");
        assert_eq!(self.nsq_header.as_deref(), Some("nsq; version=1.0"));
    }
}

fn peer(address: &str, tcp_port: u16) -> PeerInfo {
    PeerInfo {
        remote_address: format!("127.0.0.1:{}", 50000 + tcp_port),
        hostname: format!("{address}.host"),
        broadcast_address: address.into(),
        tcp_port,
        http_port: tcp_port + 1,
        version: "0.1.0".into(),
        node_id: 7,
        topology_zone: "zone-a".into(),
        topology_region: "region-1".into(),
        handoff_port: 0,
    }
}

fn directory(lifetimes: Lifetimes) -> Arc<Directory> {
    Arc::new(Directory::new(
        Registry::new(lifetimes),
        Metrics::new().unwrap(),
        LookupdInfo {
            broadcast_address: "lookupd".into(),
            hostname: "lookupd".into(),
            grpc_port: 4160,
            http_port: 4161,
        },
    ))
}

/// A lookupd with broker b1 (topics t: c1, c2#ephemeral; u) and broker b2 (topic t).
fn populated() -> (Arc<Directory>, Router) {
    let d = directory(Lifetimes::default());
    let now = SystemTime::now();
    d.update(|r| {
        r.identify(1, peer("b1", 4150), now);
        r.identify(2, peer("b2", 5150), now);
        r.register_channel(1, "t", "c1", now).unwrap();
        r.register_channel(1, "t", "c2#ephemeral", now).unwrap();
        r.register_topic(1, "u", now).unwrap();
        r.register_topic(2, "t", now).unwrap();
    });
    let app = router(d.clone());
    (d, app)
}

async fn call(app: &Router, method: &str, uri: &str) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let nsq_header = header("x-nsq-content-type");
    let content_type = header("content-type");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        nsq_header,
        content_type,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

fn peer_json(address: &str, tcp_port: u16) -> Value {
    json!({
        "remote_address": format!("127.0.0.1:{}", 50000 + tcp_port),
        "hostname": format!("{address}.host"),
        "broadcast_address": address,
        "tcp_port": tcp_port,
        "http_port": tcp_port + 1,
        "version": "0.1.0",
        "topology_zone": "zone-a",
        "topology_region": "region-1",
    })
}

#[tokio::test]
async fn ping_and_info() {
    let (_, app) = populated();
    let ping = call(&app, "GET", "/ping").await;
    assert_eq!((ping.status, ping.body.as_str()), (StatusCode::OK, "OK"));
    let info = call(&app, "GET", "/info").await;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(info.json(), json!({ "version": "1.3.0" }));
    assert_eq!(info.nsq_header.as_deref(), Some("nsq; version=1.0"));
    assert_eq!(
        info.content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
}

#[tokio::test]
async fn lookup_lists_channels_and_producers_field_for_field() {
    let (_, app) = populated();
    let reply = call(&app, "GET", "/lookup?topic=t").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.nsq_header.as_deref(), Some("nsq; version=1.0"));
    assert_eq!(
        reply.json(),
        json!({
            "channels": ["c1", "c2#ephemeral"],
            "producers": [peer_json("b1", 4150), peer_json("b2", 5150)],
        })
    );
    let reply = call(&app, "GET", "/lookup?topic=u").await;
    assert_eq!(
        reply.json(),
        json!({ "channels": [], "producers": [peer_json("b1", 4150)] })
    );
}

#[tokio::test]
async fn lookup_errors() {
    let (_, app) = populated();
    call(&app, "GET", "/lookup")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "MISSING_ARG_TOPIC");
    call(&app, "GET", "/lookup?topic=nope")
        .await
        .assert_error(StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND");
    call(&app, "GET", "/lookup?topic=%zz")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    // A topic key without producers is found, with no producers.
    call(&app, "POST", "/topic/create?topic=lonely")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/lookup?topic=lonely").await;
    assert_eq!(reply.json(), json!({ "channels": [], "producers": [] }));
}

#[tokio::test]
async fn topics_and_channels() {
    let (_, app) = populated();
    let reply = call(&app, "GET", "/topics").await;
    assert_eq!(reply.json(), json!({ "topics": ["t", "u"] }));
    assert_eq!(reply.nsq_header.as_deref(), Some("nsq; version=1.0"));
    let reply = call(&app, "GET", "/channels?topic=t").await;
    assert_eq!(reply.json(), json!({ "channels": ["c1", "c2#ephemeral"] }));
    // Unknown (even invalid) topics have no channels; no validation, no 404.
    let reply = call(&app, "GET", "/channels?topic=a$b").await;
    assert_eq!(
        (reply.status, reply.json()),
        (StatusCode::OK, json!({ "channels": [] }))
    );
    call(&app, "GET", "/channels")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "MISSING_ARG_TOPIC");
    let empty = directory(Lifetimes::default());
    let reply = call(&router(empty), "GET", "/topics").await;
    assert_eq!(reply.json(), json!({ "topics": [] }));
}

#[tokio::test]
async fn nodes_list_topics_with_aligned_tombstones() {
    let (_, app) = populated();
    call(&app, "POST", "/topic/tombstone?topic=t&node=b1:4151")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/nodes").await;
    assert_eq!(reply.nsq_header.as_deref(), Some("nsq; version=1.0"));
    let mut b1 = peer_json("b1", 4150);
    b1["tombstones"] = json!([true, false]);
    b1["topics"] = json!(["t", "u"]);
    let mut b2 = peer_json("b2", 5150);
    b2["tombstones"] = json!([false]);
    b2["topics"] = json!(["t"]);
    assert_eq!(reply.json(), json!({ "producers": [b1, b2] }));
    // The tombstoned producer is hidden from /lookup of that topic only.
    let reply = call(&app, "GET", "/lookup?topic=t").await;
    assert_eq!(reply.json()["producers"], json!([peer_json("b2", 5150)]));
    let reply = call(&app, "GET", "/lookup?topic=u").await;
    assert_eq!(reply.json()["producers"], json!([peer_json("b1", 4150)]));
}

#[tokio::test]
async fn inactive_brokers_are_hidden_from_lookup_and_nodes() {
    let d = directory(Lifetimes {
        inactive_producer_timeout: Duration::from_secs(60),
        tombstone_lifetime: Duration::from_secs(45),
    });
    let long_ago = SystemTime::now() - Duration::from_secs(120);
    d.update(|r| {
        r.identify(1, peer("old", 4150), long_ago);
        r.register_topic(1, "t", long_ago).unwrap();
        r.identify(2, peer("new", 4150), SystemTime::now());
        r.register_topic(2, "t", SystemTime::now()).unwrap();
    });
    let app = router(d);
    let reply = call(&app, "GET", "/lookup?topic=t").await;
    assert_eq!(reply.json()["producers"], json!([peer_json("new", 4150)]));
    let reply = call(&app, "GET", "/nodes").await;
    assert_eq!(reply.json()["producers"].as_array().unwrap().len(), 1);
    // /debug shows everything registered, silent or not.
    let reply = call(&app, "GET", "/debug").await;
    assert_eq!(reply.json()["topic:t:"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn topic_create_and_delete() {
    let (_, app) = populated();
    call(&app, "POST", "/topic/create")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "MISSING_ARG_TOPIC");
    call(&app, "POST", "/topic/create?topic=a$b")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "INVALID_ARG_TOPIC");
    call(&app, "POST", "/topic/create?topic=new")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/topics").await;
    assert_eq!(reply.json(), json!({ "topics": ["new", "t", "u"] }));
    call(&app, "POST", "/topic/delete")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "MISSING_ARG_TOPIC");
    // Deleting removes the key and its channels, producers or not; unknown names are fine.
    call(&app, "POST", "/topic/delete?topic=t")
        .await
        .assert_done();
    call(&app, "POST", "/topic/delete?topic=never$seen")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/topics").await;
    assert_eq!(reply.json(), json!({ "topics": ["new", "u"] }));
    let reply = call(&app, "GET", "/channels?topic=t").await;
    assert_eq!(reply.json(), json!({ "channels": [] }));
    call(&app, "GET", "/lookup?topic=t")
        .await
        .assert_error(StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND");
}

#[tokio::test]
async fn channel_create_and_delete() {
    let (_, app) = populated();
    for (query, message) in [
        ("", "MISSING_ARG_TOPIC"),
        ("?topic=a$b&channel=c", "INVALID_ARG_TOPIC"),
        ("?topic=t", "MISSING_ARG_CHANNEL"),
        ("?topic=t&channel=c%20d", "INVALID_ARG_CHANNEL"),
    ] {
        for action in ["create", "delete"] {
            call(&app, "POST", &format!("/channel/{action}{query}"))
                .await
                .assert_error(StatusCode::BAD_REQUEST, message);
        }
    }
    call(&app, "POST", "/channel/create?topic=v&channel=c")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/lookup?topic=v").await;
    assert_eq!(reply.json(), json!({ "channels": ["c"], "producers": [] }));
    call(&app, "POST", "/channel/delete?topic=v&channel=c")
        .await
        .assert_done();
    call(&app, "POST", "/channel/delete?topic=v&channel=c")
        .await
        .assert_error(StatusCode::NOT_FOUND, "CHANNEL_NOT_FOUND");
    call(&app, "POST", "/channel/delete?topic=t&channel=c1")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/channels?topic=t").await;
    assert_eq!(reply.json(), json!({ "channels": ["c2#ephemeral"] }));
}

#[tokio::test]
async fn tombstone_errors() {
    let (_, app) = populated();
    call(&app, "POST", "/topic/tombstone?node=b1:4151")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "MISSING_ARG_TOPIC");
    call(&app, "POST", "/topic/tombstone?topic=t")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "MISSING_ARG_NODE");
    // An unknown node or topic is not an error.
    call(&app, "POST", "/topic/tombstone?topic=t&node=nobody:1")
        .await
        .assert_done();
    call(&app, "POST", "/topic/tombstone?topic=nope&node=b1:4151")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/lookup?topic=t").await;
    assert_eq!(reply.json()["producers"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn debug_lists_every_registration_key() {
    let (d, app) = populated();
    call(&app, "POST", "/topic/tombstone?topic=u&node=b1:4151")
        .await
        .assert_done();
    let reply = call(&app, "GET", "/debug").await;
    assert_eq!(reply.nsq_header.as_deref(), Some("nsq; version=1.0"));
    let debug = reply.json();
    let keys: Vec<&str> = debug
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "channel:t:c1",
            "channel:t:c2#ephemeral",
            "client::",
            "topic:t:",
            "topic:u:"
        ]
    );
    assert_eq!(debug["client::"].as_array().unwrap().len(), 2);
    let b1 = &debug["topic:u:"][0];
    let last_update = b1["last_update"].as_i64().unwrap();
    assert!(last_update > 1_600_000_000_000_000_000, "{b1}");
    assert_eq!(b1["tombstoned"], json!(true));
    assert!(b1["tombstoned_at"].as_i64().unwrap() >= last_update);
    let expected = json!({
        "id": "b1:4150",
        "hostname": "b1.host",
        "broadcast_address": "b1",
        "tcp_port": 4150,
        "http_port": 4151,
        "version": "0.1.0",
        "topology_zone": "zone-a",
        "topology_region": "region-1",
        "last_update": last_update,
        "tombstoned": false,
        "tombstoned_at": -6_795_364_578_871_345_152i64,
    });
    assert_eq!(debug["channel:t:c1"][0], expected);
    // Producer-less keys are not listed, as in nsqlookupd.
    d.update(|r| r.create_topic("empty"));
    let debug = call(&app, "GET", "/debug").await.json();
    assert!(debug.get("topic:empty:").is_none());
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let (_, app) = populated();
    call(&app, "GET", "/nope")
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    call(&app, "POST", "/lookup?topic=t")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
    call(&app, "GET", "/topic/create?topic=t")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn metrics_count_registrations_and_requests() {
    let (_, app) = populated();
    call(&app, "GET", "/lookup?topic=t").await;
    call(&app, "GET", "/lookup?topic=nope").await;
    call(&app, "GET", "/nope").await;
    let reply = call(&app, "GET", "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.body;
    for line in [
        "knsq_lookupd_brokers 2",
        "knsq_lookupd_topics 2",
        "knsq_lookupd_channels 2",
        "knsq_lookupd_grpc_streams 0",
        r#"knsq_lookupd_http_requests_total{route="/lookup",status="200"} 1"#,
        r#"knsq_lookupd_http_requests_total{route="/lookup",status="404"} 1"#,
        r#"knsq_lookupd_http_requests_total{route="unmatched",status="404"} 1"#,
        r#"knsq_lookupd_http_request_duration_seconds_count{route="/lookup"} 2"#,
        r#"knsq_build_info{nsqlookupd_version="1.3.0",version="0.1.0"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}
