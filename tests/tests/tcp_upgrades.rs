//! TLS, snappy and deflate on NSQ TCP connections, as IDENTIFY negotiates them: the upgrade
//! order, what `/stats` reports, `--tls-required`, client certificates, and bad handshakes
//! and corrupt compressed streams that close one connection and no other.

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::{BufMut, BytesMut};
use proto::wire::Frame;
use proto::wire::compression::{CompressionError, Compressor, Decompressor};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tests::certs::{CertFiles, TestCa};
use tests::{NsqConn, TestBroker, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

struct TlsBroker {
    ca: TestCa,
    broker: TestBroker,
}

/// A broker with a certificate from a fresh test CA; `configure` may change more options.
async fn tls_broker(configure: impl FnOnce(&mut broker::Options, &TestCa)) -> Result<TlsBroker> {
    let ca = TestCa::new()?;
    let server = ca.server("broker")?;
    let broker = TestBroker::start(|o| {
        o.tls.tls_cert = Some(server.cert.clone());
        o.tls.tls_key = Some(server.key.clone());
        configure(o, &ca);
    })
    .await?;
    Ok(TlsBroker { ca, broker })
}

fn negotiation(extra: Value) -> Value {
    let mut json = json!({"feature_negotiation": true, "client_id": "upgrades"});
    if let (Some(into), Some(from)) = (json.as_object_mut(), extra.as_object()) {
        into.extend(from.clone());
    }
    json
}

/// The `/stats` entry of the one client subscribed to `topic`/`c`.
async fn subscriber_stats(broker: &TestBroker, topic: &str) -> Result<Value> {
    let stats = broker.stats().await?;
    let client = stats["topics"]
        .as_array()
        .and_then(|topics| topics.iter().find(|t| t["topic_name"] == topic))
        .and_then(|t| t["channels"][0]["clients"][0].as_object())
        .cloned();
    client
        .map(Value::Object)
        .ok_or_else(|| anyhow::anyhow!("no client on {topic}: {stats}"))
}

/// Subscribes, publishes two messages over the same connection, receives and finishes them.
async fn exercise(conn: &mut NsqConn, topic: &str) -> Result<()> {
    conn.subscribe(topic, "c").await?;
    let body = vec![b'x'; 40_000];
    conn.send_raw(format!("PUB {topic}\n").as_bytes()).await?;
    conn.send_raw(&(body.len() as u32).to_be_bytes()).await?;
    conn.send_raw(&body).await?;
    conn.expect_response(b"OK").await?;
    conn.send_raw(format!("PUB {topic}\n\0\0\0\x05hello").as_bytes())
        .await?;
    conn.expect_response(b"OK").await?;
    conn.send_raw(b"RDY 10\n").await?;
    let first = conn.expect_message().await?;
    ensure!(
        first.body.len() == body.len(),
        "first body has the wrong size"
    );
    let second = conn.expect_message().await?;
    ensure!(
        &second.body[..] == b"hello",
        "second body: {:?}",
        second.body
    );
    for m in [first, second] {
        conn.send_raw(format!("FIN {}\n", m.id).as_bytes()).await?;
    }
    conn.send_raw(b"NOP\n").await?;
    Ok(())
}

#[tokio::test]
async fn tls_upgrade_carries_commands_and_shows_in_stats() -> Result<()> {
    let b = tls_broker(|_, _| {}).await?;
    let mut c = b.broker.connect().await?;
    let resp = c
        .upgrade(
            &negotiation(json!({"tls_v1": true})),
            Some(b.ca.client_config(None)?),
        )
        .await?;
    ensure!(resp["tls_v1"] == true, "{resp}");
    ensure!(c.is_tls());
    exercise(&mut c, "tls").await?;
    let stats = subscriber_stats(&b.broker, "tls").await?;
    ensure!(stats["tls"] == true, "{stats}");
    ensure!(stats["tls_version"] == "TLS1.3", "{stats}");
    ensure!(
        stats["tls_cipher_suite"]
            .as_str()
            .is_some_and(|s| s.starts_with("TLS_")),
        "{stats}"
    );
    ensure!(
        stats["tls_negotiated_protocol_is_mutual"] == true,
        "{stats}"
    );
    ensure!(
        stats["snappy"] == false && stats["deflate"] == false,
        "{stats}"
    );
    Ok(())
}

#[tokio::test]
async fn tls_min_version_13_refuses_a_tls12_client() -> Result<()> {
    let b = tls_broker(|o, _| o.tls.tls_min_version = broker::config::TlsMinVersion::Tls13).await?;
    let tls12_only = {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_file_iter(b.ca.ca_file())? {
            roots.add(cert?)?;
        }
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth()
    };
    let mut c = b.broker.connect().await?;
    let upgraded = c
        .upgrade(
            &negotiation(json!({"tls_v1": true})),
            Some(std::sync::Arc::new(tls12_only)),
        )
        .await;
    ensure!(upgraded.is_err(), "a TLS 1.2 client was accepted");
    // TLS 1.3 clients are fine.
    let mut c = b.broker.connect().await?;
    c.upgrade(
        &negotiation(json!({"tls_v1": true})),
        Some(b.ca.client_config(None)?),
    )
    .await?;
    c.subscribe("t", "c").await
}

#[tokio::test]
async fn compression_upgrades_carry_commands_and_show_in_stats() -> Result<()> {
    let b = TestBroker::start(|o| o.tls.max_deflate_level = 4).await?;
    for (ask, topic, key) in [
        (json!({"snappy": true}), "snappy", "snappy"),
        (
            json!({"deflate": true, "deflate_level": 9}),
            "deflate",
            "deflate",
        ),
    ] {
        let mut c = b.connect().await?;
        let resp = c.upgrade(&negotiation(ask), None).await?;
        ensure!(resp[key] == true, "{resp}");
        if key == "deflate" {
            ensure!(resp["deflate_level"] == 4, "level not capped: {resp}");
            ensure!(resp["max_deflate_level"] == 4, "{resp}");
        }
        exercise(&mut c, topic).await?;
        let stats = subscriber_stats(&b, topic).await?;
        ensure!(stats[key] == true, "{stats}");
        ensure!(stats["tls"] == false, "{stats}");
    }
    Ok(())
}

#[tokio::test]
async fn tls_then_compression() -> Result<()> {
    let b = tls_broker(|_, _| {}).await?;
    for (ask, topic, key) in [
        (
            json!({"tls_v1": true, "snappy": true}),
            "tls_snappy",
            "snappy",
        ),
        (
            json!({"tls_v1": true, "deflate": true}),
            "tls_deflate",
            "deflate",
        ),
    ] {
        let mut c = b.broker.connect().await?;
        let resp = c
            .upgrade(&negotiation(ask), Some(b.ca.client_config(None)?))
            .await?;
        ensure!(resp["tls_v1"] == true && resp[key] == true, "{resp}");
        exercise(&mut c, topic).await?;
        let stats = subscriber_stats(&b.broker, topic).await?;
        ensure!(stats["tls"] == true && stats[key] == true, "{stats}");
    }
    Ok(())
}

#[tokio::test]
async fn without_feature_negotiation_nothing_is_upgraded() -> Result<()> {
    let b = tls_broker(|_, _| {}).await?;
    let mut c = b.broker.connect().await?;
    let frame = c.identify(&json!({"tls_v1": true, "snappy": true})).await?;
    ensure!(
        frame == proto::wire::Frame::Response(b"OK".to_vec().into()),
        "{frame:?}"
    );
    c.subscribe("plain", "c").await?;
    let stats = subscriber_stats(&b.broker, "plain").await?;
    ensure!(stats["tls"] == false && stats["snappy"] == false, "{stats}");
    Ok(())
}

#[tokio::test]
async fn tls_required_allows_only_identify_before_tls() -> Result<()> {
    let b = tls_broker(|o, _| o.tls.tls_required = broker::config::TlsRequired::Yes).await?;
    let mut c = b.broker.connect().await?;
    c.send_raw(b"PUB t\n\0\0\0\x01x").await?;
    c.expect_error("E_INVALID cannot PUB in current state (TLS required)")
        .await?;
    c.expect_closed().await?;
    // IDENTIFY without TLS is answered, the next command is refused.
    let mut c = b.broker.connect().await?;
    c.upgrade(&negotiation(json!({})), None).await?;
    c.send_raw(b"NOP\n").await?;
    c.expect_error("E_INVALID cannot NOP in current state (TLS required)")
        .await?;
    // With TLS everything works; tcp-https applies to TCP too.
    for required in [
        broker::config::TlsRequired::Yes,
        broker::config::TlsRequired::TcpOnly,
    ] {
        let b = tls_broker(|o, _| o.tls.tls_required = required).await?;
        let mut c = b.broker.connect().await?;
        c.upgrade(
            &negotiation(json!({"tls_v1": true})),
            Some(b.ca.client_config(None)?),
        )
        .await?;
        exercise(&mut c, "required").await?;
    }
    Ok(())
}

fn client_auth(
    policy: broker::config::ClientAuthPolicy,
) -> impl FnOnce(&mut broker::Options, &TestCa) {
    move |o, ca| {
        o.tls.tls_client_auth_policy = Some(policy);
        o.tls.tls_root_ca_file = Some(ca.ca_file().to_path_buf());
        // TCP only: the test reads /stats over plain HTTP.
        o.tls.tls_required = broker::config::TlsRequired::TcpOnly;
    }
}

/// Whether the broker refuses a TLS client showing `identity` (or no certificate): the
/// handshake, or the first command after it, fails.
async fn is_refused(b: &TlsBroker, identity: Option<&CertFiles>) -> Result<bool> {
    let mut c = b.broker.connect().await?;
    let config = b.ca.client_config(identity)?;
    let outcome = async {
        c.upgrade(&negotiation(json!({"tls_v1": true})), Some(config))
            .await?;
        c.send_raw(b"NOP\n").await?;
        c.next_frame().await
    };
    Ok(outcome.await.is_err())
}

#[tokio::test]
async fn require_verify_needs_a_certificate_from_the_root_ca() -> Result<()> {
    use broker::config::ClientAuthPolicy::RequireVerify;
    let b = tls_broker(client_auth(RequireVerify)).await?;
    let ask = negotiation(json!({"tls_v1": true}));
    // No certificate: the handshake fails.
    ensure!(
        is_refused(&b, None).await?,
        "a client without a certificate got in"
    );
    // A certificate from another CA: refused too.
    let other = TestCa::new()?;
    let stranger = other.client("stranger", "stranger")?;
    ensure!(
        is_refused(&b, Some(&stranger)).await?,
        "a certificate from another CA got in"
    );
    // A certificate from the root CA.
    let mut c = b.broker.connect().await?;
    let id: CertFiles = b.ca.client("client", "knsq-client")?;
    c.upgrade(&ask, Some(b.ca.client_config(Some(&id))?))
        .await?;
    exercise(&mut c, "verified").await?;
    let stats = subscriber_stats(&b.broker, "verified").await?;
    ensure!(stats["tls"] == true, "{stats}");
    Ok(())
}

#[tokio::test]
async fn require_takes_any_certificate_but_needs_one() -> Result<()> {
    use broker::config::ClientAuthPolicy::Require;
    let b = tls_broker(client_auth(Require)).await?;
    let ask = negotiation(json!({"tls_v1": true}));
    let other = TestCa::new()?;
    let stranger = other.client("stranger", "stranger")?;
    let mut c = b.broker.connect().await?;
    c.upgrade(&ask, Some(b.ca.client_config(Some(&stranger))?))
        .await?;
    exercise(&mut c, "any").await?;
    ensure!(
        is_refused(&b, None).await?,
        "a client without a certificate got in"
    );
    Ok(())
}

/// A connection that has sent IDENTIFY asking for TLS and read the response; the handshake
/// is up to the test.
async fn identified_for_tls(b: &TlsBroker) -> Result<NsqConn> {
    let mut c = b.broker.connect().await?;
    let frame = c.identify(&negotiation(json!({"tls_v1": true}))).await?;
    ensure!(
        matches!(&frame, proto::wire::Frame::Response(body) if body.starts_with(b"{")),
        "{frame:?}"
    );
    Ok(c)
}

/// Another client is served normally.
async fn others_are_served(b: &TlsBroker, topic: &str) -> Result<()> {
    let mut c = b.broker.connect().await?;
    c.upgrade(
        &negotiation(json!({"tls_v1": true})),
        Some(b.ca.client_config(None)?),
    )
    .await?;
    exercise(&mut c, topic).await
}

/// The V2 magic and an IDENTIFY with `json`, as bytes.
fn magic_and_identify(json: &Value) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(json)?;
    let mut out = proto::wire::MAGIC_V2.to_vec();
    out.put_slice(b"IDENTIFY\n");
    out.put_u32(u32::try_from(body.len())?);
    out.put_slice(&body);
    Ok(out)
}

/// The next frame from a raw socket, decoded from `buf` and what the socket delivers.
async fn read_plain_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Frame> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(frame) = Frame::decode(buf, 1024 * 1024)? {
                return Ok(frame);
            }
            if stream.read_buf(buf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no frame within {WAIT:?}"))?
}

/// A raw TCP connection that has sent the magic and IDENTIFY asking for TLS, and read the
/// JSON response: nothing more is in flight either way.
async fn raw_identified_for_tls(addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(&magic_and_identify(&negotiation(json!({"tls_v1": true})))?)
        .await?;
    let mut buf = BytesMut::new();
    let frame = read_plain_frame(&mut stream, &mut buf).await?;
    ensure!(
        matches!(&frame, Frame::Response(body) if body.starts_with(b"{")),
        "{frame:?}"
    );
    ensure!(buf.is_empty(), "{} bytes after the response", buf.len());
    Ok(stream)
}

/// How the broker ended a raw connection.
#[derive(Debug, PartialEq)]
enum Closed {
    /// An orderly close: the read returned 0.
    Eof,
    /// Closed with bytes of ours unread, which the kernel answers with a reset.
    Reset,
}

/// Reads (and drops) whatever the broker sends until it closes the connection. Fails when the
/// connection is still open after `limit` or a read fails in any other way.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Result<Closed> {
    let mut scratch = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut scratch).await {
                Ok(0) => return Ok(Closed::Eof),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(Closed::Reset);
                }
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("the connection stayed open for {limit:?}"))?
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_closes_only_that_connection() -> Result<()> {
    let b = tls_broker(|_, _| {}).await?;
    let mut bad = raw_identified_for_tls(b.broker.tcp_address()).await?;
    // A client that stays silent in its handshake meanwhile blocks nobody.
    let _silent = identified_for_tls(&b).await?;
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    // rustls may answer with an alert record; then the connection ends, well before the
    // 5 s handshake deadline.
    let started = Instant::now();
    read_until_closed(&mut bad, Duration::from_secs(3)).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "closed only after {:?}",
        started.elapsed()
    );
    others_are_served(&b, "after_garbage").await
}

#[tokio::test]
async fn a_handshake_never_finished_times_out() -> Result<()> {
    let b = tls_broker(|_, _| {}).await?;
    let mut silent = raw_identified_for_tls(b.broker.tcp_address()).await?;
    // The broker's 5 s handshake deadline runs from the IDENTIFY response, read just now.
    let started = Instant::now();
    others_are_served(&b, "while_silent").await?;
    let closed = read_until_closed(&mut silent, Duration::from_secs(8))
        .await
        .context("a silent client kept its connection")?;
    // The client sent nothing after IDENTIFY, so the close is orderly.
    ensure!(closed == Closed::Eof, "{closed:?}");
    ensure!(
        started.elapsed() >= Duration::from_secs(4),
        "closed before the handshake deadline: {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A valid compressed `NOP\n` followed by `corruption`, checked to fail with `is_expected`
/// locally, so the broker is known to be fed exactly that corruption.
fn check_corruption(
    mut compressor: Compressor,
    mut decompressor: Decompressor,
    corruption: &[u8],
    is_expected: impl Fn(&CompressionError) -> bool,
) -> Result<()> {
    let mut wire = BytesMut::new();
    compressor.compress(b"NOP\n", &mut wire);
    decompressor.feed(&wire);
    decompressor.feed(corruption);
    let mut plain = BytesMut::new();
    loop {
        match decompressor.decompress(&mut plain, 1024) {
            Ok(0) => bail!("the corruption decoded; got {plain:?}"),
            Ok(_) => continue,
            Err(e) if is_expected(&e) => break,
            Err(e) => bail!("unexpected error {e}"),
        }
    }
    ensure!(&plain[..] == b"NOP\n", "{plain:?}");
    Ok(())
}

#[tokio::test]
async fn a_corrupt_compressed_stream_closes_only_that_connection() -> Result<()> {
    // Snappy: a well-formed compressed chunk of `NOP\n` whose checksum is wrong.
    let mut chunk = BytesMut::new();
    Compressor::snappy().compress(b"NOP\n", &mut chunk);
    let mut bad_crc = chunk.split_off(proto::wire::compression::SNAPPY_STREAM_IDENTIFIER.len());
    bad_crc[4] ^= 0xff;
    check_corruption(
        Compressor::snappy(),
        Decompressor::snappy(),
        &bad_crc,
        |e| matches!(e, CompressionError::SnappyChecksum),
    )?;
    // Deflate: after a sync flush the stream is at a block boundary, and 0b110 starts a
    // block of the reserved type 3.
    let bad_block = b"\x06\x00\x00\x00";
    check_corruption(
        Compressor::deflate(6),
        Decompressor::deflate(),
        bad_block,
        |e| matches!(e, CompressionError::Deflate(_)),
    )?;

    let b = TestBroker::start(|_| {}).await?;
    for (ask, corruption) in [
        (json!({"snappy": true}), &bad_crc[..]),
        (json!({"deflate": true}), &bad_block[..]),
    ] {
        let mut bad = b.connect().await?;
        bad.upgrade(&negotiation(ask.clone()), None).await?;
        let mut good = b.connect().await?;
        good.upgrade(&negotiation(ask.clone()), None).await?;
        // A valid start: the snappy stream identifier / deflate data, with a command that
        // has no answer.
        bad.send_raw(b"NOP\n").await?;
        bad.send_below_compression(corruption).await?;
        bad.expect_closed()
            .await
            .with_context(|| format!("{ask}"))?;
        exercise(&mut good, "after_corruption").await?;
    }
    Ok(())
}

/// Compressed bytes sent in the same write as the IDENTIFY that negotiates the compression
/// are read as compressed: the broker keeps what it read past IDENTIFY for the decompressor.
#[tokio::test]
async fn commands_pipelined_after_identify_are_decompressed() -> Result<()> {
    let b = TestBroker::start(|_| {}).await?;
    for (key, ask, mut compressor, mut decompressor) in [
        (
            "snappy",
            json!({"snappy": true}),
            Compressor::snappy(),
            Decompressor::snappy(),
        ),
        (
            "deflate",
            json!({"deflate": true, "deflate_level": 6}),
            Compressor::deflate(6),
            Decompressor::deflate(),
        ),
    ] {
        let mut stream = TcpStream::connect(b.tcp_address()).await?;
        stream.set_nodelay(true)?;
        let mut out = BytesMut::from(&magic_and_identify(&negotiation(ask.clone()))?[..]);
        let topic = format!("pipelined_{key}");
        compressor.compress(format!("SUB {topic} c\n").as_bytes(), &mut out);
        stream.write_all(&out).await?;

        let mut buf = BytesMut::new();
        let frame = read_plain_frame(&mut stream, &mut buf).await?;
        let Frame::Response(body) = frame else {
            bail!("{ask}: IDENTIFY answered {frame:?}");
        };
        let resp: Value = serde_json::from_slice(&body)?;
        ensure!(resp[key] == true, "{resp}");

        // Everything after the JSON response is compressed.
        decompressor.feed(&buf);
        let mut plain = BytesMut::new();
        let mut frames = Vec::new();
        let mut scratch = [0u8; 4096];
        tokio::time::timeout(WAIT, async {
            while frames.len() < 2 {
                if let Some(frame) = Frame::decode(&mut plain, 1024 * 1024)? {
                    frames.push(frame);
                    continue;
                }
                if decompressor.decompress(&mut plain, 64 * 1024)? > 0 || decompressor.has_pending()
                {
                    continue;
                }
                let n = stream.read(&mut scratch).await?;
                ensure!(n > 0, "connection closed after {frames:?}");
                decompressor.feed(&scratch[..n]);
            }
            Ok(())
        })
        .await
        .map_err(|_| anyhow!("{ask}: no two frames within {WAIT:?}"))??;
        let ok = Frame::Response(proto::wire::OK.to_vec().into());
        ensure!(frames == [ok.clone(), ok], "{ask}: {frames:?}");
        let stats = subscriber_stats(&b, &topic).await?;
        ensure!(stats[key] == true, "{stats}");
    }
    Ok(())
}

#[tokio::test]
async fn compression_can_be_turned_off() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.tls.snappy = false;
        o.tls.deflate = false;
    })
    .await?;
    let mut c = b.connect().await?;
    let resp = c
        .upgrade(&negotiation(json!({"snappy": true})), None)
        .await?;
    ensure!(
        resp["snappy"] == false && resp["deflate"] == false,
        "{resp}"
    );
    exercise(&mut c, "uncompressed").await?;
    let stats = subscriber_stats(&b, "uncompressed").await?;
    ensure!(stats["snappy"] == false, "{stats}");
    Ok(())
}
