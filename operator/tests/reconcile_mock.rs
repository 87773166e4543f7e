//! The reconciler against a mocked API server (`tower-test`): each test scripts the server's
//! answers and asserts the exact requests the reconciler sends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use kube::api::{ApiResource, GroupVersionKind};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use operator::children::{Children, DefaultImages};
use operator::controller::{Context, Error, Resources, error_policy, reconcile};
use operator::crd::{NSQCluster, NSQClusterSpec, PAUSE_ANNOTATION};
use operator::knsq_http::{self, KnsqHttp, Transport, TransportError};
use operator::metrics::Metrics;
use prometheus::Registry;
use serde_json::{Value, json};
use tower_test::mock::Handle;

type MockHandle = Handle<Request<Body>, Response<Body>>;

/// How the mocked API server answers one request.
enum Reply {
    /// Answer with the request's own body, as server-side apply of an unchanged object does.
    Echo,
    /// Answer with this object.
    Object(Value),
    /// Answer with a `Status` error.
    Error(StatusCode, &'static str),
}

/// A request as the server saw it: method, path with query, JSON body.
#[derive(Debug)]
struct Seen {
    method: String,
    uri: String,
    body: Value,
}

async fn serve(mut handle: MockHandle, replies: Vec<Reply>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for reply in replies {
        let (request, send) = handle
            .next_request()
            .await
            .expect("the reconciler sent fewer requests than scripted");
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        let (status, answer) = match reply {
            Reply::Echo => (StatusCode::OK, body.clone()),
            Reply::Object(object) => (StatusCode::OK, object),
            Reply::Error(code, reason) => (
                code,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("scripted {reason}"), "reason": reason, "code": code.as_u16()}),
            ),
        };
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&answer).expect("encode")))
            .expect("response");
        send.send_response(response);
        seen.push(Seen { method, uri, body });
    }
    seen
}

/// The brokers' and lookupds' HTTP APIs, scripted: each `(method, address, path)` answers with
/// its status and body; anything else is refused like a closed port.
/// `(method, address, path)`.
type Call = (String, String, String);

#[derive(Default)]
struct Servers {
    answers: Mutex<BTreeMap<Call, (u16, String)>>,
    seen: Mutex<Vec<String>>,
}

impl Servers {
    fn answer(&self, method: &str, address: &str, path: &str, status: u16, body: Value) {
        self.answers.lock().expect("lock").insert(
            (method.to_owned(), address.to_owned(), path.to_owned()),
            (status, body.to_string()),
        );
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Transport for Servers {
    fn send(
        &self,
        method: http::Method,
        address: SocketAddr,
        path: String,
        body: Bytes,
    ) -> BoxFuture<'static, Result<knsq_http::Reply, TransportError>> {
        let key = (method.to_string(), address.to_string(), path.clone());
        let mut line = format!("{method} {address}{path}");
        if !body.is_empty() {
            line.push(' ');
            line.push_str(&String::from_utf8_lossy(&body));
        }
        self.seen.lock().expect("lock").push(line);
        let answer = self.answers.lock().expect("lock").get(&key).cloned();
        Box::pin(async move {
            let (status, body) = answer.ok_or_else(|| {
                TransportError::Connect(std::io::ErrorKind::ConnectionRefused.into())
            })?;
            Ok(knsq_http::Reply {
                status: StatusCode::from_u16(status).expect("status"),
                body: Bytes::from(body),
            })
        })
    }
}

/// A reconciler context whose client talks to the mocked server behind the returned handle, and
/// whose brokers and lookupds are `servers`.
fn harness(registry: &Registry, servers: Arc<Servers>) -> (Arc<Context>, MockHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Metrics::register(registry).expect("metrics");
    let pdb = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    (
        Arc::new(
            Context::new(
                client,
                images(),
                metrics,
                Resources {
                    pdb,
                    service_monitor: None,
                    prometheus_rule: None,
                },
            )
            .with_http(KnsqHttp::new(servers)),
        ),
        handle,
    )
}

fn cluster(spec: NSQClusterSpec) -> NSQCluster {
    let mut cluster = NSQCluster::new("events", spec);
    cluster.metadata.namespace = Some("prod".to_owned());
    cluster.metadata.uid = Some("7d3c0e8a-0000-4000-8000-000000000001".to_owned());
    cluster.metadata.generation = Some(2);
    cluster
}

fn images() -> DefaultImages {
    DefaultImages {
        broker: "knsq/knsq-broker:1.0.0".to_owned(),
        lookupd: "knsq/knsq-lookupd:1.0.0".to_owned(),
    }
}

/// Run one reconcile against a fresh scripted server; returns its result, the requests, and
/// the context (for the error policy).
async fn run(
    cluster: NSQCluster,
    replies: Vec<Reply>,
    registry: &Registry,
) -> (Result<Action, Error>, Vec<Seen>, Arc<Context>) {
    run_with(cluster, replies, registry, Arc::new(Servers::default())).await
}

async fn run_with(
    cluster: NSQCluster,
    replies: Vec<Reply>,
    registry: &Registry,
    servers: Arc<Servers>,
) -> (Result<Action, Error>, Vec<Seen>, Arc<Context>) {
    let expected = replies.len();
    let (ctx, handle) = harness(registry, servers);
    let server = tokio::spawn(serve(handle, replies));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(cluster), ctx.clone()),
    )
    .await
    .expect("reconcile finished: it sent no request beyond the script");
    let seen = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("every scripted request was sent")
        .expect("server task");
    assert_eq!(seen.len(), expected);
    (result, seen, ctx)
}

const STS: &str = "/apis/apps/v1/namespaces/prod/statefulsets";
const APPLY: &str = "?&force=true&fieldManager=knsq-operator";

fn not_found() -> Reply {
    Reply::Error(StatusCode::NOT_FOUND, "NotFound")
}

/// The nine applies of a cluster's children, in order.
fn apply_requests() -> Vec<(String, String)> {
    [
        "/api/v1/namespaces/prod/configmaps/events-config",
        "/api/v1/namespaces/prod/services/events-lookupd-headless",
        "/api/v1/namespaces/prod/services/events-lookupd",
        "/api/v1/namespaces/prod/services/events-broker-headless",
        "/api/v1/namespaces/prod/services/events-broker",
        "/apis/apps/v1/namespaces/prod/statefulsets/events-lookupd",
        "/apis/apps/v1/namespaces/prod/statefulsets/events-broker",
        "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/events-lookupd",
        "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/events-broker",
    ]
    .into_iter()
    .map(|path| ("PATCH".to_owned(), format!("{path}{APPLY}")))
    .collect()
}

fn requests(seen: &[Seen]) -> Vec<(String, String)> {
    seen.iter()
        .map(|s| (s.method.clone(), s.uri.clone()))
        .collect()
}

const SELECTOR: &str = "labelSelector=app.kubernetes.io%2Fcomponent%3Dbroker%2Capp.kubernetes.io%2Finstance%3Devents%2Capp.kubernetes.io%2Fname%3Dknsq";

/// The two StatefulSets read first, then the brokers' pods (when their StatefulSet exists) and
/// claims.
fn gets(existing: bool) -> Vec<(String, String)> {
    let mut out = vec![
        ("GET".to_owned(), format!("{STS}/events-lookupd")),
        ("GET".to_owned(), format!("{STS}/events-broker")),
    ];
    if existing {
        out.push((
            "GET".to_owned(),
            format!("/api/v1/namespaces/prod/pods?&{SELECTOR}"),
        ));
    }
    out.push((
        "GET".to_owned(),
        format!("/api/v1/namespaces/prod/persistentvolumeclaims?&{SELECTOR}"),
    ));
    out
}

fn list(kind: &str, items: Vec<Value>) -> Reply {
    Reply::Object(json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items}))
}

/// The answers to `gets(true)`: the StatefulSets, then these pods and claims.
fn observed(lookupd: Value, broker: Value, pods: Vec<Value>, claims: Vec<Value>) -> Vec<Reply> {
    vec![
        Reply::Object(lookupd),
        Reply::Object(broker),
        list("PodList", pods),
        list("PersistentVolumeClaimList", claims),
    ]
}

/// What the server answers to a status patch: the cluster (the tests read the request only).
fn stored_cluster() -> Reply {
    Reply::Object(serde_json::to_value(cluster(NSQClusterSpec::default())).expect("encode"))
}

fn event_post() -> (String, String) {
    (
        "POST".to_owned(),
        "/apis/events.k8s.io/v1/namespaces/prod/events?".to_owned(),
    )
}

fn status_patch() -> (String, String) {
    (
        "PATCH".to_owned(),
        format!("/apis/knsq.io/v1alpha1/namespaces/prod/nsqclusters/events/status{APPLY}"),
    )
}

fn existing(spec: NSQClusterSpec, ready: bool) -> (Value, Value) {
    let children = Children::build(&cluster(spec), &images()).expect("valid");
    let with_status = |mut sts: StatefulSet| {
        let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        sts.metadata.generation = Some(1);
        let count = if ready { replicas } else { 0 };
        sts.status = Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas,
            ready_replicas: Some(count),
            updated_replicas: Some(replicas),
            current_revision: Some("r1".to_owned()),
            update_revision: Some("r1".to_owned()),
            ..StatefulSetStatus::default()
        });
        serde_json::to_value(sts).expect("encode")
    };
    (with_status(children.lookupd), with_status(children.broker))
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .expect("condition")
}

#[tokio::test]
async fn create_applies_every_child_records_events_and_status() {
    let mut replies = vec![
        not_found(),
        not_found(),
        list("PersistentVolumeClaimList", Vec::new()),
    ];
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(
        cluster(NSQClusterSpec::default()),
        replies,
        &Registry::new(),
    )
    .await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(300))
    );

    let mut expected = gets(false);
    expected.extend(apply_requests());
    expected.extend([event_post(), event_post(), status_patch()]);
    assert_eq!(requests(&seen), expected);

    let configmap = &seen[3].body;
    assert_eq!(configmap["kind"], "ConfigMap");
    assert_eq!(
        configmap["metadata"]["ownerReferences"][0]["name"],
        "events"
    );
    let broker = &seen[9].body;
    assert_eq!(broker["kind"], "StatefulSet");
    assert_eq!(broker["spec"]["replicas"], 3);
    assert_eq!(
        broker["spec"]["template"]["spec"]["containers"][0]["image"],
        "knsq/knsq-broker:1.0.0"
    );
    let pdb = &seen[10].body;
    assert_eq!(
        (pdb["apiVersion"].as_str(), pdb["kind"].as_str()),
        (Some("policy/v1"), Some("PodDisruptionBudget"))
    );

    assert_eq!(seen[12].body["reason"], "Created");
    assert_eq!(
        seen[12].body["note"],
        "created the lookupd StatefulSet with 3 replicas"
    );
    assert_eq!(
        seen[13].body["note"],
        "created the broker StatefulSet with 3 replicas"
    );
    assert_eq!(seen[13].body["regarding"]["kind"], "NSQCluster");
    assert_eq!(seen[13].body["related"]["kind"], "StatefulSet");
    assert_eq!(seen[13].body["related"]["name"], "events-broker");

    let status = &seen[14].body;
    assert_eq!(status["status"]["observedGeneration"], 2);
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Progressing")["status"], "True");
    assert_eq!(
        status["status"]["endpoints"]["brokerTcp"],
        "events-broker.prod.svc:4150"
    );
}

#[tokio::test]
async fn scale_up_applies_new_replicas_and_records_it() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.broker.replicas = 5;
    let mut replies = observed(lookupd, broker, Vec::new(), Vec::new());
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(cluster(spec), replies, &Registry::new()).await;
    result.expect("reconciled");

    let mut expected = gets(true);
    expected.extend(apply_requests());
    expected.extend([event_post(), status_patch()]);
    assert_eq!(requests(&seen), expected);
    assert_eq!(seen[10].body["spec"]["replicas"], 5);
    assert_eq!(
        seen[9].body["spec"]["replicas"], 3,
        "lookupds keep their count"
    );
    assert_eq!(seen[13].body["reason"], "Scaled");
    assert_eq!(seen[13].body["note"], "scaled brokers from 3 to 5");
}

#[tokio::test]
async fn image_change_rolls_the_statefulset() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.broker.pod.image = Some("example/knsq-broker:2.0.0".to_owned());
    let mut replies = observed(lookupd, broker, Vec::new(), Vec::new());
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(cluster(spec), replies, &Registry::new()).await;
    result.expect("reconciled");
    assert_eq!(
        seen[10].body["spec"]["template"]["spec"]["containers"][0]["image"],
        "example/knsq-broker:2.0.0"
    );
    assert_eq!(
        seen[9].body["spec"]["template"]["spec"]["containers"][0]["image"],
        "knsq/knsq-lookupd:1.0.0"
    );
    assert_eq!(requests(&seen)[13], event_post());
    assert_eq!(seen[13].body["reason"], "ImageChanged");
    assert_eq!(
        seen[13].body["note"],
        "rolling brokers to image example/knsq-broker:2.0.0"
    );
}

#[tokio::test]
async fn status_turns_ready_and_is_not_rewritten_when_unchanged() {
    let spec = NSQClusterSpec::default();
    let (lookupd, broker) = existing(spec.clone(), true);
    let mut replies = observed(lookupd.clone(), broker.clone(), Vec::new(), Vec::new());
    replies.extend((0..5).map(|_| Reply::Echo));
    replies.extend([
        Reply::Object(lookupd.clone()),
        Reply::Object(broker.clone()),
        Reply::Echo,
        Reply::Echo,
    ]);
    replies.push(stored_cluster());
    let (result, seen, _) = run(cluster(spec.clone()), replies, &Registry::new()).await;
    result.expect("reconciled");
    let mut expected = gets(true);
    expected.extend(apply_requests());
    expected.push(status_patch());
    assert_eq!(requests(&seen), expected, "no event: nothing changed");
    let status = &seen[13].body;
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "Ready")["reason"], "AllReplicasReady");
    assert_eq!(
        status["status"]["broker"],
        json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3})
    );

    // The next reconcile sees that status stored and sends no status patch.
    let mut stored = cluster(spec);
    stored.status = Some(serde_json::from_value(status["status"].clone()).expect("status"));
    let mut replies = observed(lookupd.clone(), broker.clone(), Vec::new(), Vec::new());
    replies.extend((0..5).map(|_| Reply::Echo));
    replies.extend([
        Reply::Object(lookupd),
        Reply::Object(broker),
        Reply::Echo,
        Reply::Echo,
    ]);
    let (result, seen, _) = run(stored, replies, &Registry::new()).await;
    result.expect("reconciled");
    assert_eq!(seen.len(), 13);
}

#[tokio::test]
async fn api_error_is_reported_and_retried_with_backoff() {
    let replies = vec![
        not_found(),
        not_found(),
        list("PersistentVolumeClaimList", Vec::new()),
        Reply::Error(StatusCode::FORBIDDEN, "Forbidden"),
        Reply::Echo,
        stored_cluster(),
    ];
    let cluster = cluster(NSQClusterSpec::default());
    let registry = Registry::new();
    let (result, seen, ctx) = run(cluster.clone(), replies, &registry).await;
    let error = result.expect_err("the apply was refused");
    assert_eq!(error.reason(), "Forbidden");
    let mut expected = gets(false);
    expected.push(apply_requests()[0].clone());
    expected.extend([event_post(), status_patch()]);
    assert_eq!(requests(&seen), expected);
    assert_eq!(seen[4].body["type"], "Warning");
    assert_eq!(seen[4].body["reason"], "ReconcileFailed");
    let degraded = condition(&seen[5].body, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ReconcileFailed");
    assert!(
        degraded["message"]
            .as_str()
            .expect("message")
            .starts_with("applying ConfigMap events-config"),
        "{degraded}"
    );

    let cluster = Arc::new(cluster);
    assert_eq!(
        error_policy(cluster.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(cluster.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(cluster, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(4))
    );
    let families = registry.gather();
    let errors = families
        .iter()
        .find(|f| f.name() == "knsq_operator_reconcile_errors_total")
        .expect("error metric");
    assert_eq!(errors.get_metric()[0].get_counter().get_value(), 3.0);
}

#[tokio::test]
async fn paused_cluster_is_left_alone() {
    let mut paused = cluster(NSQClusterSpec::default());
    paused
        .annotations_mut()
        .insert(PAUSE_ANNOTATION.to_owned(), "true".to_owned());
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let replies = vec![
        Reply::Object(lookupd),
        Reply::Object(broker),
        stored_cluster(),
    ];
    let (result, seen, _) = run(paused, replies, &Registry::new()).await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(300))
    );
    let mut expected = gets(false);
    expected.pop(); // paused before the brokers are looked at
    expected.push(status_patch());
    assert_eq!(requests(&seen), expected, "no apply while paused");
    assert_eq!(
        condition(&seen[2].body, "Progressing")["reason"],
        "ReconciliationPaused"
    );
}

#[tokio::test]
async fn disabled_pdb_is_deleted() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.lookupd.pdb.enabled = false;
    let mut replies = observed(lookupd, broker, Vec::new(), Vec::new());
    replies.extend((0..8).map(|_| Reply::Echo));
    replies.push(Reply::Object(
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    ));
    replies.push(stored_cluster());
    let (result, seen, _) = run(cluster(spec), replies, &Registry::new()).await;
    result.expect("reconciled");
    let mut expected = gets(true);
    let mut applies = apply_requests();
    applies.remove(7); // the lookupd PDB is no longer applied...
    expected.extend(applies);
    expected.push((
        "DELETE".to_owned(),
        "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/events-lookupd?".to_owned(),
    ));
    expected.push(status_patch());
    assert_eq!(requests(&seen), expected, "...but deleted");
}

#[tokio::test]
async fn cluster_being_deleted_is_left_to_the_garbage_collector() {
    let mut deleting = cluster(NSQClusterSpec::default());
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
    let (result, seen, _) = run(deleting, Vec::new(), &Registry::new()).await;
    assert_eq!(result.expect("reconciled"), Action::await_change());
    assert!(seen.is_empty());
}

// ---- The brokers' day-2 operations ----

/// The answers to the nine applies: the StatefulSets as they are (with their status), the rest
/// echoed.
fn applies_answering(lookupd: Value, broker: Value) -> Vec<Reply> {
    let mut replies: Vec<Reply> = (0..9).map(|_| Reply::Echo).collect();
    replies[5] = Reply::Object(lookupd);
    replies[6] = Reply::Object(broker);
    replies
}

/// A cluster whose running brokers already use the spec's lookupds (so no reconcile asks them).
fn settled(spec: NSQClusterSpec) -> NSQCluster {
    let mut c = cluster(spec);
    let mut status = c.status.take().unwrap_or_default();
    status.lookupd_addresses = operator::children::lookupd_addresses(&c);
    c.status = Some(status);
    c
}

/// A running broker pod at `10.0.0.<ordinal>`.
fn broker_pod(ordinal: i32, restarts: i32, last_exit: Option<i32>, revision: &str) -> Value {
    let last_state = match last_exit {
        Some(code) => json!({"terminated": {"exitCode": code}}),
        None => json!({}),
    };
    json!({
        "metadata": {"name": format!("events-broker-{ordinal}"), "uid": format!("u{ordinal}"),
                     "labels": {"controller-revision-hash": revision}},
        "status": {
            "podIP": format!("10.0.0.{ordinal}"),
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "broker", "restartCount": restarts, "ready": true,
                                   "image": "b", "imageID": "", "state": {"running": {}},
                                   "lastState": last_state}]
        }
    })
}

fn three_brokers() -> Vec<Value> {
    (0..3).map(|o| broker_pod(o, 0, None, "r1")).collect()
}

fn claim(ordinal: i32) -> Value {
    json!({"metadata": {"name": format!("data-events-broker-{ordinal}")},
           "spec": {"resources": {"requests": {"storage": "10Gi"}}},
           "status": {"capacity": {"storage": "10Gi"}}})
}

fn broker_applied(seen: &[Seen]) -> Option<&Seen> {
    seen.iter()
        .find(|s| s.method == "PATCH" && s.uri.starts_with(&format!("{STS}/events-broker?")))
}

fn events(seen: &[Seen]) -> Vec<(String, String)> {
    seen.iter()
        .filter(|s| s.uri.starts_with("/apis/events.k8s.io/"))
        .map(|s| {
            (
                s.body["reason"].as_str().unwrap_or_default().to_owned(),
                s.body["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn status_of(seen: &[Seen]) -> &Value {
    &seen.last().expect("a status patch").body
}

const BROKER_2: &str = "10.0.0.2:4151";

/// Brokers where broker-2 answers `GET /drain` with `report`.
fn broker_2_reports(report: Value) -> Arc<Servers> {
    let servers = Arc::new(Servers::default());
    servers.answer("GET", BROKER_2, "/drain", 200, report);
    servers
}

#[tokio::test]
async fn scale_down_drains_before_lowering_the_statefulset() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.broker.replicas = 2;
    let servers = broker_2_reports(
        json!({"draining": false, "state": "serving", "remaining_messages": 10000}),
    );
    servers.answer("POST", BROKER_2, "/drain", 200, json!({}));
    let mut replies = observed(lookupd, broker, three_brokers(), Vec::new());
    replies.extend((0..8).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) =
        run_with(settled(spec), replies, &Registry::new(), servers.clone()).await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(2)),
        "followed closely while it drains"
    );
    assert_eq!(
        servers.seen(),
        ["GET 10.0.0.2:4151/drain", "POST 10.0.0.2:4151/drain"]
    );
    assert!(broker_applied(&seen).is_none(), "the StatefulSet is held");
    assert_eq!(
        events(&seen),
        [(
            "ScaleDownStarted".to_owned(),
            "draining events-broker-2 before lowering the brokers from 3 to 2".to_owned()
        )]
    );
    let status = status_of(&seen);
    assert_eq!(status["status"]["scaleDown"]["from"], 3);
    assert_eq!(status["status"]["scaleDown"]["to"], 2);
    let draining = &status["status"]["scaleDown"]["brokers"][0];
    assert_eq!(draining["name"], "events-broker-2");
    assert_eq!(draining["podUid"], "u2");
    assert_eq!(draining["state"], "requested");
    assert_eq!(draining["remainingMessages"], 10000);
    assert_eq!(condition(status, "ScalingDown")["status"], "True");
    assert_eq!(condition(status, "ScaleDownBlocked")["status"], "False");
}

/// The status a first reconcile of a 3 → 2 scale-down leaves.
fn draining_cluster(replicas: i32, state: &str) -> NSQCluster {
    let mut spec = NSQClusterSpec::default();
    spec.broker.replicas = replicas;
    let mut c = settled(spec);
    let mut status = c.status.take().unwrap_or_default();
    status.scale_down = Some(
        serde_json::from_value(json!({"from": 3, "to": 2, "brokers": [
            {"name": "events-broker-2", "podUid": "u2", "restarts": 0, "state": state,
             "remainingMessages": 10000, "progressedAt": "2027-01-01T00:00:00Z"}]}))
        .expect("scale-down status"),
    );
    c.status = Some(status);
    c
}

#[tokio::test]
async fn a_drained_broker_that_exited_is_scaled_away() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    // The restarted process is fresh and serving; its exit 0 since the request tells.
    let servers =
        broker_2_reports(json!({"draining": false, "state": "serving", "remaining_messages": 0}));
    let mut pods = three_brokers();
    pods[2] = broker_pod(2, 1, Some(0), "r1");
    let mut replies = observed(lookupd, broker, pods, Vec::new());
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run_with(
        draining_cluster(2, "draining"),
        replies,
        &Registry::new(),
        servers.clone(),
    )
    .await;
    result.expect("reconciled");
    assert_eq!(
        servers.seen(),
        ["GET 10.0.0.2:4151/drain"],
        "not asked again"
    );
    assert_eq!(
        broker_applied(&seen).expect("applied").body["spec"]["replicas"],
        2
    );
    assert_eq!(
        events(&seen),
        [
            (
                "ScaledDown".to_owned(),
                "events-broker-2 drained; lowering the brokers from 3 to 2".to_owned()
            ),
            ("Scaled".to_owned(), "scaled brokers from 3 to 2".to_owned()),
        ]
    );
    let status = status_of(&seen);
    assert_eq!(status["status"].get("scaleDown"), None);
    assert_eq!(condition(status, "ScalingDown")["status"], "False");
}

#[tokio::test]
async fn a_blocked_drain_holds_the_statefulset_and_says_why() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let servers = broker_2_reports(
        json!({"draining": true, "state": "blocked", "remaining_messages": 10000,
               "reason": "no peer broker can take the messages"}),
    );
    let mut replies = observed(lookupd, broker, three_brokers(), Vec::new());
    replies.extend((0..8).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run_with(
        draining_cluster(2, "draining"),
        replies,
        &Registry::new(),
        servers,
    )
    .await;
    result.expect("reconciled");
    assert!(broker_applied(&seen).is_none());
    let blocked = seen
        .iter()
        .find(|s| s.body["reason"] == "ScaleDownBlocked")
        .expect("an event");
    assert_eq!(blocked.body["type"], "Warning");
    assert_eq!(
        blocked.body["note"],
        "events-broker-2 cannot finish its drain: no peer broker can take the messages; the StatefulSet stays at 3"
    );
    let condition = condition(status_of(&seen), "ScaleDownBlocked");
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "DrainBlocked");
}

#[tokio::test]
async fn scaling_back_up_restarts_the_brokers_still_draining() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut replies = observed(lookupd, broker, three_brokers(), Vec::new());
    replies.push(Reply::Object(
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    ));
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(
        draining_cluster(3, "handing_off"),
        replies,
        &Registry::new(),
    )
    .await;
    result.expect("reconciled");
    let delete = &seen[4];
    assert_eq!(
        (delete.method.as_str(), delete.uri.as_str()),
        ("DELETE", "/api/v1/namespaces/prod/pods/events-broker-2?")
    );
    assert_eq!(
        delete.body["preconditions"]["uid"], "u2",
        "only the pod asked to drain"
    );
    assert_eq!(
        broker_applied(&seen).expect("applied").body["spec"]["replicas"],
        3
    );
    assert_eq!(events(&seen)[0].0, "ScaleDownCancelled");
    assert_eq!(status_of(&seen)["status"].get("scaleDown"), None);
}

#[tokio::test]
async fn forcing_lowers_at_once() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.broker.replicas = 2;
    let mut forced = settled(spec);
    forced.annotations_mut().insert(
        operator::crd::FORCE_SCALE_DOWN_ANNOTATION.to_owned(),
        "true".to_owned(),
    );
    let mut replies = observed(lookupd, broker, three_brokers(), Vec::new());
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, Reply::Echo, stored_cluster()]);
    let servers = Arc::new(Servers::default());
    let (result, seen, _) = run_with(forced, replies, &Registry::new(), servers.clone()).await;
    result.expect("reconciled");
    assert!(servers.seen().is_empty(), "nobody is asked to drain");
    assert_eq!(
        broker_applied(&seen).expect("applied").body["spec"]["replicas"],
        2
    );
    assert_eq!(events(&seen)[0].0, "ForcedScaleDown");
}

const JOBS: &str = "/apis/batch/v1/namespaces/prod/jobs";

#[tokio::test]
async fn an_orphaned_claim_gets_a_handoff_job() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let claims = (0..4).map(claim).collect();
    let mut replies = observed(lookupd.clone(), broker.clone(), three_brokers(), claims);
    replies.push(list("JobList", Vec::new()));
    replies.extend(applies_answering(lookupd, broker));
    replies.extend([Reply::Echo, Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(
        settled(NSQClusterSpec::default()),
        replies,
        &Registry::new(),
    )
    .await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        seen[4].uri,
        format!(
            "{JOBS}?&labelSelector=app.kubernetes.io%2Fcomponent%3Dhandoff%2Capp.kubernetes.io%2Finstance%3Devents%2Capp.kubernetes.io%2Fmanaged-by%3Dknsq-operator%2Capp.kubernetes.io%2Fname%3Dknsq"
        )
    );
    let job = &seen[14];
    assert_eq!(
        (job.method.as_str(), job.uri.as_str()),
        (
            "PATCH",
            format!("{JOBS}/events-broker-3-handoff{APPLY}").as_str()
        )
    );
    assert_eq!(
        job.body["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "data-events-broker-3"
    );
    assert_eq!(
        events(&seen),
        [(
            "VolumeRecoveryStarted".to_owned(),
            "data-events-broker-3 has no broker to come back to: Job events-broker-3-handoff hands off what is left on it".to_owned()
        )]
    );
    let status = status_of(&seen);
    assert_eq!(
        status["status"]["volumeRecovery"],
        json!([{"claim": "data-events-broker-3", "job": "events-broker-3-handoff", "state": "running"}])
    );
    assert_eq!(
        condition(status, "Progressing")["reason"],
        "RecoveringVolumes"
    );
}

#[tokio::test]
async fn a_finished_handoff_deletes_its_claim() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let claims = (0..4).map(claim).collect();
    let job = json!({
        "metadata": {"name": "events-broker-3-handoff",
                     "labels": {"knsq.io/claim": "data-events-broker-3"}},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]}
    });
    let mut replies = observed(lookupd, broker, three_brokers(), claims);
    replies.push(list("JobList", vec![job]));
    replies.extend((0..9).map(|_| Reply::Echo));
    let deleted =
        || Reply::Object(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    replies.extend([deleted(), deleted(), Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(
        settled(NSQClusterSpec::default()),
        replies,
        &Registry::new(),
    )
    .await;
    result.expect("reconciled");
    let deletions: Vec<(&str, &str)> = seen
        .iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| {
            (
                s.uri.as_str(),
                s.body["propagationPolicy"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        deletions,
        [
            (
                format!("{JOBS}/events-broker-3-handoff?").as_str(),
                "Background"
            ),
            (
                "/api/v1/namespaces/prod/persistentvolumeclaims/data-events-broker-3?",
                ""
            ),
        ]
    );
    assert_eq!(events(&seen)[0].0, "VolumeRecovered");
    assert_eq!(status_of(&seen)["status"].get("volumeRecovery"), None);
}

/// The broker StatefulSet in the middle of a roll: the template applied, partition at 2.
fn rolling_broker() -> Value {
    let (_, mut broker) = existing(NSQClusterSpec::default(), true);
    broker["spec"]["updateStrategy"] =
        json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}});
    broker["status"]["updateRevision"] = json!("r2");
    broker
}

fn lookupd_pod(ordinal: i32) -> Value {
    json!({
        "metadata": {"name": format!("events-lookupd-{ordinal}")},
        "status": {"podIP": format!("10.0.1.{ordinal}"),
                   "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "lookupd", "restartCount": 0, "ready": true,
                                          "image": "l", "imageID": "", "state": {"running": {}}}]}
    })
}

async fn roll_step(registered_on_second: bool) -> (Vec<Seen>, Vec<String>) {
    let (lookupd, _) = existing(NSQClusterSpec::default(), true);
    let mut pods = three_brokers();
    pods[2] = broker_pod(2, 0, None, "r2");
    let servers = Arc::new(Servers::default());
    let broker_2 = json!({"broadcast_address": "events-broker-2.events-broker-headless.prod.svc", "http_port": 4151, "tcp_port": 4150});
    let others = json!({"broadcast_address": "events-broker-0.events-broker-headless.prod.svc", "http_port": 4151, "tcp_port": 4150});
    servers.answer(
        "GET",
        "10.0.1.0:4161",
        "/nodes",
        200,
        json!({"producers": [others.clone(), broker_2.clone()]}),
    );
    let second = if registered_on_second {
        vec![broker_2]
    } else {
        vec![others]
    };
    servers.answer(
        "GET",
        "10.0.1.1:4161",
        "/nodes",
        200,
        json!({"producers": second}),
    );
    // The third lookupd does not answer: it cannot hold the roll.
    let mut replies = observed(lookupd, rolling_broker(), pods, Vec::new());
    replies.push(list("PodList", (0..3).map(lookupd_pod).collect()));
    // The nine applies, the step's event when there is one, the status.
    let event = usize::from(registered_on_second);
    replies.extend((0..9 + event).map(|_| Reply::Echo));
    replies.push(stored_cluster());
    let (result, seen, _) = run_with(
        settled(NSQClusterSpec::default()),
        replies,
        &Registry::new(),
        servers.clone(),
    )
    .await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(2))
    );
    (seen, servers.seen())
}

#[tokio::test]
async fn a_roll_moves_on_once_the_new_broker_is_registered_everywhere() {
    let (seen, asked) = roll_step(true).await;
    assert_eq!(
        seen[4].uri,
        "/api/v1/namespaces/prod/pods?&labelSelector=app.kubernetes.io%2Fcomponent%3Dlookupd%2Capp.kubernetes.io%2Finstance%3Devents%2Capp.kubernetes.io%2Fname%3Dknsq"
    );
    assert_eq!(
        asked,
        [
            "GET 10.0.1.0:4161/nodes",
            "GET 10.0.1.1:4161/nodes",
            "GET 10.0.1.2:4161/nodes"
        ]
    );
    assert_eq!(
        broker_applied(&seen).expect("applied").body["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 1}})
    );
    assert_eq!(
        events(&seen),
        [(
            "RollingBroker".to_owned(),
            "events-broker-2 runs the new template, ready and registered with every lookupd; rolling events-broker-1".to_owned()
        )]
    );
}

#[tokio::test]
async fn a_roll_waits_for_a_registration_missing_on_one_lookupd() {
    let (seen, _) = roll_step(false).await;
    assert_eq!(
        broker_applied(&seen).expect("applied").body["spec"]["updateStrategy"]["rollingUpdate"]["partition"],
        2
    );
    assert!(events(&seen).is_empty());
}

#[tokio::test]
async fn a_new_template_rolls_only_the_highest_broker_first() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.broker.pod.image = Some("example/knsq-broker:2.0.0".to_owned());
    let mut replies = observed(lookupd, broker, three_brokers(), Vec::new());
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(settled(spec), replies, &Registry::new()).await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        broker_applied(&seen).expect("applied").body["spec"]["updateStrategy"]["rollingUpdate"]["partition"],
        2
    );
}

#[tokio::test]
async fn running_brokers_are_told_new_lookupds() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.lookupd.replicas = 1;
    let mut c = cluster(spec);
    c.status = Some(Default::default());
    let servers = Arc::new(Servers::default());
    let old: Vec<String> =
        operator::children::lookupd_addresses(&cluster(NSQClusterSpec::default()));
    let new = operator::children::lookupd_addresses(&c);
    for ordinal in 0..3 {
        let address = format!("10.0.0.{ordinal}:4151");
        let current = if ordinal == 0 { &new } else { &old };
        servers.answer(
            "GET",
            &address,
            "/config/nsqlookupd_tcp_addresses",
            200,
            json!(current),
        );
        servers.answer(
            "PUT",
            &address,
            "/config/nsqlookupd_tcp_addresses",
            200,
            json!(new),
        );
    }
    let mut replies = observed(lookupd, broker, three_brokers(), Vec::new());
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run_with(c, replies, &Registry::new(), servers.clone()).await;
    result.expect("reconciled");
    let lookupd_0 = "[\"events-lookupd-0.events-lookupd-headless.prod.svc:4160\"]";
    assert_eq!(
        servers.seen(),
        [
            "GET 10.0.0.0:4151/config/nsqlookupd_tcp_addresses".to_owned(),
            "GET 10.0.0.1:4151/config/nsqlookupd_tcp_addresses".to_owned(),
            format!("PUT 10.0.0.1:4151/config/nsqlookupd_tcp_addresses {lookupd_0}"),
            "GET 10.0.0.2:4151/config/nsqlookupd_tcp_addresses".to_owned(),
            format!("PUT 10.0.0.2:4151/config/nsqlookupd_tcp_addresses {lookupd_0}"),
        ]
    );
    // The broker StatefulSet's template does not change: no broker restarts.
    assert_eq!(
        broker_applied(&seen).expect("applied").body["spec"]["updateStrategy"]["rollingUpdate"]["partition"],
        0
    );
    let reasons: Vec<String> = events(&seen).into_iter().map(|(r, _)| r).collect();
    assert_eq!(reasons, ["Scaled", "LookupdsChanged"]);
    assert_eq!(status_of(&seen)["status"]["lookupdAddresses"], json!(new));
}
