//! The Grafana dashboard the chart ships (`charts/knsq/files/dashboards/knsq.json`) against what
//! real binaries export: two knsq-brokers registered with a knsq-lookupd, under load (publishes,
//! consumers that finish, requeue and time out, `/lookup` calls), scraped by a real Prometheus
//! with the labels knsq's ServiceMonitors give (`job`, `namespace`, `nsqcluster`, `pod`). Every
//! panel's query and every variable's values must come back without error and with data.
//!
//! Needs `prometheus` on `PATH` (`scripts/install-prometheus.sh`) and the binaries built
//! (`cargo build --workspace --bins`); without Prometheus the test fails when `CI` is set and is
//! skipped, saying so, otherwise.

use anyhow::{Context, Result, bail, ensure};
use proto::wire::Command;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tests::lookupd::LookupdProcess;
use tests::prometheus::{PrometheusServer, encode, tools};
use tests::{BrokerProcess, NsqConn, http_post_ok, http_request};
use tokio_util::sync::CancellationToken;

/// What the dashboard's variables are set to: the labels of the scrape config below.
const VARIABLES: &[(&str, &str)] = &[
    ("$namespace", "test"),
    ("$nsqcluster", "events"),
    ("$topic", ".*"),
    ("$channel", ".*"),
    ("$broker", ".*"),
    // Grafana's at least four scrape intervals; Prometheus scrapes every second here.
    ("$__rate_interval", "15s"),
];

fn dashboard() -> Result<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/knsq/files/dashboards/knsq.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn substitute(expr: &str) -> String {
    VARIABLES
        .iter()
        .fold(expr.to_string(), |e, (var, value)| e.replace(var, value))
}

/// Every panel's title and queries, rows' panels included.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push((
                    title.to_string(),
                    target["expr"].as_str().unwrap_or_default().to_string(),
                ));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// One static target as knsq's ServiceMonitor would label it.
fn scrape_job(job: &str, targets: &[(SocketAddr, String)]) -> String {
    let mut config = format!(
        "  - job_name: {job}\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n"
    );
    for (address, pod) in targets {
        config.push_str(&format!(
            "      - targets: ['{address}']\n        labels: {{namespace: test, nsqcluster: events, pod: {pod}}}\n"
        ));
    }
    config
}

async fn consumer(tcp: SocketAddr, channel: &str, identify: Value) -> Result<NsqConn> {
    let mut conn = NsqConn::connect(tcp).await?;
    conn.identify(&identify).await?;
    conn.subscribe("orders", channel).await?;
    conn.send(&Command::Rdy(10)).await?;
    Ok(conn)
}

/// Publishes to both brokers and consumes until `stop`: `billing` finishes every message,
/// `retries` requeues them, `slow` holds them past a 1 s timeout; `audit` has no consumer.
async fn load(
    brokers: Vec<(SocketAddr, SocketAddr)>,
    lookupd: SocketAddr,
    stop: CancellationToken,
) -> Result<()> {
    let mut tasks = Vec::new();
    for (tcp, http) in brokers {
        http_post_ok(http, "/topic/create?topic=orders", b"").await?;
        http_post_ok(http, "/channel/create?topic=orders&channel=audit", b"").await?;
        let mut billing = consumer(tcp, "billing", json!({"client_id": "billing"})).await?;
        let mut retries = consumer(tcp, "retries", json!({"client_id": "retries"})).await?;
        let mut slow = consumer(
            tcp,
            "slow",
            json!({"client_id": "slow", "msg_timeout": 1000}),
        )
        .await?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut round = 0u32;
            // Bounded: at most two minutes of load, whatever happens to `stop`.
            while !stop.is_cancelled() && round < 480 {
                round += 1;
                let batch: Vec<u8> = (0..20)
                    .map(|i| format!("message-{round}-{i}\n"))
                    .collect::<String>()
                    .into_bytes();
                http_post_ok(http, "/mpub?topic=orders", &batch).await?;
                http_post_ok(http, "/pub?topic=payments", b"one").await?;
                for _ in 0..10 {
                    let m = billing.expect_message().await?;
                    billing.send(&Command::Fin(m.id)).await?;
                    let m = retries.expect_message().await?;
                    retries
                        .send(&Command::Req {
                            id: m.id,
                            timeout_ms: if round.is_multiple_of(2) { 0 } else { 5_000 },
                        })
                        .await?;
                }
                // slow takes its messages and never answers: they time out and come back.
                slow.send(&Command::Rdy(2)).await?;
                let _ = http_request(lookupd, "GET", "/lookup?topic=orders", b"").await?;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::Ok((billing, retries, slow))
        }));
    }
    for task in tasks {
        let conns = task.await??;
        drop(conns);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_real_binaries() -> Result<()> {
    let Some(tools) = tools() else {
        return Ok(());
    };
    let lookupd = LookupdProcess::start(&[])?;
    let grpc = format!("--lookupd-grpc-address={}", lookupd.grpc_address);
    let mut brokers = Vec::new();
    for id in 0..2 {
        brokers.push(BrokerProcess::start(&[
            &grpc,
            &format!("--node-id=events-broker-{id}"),
            "--e2e-processing-latency-percentile=0.99,0.5",
        ])?);
    }
    let config = scrape_job(
        "broker",
        &brokers
            .iter()
            .enumerate()
            .map(|(i, b)| (b.http_address, format!("events-broker-{i}")))
            .collect::<Vec<_>>(),
    ) + &scrape_job(
        "lookupd",
        &[(lookupd.http_address, "events-lookupd-0".to_string())],
    );
    let prom = PrometheusServer::start_with(&tools.prometheus, &config)?;

    let stop = CancellationToken::new();
    let load = tokio::spawn(load(
        brokers
            .iter()
            .map(|b| (b.tcp_address, b.http_address))
            .collect(),
        lookupd.http_address,
        stop.clone(),
    ));

    // Enough scrapes for 15 s rates, with the traffic in them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let scraped = prom
            .query("count_over_time(up[15s]) >= 8")
            .await
            .unwrap_or_default();
        let timeouts = prom
            .query("nsq_channel_timed_out_total > 0")
            .await
            .unwrap_or_default();
        if scraped.len() == 3 && !timeouts.is_empty() {
            break;
        }
        if load.is_finished() || tokio::time::Instant::now() > deadline {
            stop.cancel();
            let load = load.await;
            bail!(
                "Prometheus did not get there (scraped {scraped:?}, timeouts {timeouts:?}, load {load:?}); its log:\n{}",
                prom.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let dashboard = dashboard()?;
    let queries = panel_queries(&dashboard);
    ensure!(
        queries.len() >= 25,
        "only {} queries in the dashboard",
        queries.len()
    );
    let mut failures = Vec::new();
    for (title, expr) in &queries {
        let promql = substitute(expr);
        match prom.query(&promql).await {
            Ok(series) if series.is_empty() => {
                failures.push(format!("{title}: {promql} returned nothing"))
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{title}: {promql} failed: {e:#}")),
        }
    }
    // The variables: label_values(<selector>, <label>) as Grafana asks for them.
    for variable in dashboard["templating"]["list"]
        .as_array()
        .context("variables")?
    {
        let Some(query) = variable["query"]["query"].as_str() else {
            continue;
        };
        let Some(inner) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            continue;
        };
        let (selector, label) = inner
            .rsplit_once(',')
            .context("label_values(selector, label)")?;
        let path = format!(
            "/api/v1/label/{}/values?match[]={}",
            label.trim(),
            encode(&substitute(selector.trim()))
        );
        match prom.get(&path).await {
            Ok(values) if values.as_array().is_some_and(|v| !v.is_empty()) => {}
            other => failures.push(format!(
                "variable {}: {path} gave {other:?}",
                variable["name"]
            )),
        }
    }
    stop.cancel();
    load.await??;
    ensure!(
        failures.is_empty(),
        "{} failures among {} panel queries and the variables:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    drop(prom);
    drop(brokers);
    drop(lookupd);
    Ok(())
}
