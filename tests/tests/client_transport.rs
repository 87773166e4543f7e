//! The client transport (`tests::transport` through `NsqConn::upgrade`) against a tiny server
//! written here, independently of the broker: it answers IDENTIFY, upgrades in nsqd's order
//! (TLS, then snappy or deflate) with the `proto` codec driven by hand, and echoes each PUB
//! body back as a response frame.

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use proto::wire::compression::{Compressor, Decompressor};
use proto::wire::frame::{write_error, write_response};
use proto::wire::{Command, Decoder, ErrorCode, Frame, Limits, MAGIC_V2, ProtocolError};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use tests::NsqConn;
use tests::certs::TestCa;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How the test server behaves.
#[derive(Clone)]
struct ServerOpts {
    tls: Option<TlsAcceptor>,
    /// Write every compressed response one byte at a time, so the client sees every split.
    dribble: bool,
}

struct TestServer {
    addr: SocketAddr,
    ca: TestCa,
}

impl TestServer {
    async fn start(tls: bool, dribble: bool) -> Result<TestServer> {
        let ca = TestCa::new()?;
        let acceptor = if tls {
            let (certs, key) = ca.server("server")?.load()?;
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
            Some(TlsAcceptor::from(Arc::new(config)))
        } else {
            None
        };
        let opts = ServerOpts {
            tls: acceptor,
            dribble,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let opts = opts.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, opts).await {
                        eprintln!("test server: {e:#}");
                    }
                });
            }
        });
        Ok(TestServer { addr, ca })
    }

    async fn connect(&self) -> Result<NsqConn> {
        NsqConn::connect(self.addr).await
    }

    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        self.ca.client_config(None)
    }
}

/// The server's half of one connection's compression.
struct ServerCodec {
    compressor: Compressor,
    decompressor: Decompressor,
}

async fn send(
    io: &mut Box<dyn Io>,
    codec: &mut Option<ServerCodec>,
    frames: &[u8],
    dribble: bool,
) -> Result<()> {
    let Some(codec) = codec else {
        io.write_all(frames).await?;
        return Ok(io.flush().await?);
    };
    let mut wire = BytesMut::new();
    codec.compressor.compress(frames, &mut wire);
    if dribble {
        for byte in wire.iter() {
            io.write_all(&[*byte]).await?;
            io.flush().await?;
            tokio::task::yield_now().await;
        }
    } else {
        io.write_all(&wire).await?;
    }
    Ok(io.flush().await?)
}

async fn serve(mut tcp: TcpStream, opts: ServerOpts) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut magic = [0u8; 4];
    tcp.read_exact(&mut magic).await?;
    if &magic != MAGIC_V2 {
        bail!("bad magic");
    }
    let mut decoder = Decoder::new(Limits::default());
    let mut rbuf = BytesMut::new();
    let identify = loop {
        if let Some(cmd) = decoder.decode(&mut rbuf, |_| Ok(()))? {
            break cmd;
        }
        if tcp.read_buf(&mut rbuf).await? == 0 {
            return Ok(());
        }
    };
    let Command::Identify(body) = identify else {
        bail!("expected IDENTIFY first");
    };
    let asked: Value = serde_json::from_slice(&body)?;
    let wants = |key: &str| asked[key].as_bool() == Some(true);
    let tls = wants("tls_v1") && opts.tls.is_some();
    let snappy = wants("snappy");
    let deflate = wants("deflate") && !snappy;
    let level = asked["deflate_level"].as_u64().unwrap_or(6).clamp(1, 6);
    let response = json!({
        "max_rdy_count": 2500,
        "tls_v1": tls,
        "snappy": snappy,
        "deflate": deflate,
        "deflate_level": level,
    });
    let mut frames = BytesMut::new();
    write_response(&mut frames, &serde_json::to_vec(&response)?);
    let mut codec = None;
    if tls {
        tcp.write_all(&frames).await?;
        frames.clear();
    }
    let mut io: Box<dyn Io> = match (&opts.tls, tls) {
        (Some(acceptor), true) => {
            let mut tls = acceptor.accept(tcp).await?;
            write_response(&mut frames, b"OK");
            tls.write_all(&frames).await?;
            tls.flush().await?;
            frames.clear();
            Box::new(tls)
        }
        _ => Box::new(tcp),
    };
    if snappy || deflate {
        // The plain response and the first compressed bytes leave in one write, as they may
        // from a real server: the client must hand what it over-read to its decompressor.
        let mut compressed = BytesMut::new();
        let mut compressor = if snappy {
            Compressor::snappy()
        } else {
            Compressor::deflate(level as u32)
        };
        let mut ok = BytesMut::new();
        write_response(&mut ok, b"OK");
        compressor.compress(&ok, &mut compressed);
        frames.extend_from_slice(&compressed);
        io.write_all(&frames).await?;
        io.flush().await?;
        let decompressor = if snappy {
            Decompressor::snappy()
        } else {
            Decompressor::deflate()
        };
        codec = Some(ServerCodec {
            compressor,
            decompressor,
        });
    } else if !frames.is_empty() {
        io.write_all(&frames).await?;
        io.flush().await?;
    }

    // Echo loop: rbuf holds plain commands; anything left over from before the upgrade was
    // sent compressed if compression is on.
    let mut raw = vec![0u8; 16 * 1024];
    if let Some(codec) = &mut codec {
        let leftover = rbuf.split();
        codec.decompressor.feed(&leftover);
    }
    loop {
        if let Some(c) = &mut codec {
            loop {
                match c.decompressor.decompress(&mut rbuf, 64 * 1024) {
                    Ok(n) if n > 0 || c.decompressor.has_pending() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        let mut out = BytesMut::new();
                        write_error(
                            &mut out,
                            &ProtocolError::new(ErrorCode::Invalid, e.to_string()),
                        );
                        send(&mut io, &mut codec, &out, false).await?;
                        io.shutdown().await?;
                        return Ok(());
                    }
                }
            }
        }
        let mut out = BytesMut::new();
        while let Some(cmd) = decoder.decode(&mut rbuf, |_| Ok(()))? {
            match cmd {
                Command::Pub { body, .. } => write_response(&mut out, &body),
                Command::Nop => {}
                other => bail!("test server does not handle {:?}", other.name()),
            }
        }
        if !out.is_empty() {
            send(&mut io, &mut codec, &out, opts.dribble).await?;
        }
        let n = io.read(&mut raw).await?;
        if n == 0 {
            return Ok(());
        }
        match &mut codec {
            Some(c) => c.decompressor.feed(&raw[..n]),
            None => rbuf.extend_from_slice(&raw[..n]),
        }
    }
}

fn publish(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    Command::Pub {
        topic: proto::wire::Name::new("t").expect("valid"),
        body: bytes::Bytes::copy_from_slice(body),
    }
    .encode(&mut out);
    out
}

/// Bodies of several shapes: tiny, compressible, incompressible, and larger than a snappy
/// chunk.
fn bodies() -> Vec<Vec<u8>> {
    let mut x: u32 = 12345;
    let noise: Vec<u8> = (0..100_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    vec![
        b"x".to_vec(),
        b"hello hello hello hello hello hello".repeat(20),
        noise,
        b"0123456789abcdef".repeat(20_000),
    ]
}

/// Publishes each body and expects it echoed, then pipelines them all at once.
async fn echo_round_trip(conn: &mut NsqConn) -> Result<()> {
    for body in bodies() {
        conn.send_raw(&publish(&body)).await?;
        match conn.next_frame().await? {
            Frame::Response(r) => assert_eq!(r.len(), body.len()),
            other => bail!("expected the echo, got {other:?}"),
        }
    }
    let mut all = BytesMut::new();
    for body in bodies() {
        all.extend_from_slice(&publish(&body));
    }
    conn.send_raw(&all).await?;
    for body in bodies() {
        match conn.next_frame().await? {
            Frame::Response(r) => assert_eq!(&r[..], &body[..]),
            other => bail!("expected the echo, got {other:?}"),
        }
    }
    Ok(())
}

fn identify(features: Value) -> Value {
    let mut json = json!({"feature_negotiation": true, "client_id": "transport-test"});
    for (k, v) in features.as_object().into_iter().flatten() {
        json[k] = v.clone();
    }
    json
}

#[tokio::test]
async fn plain_upgrade_is_just_identify() -> Result<()> {
    let server = TestServer::start(false, false).await?;
    let mut conn = server.connect().await?;
    let response = conn.upgrade(&identify(json!({})), None).await?;
    assert_eq!(response["tls_v1"], false);
    assert_eq!(response["max_rdy_count"], 2500);
    assert!(!conn.is_tls());
    echo_round_trip(&mut conn).await
}

#[tokio::test]
async fn tls_upgrade() -> Result<()> {
    let server = TestServer::start(true, false).await?;
    let mut conn = server.connect().await?;
    let response = conn
        .upgrade(
            &identify(json!({"tls_v1": true})),
            Some(server.client_config()?),
        )
        .await?;
    assert_eq!(response["tls_v1"], true);
    assert!(conn.is_tls());
    echo_round_trip(&mut conn).await
}

#[tokio::test]
async fn tls_without_a_client_config_is_an_error() -> Result<()> {
    let server = TestServer::start(true, false).await?;
    let mut conn = server.connect().await?;
    let err = conn
        .upgrade(&identify(json!({"tls_v1": true})), None)
        .await
        .expect_err("no config");
    assert!(err.to_string().contains("no client config"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn tls_with_an_untrusted_server_fails_the_handshake() -> Result<()> {
    let server = TestServer::start(true, false).await?;
    let other_ca = TestCa::new()?;
    let mut conn = server.connect().await?;
    let err = conn
        .upgrade(
            &identify(json!({"tls_v1": true})),
            Some(other_ca.client_config(None)?),
        )
        .await
        .expect_err("untrusted");
    assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn snappy_upgrade_carries_over_bytes_read_with_the_response() -> Result<()> {
    let server = TestServer::start(false, false).await?;
    let mut conn = server.connect().await?;
    let response = conn
        .upgrade(&identify(json!({"snappy": true})), None)
        .await?;
    assert_eq!(response["snappy"], true);
    echo_round_trip(&mut conn).await
}

#[tokio::test]
async fn deflate_upgrade_carries_over_bytes_read_with_the_response() -> Result<()> {
    let server = TestServer::start(false, false).await?;
    let mut conn = server.connect().await?;
    let response = conn
        .upgrade(
            &identify(json!({"deflate": true, "deflate_level": 9})),
            None,
        )
        .await?;
    assert_eq!(response["deflate"], true);
    assert_eq!(response["deflate_level"], 6);
    echo_round_trip(&mut conn).await
}

#[tokio::test]
async fn tls_then_snappy_and_tls_then_deflate() -> Result<()> {
    let server = TestServer::start(true, false).await?;
    for features in [
        json!({"tls_v1": true, "snappy": true}),
        json!({"tls_v1": true, "deflate": true}),
    ] {
        let mut conn = server.connect().await?;
        let response = conn
            .upgrade(&identify(features.clone()), Some(server.client_config()?))
            .await?;
        assert_eq!(response["tls_v1"], true, "{features}");
        assert!(conn.is_tls());
        echo_round_trip(&mut conn)
            .await
            .with_context(|| features.to_string())?;
    }
    Ok(())
}

#[tokio::test]
async fn compressed_responses_split_into_single_bytes() -> Result<()> {
    let server = TestServer::start(true, true).await?;
    for features in [
        json!({"snappy": true}),
        json!({"deflate": true}),
        json!({"tls_v1": true, "snappy": true}),
    ] {
        let mut conn = server.connect().await?;
        conn.upgrade(&identify(features.clone()), Some(server.client_config()?))
            .await?;
        for body in [&b"x"[..], &b"abc".repeat(3000)] {
            conn.send_raw(&publish(body)).await?;
            match conn.next_frame().await? {
                Frame::Response(r) => assert_eq!(&r[..], body, "{features}"),
                other => bail!("expected the echo, got {other:?}"),
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn bytes_below_compression_reach_the_server_raw() -> Result<()> {
    let server = TestServer::start(true, false).await?;
    let cases = [
        (
            json!({"snappy": true}),
            &b"\xff\x06\x00\x00sNaPpY\x03\x01\x00\x00\x00"[..],
            "snappy: ",
        ),
        (json!({"deflate": true}), &[0xff; 8][..], "deflate: "),
        (
            json!({"tls_v1": true, "snappy": true}),
            &b"\x00\x00\x00\x00"[..],
            "snappy: ",
        ),
    ];
    for (features, garbage, prefix) in cases {
        let mut conn = server.connect().await?;
        conn.upgrade(&identify(features.clone()), Some(server.client_config()?))
            .await?;
        // A good command first, to show the corruption comes after valid compressed data.
        conn.send_raw(&publish(b"fine")).await?;
        assert!(matches!(conn.next_frame().await?, Frame::Response(r) if &r[..] == b"fine"));
        conn.send_below_compression(garbage).await?;
        match conn.next_frame().await? {
            Frame::Error(e) => {
                let text = String::from_utf8_lossy(&e);
                assert!(
                    text.starts_with(&format!("E_INVALID {prefix}")),
                    "{features}: {text}"
                );
            }
            other => bail!("{features}: expected an error, got {other:?}"),
        }
        conn.expect_closed().await?;
    }
    Ok(())
}
