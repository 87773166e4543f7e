//! The upgrades IDENTIFY agrees on, and reading an upgraded connection: TLS first, then
//! snappy or deflate, as nsqd orders them.

use super::{Connection, Input, ReadNow};
use crate::protocol::client::TransportSummary;
use crate::protocol::identify::Negotiated;
use crate::protocol::transport::{Inbound, deliver};
use bytes::BytesMut;
use proto::wire::compression::{Compressor, Decompressor};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::timeout;

/// How long a client has to finish the TLS handshake after IDENTIFY (nsqd's deadline).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for a whole TLS record (16 KiB of data and its overhead) in a socket read.
const TLS_RECORD: usize = 17 * 1024;

impl<R: AsyncRead + ReadNow + Unpin + Send> Connection<R> {
    /// Passes what was read from an upgraded connection through its layers: decrypted into
    /// the decompressor or the decoder's buffer. False when the stream is bad.
    pub(super) fn take_layered_input(&mut self) -> bool {
        let Input {
            buf: commands,
            layers,
            peer_closed,
            ..
        } = &mut self.input;
        let Inbound {
            tls,
            decompressor,
            raw,
            ..
        } = layers;
        if !*tls {
            deliver(decompressor, commands, raw);
            raw.clear();
            return true;
        }
        let decrypted = self
            .client
            .outbox
            .decrypt(raw, &mut |plain| deliver(decompressor, commands, plain));
        match decrypted {
            Ok(open) => {
                // The client ended its session: what it sent is still processed.
                *peer_closed = !open;
                true
            }
            Err(e) => {
                tracing::info!(error = %e, "bad TLS stream from client; closing");
                false
            }
        }
    }

    /// Sets up what IDENTIFY agreed on, in nsqd's order, each confirmed by an `OK` sent
    /// through it: TLS, then snappy or deflate. False when the connection must close.
    pub(super) async fn upgrade(&mut self, agreed: Negotiated) -> bool {
        // Whatever the client sent after IDENTIFY already belongs to the upgraded stream.
        let mut after_identify = self.input.buf.split();
        let mut transport = TransportSummary::default();
        if agreed.tls {
            let Some(config) = self.shared.tls.clone() else {
                return false;
            };
            let session = match rustls::ServerConnection::new(config) {
                Ok(session) => session,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start TLS");
                    return false;
                }
            };
            self.client.outbox.start_tls(session);
            self.input.layers.tls = true;
            self.input.layers.raw.extend_from_slice(&after_identify);
            after_identify.clear();
            // TLS records carry up to 16 KiB: reads take a whole one at a time.
            self.input.read_size = self.input.read_size.max(TLS_RECORD);
            let handshake = timeout(TLS_HANDSHAKE_TIMEOUT, self.handshake(&mut after_identify));
            match handshake.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "TLS handshake failed; closing");
                    return false;
                }
                Err(_) => {
                    tracing::info!("TLS handshake timed out; closing");
                    return false;
                }
            }
            let summary = self.client.outbox.tls_summary().unwrap_or_default();
            self.input.common_name = summary.common_name.clone();
            tracing::debug!(version = summary.version, "TLS on");
            transport.tls = Some(summary);
            self.client.set_transport(transport.clone());
            self.send_response(proto::wire::OK);
        }
        if agreed.snappy || agreed.deflate {
            let (compressor, decompressor) = if agreed.snappy {
                (Compressor::snappy(), Decompressor::snappy())
            } else {
                (
                    Compressor::deflate(agreed.deflate_level),
                    Decompressor::deflate(),
                )
            };
            self.client
                .outbox
                .start_compression(compressor, agreed.deflate);
            self.input.layers.decompressor = Some(decompressor);
            transport.snappy = agreed.snappy;
            transport.deflate = agreed.deflate;
            self.client.set_transport(transport);
            self.send_response(proto::wire::OK);
        }
        let Input { buf, layers, .. } = &mut self.input;
        deliver(&mut layers.decompressor, buf, &after_identify);
        true
    }

    /// Runs the server side of the TLS handshake; application bytes that follow it in the
    /// same records go to `early`.
    async fn handshake(&mut self, early: &mut BytesMut) -> io::Result<()> {
        let out = &self.client.outbox;
        let Input { reader, layers, .. } = &mut self.input;
        loop {
            let raw = &mut layers.raw;
            if !raw.is_empty() && !out.decrypt(raw, &mut |plain| early.extend_from_slice(plain))? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client ended the session during the handshake",
                ));
            }
            if !out.is_handshaking() {
                return Ok(());
            }
            raw.reserve(TLS_RECORD);
            let n = tokio::select! {
                _ = self.client.closed.cancelled() => return Err(io::ErrorKind::ConnectionAborted.into()),
                n = reader.read_buf(&mut layers.raw) => n?,
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection during the handshake",
                ));
            }
        }
    }
}
