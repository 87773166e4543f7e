//! The round-trip floor: a do-nothing NSQ server. It answers the magic, IDENTIFY (agreeing to
//! no upgrade) and every PUB, MPUB, DPUB and SUB with `OK`, and keeps nothing, so a publisher
//! timed against it measures what this machine's loopback and the client cost on their own.
//!
//! Each connection gets a thread. After answering, a connection that is the only one asks the
//! socket for the next command without sleeping for a while ([`SPIN`], as long as the broker
//! does: on a virtual machine a halted CPU is slow to wake) and only then sleeps in a blocking
//! read, which the kernel wakes directly: the cheapest round trip a server can offer. With
//! more connections than one, spinning threads would take the CPUs their clients need (as the
//! broker, the floor spins only alone).

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use proto::wire::frame::{write_error, write_response};
use proto::wire::{Command, Decoder, ErrorCode, Limits, MAGIC_V2, ProtocolError};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How long a connection asks for its next command before it sleeps (the broker's budget).
const SPIN: Duration = Duration::from_micros(50);

/// Connections open now.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Serves on `address` until the process is killed; prints the address it listens on.
pub(crate) fn serve(address: &str) -> Result<()> {
    let listener = TcpListener::bind(address).with_context(|| format!("binding {address}"))?;
    println!("floor: listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        OPEN.fetch_add(1, Relaxed);
        std::thread::spawn(move || {
            // A connection ends when its client goes; nothing to report.
            let _ = connection(stream);
            OPEN.fetch_sub(1, Relaxed);
        });
    }
    Ok(())
}

fn connection(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic)?;
    stream.set_nonblocking(true)?;
    if &magic != MAGIC_V2 {
        bail!("bad magic");
    }
    let mut decoder = Decoder::new(Limits::default());
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(4096);
    let mut raw = vec![0u8; 64 * 1024];
    loop {
        while let Some(command) = decoder.decode(&mut input, |_| Ok(()))? {
            answer(command, &mut out);
        }
        if !out.is_empty() {
            write_all(&mut stream, &out)?;
            out.clear();
        }
        let n = read_soon(&mut stream, &mut raw)?;
        if n == 0 {
            return Ok(());
        }
        input.extend_from_slice(&raw[..n]);
    }
}

/// Reads from the non-blocking `stream`: at once if bytes come within [`SPIN`] (only while
/// this is the only connection), else sleeping until they do.
fn read_soon(stream: &mut TcpStream, raw: &mut [u8]) -> io::Result<usize> {
    let spin = if OPEN.load(Relaxed) == 1 {
        SPIN
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + spin;
    loop {
        match stream.read(raw) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            result => return result,
        }
        if Instant::now() >= deadline {
            return blocking(stream, |s| s.read(raw));
        }
        std::hint::spin_loop();
    }
}

/// Writes all of `bytes` to the non-blocking `stream`, sleeping while it is full.
fn write_all(stream: &mut TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return blocking(stream, |s| s.write_all(bytes));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs `io` on `stream` in blocking mode.
fn blocking<T>(
    stream: &mut TcpStream,
    io: impl FnOnce(&mut TcpStream) -> io::Result<T>,
) -> io::Result<T> {
    stream.set_nonblocking(false)?;
    let result = io(stream);
    stream.set_nonblocking(true)?;
    result
}

fn answer(command: Command, out: &mut BytesMut) {
    match command {
        Command::Identify(_) => write_response(
            out,
            br#"{"max_rdy_count":2500,"version":"floor","max_msg_timeout":900000,"msg_timeout":60000,"tls_v1":false,"deflate":false,"snappy":false,"sample_rate":0,"auth_required":false,"output_buffer_size":16384,"output_buffer_timeout":250}"#,
        ),
        Command::Pub { .. }
        | Command::Mpub { .. }
        | Command::Dpub { .. }
        | Command::Sub { .. } => write_response(out, proto::wire::OK),
        Command::Cls => write_response(out, proto::wire::CLOSE_WAIT),
        Command::Nop | Command::Rdy(_) | Command::Fin(_) | Command::Touch(_) => {}
        Command::Req { .. } | Command::Auth(_) => write_error(
            out,
            &ProtocolError::new(ErrorCode::Invalid, "the floor server keeps nothing"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_publishes_with_ok_and_keeps_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            connection(stream).unwrap();
        });
        let mut client = TcpStream::connect(addr).unwrap();
        let mut wire = BytesMut::new();
        wire.extend_from_slice(MAGIC_V2);
        let topic = proto::wire::Name::new("t").unwrap();
        Command::Identify(bytes::Bytes::from_static(b"{}")).encode(&mut wire);
        for _ in 0..3 {
            Command::Pub {
                topic: topic.clone(),
                body: bytes::Bytes::from_static(b"hello"),
            }
            .encode(&mut wire);
        }
        Command::Nop.encode(&mut wire);
        client.write_all(&wire).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        let mut frames = BytesMut::from(&got[..]);
        let mut responses = Vec::new();
        while let Some(frame) = proto::wire::Frame::decode(&mut frames, 1 << 20).unwrap() {
            match frame {
                proto::wire::Frame::Response(b) => responses.push(b),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(responses.len(), 4);
        assert!(responses[0].starts_with(b"{\"max_rdy_count\":2500"));
        assert!(responses[1..].iter().all(|b| &b[..] == b"OK"));
    }
}
