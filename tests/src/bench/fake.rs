//! A tiny in-process NSQ server for the bench's own tests: acknowledges PUB and MPUB (but
//! fails MPUB to the topic `fail` once its subscribers finished what they were sent), and
//! after SUB sends a heartbeat and then `to_send` messages, never more than RDY in flight.
//! IDENTIFY agrees to TLS (when started with a server config) and to snappy or deflate
//! (unless started refusing compression), and upgrades as nsqd does.

use anyhow::{Result, bail};
use bytes::BytesMut;
use proto::wire::compression::{Compressor, Decompressor};
use proto::wire::frame::{write_error, write_message, write_response};
use proto::wire::{Command, Decoder, ErrorCode, Limits, MAGIC_V2, MessageId, ProtocolError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the fake server saw, across all connections.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) published: AtomicU64,
    pub(crate) pub_commands: AtomicU64,
    pub(crate) mpub_commands: AtomicU64,
    pub(crate) identifies: AtomicU64,
    pub(crate) fins: AtomicU64,
    pub(crate) nops: AtomicU64,
    /// Connections upgraded to TLS, snappy and deflate.
    pub(crate) tls: AtomicU64,
    pub(crate) snappy: AtomicU64,
    pub(crate) deflate: AtomicU64,
    /// Messages still to hand out to subscribers.
    pub(crate) to_send: AtomicU64,
    /// Messages handed out to subscribers.
    pub(crate) sent: AtomicU64,
}

/// What the fake agrees to in IDENTIFY.
#[derive(Clone, Default)]
pub(crate) struct Features {
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) refuse_compression: bool,
}

/// Starts the fake on 127.0.0.1:0; it serves until the test's runtime ends.
pub(crate) async fn start(to_send: u64) -> Result<(SocketAddr, Arc<Seen>)> {
    start_with(to_send, Features::default()).await
}

pub(crate) async fn start_with(
    to_send: u64,
    features: Features,
) -> Result<(SocketAddr, Arc<Seen>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Seen::default());
    seen.to_send.store(to_send, Ordering::Relaxed);
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = shared.clone();
            let features = features.clone();
            tokio::spawn(async move {
                // A connection ends when the client closes it; errors end it too.
                let _ = serve(stream, seen, features).await;
            });
        }
    });
    Ok((addr, seen))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The fake's end of a connection, with the compression it was upgraded to.
struct Wire {
    io: Box<dyn Io>,
    codec: Option<(Compressor, Decompressor)>,
    raw: Vec<u8>,
}

impl Wire {
    async fn write(&mut self, out: &[u8]) -> Result<()> {
        match &mut self.codec {
            Some((compressor, _)) => {
                let mut wire = BytesMut::new();
                compressor.compress(out, &mut wire);
                self.io.write_all(&wire).await?;
            }
            None => self.io.write_all(out).await?,
        }
        Ok(self.io.flush().await?)
    }

    /// Reads (and decompresses) into `rbuf`; false at the end of the stream.
    async fn read(&mut self, rbuf: &mut BytesMut) -> Result<bool> {
        let n = self.io.read(&mut self.raw).await?;
        if n == 0 {
            return Ok(false);
        }
        match &mut self.codec {
            Some((_, decompressor)) => {
                decompressor.feed(&self.raw[..n]);
                while decompressor.decompress(rbuf, 1 << 20)? > 0 || decompressor.has_pending() {}
            }
            None => rbuf.extend_from_slice(&self.raw[..n]),
        }
        Ok(true)
    }

    /// Answers IDENTIFY and upgrades as nsqd does: the response, then TLS and an `OK`
    /// through it, then compression and an `OK` through that.
    async fn identify(
        &mut self,
        body: &[u8],
        features: &Features,
        rbuf: &mut BytesMut,
        seen: &Seen,
    ) -> Result<()> {
        let asked: serde_json::Value = serde_json::from_slice(body)?;
        let wants = |key: &str| asked[key].as_bool() == Some(true);
        let tls = features.tls.clone().filter(|_| wants("tls_v1"));
        let compress = !features.refuse_compression;
        let snappy = compress && wants("snappy");
        let deflate = compress && wants("deflate") && !snappy;
        let level = asked["deflate_level"].as_u64().unwrap_or(6).clamp(1, 6);
        let response = serde_json::json!({
            "max_rdy_count": 2500,
            "version": "fake",
            "tls_v1": tls.is_some(),
            "snappy": snappy,
            "deflate": deflate,
            "deflate_level": level,
        });
        let mut out = BytesMut::new();
        write_response(&mut out, &serde_json::to_vec(&response)?);
        self.write(&out).await?;
        out.clear();
        write_response(&mut out, b"OK");
        if let Some(config) = tls {
            let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::duplex(1).0));
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            self.io = Box::new(acceptor.accept(plain).await?);
            seen.tls.fetch_add(1, Ordering::Relaxed);
            self.write(&out).await?;
        }
        if snappy || deflate {
            let (compressor, mut decompressor) = if snappy {
                seen.snappy.fetch_add(1, Ordering::Relaxed);
                (Compressor::snappy(), Decompressor::snappy())
            } else {
                seen.deflate.fetch_add(1, Ordering::Relaxed);
                (Compressor::deflate(level as u32), Decompressor::deflate())
            };
            decompressor.feed(&rbuf.split());
            self.codec = Some((compressor, decompressor));
            self.write(&out).await?;
        }
        Ok(())
    }
}

async fn serve(mut stream: TcpStream, seen: Arc<Seen>, features: Features) -> Result<()> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC_V2 {
        bail!("bad magic");
    }
    let mut decoder = Decoder::new(Limits::default());
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut subscribed = false;
    let mut rdy = 0u64;
    let mut in_flight = 0u64;
    let mut next_id = 0u64;
    let mut wire = Wire {
        io: Box::new(stream),
        codec: None,
        raw: vec![0; 64 * 1024],
    };
    loop {
        while let Some(cmd) = decoder.decode(&mut rbuf, |_| Ok(()))? {
            match cmd {
                Command::Identify(body) => {
                    seen.identifies.fetch_add(1, Ordering::Relaxed);
                    wire.identify(&body, &features, &mut rbuf, &seen).await?;
                }
                Command::Pub { .. } => {
                    seen.pub_commands.fetch_add(1, Ordering::Relaxed);
                    seen.published.fetch_add(1, Ordering::Relaxed);
                    write_response(&mut out, b"OK");
                }
                Command::Mpub { topic, .. } if topic.as_str() == "fail" => {
                    // Fails once the subscribers have finished every message there is for
                    // them (for 5 s at most), so a run it ends has received them all.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while (seen.to_send.load(Ordering::Relaxed) > 0
                        || seen.fins.load(Ordering::Relaxed) < seen.sent.load(Ordering::Relaxed))
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let err = ProtocolError::new(ErrorCode::MpubFailed, "MPUB failed: test");
                    write_error(&mut out, &err);
                }
                Command::Mpub { bodies, .. } => {
                    seen.mpub_commands.fetch_add(1, Ordering::Relaxed);
                    seen.published
                        .fetch_add(bodies.len() as u64, Ordering::Relaxed);
                    write_response(&mut out, b"OK");
                }
                Command::Sub { .. } => {
                    subscribed = true;
                    write_response(&mut out, b"OK");
                    write_response(&mut out, proto::wire::HEARTBEAT);
                }
                Command::Rdy(n) => rdy = n,
                Command::Fin(_) => {
                    seen.fins.fetch_add(1, Ordering::Relaxed);
                    in_flight = in_flight.saturating_sub(1);
                }
                Command::Nop => {
                    seen.nops.fetch_add(1, Ordering::Relaxed);
                }
                Command::Cls => write_response(&mut out, b"CLOSE_WAIT"),
                other => bail!("fake server does not handle {:?}", other.name()),
            }
        }
        if subscribed {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i64;
            while in_flight < rdy {
                let took = seen
                    .to_send
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                if took.is_err() {
                    break;
                }
                next_id += 1;
                seen.sent.fetch_add(1, Ordering::Relaxed);
                // Published a millisecond ago, so latency is measurable and positive.
                write_message(
                    &mut out,
                    now - 1_000_000,
                    1,
                    &MessageId::from_u64(next_id),
                    b"m",
                );
                in_flight += 1;
            }
        }
        if !out.is_empty() {
            wire.write(&out).await?;
            out.clear();
        }
        if !wire.read(&mut rbuf).await? {
            return Ok(());
        }
    }
}
