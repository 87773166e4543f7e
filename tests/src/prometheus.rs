//! A real Prometheus server for tests (Debian's `prometheus` package; see
//! `scripts/install-prometheus.sh`): started on loopback with a generated scrape config, queried
//! over its HTTP API, killed when dropped.

use crate::http_request;
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};

/// The Prometheus binaries.
pub struct Tools {
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The Prometheus binaries, or `None` when this test is to be skipped.
pub fn tools() -> Option<Tools> {
    match (on_path("prometheus"), on_path("promtool")) {
        (Some(prometheus), Some(promtool)) => Some(Tools {
            prometheus,
            promtool,
        }),
        _ if std::env::var_os("CI").is_some() => {
            panic!("prometheus/promtool not installed: run scripts/install-prometheus.sh")
        }
        _ => {
            eprintln!("skipped: prometheus not installed (run scripts/install-prometheus.sh)");
            None
        }
    }
}

/// `promtool check metrics` on `body`: its exit code and everything it printed.
pub fn promtool_check(promtool: &Path, body: &[u8]) -> Result<(i32, String)> {
    let mut child = Process::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", promtool.display()))?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(body)?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), said))
}

/// A Prometheus server; killed on drop.
pub struct PrometheusServer {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Scraping one target every second, as job `knsq`.
    pub fn start(binary: &Path, target: SocketAddr) -> Result<PrometheusServer> {
        PrometheusServer::start_with(
            binary,
            &format!(
                "  - job_name: knsq\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
                 metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
    }

    /// With these `scrape_configs` entries (YAML, indented as list items under the key).
    pub fn start_with(binary: &Path, scrape_configs: &str) -> Result<PrometheusServer> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n{scrape_configs}"
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Process::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--web.enable-lifecycle")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(PrometheusServer {
            child,
            address,
            log,
            _dir: dir,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET of the HTTP API: its `data` when the status is `success`.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let resp = http_request(self.address, "GET", path, b"").await?;
        ensure!(
            resp.status == 200,
            "Prometheus answered {} to {path}: {}",
            resp.status,
            resp.text()
        );
        let v = resp.json()?;
        ensure!(v["status"] == "success", "{path}: {v}");
        Ok(v["data"].clone())
    }

    /// An instant query: each series' labels (without `__name__`, `job`, `instance`) and value.
    pub async fn query(&self, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let data = self
            .get(&format!("/api/v1/query?query={}", encode(promql)))
            .await?;
        let mut series = Vec::new();
        for s in data["result"].as_array().context("result")? {
            let mut labels: BTreeMap<String, String> = s["metric"]
                .as_object()
                .context("metric")?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            for k in ["__name__", "job", "instance"] {
                labels.remove(k);
            }
            let value: f64 = s["value"][1]
                .as_str()
                .context("value")?
                .parse()
                .context("value is not a number")?;
            series.push((labels, value));
        }
        Ok(series)
    }

    /// The value of the one series `promql` selects.
    pub async fn value(&self, promql: &str) -> Result<f64> {
        match &self.query(promql).await?[..] {
            [(_, v)] => Ok(*v),
            other => bail!(
                "{promql} selects {} series, not one: {other:?}",
                other.len()
            ),
        }
    }

    /// The metric type Prometheus recorded from the `# TYPE` line.
    pub async fn metric_type(&self, metric: &str) -> Result<String> {
        let data = self
            .get(&format!("/api/v1/metadata?metric={metric}"))
            .await?;
        Ok(data[metric][0]["type"]
            .as_str()
            .with_context(|| format!("no metadata for {metric}: {data}"))?
            .to_string())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query-string value.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
