//! The operator end to end: a real kube-apiserver and kube-controller-manager (v1.20, built from
//! Debian's source; the StatefulSet, Job, endpoints, garbage-collector and claim-protection
//! controllers make and remove the pods), the `knsq-operator` binary with the chart's rules, and
//! the kubelet stand-in running every pod's knsq binary with the command line the operator
//! generated, each pod in its own network namespace with a loopback address of its own (127.1.S.N).
//! Real clients publish and consume through
//! the brokers, finding them through the lookupd by the names they register.
//!
//! `scripts/test-operator.sh --e2e` starts the servers in a private network namespace and runs
//! these one at a time; a plain `cargo nextest` run reports them as skipped.

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use serde_json::json;
use tests::e2e::{Cluster, Consumer, PATIENCE, eventually, get_json, http, publish};

const NAME: &str = "events";

/// A cluster sized and timed for a test: one lookupd, `brokers` brokers on 1Gi claims, a short
/// lame-duck delay and drain timeout.
fn spec(brokers: i32) -> serde_json::Value {
    json!({
        "lookupd": {"replicas": 1},
        "broker": {
            "replicas": brokers,
            "storage": {"size": "1Gi"},
            "terminationGracePeriodSeconds": 30,
            "shutdownDelay": "2s",
            "shutdownTimeout": "10s",
            "drainTimeout": "5s",
        },
    })
}

/// Every broker registered with the lookupd (its `/nodes`), by broadcast address.
async fn registered(cluster: &Cluster, lookupd: i32) -> Result<BTreeSet<String>> {
    let nodes = get_json(
        &format!("{}:4161", cluster.host(NAME, "lookupd", lookupd)),
        "/nodes",
    )
    .await?;
    Ok(nodes["producers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["broadcast_address"].as_str().map(str::to_owned))
        .collect())
}

async fn wait_registered(cluster: &Cluster, brokers: i32) -> Result<()> {
    let wanted: BTreeSet<String> = (0..brokers)
        .map(|i| cluster.host(NAME, "broker", i))
        .collect();
    eventually("every broker registered", PATIENCE, || async {
        (registered(cluster, 0).await.ok()? == wanted).then_some(())
    })
    .await
}

fn broker_tcp(cluster: &Cluster, ordinal: i32) -> String {
    format!("{}:4150", cluster.host(NAME, "broker", ordinal))
}

fn broker_http(cluster: &Cluster, ordinal: i32) -> String {
    format!("{}:4151", cluster.host(NAME, "broker", ordinal))
}

fn lookupd_http(cluster: &Cluster) -> String {
    format!("{}:4161", cluster.host(NAME, "lookupd", 0))
}

/// (uid, restarts) of each broker pod, by name.
async fn broker_pods(cluster: &Cluster) -> Vec<(String, String, i32)> {
    let mut pods: Vec<_> = cluster
        .pods(NAME, "broker")
        .await
        .into_iter()
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .map_or(0, |c| c.restart_count);
            (p.name_any(), p.uid().unwrap_or_default(), restarts)
        })
        .collect();
    pods.sort();
    pods
}

async fn statefulset(cluster: &Cluster, name: &str) -> Option<StatefulSet> {
    cluster
        .api::<StatefulSet>()
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

/// Run `body` on a fresh cluster world `name` (pods in `127.1.<subnet>.0/24`), printing what
/// explains a failure; skipped outside `scripts/test-operator.sh --e2e`.
async fn scenario<F, Fut>(name: &str, subnet: u8, body: F) -> Result<()>
where
    F: FnOnce(Arc<Cluster>) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    if std::env::var_os("KNSQ_TEST_KUBECONFIG").is_none() {
        eprintln!("SKIPPED: run through `scripts/test-operator.sh --e2e`");
        return Ok(());
    }
    Cluster::start(name, subnet).await?.run(body).await
}

/// 1. Three brokers and a lookupd come up from the operator's pods; pynsq publishes to each
///    broker and consumes through the lookupd. Then the lookupds grow to two: every broker
///    registers with the new one without restarting.
#[tokio::test]
#[ignore = "needs the e2e environment of scripts/test-operator.sh --e2e"]
async fn a_cluster_comes_up_and_serves_real_clients() -> Result<()> {
    scenario("serve", 1, |cluster| async move {
        cluster.create(NAME, spec(3)).await?;
        cluster.ready(NAME).await?;
        wait_registered(&cluster, 3).await?;
        // Node ids from the pods' ordinals.
        for ordinal in 0..3 {
            let id = get_json(&broker_http(&cluster, ordinal), "/config/node_id").await?;
            ensure!(id == json!(ordinal), "broker-{ordinal} has node id {id}");
        }

        let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../compat/python/e2e_roundtrip.py");
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .args(["--topic", "e2e_orders", "--count", "300"])
            .arg(format!("--lookupd=http://{}", lookupd_http(&cluster)));
        for ordinal in 0..3 {
            command.arg(format!("--nsqd={}", broker_tcp(&cluster, ordinal)));
        }
        let output = tokio::task::spawn_blocking(move || command.output())
            .await?
            .with_context(|| format!("running {}", python.display()))?;
        let report = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "pynsq round trip failed: {report}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(report.trim())?;
        eprintln!("pynsq: {report}");
        ensure!(report["distinct"] == 300, "{report}");
        ensure!(
            report["brokers"].as_array().map(Vec::len) == Some(3),
            "the Reader found every broker through the lookupd: {report}"
        );

        // A second lookupd: the brokers learn of it at runtime.
        let before = broker_pods(&cluster).await;
        cluster
            .patch(NAME, json!({"spec": {"lookupd": {"replicas": 2}}}))
            .await?;
        let wanted: BTreeSet<String> = (0..3).map(|i| cluster.host(NAME, "broker", i)).collect();
        eventually(
            "every broker registered with the new lookupd",
            PATIENCE,
            || async { (registered(&cluster, 1).await.ok()? == wanted).then_some(()) },
        )
        .await?;
        for ordinal in 0..3 {
            let list = get_json(
                &broker_http(&cluster, ordinal),
                "/config/nsqlookupd_tcp_addresses",
            )
            .await?;
            ensure!(
                list.as_array().map(Vec::len) == Some(2),
                "broker-{ordinal} uses {list}"
            );
        }
        ensure!(
            broker_pods(&cluster).await == before,
            "no broker pod was replaced or restarted"
        );
        let events = cluster.events(NAME).await;
        ensure!(
            events.iter().any(|(reason, _)| reason == "LookupdsChanged"),
            "{events:?}"
        );
        Ok(())
    })
    .await
}

/// Create `topic` and its `channel` on one broker (so messages published there wait in it).
async fn create_channel(cluster: &Cluster, ordinal: i32, topic: &str, channel: &str) -> Result<()> {
    for path in [
        format!("/topic/create?topic={topic}"),
        format!("/channel/create?topic={topic}&channel={channel}"),
    ] {
        let (status, body) = http(&broker_http(cluster, ordinal), "POST", &path, b"").await?;
        ensure!(status == 200, "POST {path}: {status} {body}");
    }
    Ok(())
}

/// The depth of a channel on one broker.
async fn depth(cluster: &Cluster, ordinal: i32, topic: &str, channel: &str) -> Result<i64> {
    let stats = get_json(
        &broker_http(cluster, ordinal),
        &format!("/stats?format=json&topic={topic}&channel={channel}"),
    )
    .await?;
    Ok(stats["topics"][0]["channels"][0]["depth"]
        .as_i64()
        .unwrap_or_default())
}

fn reasons(events: &[(String, String)]) -> Vec<&str> {
    events.iter().map(|(r, _)| r.as_str()).collect()
}

async fn claim_exists(cluster: &Cluster, ordinal: i32) -> bool {
    let claims: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = cluster.api();
    claims
        .get_opt(&format!("data-{NAME}-broker-{ordinal}"))
        .await
        .ok()
        .flatten()
        .is_some()
}

async fn replicas(cluster: &Cluster) -> Option<i32> {
    statefulset(cluster, &format!("{NAME}-broker"))
        .await?
        .spec?
        .replicas
}

/// Consume `topic`/`channel` through the lookupd until every one of `numbers` arrived.
async fn consume_all(
    cluster: &Cluster,
    topic: &str,
    channel: &str,
    numbers: std::ops::Range<u64>,
) -> Result<()> {
    let consumer = Consumer::start(lookupd_http(cluster), topic, channel);
    let wanted: BTreeSet<u64> = numbers.collect();
    let result = consumer.wait_for(&wanted, PATIENCE).await;
    consumer.stop().await;
    result
}

/// A cluster of `brokers` brokers, ready and registered with the lookupd, with the messages
/// `0..count` waiting on the last broker in `topic`/`channel`, which nobody consumes.
async fn messages_waiting_on_the_last_broker(
    cluster: &Cluster,
    brokers: i32,
    topic: &str,
    channel: &str,
    count: u64,
) -> Result<()> {
    cluster.create(NAME, spec(brokers)).await?;
    cluster.ready(NAME).await?;
    wait_registered(cluster, brokers).await?;
    create_channel(cluster, brokers - 1, topic, channel).await?;
    publish(&broker_tcp(cluster, brokers - 1), topic, 0..count).await
}

/// 2. Ten thousand messages wait on broker-2 in a channel nobody consumes; scaling to two
///    brokers drains broker-2 first (its messages handed off to the other two), lowers the
///    StatefulSet only then, deletes its claim, and every message is consumed from the two left.
#[tokio::test]
#[ignore = "needs the e2e environment of scripts/test-operator.sh --e2e"]
async fn a_scale_down_drains_before_lowering_and_loses_nothing() -> Result<()> {
    scenario("drain", 2, |cluster| async move {
        messages_waiting_on_the_last_broker(&cluster, 3, "orders", "archive", 10_000).await?;
        ensure!(depth(&cluster, 2, "orders", "archive").await? == 10_000);

        cluster
            .patch(NAME, json!({"spec": {"broker": {"replicas": 2}}}))
            .await?;
        // Watch the StatefulSet and broker-2's drain side by side until it is lowered.
        let mut seen_drained = false;
        let mut states: Vec<String> = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let state = get_json(&broker_http(&cluster, 2), "/drain")
                .await
                .map(|d| d["state"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_else(|e| format!("unreachable ({e})"));
            if states.last() != Some(&state) {
                states.push(state.clone());
            }
            if replicas(&cluster).await == Some(2) {
                break;
            }
            seen_drained |= state == "drained";
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the StatefulSet was not lowered; broker-2's states: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            seen_drained,
            "lowered before broker-2 was seen drained; its states: {states:?}"
        );
        eventually("broker-2's claim deleted", PATIENCE, || async {
            (!claim_exists(&cluster, 2).await).then_some(())
        })
        .await?;
        ensure!(claim_exists(&cluster, 0).await && claim_exists(&cluster, 1).await);
        consume_all(&cluster, "orders", "archive", 0..10_000).await?;

        let events = cluster.events(NAME).await;
        let reasons = reasons(&events);
        for wanted in [
            "ScaleDownStarted",
            "ScaledDown",
            "VolumeRecoveryStarted",
            "VolumeRecovered",
        ] {
            ensure!(reasons.contains(&wanted), "no {wanted} event: {events:?}");
        }
        let scaling = cluster.condition(NAME, "ScalingDown").await;
        ensure!(
            scaling.as_ref().map(|c| c.0.as_str()) == Some("False"),
            "{scaling:?}"
        );
        Ok(())
    })
    .await
}

/// Broker pods by ordinal: (uid, ready, terminating).
async fn broker_states(cluster: &Cluster) -> std::collections::BTreeMap<i32, (String, bool, bool)> {
    cluster
        .pods(NAME, "broker")
        .await
        .into_iter()
        .filter_map(|p| {
            let ordinal = p.name_any().rsplit('-').next()?.parse().ok()?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let terminating = p.metadata.deletion_timestamp.is_some();
            Some((ordinal, (p.uid().unwrap_or_default(), ready, terminating)))
        })
        .collect()
}

/// 3. An image and settings change rolls the brokers while a producer and a consumer run: one
///    broker at a time, highest ordinal first, each replaced only once the one before is ready
///    and registered with the lookupd; every message a broker acknowledged is consumed.
#[tokio::test]
#[ignore = "needs the e2e environment of scripts/test-operator.sh --e2e"]
async fn a_rolling_update_under_load_loses_no_acknowledged_message() -> Result<()> {
    scenario("roll", 3, |cluster| async move {
            cluster.create(NAME, spec(3)).await?;
            cluster.ready(NAME).await?;
            wait_registered(&cluster, 3).await?;
            let brokers: Vec<String> = (0..3).map(|i| broker_tcp(&cluster, i)).collect();
            // The topic and channel everywhere first, so no message waits for a channel.
            for ordinal in 0..3 {
                create_channel(&cluster, ordinal, "payments", "ledger").await?;
            }
            let consumer = Consumer::start(lookupd_http(&cluster), "payments", "ledger");
            let producer = tests::e2e::Producer::start(brokers, "payments", Duration::from_millis(2));
            eventually("the producer going", PATIENCE, || async {
                (producer.acked() > 200).then_some(())
            })
            .await?;

            let original = broker_states(&cluster).await;
            cluster
                .patch(
                    NAME,
                    json!({"spec": {"broker": {"image": "knsq/knsq-broker:e2e-2",
                                               "settings": {"msgTimeout": "50s"}}}}),
                )
                .await?;
            // Sample pods and registrations until every broker was replaced and is ready.
            let mut order = Vec::new();
            let mut violations = Vec::new();
            let deadline = tokio::time::Instant::now() + PATIENCE * 2;
            loop {
                let now = broker_states(&cluster).await;
                let registered = registered(&cluster, 0).await.unwrap_or_default();
                let replaced = |o: i32| {
                    now.get(&o)
                        .is_some_and(|(uid, _, _)| Some(uid) != original.get(&o).map(|s| &s.0))
                };
                let serving = |o: i32| now.get(&o).is_some_and(|(_, ready, stopping)| *ready && !stopping);
                // Down: missing, not ready, or being stopped.
                let down: Vec<i32> = (0..3).filter(|o| !serving(*o)).collect();
                if down.len() > 1 {
                    violations.push(format!("{down:?} down at once"));
                }
                for o in &down {
                    for higher in o + 1..3 {
                        let host = cluster.host(NAME, "broker", higher);
                        if !(replaced(higher) && serving(higher) && registered.contains(&host)) {
                            violations.push(format!(
                                "broker-{o} down while broker-{higher} was not yet replaced, ready and registered"
                            ));
                        }
                    }
                }
                for o in (0..3).rev() {
                    if replaced(o) && !order.contains(&o) {
                        order.push(o);
                    }
                }
                if (0..3).all(|o| replaced(o) && serving(o)) {
                    break;
                }
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the roll did not finish: replaced {order:?}, now {now:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ensure!(violations.is_empty(), "{violations:?}");
            ensure!(order == [2, 1, 0], "replaced in the order {order:?}");
            let sts = statefulset(&cluster, &format!("{NAME}-broker"))
                .await
                .context("the broker StatefulSet")?;
            let image = sts
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.containers[0].image.clone());
            ensure!(image.as_deref() == Some("knsq/knsq-broker:e2e-2"), "{image:?}");
            wait_registered(&cluster, 3).await?;

            // A little more under the new brokers, then everything acknowledged must arrive.
            let before = producer.acked();
            eventually("the producer going on", PATIENCE, || async {
                (producer.acked() > before + 200).then_some(())
            })
            .await?;
            let acked = producer.stop().await;
            consumer.wait_for(&acked, PATIENCE).await?;
            let ledger = consumer.stop().await;
            eprintln!(
                "roll: {} acknowledged, {} delivered, {} redeliveries",
                acked.len(),
                ledger.deliveries.len(),
                ledger.redeliveries()
            );
            let steps = cluster.event_count(NAME, "RollingBroker").await;
            ensure!(
                steps == 2,
                "two paced steps after broker-2, not {steps}: {:?}",
                cluster.events(NAME).await
            );
            Ok(())
        })
        .await
}

/// 4. A forced scale-down with messages on the leaving broker: the StatefulSet is lowered at
///    once, and a Job running the offline handoff on the orphaned claim moves its messages to
///    the brokers left before the claim is deleted.
#[tokio::test]
#[ignore = "needs the e2e environment of scripts/test-operator.sh --e2e"]
async fn a_forced_scale_down_is_recovered_from_the_volume() -> Result<()> {
    scenario("force", 4, |cluster| async move {
        messages_waiting_on_the_last_broker(&cluster, 3, "audit", "cold", 5_000).await?;

        cluster
            .patch(
                NAME,
                json!({"metadata": {"annotations": {"knsq.io/force-scale-down": "true"}},
                           "spec": {"broker": {"replicas": 2}}}),
            )
            .await?;
        eventually("the StatefulSet lowered", PATIENCE, || async {
            (replicas(&cluster).await == Some(2)).then_some(())
        })
        .await?;
        let job = eventually("the handoff Job's pod", PATIENCE, || async {
            cluster.pods(NAME, "handoff").await.into_iter().next()
        })
        .await?;
        ensure!(
            job.labels().get("knsq.io/claim").map(String::as_str) == Some("data-events-broker-2"),
            "{:?}",
            job.labels()
        );
        eventually("broker-2's claim emptied and deleted", PATIENCE, || async {
            (!claim_exists(&cluster, 2).await).then_some(())
        })
        .await?;
        consume_all(&cluster, "audit", "cold", 0..5_000).await?;
        let events = cluster.events(NAME).await;
        let reasons = reasons(&events);
        for wanted in [
            "ForcedScaleDown",
            "VolumeRecoveryStarted",
            "VolumeRecovered",
        ] {
            ensure!(reasons.contains(&wanted), "no {wanted} event: {events:?}");
        }
        ensure!(
            !reasons.contains(&"ScaleDownStarted"),
            "forced: no drain was asked: {events:?}"
        );
        Ok(())
    })
    .await
}

/// 5. A drain that cannot finish — the only broker, no peer to hand off to — blocks the
///    scale-down with ScaleDownBlocked saying why; nothing is lost, and raising the replicas
///    again brings the broker back serving every message it held.
#[tokio::test]
#[ignore = "needs the e2e environment of scripts/test-operator.sh --e2e"]
async fn a_drain_without_peers_blocks_the_scale_down_and_loses_nothing() -> Result<()> {
    scenario("blocked", 5, |cluster| async move {
        messages_waiting_on_the_last_broker(&cluster, 1, "ledger", "nightly", 1_000).await?;

        cluster
            .patch(NAME, json!({"spec": {"broker": {"replicas": 0}}}))
            .await?;
        let blocked = eventually("ScaleDownBlocked", PATIENCE, || async {
            let condition = cluster.condition(NAME, "ScaleDownBlocked").await?;
            (condition.0 == "True").then_some(condition)
        })
        .await?;
        ensure!(blocked.1 == "DrainBlocked", "{blocked:?}");
        ensure!(blocked.2.starts_with("events-broker-0: "), "{blocked:?}");
        // Held, whatever time passes.
        tokio::time::sleep(Duration::from_secs(5)).await;
        ensure!(
            replicas(&cluster).await == Some(1),
            "the StatefulSet was lowered"
        );
        let report = get_json(&broker_http(&cluster, 0), "/drain").await?;
        ensure!(report["remaining_messages"] == 1_000, "{report}");
        let events = cluster.events(NAME).await;
        ensure!(reasons(&events).contains(&"ScaleDownBlocked"), "{events:?}");

        // Called off: the broker restarts out of its drain and serves what it held.
        let before = broker_pods(&cluster).await;
        cluster
            .patch(NAME, json!({"spec": {"broker": {"replicas": 1}}}))
            .await?;
        eventually("broker-0 replaced", PATIENCE, || async {
            let now = broker_pods(&cluster).await;
            (now.len() == 1 && now[0].1 != before[0].1).then_some(())
        })
        .await?;
        cluster.ready(NAME).await?;
        let report = get_json(&broker_http(&cluster, 0), "/drain").await?;
        ensure!(report["state"] == "serving", "{report}");
        consume_all(&cluster, "ledger", "nightly", 0..1_000).await?;
        let blocked = cluster.condition(NAME, "ScaleDownBlocked").await;
        ensure!(
            blocked.as_ref().map(|c| c.0.as_str()) == Some("False"),
            "{blocked:?}"
        );
        let events = cluster.events(NAME).await;
        ensure!(
            reasons(&events).contains(&"ScaleDownCancelled"),
            "{events:?}"
        );
        Ok(())
    })
    .await
}

/// The scenarios' shared assumptions about the operator's output, checked without a cluster.
#[test]
fn the_test_spec_fits_the_grace_period_rule() -> Result<()> {
    let cluster: operator::crd::NSQCluster = serde_json::from_value(json!({
        "apiVersion": "knsq.io/v1alpha1", "kind": "NSQCluster",
        "metadata": {"name": NAME, "namespace": "e2e"}, "spec": spec(3),
    }))?;
    let violations = operator::validation::check(&cluster);
    if !violations.is_empty() {
        bail!("{violations:?}");
    }
    Ok(())
}
