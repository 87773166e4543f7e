//! The client end of an NSQ connection's transport: plain TCP, upgraded in place to TLS and
//! then to snappy or deflate compression after IDENTIFY, in the order nsqd upgrades.
//!
//! ```text
//! caller ── compression (optional) ── TCP or TLS ── socket
//! ```
//!
//! Compression is flushed on every write: each `poll_write` becomes self-contained
//! compressed bytes, so a caller that never calls `flush` (as `write_all` alone) still gets
//! every command to the server. Reads decompress what the socket delivers.

use bytes::{Buf, BytesMut};
use proto::wire::compression::{Compressor, Decompressor};
use rustls::pki_types::ServerName;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How much a read takes from the socket, and the most a read decompresses in one step.
const READ_CHUNK: usize = 64 * 1024;
/// Compressed bytes a writer may leave unsent before its writes wait for the socket.
const WRITE_HIGH_WATER: usize = 256 * 1024;

/// A compression an NSQ connection can be upgraded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Snappy,
    /// Raw deflate at this level (1-9).
    Deflate(u32),
}

/// The layer under compression.
enum Base {
    Tcp(TcpStream),
    // Boxed: a TLS session is a few KiB, a plain connection should not carry that.
    Tls(Box<TlsStream<TcpStream>>),
    /// A TLS handshake took the socket and failed.
    Lost,
}

impl Base {
    fn lost() -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "the connection was lost in a TLS handshake",
        )
    }
}

impl AsyncRead for Base {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Base::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Base::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Base::Lost => Poll::Ready(Err(Base::lost())),
        }
    }
}

impl AsyncWrite for Base {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Base::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Base::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Base::Lost => Poll::Ready(Err(Base::lost())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Base::Tcp(s) => Pin::new(s).poll_flush(cx),
            Base::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Base::Lost => Poll::Ready(Err(Base::lost())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Base::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Base::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Base::Lost => Poll::Ready(Err(Base::lost())),
        }
    }
}

/// Compression state: both directions and their buffers, reused for the connection's life.
struct Codec {
    compressor: Compressor,
    decompressor: Decompressor,
    /// Compressed bytes not yet taken by the socket.
    wire_out: BytesMut,
    /// Decompressed bytes not yet taken by the reader.
    plain_in: BytesMut,
    /// Where socket reads land before they are fed to the decompressor.
    scratch: Box<[u8]>,
}

impl Codec {
    /// Writes out `wire_out`; Ready(Ok) once all of it is with the socket (and flushed).
    fn poll_drain(&mut self, base: &mut Base, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wire_out.is_empty() {
            let n = ready!(Pin::new(&mut *base).poll_write(cx, &self.wire_out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wire_out.advance(n);
        }
        Pin::new(base).poll_flush(cx)
    }
}

/// A client connection: TCP or TLS, optionally compressed. See the module docs.
pub struct ClientStream {
    base: Base,
    // Boxed: the plain path only pays for checking that it is absent.
    codec: Option<Box<Codec>>,
}

impl ClientStream {
    pub fn tcp(stream: TcpStream) -> ClientStream {
        ClientStream {
            base: Base::Tcp(stream),
            codec: None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.base, Base::Tls(_))
    }

    pub fn is_compressed(&self) -> bool {
        self.codec.is_some()
    }

    /// Runs the TLS handshake on the plain TCP connection. The server must not have sent
    /// anything the caller has not read: its first TLS bytes only follow our ClientHello.
    pub async fn start_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<()> {
        if self.codec.is_some() {
            return Err(io::Error::other("TLS must start before compression"));
        }
        let tcp = match std::mem::replace(&mut self.base, Base::Lost) {
            Base::Tcp(tcp) => tcp,
            other => {
                self.base = other;
                return Err(io::Error::other("the connection is not plain TCP"));
            }
        };
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        self.base = Base::Tls(Box::new(tls));
        Ok(())
    }

    /// Compresses everything written from now on and decompresses everything read.
    /// `already_read` is what the caller read from the socket past the last uncompressed
    /// frame: the start of the compressed stream, which the server may send at once.
    pub fn start_compression(
        &mut self,
        compression: Compression,
        already_read: &[u8],
    ) -> io::Result<()> {
        if self.codec.is_some() {
            return Err(io::Error::other("the connection is already compressed"));
        }
        let (compressor, mut decompressor) = match compression {
            Compression::Snappy => (Compressor::snappy(), Decompressor::snappy()),
            Compression::Deflate(level) => (Compressor::deflate(level), Decompressor::deflate()),
        };
        decompressor.feed(already_read);
        self.codec = Some(Box::new(Codec {
            compressor,
            decompressor,
            wire_out: BytesMut::with_capacity(READ_CHUNK),
            plain_in: BytesMut::with_capacity(READ_CHUNK),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        }));
        Ok(())
    }

    /// Writes `bytes` as they are under the compression layer (after anything already
    /// written through it), for tests that send a corrupt compressed stream.
    pub async fn write_below_compression(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(codec) = &mut self.codec {
            std::future::poll_fn(|cx| codec.poll_drain(&mut self.base, cx)).await?;
        }
        self.base.write_all(bytes).await?;
        self.base.flush().await
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(codec) = &mut this.codec else {
            return Pin::new(&mut this.base).poll_read(cx, buf);
        };
        // A caller that wrote and now waits for the answer must not wait on its own unsent
        // bytes.
        if !codec.wire_out.is_empty()
            && let Poll::Ready(Err(e)) = codec.poll_drain(&mut this.base, cx)
        {
            return Poll::Ready(Err(e));
        }
        loop {
            if !codec.plain_in.is_empty() {
                let n = codec.plain_in.len().min(buf.remaining());
                buf.put_slice(&codec.plain_in[..n]);
                codec.plain_in.advance(n);
                return Poll::Ready(Ok(()));
            }
            let n = codec
                .decompressor
                .decompress(&mut codec.plain_in, READ_CHUNK)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // Without output, pending input is a chunk header or stream identifier that
            // decompress has just consumed; go round once more before reading.
            if n > 0 || codec.decompressor.has_pending() {
                continue;
            }
            let mut raw = ReadBuf::new(&mut codec.scratch);
            ready!(Pin::new(&mut this.base).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                // End of stream; a compressed chunk cut short is the peer's problem to report.
                return Poll::Ready(Ok(()));
            }
            codec.decompressor.feed(raw.filled());
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(codec) = &mut this.codec else {
            return Pin::new(&mut this.base).poll_write(cx, buf);
        };
        // Back-pressure: a writer faster than the socket waits here rather than growing
        // the buffer without bound.
        if codec.wire_out.len() >= WRITE_HIGH_WATER {
            ready!(codec.poll_drain(&mut this.base, cx))?;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        codec.compressor.compress(buf, &mut codec.wire_out);
        // Send what the socket takes now; the rest goes with the next write, flush or read.
        if let Poll::Ready(Err(e)) = codec.poll_drain(&mut this.base, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.codec {
            Some(codec) => codec.poll_drain(&mut this.base, cx),
            None => Pin::new(&mut this.base).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(codec) = &mut this.codec {
            ready!(codec.poll_drain(&mut this.base, cx))?;
        }
        Pin::new(&mut this.base).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = match self.base {
            Base::Tcp(_) => "tcp",
            Base::Tls(_) => "tls",
            Base::Lost => "lost",
        };
        f.debug_struct("ClientStream")
            .field("base", &base)
            .field("compressed", &self.is_compressed())
            .finish()
    }
}
