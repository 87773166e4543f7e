//! The lookups: `/lookup`, `/topics`, `/channels`, `/nodes`, `/debug`, and `/ping`, `/info`,
//! `/metrics`.

use crate::directory::Directory;
use crate::registry::PeerInfo;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use serde_json::{Value, json};
use server_kit::http::{ApiError, Params, json_response, metrics_response};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

type Reply = Result<Response, ApiError>;

/// Go's `time.Time{}.UnixNano()`, which nsqlookupd's `/debug` reports for a producer never
/// tombstoned.
const GO_ZERO_TIME_UNIX_NANO: i64 = -6_795_364_578_871_345_152;

fn to_json(value: &impl Serialize) -> Reply {
    serde_json::to_string(value)
        .map(|body| json_response(StatusCode::OK, body))
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"))
}

/// nsqlookupd's `PeerInfo` JSON, field for field.
#[derive(Serialize)]
struct Peer<'a> {
    remote_address: &'a str,
    hostname: &'a str,
    broadcast_address: &'a str,
    tcp_port: u16,
    http_port: u16,
    version: &'a str,
    topology_zone: &'a str,
    topology_region: &'a str,
}

impl<'a> From<&'a PeerInfo> for Peer<'a> {
    fn from(p: &'a PeerInfo) -> Peer<'a> {
        Peer {
            remote_address: &p.remote_address,
            hostname: &p.hostname,
            broadcast_address: &p.broadcast_address,
            tcp_port: p.tcp_port,
            http_port: p.http_port,
            version: &p.version,
            topology_zone: &p.topology_zone,
            topology_region: &p.topology_region,
        }
    }
}

/// The `topic` parameter, which must be present (it may be empty, as in nsqlookupd).
pub(super) fn topic_param(params: &Params) -> Result<&str, ApiError> {
    params
        .get("topic")
        .ok_or(ApiError::bad_request("MISSING_ARG_TOPIC"))
}

pub(super) async fn ping() -> &'static str {
    "OK"
}

pub(super) async fn info() -> Reply {
    to_json(&json!({ "version": crate::NSQ_COMPAT_VERSION }))
}

pub(super) async fn lookup(State(d): State<Arc<Directory>>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let topic = topic_param(&params)?;
    let now = SystemTime::now();
    d.read(|r| {
        let found = r
            .lookup(topic, now)
            .ok_or(ApiError::not_found("TOPIC_NOT_FOUND"))?;
        let producers: Vec<Peer<'_>> = found.producers.into_iter().map(Peer::from).collect();
        to_json(&json!({ "channels": found.channels, "producers": producers }))
    })
}

pub(super) async fn topics(State(d): State<Arc<Directory>>) -> Reply {
    d.read(|r| to_json(&json!({ "topics": r.topics() })))
}

pub(super) async fn channels(State(d): State<Arc<Directory>>, RawQuery(q): RawQuery) -> Reply {
    let params = Params::parse(q.as_deref())?;
    let topic = topic_param(&params)?;
    d.read(|r| to_json(&json!({ "channels": r.channels(topic) })))
}

/// One producer of `/nodes`.
#[derive(Serialize)]
struct Node<'a> {
    #[serde(flatten)]
    peer: Peer<'a>,
    tombstones: Vec<bool>,
    topics: Vec<&'a str>,
}

pub(super) async fn nodes(State(d): State<Arc<Directory>>) -> Reply {
    let now = SystemTime::now();
    d.read(|r| {
        let producers: Vec<Node<'_>> = r
            .nodes(now)
            .into_iter()
            .map(|node| Node {
                peer: Peer::from(node.info),
                tombstones: node.topics.iter().map(|&(_, t)| t).collect(),
                topics: node.topics.iter().map(|&(t, _)| t).collect(),
            })
            .collect();
        to_json(&json!({ "producers": producers }))
    })
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub(super) async fn debug(State(d): State<Arc<Directory>>) -> Reply {
    d.read(|r| {
        let entries: serde_json::Map<String, Value> = r
            .debug()
            .into_iter()
            .map(|entry| {
                let producers = entry
                    .producers
                    .iter()
                    .map(|p| {
                        json!({
                            "id": p.id.to_string(),
                            "hostname": p.info.hostname,
                            "broadcast_address": p.info.broadcast_address,
                            "tcp_port": p.info.tcp_port,
                            "http_port": p.info.http_port,
                            "version": p.info.version,
                            "topology_zone": p.info.topology_zone,
                            "topology_region": p.info.topology_region,
                            "last_update": unix_nanos(p.last_update),
                            "tombstoned": p.tombstoned_at.is_some(),
                            "tombstoned_at": p.tombstoned_at.map_or(GO_ZERO_TIME_UNIX_NANO, unix_nanos),
                        })
                    })
                    .collect();
                (entry.key, Value::Array(producers))
            })
            .collect();
        to_json(&entries)
    })
}

pub(super) async fn metrics(State(d): State<Arc<Directory>>) -> Response {
    metrics_response(d.metrics.render())
}
