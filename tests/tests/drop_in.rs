//! Drop-in for nsqd and nsqlookupd: their full flag lists and config files start the real
//! binaries unchanged, any valid topic or channel name works through publish, consume and
//! restart, and the startup errors a first run meets say what is wrong, once.

use anyhow::{Result, ensure};
use proto::wire::{Command, Frame, Name};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::Duration;
use tests::certs::TestCa;
use tests::lookupd::LookupdProcess;
use tests::{BrokerProcess, NsqConn, binary_path, http_request};

/// Every flag of nsqd v1.3.0 (nsq's `apps/nsqd/options.go`, `nsqdFlagSet`), in that order, with
/// a value of its type, plus the four that nsqd's master added after 1.3.0
/// (`--auth-http-request-method`, `--topology-region`, `--topology-zone`,
/// `--enable-experiment`). `--version` and `--config` have tests of their own; the addresses,
/// data path and TLS files are filled in by the test. `None` is a bare boolean, as Go takes it.
const NSQD_FLAGS: &[(&str, Option<&str>)] = &[
    ("log-level", Some("info")),
    ("log-prefix", Some("[nsqd] ")),
    ("verbose", None),
    ("node-id", Some("3")),
    ("worker-id", None),
    ("https-address", Some("127.0.0.1:0")),
    ("http-address", Some("127.0.0.1:0")),
    ("tcp-address", Some("127.0.0.1:0")),
    ("auth-http-address", Some("127.0.0.1:1")),
    ("broadcast-address", Some("127.0.0.1")),
    ("broadcast-tcp-port", Some("4150")),
    ("broadcast-http-port", Some("4151")),
    ("lookupd-tcp-address", Some("127.0.0.1:1")),
    ("http-client-connect-timeout", Some("2s")),
    ("http-client-request-timeout", Some("5s")),
    ("data-path", Some("{data}")),
    ("mem-queue-size", Some("10000")),
    ("max-bytes-per-file", Some("104857600")),
    ("sync-every", Some("2500")),
    ("sync-timeout", Some("2s")),
    ("queue-scan-worker-pool-max", Some("4")),
    ("queue-scan-selection-count", Some("20")),
    ("msg-timeout", Some("1m0s")),
    ("max-msg-timeout", Some("15m0s")),
    ("max-msg-size", Some("1048576")),
    ("max-req-timeout", Some("1h0m0s")),
    ("max-body-size", Some("5242880")),
    ("max-heartbeat-interval", Some("1m0s")),
    ("max-rdy-count", Some("2500")),
    ("max-output-buffer-size", Some("65536")),
    ("max-output-buffer-timeout", Some("30s")),
    ("min-output-buffer-timeout", Some("25ms")),
    ("output-buffer-timeout", Some("250ms")),
    ("max-channel-consumers", Some("0")),
    ("statsd-address", Some("127.0.0.1:8125")),
    ("statsd-interval", Some("1m0s")),
    ("statsd-mem-stats", Some("true")),
    ("statsd-prefix", Some("nsq.%s")),
    ("statsd-udp-packet-size", Some("508")),
    ("statsd-exclude-ephemeral", None),
    ("e2e-processing-latency-percentile", Some("1.0,0.99,0.95")),
    ("e2e-processing-latency-window-time", Some("10m0s")),
    ("tls-cert", Some("{cert}")),
    ("tls-key", Some("{key}")),
    ("tls-client-auth-policy", Some("require-verify")),
    ("tls-root-ca-file", Some("{ca}")),
    ("tls-required", Some("tcp-https")),
    ("tls-min-version", Some("tls1.2")),
    ("deflate", Some("true")),
    ("max-deflate-level", Some("6")),
    ("snappy", None),
    // After v1.3.0, on nsq's master.
    ("auth-http-request-method", Some("get")),
    ("topology-region", Some("eu-west")),
    ("topology-zone", Some("eu-west-1a")),
    ("enable-experiment", Some("topology-aware-consumption")),
];

/// Every flag of nsqlookupd v1.3.0 (`apps/nsqlookupd/main.go`, `nsqlookupdFlagSet`) but
/// `--version` and `--config`.
const NSQLOOKUPD_FLAGS: &[(&str, Option<&str>)] = &[
    ("log-level", Some("info")),
    ("log-prefix", Some("[nsqlookupd] ")),
    ("verbose", None),
    ("tcp-address", Some("127.0.0.1:0")),
    ("http-address", Some("127.0.0.1:0")),
    ("broadcast-address", Some("lookupd-0")),
    ("inactive-producer-timeout", Some("5m0s")),
    ("tombstone-lifetime", Some("45s")),
];

/// A flag list in Go's syntax (`-flag=value`, bare booleans), placeholders filled in.
fn go_command_line(flags: &[(&str, Option<&str>)], fill: &[(&str, String)]) -> Vec<String> {
    flags
        .iter()
        .map(|(flag, value)| match value {
            None => format!("-{flag}"),
            Some(v) => {
                let v = fill
                    .iter()
                    .fold(v.to_string(), |v, (from, to)| v.replace(from, to));
                format!("-{flag}={v}")
            }
        })
        .collect()
}

/// Runs a binary to its end: exit code and stderr.
fn run(binary: &str, args: &[String]) -> Result<(Option<i32>, String)> {
    let out = Process::new(binary_path(binary))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    ))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_nsqd_flag_with_a_value_starts_the_broker() -> Result<()> {
    let ca = TestCa::new()?;
    let server = ca.server("broker")?;
    let data = tempfile::tempdir()?;
    let fill = [
        ("{data}", data.path().display().to_string()),
        ("{cert}", server.cert.display().to_string()),
        ("{key}", server.key.display().to_string()),
        ("{ca}", ca.ca_file().display().to_string()),
    ];
    let mut broker = BrokerProcess::spawn(&go_command_line(NSQD_FLAGS, &fill))?;
    let warning = broker.find_log("ignoring nsqd flags")?;
    // One warning for the flags knsq has no use for, naming each and what replaces it.
    for named in [
        "--statsd-address",
        "--statsd-prefix",
        "--statsd-interval",
        "--statsd-mem-stats",
        "--statsd-udp-packet-size",
        "--statsd-exclude-ephemeral",
        "--queue-scan-worker-pool-max",
        "--queue-scan-selection-count",
        "/metrics",
        "timer per channel",
    ] {
        assert!(warning.contains(named), "{named} missing from {warning:?}");
    }
    assert!(warning.starts_with("[nsqd] "), "{warning:?}");
    // Honoured: the node id, the topology, the e2e quantiles.
    let info = http_request(broker.http_address, "GET", "/info", b"").await?;
    let info = info.json()?;
    assert_eq!(info["topology_region"], "eu-west");
    assert_eq!(info["topology_zone"], "eu-west-1a");
    let id = http_request(broker.http_address, "GET", "/config/node_id", b"").await?;
    assert_eq!(id.text(), "3");
    let q = http_request(
        broker.http_address,
        "GET",
        "/config/e2e_processing_latency_percentiles",
        b"",
    )
    .await?;
    assert_eq!(q.json()?, serde_json::json!([1.0, 0.99, 0.95]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_topology_reaches_the_lookupd_and_worker_id_is_the_node_id() -> Result<()> {
    let lookupd = LookupdProcess::start(&[])?;
    let grpc = format!("--lookupd-tcp-address={}", lookupd.grpc_address);
    let mut broker = BrokerProcess::start(&[
        &grpc,
        "--worker-id=17",
        "--topology-region=r1",
        "--topology-zone=z1",
    ])?;
    broker.find_log("--worker-id is deprecated; use --node-id")?;
    let id = http_request(broker.http_address, "GET", "/config/node_id", b"").await?;
    assert_eq!(id.text(), "17");
    // IDENTIFY answers with the broker's topology and keeps the client's for /stats.
    let mut conn = NsqConn::connect(broker.tcp_address).await?;
    let answer = conn
        .identify(&serde_json::json!({
            "feature_negotiation": true,
            "topology_region": "r2",
            "topology_zone": "z2",
        }))
        .await?;
    let Frame::Response(body) = answer else {
        anyhow::bail!("IDENTIFY answered {answer:?}");
    };
    let answer: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(answer["topology_region"], "r1");
    assert_eq!(answer["topology_zone"], "z1");
    conn.subscribe("t", "c").await?;
    let stats = http_request(broker.http_address, "GET", "/stats?format=json", b"").await?;
    let client = stats.json()?["topics"][0]["channels"][0]["clients"][0].clone();
    assert_eq!(client["topology_region"], "r2", "{client}");
    assert_eq!(client["topology_zone"], "z2", "{client}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = http_request(lookupd.http_address, "GET", "/nodes", b"").await?;
        let nodes = nodes.json()?;
        if let Some(node) = nodes["producers"].get(0) {
            assert_eq!(node["topology_region"], "r1");
            assert_eq!(node["topology_zone"], "z1");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "not registered: {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_nsqlookupd_flag_with_a_value_starts_the_lookupd() -> Result<()> {
    let mut lookupd = LookupdProcess::spawn(&go_command_line(NSQLOOKUPD_FLAGS, &[]), &[])?;
    let ping = http_request(lookupd.http_address, "GET", "/ping", b"").await?;
    assert_eq!(ping.text(), "OK");
    let line = lookupd.find_log("--verbose is deprecated")?;
    assert!(line.starts_with("[nsqlookupd] "), "{line:?}");
    Ok(())
}

#[test]
fn version_prints_the_version_as_nsqd_does() -> Result<()> {
    for binary in ["knsq-broker", "knsq-lookupd"] {
        let (code, out) = run(binary, &strings(&["-version"]))?;
        assert_eq!(code, Some(0), "{out}");
        assert!(out.starts_with(binary), "{out}");
    }
    Ok(())
}

/// An nsqd config file as nsqd's `contrib/nsqd.cfg.example` writes one: underscores, `id`
/// and `nsqlookupd_tcp_addresses`, durations as strings or integer milliseconds, empty
/// strings for unset options.
fn nsqd_config(data: &Path) -> String {
    format!(
        r#"
## log verbosity level: debug, info, warn, error, or fatal
log_level = "info"
id = 9
tcp_address = "127.0.0.1:1"
http_address = "127.0.0.1:1"
https_address = "127.0.0.1:0"
broadcast_address = "127.0.0.1"
nsqlookupd_tcp_addresses = []
data_path = "{}"
mem_queue_size = 100
max_bytes_per_file = 104857600
msg_timeout = "30s"
max_msg_timeout = 900000
max_req_timeout = "1h"
sync_every = 2500
e2e_processing_latency_percentiles = [0.99, 0.5]
statsd_address = ""
statsd_prefix = "nsq.%s"
statsd_mem_stats = true
tls_cert = ""
tls_key = ""
tls_client_auth_policy = ""
tls_required = false
tls_min_version = ""
deflate = true
max_deflate_level = 6
snappy = true
"#,
        data.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nsqd_config_file_works_and_the_command_line_overrides_it() -> Result<()> {
    let data = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("nsqd.cfg");
    std::fs::write(&file, nsqd_config(data.path()))?;
    // The file's addresses (port 1) are overridden; everything else comes from it.
    let mut broker = BrokerProcess::spawn(&strings(&[
        &format!("--config={}", file.display()),
        "--tcp-address=127.0.0.1:0",
        "-http-address",
        "127.0.0.1:0",
        "--mem-queue-size=5",
    ]))?;
    broker.find_log("--statsd-prefix")?;
    for (option, want) in [
        ("node_id", "9"),
        ("mem_queue_size", "5"),
        ("msg_timeout", "30000000000"),
        ("max_msg_timeout", "900000000000"),
        ("e2e_processing_latency_percentiles", "[0.99,0.5]"),
    ] {
        let got = http_request(
            broker.http_address,
            "GET",
            &format!("/config/{option}"),
            b"",
        )
        .await?;
        assert_eq!(got.text(), want, "{option}");
    }
    // The environment overrides the file too.
    let env_broker = tests::ChildProcess::spawn(
        "knsq-broker",
        &strings(&[&format!("-config={}", file.display())]),
        &[
            ("KNSQ_TCP_ADDRESS", "127.0.0.1:0"),
            ("KNSQ_HTTP_ADDRESS", "127.0.0.1:0"),
            ("KNSQ_DATA_PATH", &dir.path().display().to_string()),
        ],
    );
    let mut env_broker = env_broker?;
    env_broker.wait_for_address("HTTP: listening on ")?;
    Ok(())
}

#[test]
fn a_bad_config_file_is_an_error_naming_the_key_or_value() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "knsq-broker",
            "mem_queue_sise = 5\n",
            &["unknown option \"mem_queue_sise\""],
        ),
        (
            "knsq-broker",
            "mem_queue_size = \"lots\"\n",
            &["invalid value \"lots\" for mem_queue_size"],
        ),
        (
            "knsq-broker",
            "msg_timeout = \"5 fortnights\"\n",
            &["for msg_timeout", "invalid duration"],
        ),
        (
            "knsq-broker",
            "tls_required = \"maybe\"\n",
            &["for tls_required"],
        ),
        (
            "knsq-broker",
            "id = 5000\n",
            &["--node-id", "set by id in config file"],
        ),
        (
            "knsq-broker",
            "mem_queue_size = [1, 2]\n",
            &["for mem_queue_size", "not a list"],
        ),
        (
            "knsq-broker",
            "mem_queue_size = \n",
            &["not valid TOML", "line 1"],
        ),
        (
            "knsq-lookupd",
            "tombstone_lifetim = \"1s\"\n",
            &["unknown option \"tombstone_lifetim\""],
        ),
        (
            "knsq-lookupd",
            "inactive_producer_timeout = \"soon\"\n",
            &["invalid value \"soon\" for inactive_producer_timeout"],
        ),
    ];
    for (binary, text, wanted) in cases {
        let file = dir.path().join("bad.cfg");
        std::fs::write(&file, text)?;
        let (code, stderr) = run(binary, &strings(&[&format!("--config={}", file.display())]))?;
        assert_eq!(code, Some(2), "{binary} {text:?}: {stderr}");
        assert!(stderr.contains(&file.display().to_string()), "{stderr}");
        for want in *wanted {
            assert!(
                stderr.contains(want),
                "{binary} {text:?}: {want:?} missing from {stderr}"
            );
        }
    }
    let (code, stderr) = run("knsq-broker", &strings(&["--config=/nonexistent/nsqd.cfg"]))?;
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("cannot read config file /nonexistent/nsqd.cfg"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nsqlookupd_config_file_works_and_the_command_line_overrides_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("nsqlookupd.cfg");
    std::fs::write(
        &file,
        "log_level = \"info\"\nlog_prefix = \"[from-file] \"\ntcp_address = \"127.0.0.1:1\"\n\
         http_address = \"127.0.0.1:0\"\nbroadcast_address = \"from-file\"\n\
         inactive_producer_timeout = 300000\ntombstone_lifetime = \"45s\"\n",
    )?;
    let mut lookupd = LookupdProcess::spawn(
        &strings(&[
            &format!("-config={}", file.display()),
            "-tcp-address=127.0.0.1:0",
        ]),
        &[],
    )?;
    let ping = http_request(lookupd.http_address, "GET", "/ping", b"").await?;
    assert_eq!(ping.text(), "OK");
    let line = lookupd.find_log("listening")?;
    assert!(line.starts_with("[from-file] "), "{line:?}");
    Ok(())
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap_or_else(|| panic!("{s:?} is not a name"))
}

/// Names nsqd takes that a file system treats specially, or that differ only in case or in
/// such a character.
const SPECIAL: &[(&str, &str)] = &[
    (".", "."),
    ("..", ".."),
    ("a.b", "..."),
    ("a_b", "c"),
    ("A.b", "C"),
    ("a.B", ".c."),
];

#[tokio::test(flavor = "multi_thread")]
async fn any_valid_name_works_through_publish_consume_and_restart() -> Result<()> {
    let broker = BrokerProcess::start(&["--mem-queue-size=1"])?;
    for (topic, channel) in SPECIAL {
        let path = format!("/topic/create?topic={topic}");
        let r = http_request(broker.http_address, "POST", &path, b"").await?;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let path = format!("/channel/create?topic={topic}&channel={channel}");
        let r = http_request(broker.http_address, "POST", &path, b"").await?;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        // Two messages each: with a memory queue of one, at least one goes to disk.
        for n in 0..2 {
            let mut conn = NsqConn::connect(broker.tcp_address).await?;
            conn.send(&Command::Pub {
                topic: name(topic),
                body: format!("{topic}/{channel}/{n}").into_bytes().into(),
            })
            .await?;
            conn.expect_response(b"OK").await?;
        }
    }
    let data = broker
        .data
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_default();
    let mut broker = broker;
    broker.signal("TERM")?;
    broker.wait_exit(Duration::from_secs(10))?;
    // No file is named after a name verbatim: none is hidden or outside the directory.
    for entry in std::fs::read_dir(&data)? {
        let file = entry?.file_name().to_string_lossy().into_owned();
        assert!(!file.starts_with('.'), "{file}");
    }

    let mut broker = broker.restart(&[])?;
    let recovered = broker.find_log("recovered")?;
    assert!(recovered.contains("12 queued messages"), "{recovered}");
    for (topic, channel) in SPECIAL {
        let mut conn = NsqConn::connect(broker.tcp_address).await?;
        conn.identify(&serde_json::json!({})).await?;
        conn.subscribe(topic, channel).await?;
        conn.send(&Command::Rdy(10)).await?;
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let msg = conn.expect_message().await?;
            bodies.push(String::from_utf8_lossy(&msg.body).into_owned());
            conn.send(&Command::Fin(msg.id)).await?;
        }
        bodies.sort();
        assert_eq!(
            bodies,
            [
                format!("{topic}/{channel}/0"),
                format!("{topic}/{channel}/1")
            ],
            "{topic}:{channel}"
        );
    }
    let stats = http_request(broker.http_address, "GET", "/stats?format=json", b"").await?;
    let stats = stats.json()?;
    let topics: Vec<&str> = stats["topics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["topic_name"].as_str())
        .collect();
    assert_eq!(topics.len(), SPECIAL.len(), "{topics:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_with_files_named_verbatim_keeps_its_messages() -> Result<()> {
    let broker = BrokerProcess::start(&["--mem-queue-size=0"])?;
    for n in 0..3 {
        let path = "/pub?topic=Orders.v1";
        let r = http_request(
            broker.http_address,
            "POST",
            path,
            format!("m{n}").as_bytes(),
        )
        .await?;
        assert_eq!(r.status, 200);
    }
    let data = broker
        .data
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_default();
    let mut broker = broker;
    broker.signal("TERM")?;
    broker.wait_exit(Duration::from_secs(10))?;
    // Name the queue's files as knsq did before names were encoded (and as nsqd does).
    let mut renamed = 0;
    for entry in std::fs::read_dir(&data)? {
        let file = entry?.file_name().to_string_lossy().into_owned();
        if let Some(rest) = file.strip_prefix("%4Frders%2Ev1.") {
            std::fs::rename(data.join(&file), data.join(format!("Orders.v1.{rest}")))?;
            renamed += 1;
        }
    }
    assert!(renamed >= 2, "no files of the queue found");
    let mut broker = broker.restart(&[])?;
    broker.find_log("3 queued messages")?;
    let mut conn = NsqConn::connect(broker.tcp_address).await?;
    conn.identify(&serde_json::json!({})).await?;
    conn.subscribe("Orders.v1", "c").await?;
    conn.send(&Command::Rdy(10)).await?;
    for n in 0..3 {
        let msg = conn.expect_message().await?;
        assert_eq!(&msg.body[..], format!("m{n}").as_bytes());
    }
    Ok(())
}

#[test]
fn startup_errors_say_each_cause_once() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.to_string();
    let data = tempfile::tempdir()?;
    let data_flag = format!("--data-path={}", data.path().display());
    for (binary, args) in [
        (
            "knsq-broker",
            vec![
                format!("--tcp-address={port}"),
                "--http-address=127.0.0.1:0".into(),
                data_flag.clone(),
            ],
        ),
        (
            "knsq-broker",
            vec![
                "--tcp-address=127.0.0.1:0".into(),
                format!("--http-address={port}"),
                data_flag.clone(),
            ],
        ),
        (
            "knsq-lookupd",
            vec![
                format!("--tcp-address={port}"),
                "--http-address=127.0.0.1:0".into(),
            ],
        ),
    ] {
        let (code, stderr) = run(binary, &args)?;
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(
            stderr.matches("Address already in use").count(),
            1,
            "{stderr}"
        );
        assert!(stderr.contains(&port), "{stderr}");
    }
    Ok(())
}

#[test]
fn a_data_path_that_is_a_file_or_has_no_parent_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"")?;
    let ports = ["--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0"];
    let mut args = strings(&ports);
    args.push(format!("--data-path={}", file.display()));
    let (code, stderr) = run("knsq-broker", &args)?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a directory"), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");

    let missing = dir.path().join("missing").join("data");
    let mut args = strings(&ports);
    args.push(format!("--data-path={}", missing.display()));
    let (code, stderr) = run("knsq-broker", &args)?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        !dir.path().join("missing").exists(),
        "the parent was created"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_process_names_itself_in_its_logs() -> Result<()> {
    let mut lookupd = LookupdProcess::start(&[])?;
    lookupd.signal("TERM")?;
    let line = lookupd.wait_for_log("signal received")?;
    assert!(line.starts_with("[knsq-lookupd] "), "{line:?}");
    assert!(!line.contains("broker"), "{line:?}");
    let mut broker = BrokerProcess::start(&[])?;
    broker.signal("TERM")?;
    let line = broker.wait_for_log("signal received")?;
    assert!(line.starts_with("[knsq-broker] "), "{line:?}");
    Ok(())
}
