//! A tiny in-process NSQ server for the bench's own tests: acknowledges PUB and MPUB (but
//! fails MPUB to the topic `fail`), and
//! after SUB sends a heartbeat and then `to_send` messages, never more than RDY in flight.

use anyhow::{Result, bail};
use bytes::BytesMut;
use proto::wire::frame::{write_error, write_message, write_response};
use proto::wire::{Command, Decoder, ErrorCode, Limits, MAGIC_V2, MessageId, ProtocolError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    /// Messages still to hand out to subscribers.
    pub(crate) to_send: AtomicU64,
}

/// Starts the fake on 127.0.0.1:0; it serves until the test's runtime ends.
pub(crate) async fn start(to_send: u64) -> Result<(SocketAddr, Arc<Seen>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Seen::default());
    seen.to_send.store(to_send, Ordering::Relaxed);
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = shared.clone();
            tokio::spawn(async move {
                // A connection ends when the client closes it; errors end it too.
                let _ = serve(stream, seen).await;
            });
        }
    });
    Ok((addr, seen))
}

async fn serve(mut stream: TcpStream, seen: Arc<Seen>) -> Result<()> {
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
    loop {
        while let Some(cmd) = decoder.decode(&mut rbuf, |_| Ok(()))? {
            match cmd {
                Command::Identify(_) => {
                    seen.identifies.fetch_add(1, Ordering::Relaxed);
                    write_response(&mut out, br#"{"max_rdy_count":2500,"version":"fake"}"#);
                }
                Command::Pub { .. } => {
                    seen.pub_commands.fetch_add(1, Ordering::Relaxed);
                    seen.published.fetch_add(1, Ordering::Relaxed);
                    write_response(&mut out, b"OK");
                }
                Command::Mpub { topic, .. } if topic.as_str() == "fail" => {
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
            stream.write_all(&out).await?;
            out.clear();
        }
        if stream.read_buf(&mut rbuf).await? == 0 {
            return Ok(());
        }
    }
}
