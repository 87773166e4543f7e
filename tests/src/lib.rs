//! The knsq test harness: brokers on loopback port 0 with temporary data directories, in
//! this process ([`TestBroker`]) or as the real binary ([`BrokerProcess`]), and a raw NSQ
//! connection ([`NsqConn`]) for byte-level protocol tests.

pub mod certs;
pub mod crash;
pub mod e2e;
pub mod kubelet;
pub mod lookupd;
mod process;
pub mod prometheus;
pub mod transport;

pub use process::ChildProcess;

use anyhow::{Context, Result, anyhow, bail};
use broker::{Options, Server};
use bytes::{BufMut, BytesMut};
use proto::wire::{Command, Frame, MAGIC_V2};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use transport::{ClientStream, Compression};

/// How long a test waits for any single expected event before failing.
pub const WAIT: Duration = Duration::from_secs(5);

/// A broker running inside the test process.
pub struct TestBroker {
    server: Option<Server>,
    data: tempfile::TempDir,
}

impl TestBroker {
    /// Starts a broker with nsqd's defaults on 127.0.0.1 port 0; `configure` may change
    /// any option first.
    pub async fn start(configure: impl FnOnce(&mut Options)) -> Result<TestBroker> {
        let data = tempfile::tempdir()?;
        let mut options = Options::for_tests(data.path());
        configure(&mut options);
        let server = Server::start(options).await?;
        Ok(TestBroker {
            server: Some(server),
            data,
        })
    }

    fn server(&self) -> &Server {
        match &self.server {
            Some(server) => server,
            None => unreachable!("the server is only taken by stop()"),
        }
    }

    pub fn tcp_address(&self) -> SocketAddr {
        self.server().tcp_address()
    }

    pub fn http_address(&self) -> SocketAddr {
        self.server().http_address()
    }

    pub fn data_path(&self) -> &Path {
        self.data.path()
    }

    /// A connection that has sent the V2 magic.
    pub async fn connect(&self) -> Result<NsqConn> {
        NsqConn::connect(self.tcp_address()).await
    }

    /// An HTTP request to the broker; returns status, headers (lower-cased names) and body.
    pub async fn http(&self, method: &str, path: &str, body: &[u8]) -> Result<HttpResponse> {
        http_request(self.http_address(), method, path, body).await
    }

    /// `/stats?format=json` parsed.
    pub async fn stats(&self) -> Result<serde_json::Value> {
        let resp = self.http("GET", "/stats?format=json", b"").await?;
        Ok(serde_json::from_slice(&resp.body)?)
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(server) = self.server.take() {
            server.stop().await?;
        }
        Ok(())
    }
}

/// A raw NSQ TCP connection speaking through the `proto::wire` codec, over plain TCP or, after
/// [`NsqConn::upgrade`], TLS and/or compression.
pub struct NsqConn {
    stream: ClientStream,
    buf: BytesMut,
}

impl NsqConn {
    pub async fn connect(addr: SocketAddr) -> Result<NsqConn> {
        let mut conn = NsqConn::connect_raw(addr).await?;
        conn.send_raw(MAGIC_V2).await?;
        Ok(conn)
    }

    /// A connection that has sent nothing yet.
    pub async fn connect_raw(addr: SocketAddr) -> Result<NsqConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(NsqConn {
            stream: ClientStream::tcp(stream),
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// Writes bytes as they are (compressed, once the connection is).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        // A no-op on plain TCP; pushes out TLS records and compressed bytes.
        self.stream.flush().await?;
        Ok(())
    }

    /// Writes bytes under the compression layer (or as [`NsqConn::send_raw`] when there is
    /// none), e.g. a corrupt compressed stream.
    pub async fn send_below_compression(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_below_compression(bytes).await?;
        Ok(())
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Sends IDENTIFY with `json` (which should ask for `feature_negotiation`), reads the JSON
    /// response and then performs the upgrades it agreed to, in nsqd's order: TLS (with
    /// `tls`, checking the name `localhost`), snappy, deflate at its `deflate_level`; each
    /// answered by an `OK`. Returns the response.
    pub async fn upgrade(
        &mut self,
        json: &serde_json::Value,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<serde_json::Value> {
        let response = match self.identify(json).await? {
            Frame::Response(body) => serde_json::from_slice::<serde_json::Value>(&body)
                .with_context(|| {
                    format!(
                        "IDENTIFY response {:?} is not JSON",
                        String::from_utf8_lossy(&body)
                    )
                })?,
            other => bail!("IDENTIFY: expected a JSON response, got {other:?}"),
        };
        let agreed = |key: &str| response[key].as_bool() == Some(true);
        if agreed("tls_v1") {
            let config =
                tls.ok_or_else(|| anyhow!("the server starts TLS but no client config was given"))?;
            if !self.buf.is_empty() {
                bail!(
                    "{} unexpected bytes before the TLS handshake",
                    self.buf.len()
                );
            }
            self.stream
                .start_tls(config, certs::loopback_name())
                .await
                .context("TLS handshake")?;
            self.expect_response(proto::wire::OK)
                .await
                .context("after TLS")?;
        }
        let mut compress = |compression| {
            // What was read past the last plain frame is the start of the compressed stream.
            let already_read = self.buf.split();
            self.stream.start_compression(compression, &already_read)
        };
        if agreed("snappy") {
            compress(Compression::Snappy)?;
            self.expect_response(proto::wire::OK)
                .await
                .context("after snappy")?;
        } else if agreed("deflate") {
            let level = response["deflate_level"].as_u64().unwrap_or(6);
            compress(Compression::Deflate(u32::try_from(level).unwrap_or(9)))?;
            self.expect_response(proto::wire::OK)
                .await
                .context("after deflate")?;
        }
        Ok(response)
    }

    pub async fn send(&mut self, command: &Command) -> Result<()> {
        let mut out = BytesMut::new();
        command.encode(&mut out);
        self.send_raw(&out).await
    }

    /// `IDENTIFY` with a JSON body.
    pub async fn identify(&mut self, json: &serde_json::Value) -> Result<Frame> {
        let body = serde_json::to_vec(json)?;
        let mut out = BytesMut::new();
        out.put_slice(b"IDENTIFY\n");
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
        self.send_raw(&out).await?;
        self.next_frame().await
    }

    /// `SUB topic channel`, expecting its `OK`.
    pub async fn subscribe(&mut self, topic: &str, channel: &str) -> Result<()> {
        let name = |n: &str| proto::wire::Name::new(n).ok_or_else(|| anyhow!("invalid name {n:?}"));
        self.send(&Command::Sub {
            topic: name(topic)?,
            channel: name(channel)?,
        })
        .await?;
        self.expect_response(b"OK").await
    }

    /// The next frame, or an error after [`WAIT`] or when the connection closes.
    pub async fn next_frame(&mut self) -> Result<Frame> {
        self.next_frame_within(WAIT).await
    }

    pub async fn next_frame_within(&mut self, limit: Duration) -> Result<Frame> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(frame) = Frame::decode(&mut self.buf, 16 * 1024 * 1024)? {
                    return Ok(frame);
                }
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    bail!("connection closed by the broker");
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no frame within {limit:?}"))?
    }

    /// The next frame that is not a heartbeat.
    pub async fn next_non_heartbeat(&mut self) -> Result<Frame> {
        loop {
            match self.next_frame().await? {
                Frame::Response(r) if &r[..] == proto::wire::HEARTBEAT => continue,
                frame => return Ok(frame),
            }
        }
    }

    pub async fn expect_response(&mut self, want: &[u8]) -> Result<()> {
        match self.next_non_heartbeat().await? {
            Frame::Response(r) if &r[..] == want => Ok(()),
            other => bail!(
                "expected response {:?}, got {other:?}",
                String::from_utf8_lossy(want)
            ),
        }
    }

    pub async fn expect_error(&mut self, want: &str) -> Result<()> {
        match self.next_non_heartbeat().await? {
            Frame::Error(e) if &e[..] == want.as_bytes() => Ok(()),
            other => bail!("expected error {want:?}, got {other:?}"),
        }
    }

    pub async fn expect_message(&mut self) -> Result<proto::wire::Message> {
        match self.next_non_heartbeat().await? {
            Frame::Message(m) => Ok(m),
            other => bail!("expected a message, got {other:?}"),
        }
    }

    /// Succeeds when the broker closes the connection (EOF) within [`WAIT`], with no
    /// further frame.
    pub async fn expect_closed(&mut self) -> Result<()> {
        match self.next_frame().await {
            Err(e) if e.to_string().contains("closed") => Ok(()),
            Err(e) => Err(e),
            Ok(frame) => bail!("expected the connection to close, got {frame:?}"),
        }
    }

    /// Asserts nothing arrives (other than heartbeats) for `quiet`.
    pub async fn expect_nothing_for(&mut self, quiet: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.next_frame_within(left).await {
                Err(e) if e.to_string().starts_with("no frame") => return Ok(()),
                Err(e) => return Err(e),
                Ok(Frame::Response(r)) if &r[..] == proto::wire::HEARTBEAT => continue,
                Ok(frame) => bail!("expected nothing, got {frame:?}"),
            }
        }
    }
}

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", self.text()))
    }
}

/// A `POST` that must answer 200.
pub async fn http_post_ok(addr: SocketAddr, path: &str, body: &[u8]) -> Result<()> {
    let resp = http_request(addr, "POST", path, body).await?;
    if resp.status != 200 {
        bail!("POST {path}: {} {}", resp.status, resp.text());
    }
    Ok(())
}

/// One HTTP/1.1 request with `Connection: close`, enough for tests without an HTTP client
/// dependency.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<HttpResponse> {
    let stream = TcpStream::connect(addr).await?;
    http_exchange(stream, addr, method, path, body).await
}

/// One HTTP/1.1 request with `Connection: close` over an open stream (plain or TLS) to
/// `addr`, and its response.
pub async fn http_exchange<S>(
    mut stream: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<HttpResponse>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    // A no-op on TCP; sends the TLS records.
    stream.flush().await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .map_err(|_| anyhow!("no HTTP response within {WAIT:?}"))??;
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol])?.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

/// The path of a workspace binary built in the same profile as the tests.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join(name)
}

/// The real `knsq-broker` binary, started with the given flags plus loopback port 0 and a
/// temporary data directory (unless the flags set their own). Signals, logs and exit through
/// its [`ChildProcess`].
pub struct BrokerProcess {
    process: ChildProcess,
    pub tcp_address: SocketAddr,
    pub http_address: SocketAddr,
    pub data: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    pub fn start(extra: &[&str]) -> Result<BrokerProcess> {
        let data = tempfile::tempdir()?;
        let data_flag = format!("--data-path={}", data.path().display());
        let mut args: Vec<String> = vec![
            "--tcp-address=127.0.0.1:0".into(),
            "--http-address=127.0.0.1:0".into(),
            "--broadcast-address=127.0.0.1".into(),
            data_flag,
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut process = BrokerProcess::spawn(&args)?;
        process.data = Some(data);
        Ok(process)
    }

    /// Stops this broker (if it still runs) and starts it again on the same data directory and
    /// ports, with `extra` flags.
    pub fn restart(self, extra: &[&str]) -> Result<BrokerProcess> {
        let ports = [self.tcp_address.to_string(), self.http_address.to_string()];
        self.respawn(&ports, extra)
    }

    /// Like [`BrokerProcess::restart`], on new ports (for when the old ones may still be taken
    /// by a process the test left running).
    pub fn restart_on_new_ports(self, extra: &[&str]) -> Result<BrokerProcess> {
        let ports = ["127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()];
        self.respawn(&ports, extra)
    }

    fn respawn(mut self, [tcp, http]: &[String; 2], extra: &[&str]) -> Result<BrokerProcess> {
        let data = self.data.take();
        drop(self);
        let dir = data
            .as_ref()
            .map(|d| d.path().display().to_string())
            .unwrap_or_default();
        let mut args = vec![
            format!("--tcp-address={tcp}"),
            format!("--http-address={http}"),
            "--broadcast-address=127.0.0.1".to_string(),
            format!("--data-path={dir}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut broker = BrokerProcess::spawn(&args)?;
        broker.data = data;
        Ok(broker)
    }

    /// Starts the binary with exactly these arguments and waits for its listening lines.
    pub fn spawn(args: &[String]) -> Result<BrokerProcess> {
        let mut process = ChildProcess::spawn("knsq-broker", args, &[])?;
        let tcp_address = process.wait_for_address("TCP: listening on ")?;
        let http_address = process.wait_for_address("HTTP: listening on ")?;
        Ok(BrokerProcess {
            process,
            tcp_address,
            http_address,
            data: None,
        })
    }
}

impl std::ops::Deref for BrokerProcess {
    type Target = ChildProcess;
    fn deref(&self) -> &ChildProcess {
        &self.process
    }
}

impl std::ops::DerefMut for BrokerProcess {
    fn deref_mut(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}
