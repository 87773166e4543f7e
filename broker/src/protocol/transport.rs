//! The layers IDENTIFY can put between frames and the socket: TLS, then snappy or deflate.
//!
//! Both are sans-IO here. [`Layers`] turns outgoing frames into socket bytes and lives in the
//! outbox, under its lock, because the rustls session is one object for both directions;
//! [`Inbound`] turns socket bytes into command bytes for the reader, asking the outbox's
//! session to decrypt. Plain connections have neither and keep the direct write path.

use bytes::{Buf, BufMut, BytesMut};
use proto::wire::compression::{CompressionError, Compressor, Decompressor};
use rustls::ServerConnection;
use std::io::{self, ErrorKind, Read, Write};

/// The blocks the decoder's buffer grows by once upgraded. A step of decompression fills at
/// most the room left in the block: a small compressed input can expand a thousandfold, so
/// it is taken in steps the decoder consumes between.
const DECOMPRESS_STEP: usize = 64 * 1024;

/// Less free space than this in the decoder's buffer gets a new [`DECOMPRESS_STEP`] block.
const MIN_SPARE: usize = 4 * 1024;

/// Makes room for `needed` more bytes in the decoder's buffer. Message bodies keep the blocks
/// they were read into alive, so new blocks are big (many small messages share one) and a
/// block is filled before the next is taken (one message must not pin a mostly empty one).
fn ensure_spare(commands: &mut BytesMut, needed: usize) {
    if commands.capacity() - commands.len() < needed {
        commands.reserve(needed.max(DECOMPRESS_STEP));
    }
}

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
        // The outbox bounds what waits for a slow client; rustls must take every frame.
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

    /// Decrypts `raw` (which it consumes) into `plain`; TLS records it must answer (the
    /// handshake, alerts) go to `wire`. `Ok(false)` once the client closed the session.
    pub(super) fn decrypt(&mut self, raw: &mut BytesMut, plain: &mut BytesMut) -> io::Result<bool> {
        let Some(tls) = &mut self.tls else {
            plain.extend_from_slice(raw);
            raw.clear();
            return Ok(true);
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
            if state.plaintext_bytes_to_read() > 0 {
                open &= read_plaintext(tls, plain)?;
            }
            if state.peer_has_closed() {
                open = false;
            }
        }
        pump_tls(tls, &mut self.wire)?;
        Ok(open)
    }

    pub(super) fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Queues TLS's close_notify, so the client reads a clean end of the session.
    pub(super) fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
            let _ = pump_tls(tls, &mut self.wire);
        }
    }
}

fn pump_tls(tls: &mut ServerConnection, wire: &mut BytesMut) -> io::Result<()> {
    let mut out = wire.writer();
    while tls.wants_write() {
        tls.write_tls(&mut out)?;
    }
    Ok(())
}

/// Moves the session's decrypted bytes into `plain`. False at the client's close_notify.
fn read_plaintext(tls: &mut ServerConnection, plain: &mut BytesMut) -> io::Result<bool> {
    const STEP: usize = 16 * 1024;
    loop {
        let start = plain.len();
        plain.resize(start + STEP, 0);
        let read = tls.reader().read(&mut plain[start..]);
        match read {
            Ok(0) => {
                plain.truncate(start);
                return Ok(false);
            }
            Ok(n) => plain.truncate(start + n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                plain.truncate(start);
                return Ok(true);
            }
            Err(e) => {
                plain.truncate(start);
                return Err(e);
            }
        }
    }
}

/// The read side: socket bytes in, command bytes out.
#[derive(Debug, Default)]
pub(super) struct Inbound {
    /// TLS is on: socket bytes go to the outbox's session first.
    pub(super) tls: bool,
    pub(super) decompressor: Option<Decompressor>,
    /// Socket bytes not yet decrypted.
    pub(super) raw: BytesMut,
    /// Decrypted bytes on their way to the decompressor.
    plain: BytesMut,
}

impl Inbound {
    /// Whether anything beyond plain TCP is in place.
    pub(super) fn is_layered(&self) -> bool {
        self.tls || self.decompressor.is_some()
    }

    /// Feeds bytes that arrived (decrypted if TLS is on) to the decompressor, or straight to
    /// the decoder's buffer.
    pub(super) fn take_plain(&mut self, plain: &[u8], commands: &mut BytesMut) {
        match &mut self.decompressor {
            Some(d) => d.feed(plain),
            None => {
                ensure_spare(commands, plain.len());
                commands.extend_from_slice(plain);
            }
        }
    }

    /// Decompresses the next step of what was fed into `commands`, filling the space it has
    /// left; 0 when the decompressor needs more input (or there is none).
    pub(super) fn decompress(
        &mut self,
        commands: &mut BytesMut,
    ) -> Result<usize, CompressionError> {
        match &mut self.decompressor {
            Some(d) if d.has_pending() => {
                ensure_spare(commands, MIN_SPARE);
                let room = commands.capacity() - commands.len();
                d.decompress(commands, room)
            }
            _ => Ok(0),
        }
    }

    /// A buffer for decrypted bytes, lent to the outbox while it decrypts.
    pub(super) fn plain_buffer(&mut self) -> BytesMut {
        std::mem::take(&mut self.plain)
    }

    pub(super) fn return_plain_buffer(&mut self, mut plain: BytesMut) {
        plain.clear();
        self.plain = plain;
    }
}
