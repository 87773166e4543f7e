//! nsqd's HTTPS listener as knsq serves it: the API over TLS on `--https-address`, plain HTTP
//! refused with nsqd's 403 under `--tls-required=true` (and allowed under `tcp-https`), client
//! certificates per `--tls-client-auth-policy`, and clients that never finish a handshake not
//! holding up the others.
//!
//! Each test starts its own broker on loopback port 0 with certificates from a throwaway CA.

use anyhow::{Context, Result, anyhow, bail, ensure};
use broker::config::{ClientAuthPolicy, TlsRequired};
use broker::{Options, Server};
use std::net::SocketAddr;
use std::sync::Arc;
use tests::certs::{TestCa, loopback_name};
use tests::{HttpResponse, WAIT, http_exchange, http_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A broker in this process with TLS from `ca`, and its data directory.
struct TlsBroker {
    server: Server,
    _data: tempfile::TempDir,
}

impl TlsBroker {
    async fn start(ca: &TestCa, configure: impl FnOnce(&mut Options)) -> Result<TlsBroker> {
        let data = tempfile::tempdir()?;
        let mut options = Options::for_tests(data.path());
        let files = ca.server("broker")?;
        options.tls.tls_cert = Some(files.cert);
        options.tls.tls_key = Some(files.key);
        configure(&mut options);
        Ok(TlsBroker {
            server: Server::start(options).await?,
            _data: data,
        })
    }

    fn https_address(&self) -> Result<SocketAddr> {
        self.server
            .https_address()
            .ok_or_else(|| anyhow!("no HTTPS listener"))
    }

    async fn http(&self, method: &str, path: &str, body: &[u8]) -> Result<HttpResponse> {
        http_request(self.server.http_address(), method, path, body).await
    }
}

/// One HTTP/1.1 request over TLS with `Connection: close`.
async fn https_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<HttpResponse> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        WAIT,
        TlsConnector::from(config).connect(loopback_name(), tcp),
    )
    .await
    .map_err(|_| anyhow!("no TLS handshake within {WAIT:?}"))?
    .context("TLS handshake")?;
    http_exchange(tls, addr, method, path, body).await
}

fn expect_ok(resp: &HttpResponse, what: &str) -> Result<()> {
    ensure!(
        resp.status == 200,
        "{what}: status {} with body {:?}",
        resp.status,
        resp.text()
    );
    Ok(())
}

#[tokio::test]
async fn https_serves_the_same_api() -> Result<()> {
    let ca = TestCa::new()?;
    let b = TlsBroker::start(&ca, |_| {}).await?;
    let https = b.https_address()?;
    let client = ca.client_config(None)?;

    let ping = https_request(https, client.clone(), "GET", "/ping", b"").await?;
    expect_ok(&ping, "GET /ping")?;
    ensure!(ping.text() == "OK", "ping body {:?}", ping.text());

    let publish = https_request(https, client.clone(), "POST", "/pub?topic=secure", b"hi").await?;
    expect_ok(&publish, "POST /pub")?;
    ensure!(publish.text() == "OK", "pub body {:?}", publish.text());
    ensure!(publish.header("x-nsq-content-type") == Some("nsq; version=1.0"));

    let stats = https_request(https, client, "GET", "/stats?format=json", b"").await?;
    expect_ok(&stats, "GET /stats")?;
    let stats = stats.json()?;
    let topic = stats["topics"]
        .as_array()
        .and_then(|topics| topics.iter().find(|t| t["topic_name"] == "secure"))
        .ok_or_else(|| anyhow!("no topic \"secure\" in {stats}"))?;
    ensure!(topic["message_count"] == 1, "topic stats {topic}");

    // TLS not required: plain HTTP serves the API too.
    expect_ok(&b.http("GET", "/ping", b"").await?, "plain GET /ping")?;
    b.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn https_offers_http1_by_alpn() -> Result<()> {
    let ca = TestCa::new()?;
    let b = TlsBroker::start(&ca, |_| {}).await?;
    let mut config = (*ca.client_config(None)?).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(b.https_address()?).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(loopback_name(), tcp)
        .await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    ensure!(
        alpn.as_deref() == Some(b"http/1.1".as_slice()),
        "negotiated {alpn:?}"
    );
    drop(tls);
    b.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn tls_required_refuses_plain_http_with_the_https_port() -> Result<()> {
    let ca = TestCa::new()?;
    let b = TlsBroker::start(&ca, |o| o.tls.tls_required = TlsRequired::Yes).await?;
    let https = b.https_address()?;
    let want = format!(
        r#"{{"message": "TLS_REQUIRED", "https_port": {}}}"#,
        https.port()
    );
    for (method, path, body) in [
        ("GET", "/ping", &b""[..]),
        ("POST", "/pub?topic=t", b"hi"),
        ("GET", "/no/such/path", b""),
    ] {
        let resp = b.http(method, path, body).await?;
        ensure!(
            resp.status == 403,
            "plain {method} {path}: status {}",
            resp.status
        );
        ensure!(
            resp.text() == want,
            "plain {method} {path}: {:?}",
            resp.text()
        );
        let json = resp.json()?;
        ensure!(json["message"] == "TLS_REQUIRED" && json["https_port"] == https.port());
        ensure!(resp.header("x-nsq-content-type") == Some("nsq; version=1.0"));
        ensure!(resp.header("content-type") == Some("application/json; charset=utf-8"));
    }
    // Nothing was published over plain HTTP; HTTPS works.
    let client = ca.client_config(None)?;
    let stats = https_request(https, client.clone(), "GET", "/stats?format=json", b"").await?;
    ensure!(
        stats.json()?["topics"] == serde_json::json!([]),
        "{}",
        stats.text()
    );
    expect_ok(
        &https_request(https, client, "GET", "/ping", b"").await?,
        "HTTPS /ping",
    )?;
    b.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn tcp_https_keeps_plain_http() -> Result<()> {
    let ca = TestCa::new()?;
    let b = TlsBroker::start(&ca, |o| o.tls.tls_required = TlsRequired::TcpOnly).await?;
    expect_ok(&b.http("GET", "/ping", b"").await?, "plain GET /ping")?;
    expect_ok(
        &b.http("POST", "/pub?topic=t", b"hi").await?,
        "plain POST /pub",
    )?;
    let client = ca.client_config(None)?;
    expect_ok(
        &https_request(b.https_address()?, client, "GET", "/ping", b"").await?,
        "HTTPS /ping",
    )?;
    b.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn https_client_certificates_follow_the_auth_policy() -> Result<()> {
    let ca = TestCa::new()?;
    let b = TlsBroker::start(&ca, |o| {
        o.tls.tls_client_auth_policy = Some(ClientAuthPolicy::RequireVerify);
        o.tls.tls_root_ca_file = Some(ca.ca_file().to_path_buf());
    })
    .await?;
    let https = b.https_address()?;

    let anonymous = https_request(https, ca.client_config(None)?, "GET", "/ping", b"").await;
    ensure!(
        anonymous.is_err(),
        "a client without a certificate was served: {anonymous:?}"
    );

    let other_ca = TestCa::new()?;
    let stranger = other_ca.client("stranger", "stranger")?;
    let untrusted = https_request(
        https,
        ca.client_config(Some(&stranger))?,
        "GET",
        "/ping",
        b"",
    )
    .await;
    ensure!(
        untrusted.is_err(),
        "a certificate from another CA was accepted: {untrusted:?}"
    );

    let identity = ca.client("client", "client-1")?;
    let client = ca.client_config(Some(&identity))?;
    expect_ok(
        &https_request(https, client, "GET", "/ping", b"").await?,
        "HTTPS /ping with a client certificate",
    )?;

    // A client auth policy requires TLS, for HTTP as in nsqd.
    ensure!(b.http("GET", "/ping", b"").await?.status == 403);
    b.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn stalled_and_garbage_clients_do_not_block_others() -> Result<()> {
    let ca = TestCa::new()?;
    let b = TlsBroker::start(&ca, |_| {}).await?;
    let https = b.https_address()?;

    // Connected, never says anything.
    let silent = TcpStream::connect(https).await?;
    // A handshake begun and never finished: a partial TLS record header.
    let mut partial = TcpStream::connect(https).await?;
    partial.write_all(&[0x16, 0x03, 0x01]).await?;
    // Not TLS at all.
    let mut garbage = TcpStream::connect(https).await?;
    garbage
        .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x13\x37")
        .await?;

    let client = ca.client_config(None)?;
    for i in 0..3 {
        let resp = https_request(https, client.clone(), "GET", "/ping", b"").await?;
        expect_ok(&resp, &format!("HTTPS /ping {i} beside stalled clients"))?;
    }

    // The garbage connection is closed, with at most a TLS alert, not served.
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, garbage.read_to_end(&mut reply))
        .await
        .map_err(|_| anyhow!("the garbage connection was not closed within {WAIT:?}"))?
        .ok();
    ensure!(
        !reply.starts_with(b"HTTP/"),
        "garbage got an HTTP answer: {:?}",
        String::from_utf8_lossy(&reply)
    );

    // Shutdown does not wait on clients that never finished a handshake.
    tokio::time::timeout(WAIT, b.server.stop())
        .await
        .map_err(|_| anyhow!("shutdown waited on stalled HTTPS clients"))??;
    drop((silent, partial));
    Ok(())
}

#[tokio::test]
async fn no_https_listener_without_tls() -> Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(Options::for_tests(data.path())).await?;
    if let Some(address) = server.https_address() {
        bail!("HTTPS listener on {address} without TLS");
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn an_empty_https_address_serves_no_https() -> Result<()> {
    // nsqd serves HTTPS only with TLS and a non-empty --https-address; TLS over TCP stays.
    let ca = TestCa::new()?;
    let b = TlsBroker::start(&ca, |o| {
        o.tls.https_address = String::new();
        o.tls.tls_required = TlsRequired::Yes;
    })
    .await?;
    if let Some(address) = b.server.https_address() {
        bail!("HTTPS listener on {address} with an empty --https-address");
    }
    // With no HTTPS listener, plain HTTP is refused with port 0.
    let resp = b.http("GET", "/ping", b"").await?;
    ensure!(resp.status == 403, "status {}", resp.status);
    ensure!(
        resp.text() == r#"{"message": "TLS_REQUIRED", "https_port": 0}"#,
        "{:?}",
        resp.text()
    );
    b.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn bad_tls_files_fail_the_start() -> Result<()> {
    // The files are read when the options are validated, so start fails, not the broker task.
    let ca = TestCa::new()?;
    let data = tempfile::tempdir()?;
    let garbage = data.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM")?;
    let Err(error) = TlsBroker::start(&ca, |o| o.tls.tls_cert = Some(garbage.clone())).await else {
        bail!("the broker started with a --tls-cert that is no certificate");
    };
    let text = format!("{error:#}");
    ensure!(
        text.contains("--tls-cert") && text.contains("garbage.pem"),
        "error {text:?}"
    );
    Ok(())
}

#[tokio::test]
async fn https_bind_failure_names_its_flag() -> Result<()> {
    let ca = TestCa::new()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = taken.local_addr()?.to_string();
    let Err(error) = TlsBroker::start(&ca, |o| o.tls.https_address = address.clone()).await else {
        bail!("the broker started on a taken --https-address");
    };
    let text = format!("{error:#}");
    ensure!(
        text.contains("--https-address") && text.contains(&address),
        "error {text:?}"
    );
    Ok(())
}
