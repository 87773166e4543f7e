//! One client connection: magic, IDENTIFY, and reading frames with `proto::wire`.

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use proto::wire::{Command, Frame, MAGIC_V2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest frame accepted from the broker; far above any message the bench sends.
pub(crate) const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Read buffer size: enough for hundreds of 200-byte message frames per read.
const READ_BUF: usize = 256 * 1024;

/// A connection with its own read buffer (so reads are cancel-safe) and write buffer.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
}

/// What the broker told us in its IDENTIFY response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub(crate) max_rdy_count: Option<u64>,
}

/// IDENTIFY options a connection asks for.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IdentifyOpts {
    pub(crate) output_buffer_size: Option<i64>,
    pub(crate) output_buffer_timeout: Option<i64>,
}

impl IdentifyOpts {
    pub(crate) fn json(&self) -> String {
        let mut json = format!(
            concat!(
                "{{\"feature_negotiation\":true,\"client_id\":\"knsq-bench\",",
                "\"hostname\":\"knsq-bench\",\"user_agent\":\"knsq-bench/{}\""
            ),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(v) = self.output_buffer_size {
            json.push_str(&format!(",\"output_buffer_size\":{v}"));
        }
        if let Some(v) = self.output_buffer_timeout {
            json.push_str(&format!(",\"output_buffer_timeout\":{v}"));
        }
        json.push('}');
        json
    }
}

impl Conn {
    /// Connects, sends the magic and IDENTIFY, and reads the broker's answer.
    pub(crate) async fn open(address: &str, identify: &IdentifyOpts) -> Result<(Conn, Negotiated)> {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_BUF),
            wbuf: BytesMut::with_capacity(64 * 1024),
        };
        conn.wbuf.extend_from_slice(MAGIC_V2);
        Command::Identify(identify.json().into()).encode(&mut conn.wbuf);
        conn.flush().await?;
        let negotiated = match conn
            .read_frame()
            .await
            .context("reading IDENTIFY response")?
        {
            Frame::Response(body) if body.first() == Some(&b'{') => Negotiated {
                max_rdy_count: json_u64(&body, "max_rdy_count"),
            },
            Frame::Response(_) => Negotiated {
                max_rdy_count: None,
            },
            Frame::Error(e) => bail!("IDENTIFY failed: {}", String::from_utf8_lossy(&e)),
            Frame::Message(_) => bail!("message frame in answer to IDENTIFY"),
        };
        Ok((conn, negotiated))
    }

    /// Writes and clears the write buffer.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Reads more bytes into the read buffer; cancel-safe. Fails when the broker closed.
    pub(crate) async fn fill(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_BUF / 4 {
            self.rbuf.reserve(READ_BUF);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("broker closed the connection");
        }
        Ok(())
    }

    /// The next frame, skipping heartbeats (answered with NOP); cancel-safe.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            while let Some(frame) = Frame::decode(&mut self.rbuf, MAX_FRAME)? {
                if matches!(&frame, Frame::Response(b) if b[..] == *proto::wire::HEARTBEAT) {
                    Command::Nop.encode(&mut self.wbuf);
                    self.flush().await?;
                    continue;
                }
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Reads a frame that must be `OK`.
    pub(crate) async fn expect_ok(&mut self, what: &str) -> Result<()> {
        match self.read_frame().await? {
            Frame::Response(b) if b[..] == *proto::wire::OK => Ok(()),
            other => bail!("{what}: expected OK, got {}", describe(&other)),
        }
    }
}

/// A frame for an error message.
pub(crate) fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Response(b) => format!("response {:?}", String::from_utf8_lossy(b)),
        Frame::Error(b) => format!("error {:?}", String::from_utf8_lossy(b)),
        Frame::Message(m) => format!("message {}", m.id),
    }
}

/// The unsigned integer value of `"key":` in a flat JSON object, without a JSON parser.
pub(crate) fn json_u64(json: &[u8], key: &str) -> Option<u64> {
    let pat = format!("\"{key}\"");
    let at = json.windows(pat.len()).position(|w| w == pat.as_bytes())?;
    let rest = &json[at + pat.len()..];
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b":")?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let digits = &rest[start..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_json() {
        let plain = IdentifyOpts::default().json();
        assert!(
            plain.starts_with("{\"feature_negotiation\":true,"),
            "{plain}"
        );
        assert!(plain.ends_with('}'));
        let buffered = IdentifyOpts {
            output_buffer_size: Some(-1),
            output_buffer_timeout: Some(25),
        }
        .json();
        assert!(
            buffered.ends_with(",\"output_buffer_size\":-1,\"output_buffer_timeout\":25}"),
            "{buffered}"
        );
    }

    #[test]
    fn json_u64_finds_top_level_numbers() {
        let json = br#"{"max_rdy_count": 2500,"version":"1.3.0","msg_timeout":60000}"#;
        assert_eq!(json_u64(json, "max_rdy_count"), Some(2500));
        assert_eq!(json_u64(json, "msg_timeout"), Some(60000));
        assert_eq!(json_u64(json, "version"), None);
        assert_eq!(json_u64(json, "missing"), None);
    }
}
