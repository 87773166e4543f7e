//! TLS and mutual TLS on the gRPC channel between brokers and lookupds (issue 6): brokers
//! register over TLS, show client certificates to lookupds that require them, and refuse
//! lookupds they cannot verify. Every refusal is retried with backoff and logged with its
//! reason; nothing hangs and nothing falls back to plain text.

use anyhow::{Result, ensure};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::Duration;
use tests::certs::{CertFiles, TestCa};
use tests::lookupd::{LookupdProcess, TestLookupd, eventually, lookup_producers};
use tests::{BrokerProcess, TestBroker, binary_path, http_request};

/// The identity `/lookup` gives a broker: `broadcast_address:tcp_port`.
fn producer(tcp: SocketAddr) -> String {
    format!("127.0.0.1:{}", tcp.port())
}

/// The value of one sample of a broker's `/metrics`, if present.
async fn metric(http: SocketAddr, sample: &str) -> Result<Option<f64>> {
    let resp = http_request(http, "GET", "/metrics", b"").await?;
    Ok(resp
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok()))
}

fn connected(grpc: SocketAddr) -> String {
    format!("knsq_lookupd_connected{{address=\"{grpc}\"}}")
}

/// Creates topic `t` on the broker and waits until the lookupd lists the broker for it.
async fn expect_registered(
    broker_http: SocketAddr,
    broker_tcp: SocketAddr,
    lookupd_http: SocketAddr,
) -> Result<()> {
    let created = http_request(broker_http, "POST", "/topic/create?topic=t", b"").await?;
    ensure!(created.status == 200, "{}", created.text());
    let me = producer(broker_tcp);
    eventually(&format!("/lookup?topic=t lists {me}"), || {
        let me = me.clone();
        async move { Ok(lookup_producers(lookupd_http, "t").await?.contains(&me)) }
    })
    .await
}

/// Creates topic `t` on the broker and checks it stays unregistered while the broker keeps
/// retrying: at least two reconnects, the connected gauge at 0, and `/lookup` without it.
async fn expect_refused(
    broker_http: SocketAddr,
    broker_tcp: SocketAddr,
    lookupd: SocketAddr,
    lookupd_http: SocketAddr,
) -> Result<()> {
    let created = http_request(broker_http, "POST", "/topic/create?topic=t", b"").await?;
    ensure!(created.status == 200, "{}", created.text());
    let reconnects = format!("knsq_lookupd_reconnects_total{{address=\"{lookupd}\"}}");
    eventually("the broker retries the lookupd twice", || {
        let reconnects = reconnects.clone();
        async move { Ok(metric(broker_http, &reconnects).await?.unwrap_or(0.0) >= 2.0) }
    })
    .await?;
    ensure!(metric(broker_http, &connected(lookupd)).await? == Some(0.0));
    let listed = lookup_producers(lookupd_http, "t").await?;
    ensure!(!listed.contains(&producer(broker_tcp)), "{listed:?}");
    Ok(())
}

async fn tls_lookupd(server: &CertFiles, client_ca: Option<&Path>) -> Result<TestLookupd> {
    let (cert, key) = (server.cert.clone(), server.key.clone());
    let client_ca = client_ca.map(Path::to_path_buf);
    TestLookupd::start(move |o| {
        o.grpc_tls_cert = Some(cert);
        o.grpc_tls_key = Some(key);
        o.grpc_tls_client_ca_file = client_ca;
    })
    .await
}

fn tls_lookupd_process(server: &CertFiles, client_ca: Option<&Path>) -> Result<LookupdProcess> {
    let mut flags = vec![
        format!("--grpc-tls-cert={}", server.cert.display()),
        format!("--grpc-tls-key={}", server.key.display()),
    ];
    if let Some(ca) = client_ca {
        flags.push(format!("--grpc-tls-client-ca-file={}", ca.display()));
    }
    LookupdProcess::start(&flags.iter().map(String::as_str).collect::<Vec<_>>())
}

fn broker_process(lookupd: SocketAddr, flags: &[String]) -> Result<BrokerProcess> {
    let mut all = vec![format!("--lookupd-grpc-address={lookupd}")];
    all.extend_from_slice(flags);
    BrokerProcess::start(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn flag(name: &str, path: &Path) -> String {
    format!("--{name}={}", path.display())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_registers_with_a_tls_lookupd() -> Result<()> {
    let ca = TestCa::new()?;
    let lookupd = tls_lookupd(&ca.server("lookupd")?, None).await?;
    let grpc = lookupd.grpc_address();
    let root = ca.ca_file().to_path_buf();
    let broker = TestBroker::start(move |o| {
        o.lookupd_grpc_addresses = vec![grpc.to_string()];
        o.lookupd_tls_root_ca_file = Some(root);
        // The certificate names localhost as well as 127.0.0.1.
        o.lookupd_tls_server_name = Some("localhost".into());
        o.lookupd_heartbeat_interval = Duration::from_millis(100);
    })
    .await?;
    expect_registered(
        broker.http_address(),
        broker.tcp_address(),
        lookupd.http_address(),
    )
    .await?;
    ensure!(metric(broker.http_address(), &connected(grpc)).await? == Some(1.0));
    // Pre-creation asks over the same TLS channel.
    let created = http_request(
        broker.http_address(),
        "POST",
        "/channel/create?topic=t&channel=c",
        b"",
    )
    .await?;
    ensure!(created.status == 200);
    broker.stop().await?;
    lookupd.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_with_a_client_certificate_registers_with_a_mutual_tls_lookupd() -> Result<()> {
    let ca = TestCa::new()?;
    let lookupd = tls_lookupd(&ca.server("lookupd")?, Some(ca.ca_file())).await?;
    let grpc = lookupd.grpc_address();
    let client = ca.client("broker", "broker-0")?;
    let root = ca.ca_file().to_path_buf();
    let broker = TestBroker::start(move |o| {
        o.lookupd_grpc_addresses = vec![grpc.to_string()];
        o.lookupd_tls_root_ca_file = Some(root);
        o.lookupd_tls_cert = Some(client.cert);
        o.lookupd_tls_key = Some(client.key);
    })
    .await?;
    expect_registered(
        broker.http_address(),
        broker.tcp_address(),
        lookupd.http_address(),
    )
    .await?;
    ensure!(metric(broker.http_address(), &connected(grpc)).await? == Some(1.0));
    broker.stop().await?;
    lookupd.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mutual_tls_lookupd_refuses_a_broker_without_a_client_certificate() -> Result<()> {
    let ca = TestCa::new()?;
    let lookupd = tls_lookupd_process(&ca.server("lookupd")?, Some(ca.ca_file()))?;
    let trust = flag("lookupd-tls-root-ca-file", ca.ca_file());
    let mut anonymous = broker_process(lookupd.grpc_address, std::slice::from_ref(&trust))?;
    let line = anonymous.wait_for_log("lookupd registration lost or failed")?;
    // The lookupd's alert, when it arrives before the broker's first write fails.
    ensure!(
        line.contains("may require a client certificate") || line.contains("CertificateRequired"),
        "{line}"
    );
    expect_refused(
        anonymous.http_address,
        anonymous.tcp_address,
        lookupd.grpc_address,
        lookupd.http_address,
    )
    .await?;

    // A certificate from a CA the lookupd does not trust fares no better.
    let other = TestCa::new()?;
    let stranger = other.client("stranger", "broker-x")?;
    let mut untrusted = broker_process(
        lookupd.grpc_address,
        &[
            trust.clone(),
            flag("lookupd-tls-cert", &stranger.cert),
            flag("lookupd-tls-key", &stranger.key),
        ],
    )?;
    let line = untrusted.wait_for_log("lookupd registration lost or failed")?;
    ensure!(
        line.contains("may have refused the client certificate") || line.contains("alert"),
        "{line}"
    );
    expect_refused(
        untrusted.http_address,
        untrusted.tcp_address,
        lookupd.grpc_address,
        lookupd.http_address,
    )
    .await?;

    // The lookupd is unharmed and takes a broker that shows its certificate.
    let ping = http_request(lookupd.http_address, "GET", "/ping", b"").await?;
    ensure!(ping.status == 200 && ping.text() == "OK");
    let client = ca.client("broker", "broker-1")?;
    let good = broker_process(
        lookupd.grpc_address,
        &[
            trust,
            flag("lookupd-tls-cert", &client.cert),
            flag("lookupd-tls-key", &client.key),
        ],
    )?;
    expect_registered(good.http_address, good.tcp_address, lookupd.http_address).await?;
    let listed = lookup_producers(lookupd.http_address, "t").await?;
    ensure!(listed == [producer(good.tcp_address)], "{listed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_refuses_a_lookupd_it_cannot_verify() -> Result<()> {
    let ca = TestCa::new()?;
    let other = TestCa::new()?;
    let lookupd = tls_lookupd_process(&ca.server("lookupd")?, None)?;

    // Signed by a CA the broker does not trust.
    let mut wrong_ca = broker_process(
        lookupd.grpc_address,
        &[flag("lookupd-tls-root-ca-file", other.ca_file())],
    )?;
    let line = wrong_ca.wait_for_log("lookupd registration lost or failed")?;
    ensure!(line.contains("invalid peer certificate"), "{line}");
    expect_refused(
        wrong_ca.http_address,
        wrong_ca.tcp_address,
        lookupd.grpc_address,
        lookupd.http_address,
    )
    .await?;

    // The right CA, but a name the certificate does not carry.
    let mut wrong_name = broker_process(
        lookupd.grpc_address,
        &[
            flag("lookupd-tls-root-ca-file", ca.ca_file()),
            "--lookupd-tls-server-name=lookupd.elsewhere".into(),
        ],
    )?;
    let line = wrong_name.wait_for_log("lookupd registration lost or failed")?;
    ensure!(line.contains("not valid for name"), "{line}");
    expect_refused(
        wrong_name.http_address,
        wrong_name.tcp_address,
        lookupd.grpc_address,
        lookupd.http_address,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_and_tls_sides_do_not_register_with_each_other() -> Result<()> {
    let ca = TestCa::new()?;
    let tls = tls_lookupd(&ca.server("lookupd")?, None).await?;
    let mut plain_broker = broker_process(tls.grpc_address(), &[])?;
    let line = plain_broker.wait_for_log("lookupd registration lost or failed")?;
    ensure!(line.contains("may require TLS"), "{line}");
    expect_refused(
        plain_broker.http_address,
        plain_broker.tcp_address,
        tls.grpc_address(),
        tls.http_address(),
    )
    .await?;

    let plain = TestLookupd::start(|_| {}).await?;
    let mut tls_broker = broker_process(
        plain.grpc_address(),
        &[flag("lookupd-tls-root-ca-file", ca.ca_file())],
    )?;
    let line = tls_broker.wait_for_log("lookupd registration lost or failed")?;
    ensure!(line.contains("does not seem to speak TLS"), "{line}");
    expect_refused(
        tls_broker.http_address,
        tls_broker.tcp_address,
        plain.grpc_address(),
        plain.http_address(),
    )
    .await?;
    tls.stop().await?;
    plain.stop().await
}

/// Runs a binary with `args` and returns its stderr, failing if it started.
fn startup_error(binary: &str, args: &[String]) -> Result<String> {
    let data = tempfile::tempdir()?;
    let mut command = Process::new(binary_path(binary));
    if binary == "knsq-broker" {
        command.arg(flag("data-path", data.path()));
    }
    let out = command
        .args(["--broadcast-address=x"])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    ensure!(!out.status.success(), "{binary} {args:?} started");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_tls_flags_are_startup_errors_naming_the_flag() -> Result<()> {
    let ca = TestCa::new()?;
    let server = ca.server("lookupd")?;
    let client = ca.client("broker", "broker-0")?;
    let dir = tempfile::tempdir()?;
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all")?;
    let cert = |path: &Path| flag("grpc-tls-cert", path);
    let key = |path: &Path| flag("grpc-tls-key", path);

    let lookupd_cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![cert(&server.cert)],
            "invalid value for --grpc-tls-key: is needed with --grpc-tls-cert",
        ),
        (
            vec![key(&server.key)],
            "invalid value for --grpc-tls-cert: is needed with --grpc-tls-key",
        ),
        (
            vec![flag("grpc-tls-client-ca-file", ca.ca_file())],
            "invalid value for --grpc-tls-client-ca-file: needs --grpc-tls-cert",
        ),
        (
            vec![cert(Path::new("/no/such.pem")), key(&server.key)],
            "invalid value for --grpc-tls-cert: cannot read /no/such.pem",
        ),
        (
            vec![cert(&garbage), key(&server.key)],
            "invalid value for --grpc-tls-cert: no PEM certificate in",
        ),
        (
            vec![cert(&server.cert), key(&garbage)],
            "invalid value for --grpc-tls-key: no PEM private key in",
        ),
        (
            vec![cert(&server.cert), key(&client.key)],
            "does not fit the certificate in",
        ),
        (
            vec![
                cert(&server.cert),
                key(&server.key),
                flag("grpc-tls-client-ca-file", &garbage),
            ],
            "invalid value for --grpc-tls-client-ca-file: no PEM certificate in",
        ),
    ];
    for (args, want) in lookupd_cases {
        let mut all = vec!["--grpc-address=127.0.0.1:0".to_string()];
        all.extend(args);
        let stderr = startup_error("knsq-lookupd", &all)?;
        ensure!(stderr.contains(want), "{all:?}: {stderr}");
    }

    let root = flag("lookupd-tls-root-ca-file", ca.ca_file());
    let broker_cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![flag("lookupd-tls-cert", &client.cert)],
            "invalid value for --lookupd-tls-key: is needed with --lookupd-tls-cert",
        ),
        (
            vec![flag("lookupd-tls-root-ca-file", &garbage)],
            "invalid value for --lookupd-tls-root-ca-file: no PEM certificate in",
        ),
        (
            vec![
                root.clone(),
                flag("lookupd-tls-cert", &client.cert),
                flag("lookupd-tls-key", &server.key),
            ],
            "invalid value for --lookupd-tls-key:",
        ),
        (
            vec!["--lookupd-tls-server-name=l".into()],
            "invalid value for --lookupd-tls-server-name",
        ),
        (
            vec![root, "--lookupd-grpc-address=http://127.0.0.1:4160".into()],
            "invalid value for --lookupd-grpc-address:",
        ),
    ];
    for (args, want) in broker_cases {
        let mut all = vec![
            "--tcp-address=127.0.0.1:0".to_string(),
            "--http-address=127.0.0.1:0".into(),
        ];
        all.extend(args);
        let stderr = startup_error("knsq-broker", &all)?;
        ensure!(stderr.contains(want), "{all:?}: {stderr}");
    }
    Ok(())
}
