//! knsq's alerts as Prometheus runs them: `promtool check rules` on the chart's rules and on a
//! cluster's PrometheusRule, `promtool test rules` on the cases in `operator/tests/alerts/`
//! (every alert fires on what it should), the chart's copy up to date, and a runbook section
//! per alert in `docs/alerts.md`.
//!
//! Needs `promtool` on `PATH` (`scripts/install-prometheus.sh`); without it the promtool tests
//! fail when `CI` is set and are skipped, saying so, otherwise.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use operator::alerts::{Scope, alerts, groups, rules_yaml};
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/alerts")
}

fn promtool() -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool not installed: run scripts/install-prometheus.sh"
        );
        eprintln!("skipped: promtool not installed (run scripts/install-prometheus.sh)");
    }
    found
}

/// A fresh directory with the rule files and the test cases side by side.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("knsq-alerts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    std::fs::write(dir.join("rules.yaml"), rules_yaml().expect("rules")).expect("write rules");
    let cluster = json!({"groups": groups(Scope::Cluster { namespace: "prod", name: "events" })});
    std::fs::write(
        dir.join("cluster-rules.yaml"),
        serde_saphyr::to_string(&cluster).expect("yaml"),
    )
    .expect("write cluster rules");
    for entry in std::fs::read_dir(cases_dir()).expect("cases") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy case");
    }
    dir
}

fn run(promtool: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{said}");
    said
}

#[test]
fn promtool_checks_the_rules_clean() {
    let Some(promtool) = promtool() else { return };
    let dir = workdir("check");
    let said = run(
        &promtool,
        &dir,
        &["check", "rules", "rules.yaml", "cluster-rules.yaml"],
    );
    let everything = alerts(Scope::Everything).len();
    assert!(
        said.contains(&format!("SUCCESS: {everything} rules found")),
        "{said}"
    );
    assert!(!said.to_lowercase().contains("warning"), "{said}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn promtool_unit_tests_pass() {
    let Some(promtool) = promtool() else { return };
    let dir = workdir("test");
    let said = run(
        &promtool,
        &dir,
        &["test", "rules", "everything_test.yaml", "cluster_test.yaml"],
    );
    assert!(said.contains("SUCCESS"), "{said}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Every alert has a case where it fires.
#[test]
fn every_alert_has_a_firing_case() {
    let text =
        std::fs::read_to_string(cases_dir().join("everything_test.yaml")).expect("test cases");
    let cases: Value = serde_saphyr::from_str(&text).expect("yaml");
    let fired: BTreeSet<&str> = cases["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().expect("alert tests"))
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str())
        .collect();
    let all: BTreeSet<&str> = alerts(Scope::Everything).iter().map(|a| a.name).collect();
    assert_eq!(fired, all);
}

#[test]
fn the_charts_rule_file_is_the_generated_one() {
    let path = repo_root().join("charts/knsq/files/prometheus-rules.yaml");
    let committed = std::fs::read_to_string(&path).expect("chart rules");
    assert!(
        committed == rules_yaml().expect("rules"),
        "{} is out of date: regenerate it with `cargo run -p operator --bin knsq-operator -- prometheus-rules > charts/knsq/files/prometheus-rules.yaml`",
        path.display()
    );
}

#[test]
fn every_alert_has_a_runbook_section() {
    let runbook =
        std::fs::read_to_string(repo_root().join("docs/alerts.md")).expect("docs/alerts.md");
    for alert in alerts(Scope::Everything) {
        assert!(
            runbook.lines().any(|l| l == format!("### {}", alert.name)),
            "docs/alerts.md has no section for {}",
            alert.name
        );
    }
}
