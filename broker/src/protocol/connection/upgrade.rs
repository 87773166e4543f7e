//! The upgrades IDENTIFY agrees on, and reading an upgraded connection: TLS first, then
//! snappy or deflate, as nsqd orders them.

use super::Connection;
use crate::protocol::client::TransportSummary;
use crate::protocol::identify::Negotiated;
use bytes::BytesMut;
use proto::wire::compression::{Compressor, Decompressor};
use std::io;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::timeout;

/// How long a client has to finish the TLS handshake after IDENTIFY (nsqd's deadline).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket reads of an upgraded connection.
const LAYERED_READ: usize = 16 * 1024;

impl Connection {
    /// The next step of an upgraded connection's input: decompressed bytes already received,
    /// or a socket read through TLS and decompression. False at the end of the stream.
    pub(super) async fn read_layered(&mut self, reader: &mut OwnedReadHalf) -> io::Result<bool> {
        let decompressed = self
            .inbound
            .decompress(&mut self.read_buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if decompressed > 0 {
            return Ok(true);
        }
        if self.peer_closed {
            return Ok(false);
        }
        self.inbound.raw.reserve(LAYERED_READ);
        let read = async {
            match self.heartbeat {
                Some(hb) => timeout(hb * 2, reader.read_buf(&mut self.inbound.raw)).await,
                None => Ok(reader.read_buf(&mut self.inbound.raw).await),
            }
        };
        let n = tokio::select! {
            _ = self.client.closed.cancelled() => return Ok(false),
            r = read => match r {
                Ok(r) => r?,
                Err(_) => {
                    tracing::info!(client = self.client.id, "no command within two heartbeats; closing");
                    return Ok(false);
                }
            },
        };
        if n == 0 {
            return Ok(false);
        }
        if self.inbound.tls {
            let mut plain = self.inbound.plain_buffer();
            let decrypted = self
                .client
                .outbox
                .decrypt(&mut self.inbound.raw, &mut plain);
            self.inbound.take_plain(&plain, &mut self.read_buf);
            self.inbound.return_plain_buffer(plain);
            self.peer_closed = !decrypted?;
        } else {
            let raw = std::mem::take(&mut self.inbound.raw);
            self.inbound.take_plain(&raw, &mut self.read_buf);
            self.inbound.raw = raw;
            self.inbound.raw.clear();
        }
        Ok(true)
    }

    /// Sets up what IDENTIFY agreed on, in nsqd's order, each confirmed by an `OK` sent
    /// through it: TLS, then snappy or deflate. False when the connection must close.
    pub(super) async fn upgrade(&mut self, reader: &mut OwnedReadHalf, agreed: Negotiated) -> bool {
        // Whatever the client sent after IDENTIFY already belongs to the upgraded stream.
        let mut after_identify = self.read_buf.split();
        let mut transport = TransportSummary::default();
        if agreed.tls {
            let Some(config) = self.broker.tls.clone() else {
                return false;
            };
            let session = match rustls::ServerConnection::new(config) {
                Ok(session) => session,
                Err(e) => {
                    tracing::warn!(client = self.client.id, error = %e, "cannot start TLS");
                    return false;
                }
            };
            self.client.outbox.start_tls(session);
            self.inbound.tls = true;
            self.inbound.raw.extend_from_slice(&after_identify);
            after_identify.clear();
            let handshake = timeout(
                TLS_HANDSHAKE_TIMEOUT,
                self.handshake(reader, &mut after_identify),
            );
            match handshake.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::info!(client = self.client.id, error = %e, "TLS handshake failed; closing");
                    return false;
                }
                Err(_) => {
                    tracing::info!(client = self.client.id, "TLS handshake timed out; closing");
                    return false;
                }
            }
            let summary = self.client.outbox.tls_summary().unwrap_or_default();
            self.common_name = summary.common_name.clone();
            tracing::debug!(client = self.client.id, version = summary.version, "TLS on");
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
            self.client.outbox.start_compression(compressor);
            self.inbound.decompressor = Some(decompressor);
            transport.snappy = agreed.snappy;
            transport.deflate = agreed.deflate;
            self.client.set_transport(transport);
            self.send_response(proto::wire::OK);
        }
        self.inbound.take_plain(&after_identify, &mut self.read_buf);
        true
    }

    /// Runs the server side of the TLS handshake; application bytes that follow it in the
    /// same records go to `early`.
    async fn handshake(
        &mut self,
        reader: &mut OwnedReadHalf,
        early: &mut BytesMut,
    ) -> io::Result<()> {
        let out = &self.client.outbox;
        loop {
            if !self.inbound.raw.is_empty() && !out.decrypt(&mut self.inbound.raw, early)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client ended the session during the handshake",
                ));
            }
            if !out.is_handshaking() {
                return Ok(());
            }
            self.inbound.raw.reserve(LAYERED_READ);
            let n = tokio::select! {
                _ = self.client.closed.cancelled() => return Err(io::ErrorKind::ConnectionAborted.into()),
                n = reader.read_buf(&mut self.inbound.raw) => n?,
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
