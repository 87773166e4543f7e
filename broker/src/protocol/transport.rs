//! The layers IDENTIFY can put between frames and the socket: TLS, then snappy or deflate.
//!
//! Both are sans-IO here. [`Layers`] turns outgoing frames into socket bytes and lives in the
//! outbox, under its lock, because the rustls session is one object for both directions;
//! [`Inbound`] turns socket bytes into command bytes for the reader, asking the outbox's
//! session to decrypt. Plain connections have neither and keep the direct write path.

use bytes::{Buf, BufMut, BytesMut};
use proto::wire::compression::{CompressionError, Compressor, Decompressor};
use rustls::ServerConnection;
use std::io::{self, BufRead, ErrorKind, Write};

/// The largest block the decoder's buffer grows by for decompressed input. A step of
/// decompression fills at most the room left in the block: a small compressed input can
/// expand a thousandfold, so it is taken in steps the decoder consumes between.
const DECOMPRESS_STEP: usize = 64 * 1024;

/// Less free space than this in the decoder's buffer gets a new block. Message bodies keep
/// the blocks they were decompressed into alive, so a block is filled before the next is
/// taken: one small message must not pin a mostly empty block.
const MIN_SPARE: usize = 4 * 1024;

/// Outgoing layers of an upgraded connection.
#[derive(Debug, Default)]
pub(super) struct Layers {
    tls: Option<Box<ServerConnection>>,
    compressor: Option<Compressor>,
    /// Compressed bytes on their way into TLS.
    staged: BytesMut,
    /// Bytes ready for the socket.
    pub(super) wire: BytesMut,
}

impl Layers {
    /// Layers that first send `queued`, bytes already in their final form.
    pub(super) fn with_queued(queued: BytesMut) -> Layers {
        Layers {
            wire: queued,
            ..Layers::default()
        }
    }

    pub(super) fn start_tls(&mut self, mut conn: ServerConnection) {
        // Frames are encrypted as they are queued and `wire` holds what the socket has not
        // taken, so rustls must accept every frame (it holds them only during the handshake).
        conn.set_buffer_limit(None);
        self.tls = Some(Box::new(conn));
    }

    pub(super) fn start_compression(&mut self, compressor: Compressor) {
        self.compressor = Some(compressor);
    }

    pub(super) fn tls(&self) -> Option<&ServerConnection> {
        self.tls.as_deref()
    }

    /// Turns frames into socket bytes, appended to `wire`.
    pub(super) fn encode(&mut self, frames: &[u8]) -> io::Result<()> {
        let Some(tls) = &mut self.tls else {
            match &mut self.compressor {
                Some(c) => c.compress(frames, &mut self.wire),
                None => self.wire.extend_from_slice(frames),
            }
            return Ok(());
        };
        let plain = match &mut self.compressor {
            Some(c) => {
                c.compress(frames, &mut self.staged);
                &self.staged[..]
            }
            None => frames,
        };
        tls.writer().write_all(plain)?;
        self.staged.clear();
        pump_tls(tls, &mut self.wire)
    }

    /// Decrypts `raw` (which it consumes), handing the plaintext to `deliver`; TLS records it
    /// must answer (the handshake, alerts) go to `wire`. `Ok(false)` once the client closed
    /// the session. Only called once TLS is on.
    pub(super) fn decrypt(
        &mut self,
        raw: &mut BytesMut,
        deliver: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        let Some(tls) = &mut self.tls else {
            return Err(io::Error::other("no TLS session"));
        };
        let mut open = true;
        while !raw.is_empty() {
            let n = tls.read_tls(&mut &raw[..])?;
            if n == 0 {
                break;
            }
            raw.advance(n);
            let processed = tls.process_new_packets();
            // Send the alert telling the client why, then give up.
            let _ = pump_tls(tls, &mut self.wire);
            let state = processed.map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                open &= read_plaintext(tls, deliver)?;
            }
        }
        pump_tls(tls, &mut self.wire)?;
        Ok(open)
    }

    /// Encodes the frames still queued, then ends a TLS session with its close_notify, so the
    /// client reads them and then a clean end of the session.
    pub(super) fn close(&mut self, queued: &[u8]) -> io::Result<()> {
        if !queued.is_empty() {
            self.encode(queued)?;
        }
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
            pump_tls(tls, &mut self.wire)?;
        }
        Ok(())
    }

    pub(super) fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }
}

fn pump_tls(tls: &mut ServerConnection, wire: &mut BytesMut) -> io::Result<()> {
    let mut out = wire.writer();
    while tls.wants_write() {
        tls.write_tls(&mut out)?;
    }
    Ok(())
}

/// Hands the session's decrypted bytes to `deliver` without copying them first. False at
/// the client's close_notify.
fn read_plaintext(tls: &mut ServerConnection, deliver: &mut dyn FnMut(&[u8])) -> io::Result<bool> {
    loop {
        let mut reader = tls.reader();
        match reader.fill_buf() {
            Ok([]) => return Ok(false),
            Ok(chunk) => {
                let n = chunk.len();
                deliver(chunk);
                reader.consume(n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// The read side: socket bytes in, command bytes out.
#[derive(Debug)]
pub(super) struct Inbound {
    /// TLS is on: socket bytes go to the outbox's session first.
    pub(super) tls: bool,
    pub(super) decompressor: Option<Decompressor>,
    /// Socket bytes not yet decrypted or decompressed.
    pub(super) raw: BytesMut,
    /// The block the decoder's buffer grows by for decompressed input: small while the
    /// client is quiet, doubling up to [`DECOMPRESS_STEP`] while steps fill it.
    block: usize,
}

impl Default for Inbound {
    fn default() -> Inbound {
        Inbound {
            tls: false,
            decompressor: None,
            raw: BytesMut::new(),
            block: MIN_SPARE,
        }
    }
}

impl Inbound {
    /// Whether anything beyond plain TCP is in place.
    pub(super) fn is_layered(&self) -> bool {
        self.tls || self.decompressor.is_some()
    }

    /// Decompresses the next step of what was fed into `commands`, filling the room left in
    /// its block; 0 when the decompressor needs more input (or there is none).
    pub(super) fn decompress(
        &mut self,
        commands: &mut BytesMut,
    ) -> Result<usize, CompressionError> {
        let Some(d) = &mut self.decompressor else {
            return Ok(0);
        };
        if !d.has_pending() {
            return Ok(0);
        }
        if commands.capacity() - commands.len() < MIN_SPARE {
            commands.reserve(self.block);
        }
        let room = commands.capacity() - commands.len();
        let n = d.decompress(commands, room)?;
        if n >= room && self.block < DECOMPRESS_STEP {
            self.block *= 2;
        }
        Ok(n)
    }
}

/// Bytes that arrived (decrypted if TLS is on) go to the decompressor, or straight to the
/// decoder's buffer.
pub(super) fn deliver(
    decompressor: &mut Option<Decompressor>,
    commands: &mut BytesMut,
    plain: &[u8],
) {
    match decompressor {
        Some(d) => d.feed(plain),
        None => commands.extend_from_slice(plain),
    }
}
