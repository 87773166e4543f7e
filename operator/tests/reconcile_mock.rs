//! The reconciler against a mocked API server (`tower-test`): each test scripts the server's
//! answers and asserts the exact requests the reconciler sends.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use kube::api::{ApiResource, GroupVersionKind};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use operator::children::{Children, DefaultImages};
use operator::controller::{Context, Error, Resources, error_policy, reconcile};
use operator::crd::{NSQCluster, NSQClusterSpec, PAUSE_ANNOTATION};
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

/// A reconciler context whose client talks to the mocked server behind the returned handle.
fn harness(registry: &Registry) -> (Arc<Context>, MockHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Metrics::register(registry).expect("metrics");
    let pdb = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    (
        Arc::new(Context::new(
            client,
            images(),
            metrics,
            Resources {
                pdb,
                service_monitor: None,
                prometheus_rule: None,
            },
        )),
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
    let expected = replies.len();
    let (ctx, handle) = harness(registry);
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

fn gets() -> Vec<(String, String)> {
    vec![
        ("GET".to_owned(), format!("{STS}/events-lookupd")),
        ("GET".to_owned(), format!("{STS}/events-broker")),
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
    let mut replies = vec![not_found(), not_found()];
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

    let mut expected = gets();
    expected.extend(apply_requests());
    expected.extend([event_post(), event_post(), status_patch()]);
    assert_eq!(requests(&seen), expected);

    let configmap = &seen[2].body;
    assert_eq!(configmap["kind"], "ConfigMap");
    assert_eq!(
        configmap["metadata"]["ownerReferences"][0]["name"],
        "events"
    );
    let broker = &seen[8].body;
    assert_eq!(broker["kind"], "StatefulSet");
    assert_eq!(broker["spec"]["replicas"], 3);
    assert_eq!(
        broker["spec"]["template"]["spec"]["containers"][0]["image"],
        "knsq/knsq-broker:1.0.0"
    );
    let pdb = &seen[9].body;
    assert_eq!(
        (pdb["apiVersion"].as_str(), pdb["kind"].as_str()),
        (Some("policy/v1"), Some("PodDisruptionBudget"))
    );

    assert_eq!(seen[11].body["reason"], "Created");
    assert_eq!(
        seen[11].body["note"],
        "created the lookupd StatefulSet with 3 replicas"
    );
    assert_eq!(
        seen[12].body["note"],
        "created the broker StatefulSet with 3 replicas"
    );
    assert_eq!(seen[12].body["regarding"]["kind"], "NSQCluster");
    assert_eq!(seen[12].body["related"]["kind"], "StatefulSet");
    assert_eq!(seen[12].body["related"]["name"], "events-broker");

    let status = &seen[13].body;
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
    let mut replies = vec![Reply::Object(lookupd), Reply::Object(broker)];
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(cluster(spec), replies, &Registry::new()).await;
    result.expect("reconciled");

    let mut expected = gets();
    expected.extend(apply_requests());
    expected.extend([event_post(), status_patch()]);
    assert_eq!(requests(&seen), expected);
    assert_eq!(seen[8].body["spec"]["replicas"], 5);
    assert_eq!(
        seen[7].body["spec"]["replicas"], 3,
        "lookupds keep their count"
    );
    assert_eq!(seen[11].body["reason"], "Scaled");
    assert_eq!(seen[11].body["note"], "scaled brokers from 3 to 5");
}

#[tokio::test]
async fn image_change_rolls_the_statefulset() {
    let (lookupd, broker) = existing(NSQClusterSpec::default(), true);
    let mut spec = NSQClusterSpec::default();
    spec.broker.pod.image = Some("example/knsq-broker:2.0.0".to_owned());
    let mut replies = vec![Reply::Object(lookupd), Reply::Object(broker)];
    replies.extend((0..9).map(|_| Reply::Echo));
    replies.extend([Reply::Echo, stored_cluster()]);
    let (result, seen, _) = run(cluster(spec), replies, &Registry::new()).await;
    result.expect("reconciled");
    assert_eq!(
        seen[8].body["spec"]["template"]["spec"]["containers"][0]["image"],
        "example/knsq-broker:2.0.0"
    );
    assert_eq!(
        seen[7].body["spec"]["template"]["spec"]["containers"][0]["image"],
        "knsq/knsq-lookupd:1.0.0"
    );
    assert_eq!(requests(&seen)[11], event_post());
    assert_eq!(seen[11].body["reason"], "ImageChanged");
    assert_eq!(
        seen[11].body["note"],
        "rolling brokers to image example/knsq-broker:2.0.0"
    );
}

#[tokio::test]
async fn status_turns_ready_and_is_not_rewritten_when_unchanged() {
    let spec = NSQClusterSpec::default();
    let (lookupd, broker) = existing(spec.clone(), true);
    let mut replies = vec![
        Reply::Object(lookupd.clone()),
        Reply::Object(broker.clone()),
    ];
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
    let mut expected = gets();
    expected.extend(apply_requests());
    expected.push(status_patch());
    assert_eq!(requests(&seen), expected, "no event: nothing changed");
    let status = &seen[11].body;
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "Ready")["reason"], "AllReplicasReady");
    assert_eq!(
        status["status"]["broker"],
        json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3})
    );

    // The next reconcile sees that status stored and sends no status patch.
    let mut stored = cluster(spec);
    stored.status = Some(serde_json::from_value(status["status"].clone()).expect("status"));
    let mut replies = vec![
        Reply::Object(lookupd.clone()),
        Reply::Object(broker.clone()),
    ];
    replies.extend((0..5).map(|_| Reply::Echo));
    replies.extend([
        Reply::Object(lookupd),
        Reply::Object(broker),
        Reply::Echo,
        Reply::Echo,
    ]);
    let (result, seen, _) = run(stored, replies, &Registry::new()).await;
    result.expect("reconciled");
    assert_eq!(seen.len(), 11);
}

#[tokio::test]
async fn api_error_is_reported_and_retried_with_backoff() {
    let replies = vec![
        not_found(),
        not_found(),
        Reply::Error(StatusCode::FORBIDDEN, "Forbidden"),
        Reply::Echo,
        stored_cluster(),
    ];
    let cluster = cluster(NSQClusterSpec::default());
    let registry = Registry::new();
    let (result, seen, ctx) = run(cluster.clone(), replies, &registry).await;
    let error = result.expect_err("the apply was refused");
    assert_eq!(error.reason(), "Forbidden");
    let mut expected = gets();
    expected.push(apply_requests()[0].clone());
    expected.extend([event_post(), status_patch()]);
    assert_eq!(requests(&seen), expected);
    assert_eq!(seen[3].body["type"], "Warning");
    assert_eq!(seen[3].body["reason"], "ReconcileFailed");
    let degraded = condition(&seen[4].body, "Degraded");
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
    let mut expected = gets();
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
    let mut replies = vec![Reply::Object(lookupd), Reply::Object(broker)];
    replies.extend((0..8).map(|_| Reply::Echo));
    replies.push(Reply::Object(
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    ));
    replies.push(stored_cluster());
    let (result, seen, _) = run(cluster(spec), replies, &Registry::new()).await;
    result.expect("reconciled");
    let mut expected = gets();
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
