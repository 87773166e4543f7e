//! Lookupds for tests: in this process ([`TestLookupd`]) or as the real binary
//! ([`LookupdProcess`]), both on loopback port 0, and a broker's side of a registration
//! stream ([`RegistrationStream`]) speaking the generated gRPC client.

use crate::{ChildProcess, HttpResponse, WAIT, http_request};
use anyhow::{Context, Result, anyhow, bail};
use lookupd::{Options, Server};
use proto::cluster::v1::broker_message::Kind;
use proto::cluster::v1::registry_client::RegistryClient;
use proto::cluster::v1::{
    BrokerMessage, Heartbeat, Identify, LookupdMessage, RegisterChannel, RegisterTopic, Snapshot,
    TopicChannelsRequest, TopicRegistration, lookupd_message,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

/// A lookupd running inside the test process.
pub struct TestLookupd {
    server: Option<Server>,
    grpc_address: SocketAddr,
    http_address: SocketAddr,
}

impl TestLookupd {
    /// Starts a lookupd with nsqlookupd's defaults on 127.0.0.1 port 0; `configure` may
    /// change any option first.
    pub async fn start(configure: impl FnOnce(&mut Options)) -> Result<TestLookupd> {
        let mut options = Options::for_tests();
        configure(&mut options);
        let server = Server::start(options).await?;
        Ok(TestLookupd {
            grpc_address: server.grpc_address(),
            http_address: server.http_address(),
            server: Some(server),
        })
    }

    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc_address
    }

    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// An HTTP request to the lookupd's nsqlookupd API.
    pub async fn http(&self, method: &str, path: &str) -> Result<HttpResponse> {
        http_request(self.http_address, method, path, b"").await
    }

    /// `GET /lookup?topic=` parsed; `None` for 404 TOPIC_NOT_FOUND.
    pub async fn lookup(&self, topic: &str) -> Result<Option<serde_json::Value>> {
        lookup(self.http_address, topic).await
    }

    pub async fn client(&self) -> Result<RegistryClient<Channel>> {
        registry_client(self.grpc_address).await
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(server) = self.server.take() {
            server.stop().await?;
        }
        Ok(())
    }
}

/// `GET /lookup?topic=` of the lookupd at `http`; `None` for 404 TOPIC_NOT_FOUND.
pub async fn lookup(http: SocketAddr, topic: &str) -> Result<Option<serde_json::Value>> {
    let resp = http_request(http, "GET", &format!("/lookup?topic={topic}"), b"").await?;
    match resp.status {
        200 => Ok(Some(resp.json()?)),
        404 => Ok(None),
        status => bail!("/lookup answered {status}: {}", resp.text()),
    }
}

/// The `broadcast_address:tcp_port` of each producer `/lookup` lists for `topic`.
pub async fn lookup_producers(http: SocketAddr, topic: &str) -> Result<Vec<String>> {
    let Some(found) = lookup(http, topic).await? else {
        return Ok(Vec::new());
    };
    let producers = found["producers"]
        .as_array()
        .ok_or_else(|| anyhow!("no producers in {found}"))?;
    Ok(producers
        .iter()
        .map(|p| {
            format!(
                "{}:{}",
                p["broadcast_address"].as_str().unwrap_or("?"),
                p["tcp_port"]
            )
        })
        .collect())
}

/// Polls `check` every 20 ms until it holds, at most [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("not within {WAIT:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn registry_client(grpc: SocketAddr) -> Result<RegistryClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{grpc}"))?
        .connect_timeout(WAIT)
        .connect()
        .await
        .with_context(|| format!("connecting to the lookupd at {grpc}"))?;
    Ok(RegistryClient::new(channel))
}

/// `TopicChannels` of the lookupd at `grpc`.
pub async fn topic_channels(grpc: SocketAddr, topic: &str) -> Result<Result<Vec<String>, Status>> {
    let mut client = registry_client(grpc).await?;
    let request = TopicChannelsRequest {
        topic: topic.into(),
    };
    Ok(client
        .topic_channels(request)
        .await
        .map(|r| r.into_inner().channels))
}

/// An `Identify` for a broker at 127.0.0.1 with these ports.
pub fn identify(tcp_port: u32, http_port: u32) -> Identify {
    Identify {
        broadcast_address: "127.0.0.1".into(),
        tcp_port,
        http_port,
        version: "0.1.0".into(),
        node_id: 1,
        hostname: "test-broker".into(),
        topology_zone: String::new(),
        topology_region: String::new(),
        handoff_port: 0,
    }
}

pub fn snapshot(topics: &[(&str, &[&str])]) -> Kind {
    Kind::Snapshot(Snapshot {
        topics: topics
            .iter()
            .map(|(topic, channels)| TopicRegistration {
                topic: topic.to_string(),
                channels: channels.iter().map(|c| c.to_string()).collect(),
            })
            .collect(),
    })
}

pub fn register_topic(topic: &str) -> Kind {
    Kind::RegisterTopic(RegisterTopic {
        topic: topic.into(),
    })
}

pub fn register_channel(topic: &str, channel: &str) -> Kind {
    Kind::RegisterChannel(RegisterChannel {
        topic: topic.into(),
        channel: channel.into(),
    })
}

pub fn heartbeat() -> Kind {
    Kind::Heartbeat(Heartbeat {})
}

/// The broker's side of one registration stream.
pub struct RegistrationStream {
    outbound: Option<mpsc::Sender<BrokerMessage>>,
    replies: Streaming<LookupdMessage>,
}

impl RegistrationStream {
    /// Opens a stream; nothing is sent yet.
    pub async fn open(grpc: SocketAddr) -> Result<RegistrationStream> {
        let mut client = registry_client(grpc).await?;
        // A test sends a message and reads its reply before the next: one slot is enough.
        let (outbound, rx) = mpsc::channel(1);
        let replies = client.register(ReceiverStream::new(rx)).await?.into_inner();
        Ok(RegistrationStream {
            outbound: Some(outbound),
            replies,
        })
    }

    /// Opens a stream and identifies; returns it with the lookupd's `Identified` answer.
    pub async fn identified(
        grpc: SocketAddr,
        identify: Identify,
    ) -> Result<(RegistrationStream, proto::cluster::v1::Identified)> {
        let mut stream = RegistrationStream::open(grpc).await?;
        match stream.call(Kind::Identify(identify)).await? {
            lookupd_message::Kind::Identified(identified) => Ok((stream, identified)),
            other => bail!("expected Identified, got {other:?}"),
        }
    }

    pub async fn send(&mut self, kind: Kind) -> Result<()> {
        self.send_message(BrokerMessage { kind: Some(kind) }).await
    }

    pub async fn send_message(&mut self, message: BrokerMessage) -> Result<()> {
        let outbound = self
            .outbound
            .as_ref()
            .ok_or_else(|| anyhow!("the stream was half-closed"))?;
        outbound
            .send(message)
            .await
            .map_err(|_| anyhow!("the stream has ended"))
    }

    /// The next reply: a message, the status that ended the stream, or `None` when it ended
    /// cleanly. Fails after [`WAIT`].
    pub async fn next(&mut self) -> Result<Option<Result<LookupdMessage, Status>>> {
        match tokio::time::timeout(WAIT, self.replies.message()).await {
            Err(_) => bail!("no reply from the lookupd within {WAIT:?}"),
            Ok(Ok(Some(message))) => Ok(Some(Ok(message))),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Ok(Some(Err(status))),
        }
    }

    /// Sends a message and returns its (successful) reply.
    pub async fn call(&mut self, kind: Kind) -> Result<lookupd_message::Kind> {
        self.send(kind).await?;
        match self.next().await? {
            Some(Ok(LookupdMessage { kind: Some(kind) })) => Ok(kind),
            other => bail!("expected a reply, got {other:?}"),
        }
    }

    /// Sends a message the lookupd must acknowledge; returns the ack's sequence number.
    pub async fn acked(&mut self, kind: Kind) -> Result<u64> {
        match self.call(kind).await? {
            lookupd_message::Kind::Ack(ack) => Ok(ack.sequence),
            other => bail!("expected an Ack, got {other:?}"),
        }
    }

    /// Waits for the status that ends the stream.
    pub async fn expect_status(&mut self) -> Result<Status> {
        match self.next().await? {
            Some(Err(status)) => Ok(status),
            other => bail!("expected the stream to end with a status, got {other:?}"),
        }
    }

    /// Closes the broker's side of the stream, as a broker leaving cleanly does.
    pub fn half_close(&mut self) {
        self.outbound = None;
    }
}

/// The real `knsq-lookupd` binary, started with the given flags plus loopback port 0 (unless
/// the flags set their own addresses). Signals, logs and exit through its [`ChildProcess`].
pub struct LookupdProcess {
    process: ChildProcess,
    pub grpc_address: SocketAddr,
    pub http_address: SocketAddr,
}

impl LookupdProcess {
    pub fn start(extra: &[&str]) -> Result<LookupdProcess> {
        let mut args: Vec<String> = vec![
            "--grpc-address=127.0.0.1:0".into(),
            "--http-address=127.0.0.1:0".into(),
            "--broadcast-address=127.0.0.1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        LookupdProcess::spawn(&args, &[])
    }

    /// Starts the binary with exactly these arguments and environment additions, and waits
    /// for its listening lines.
    pub fn spawn(args: &[String], env: &[(&str, &str)]) -> Result<LookupdProcess> {
        let mut process = ChildProcess::spawn("knsq-lookupd", args, env)?;
        let grpc_address = process.wait_for_address("GRPC: listening on ")?;
        let http_address = process.wait_for_address("HTTP: listening on ")?;
        Ok(LookupdProcess {
            process,
            grpc_address,
            http_address,
        })
    }
}

impl std::ops::Deref for LookupdProcess {
    type Target = ChildProcess;
    fn deref(&self) -> &ChildProcess {
        &self.process
    }
}

impl std::ops::DerefMut for LookupdProcess {
    fn deref_mut(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}
