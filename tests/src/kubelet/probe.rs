//! Probes as the kubelet runs them: `httpGet` (a status from 200 to 399 passes), `tcpSocket`
//! (a connection passes) and `exec` (exit 0 passes), each with its initial delay, period,
//! timeout and success and failure thresholds.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::runtime;

/// What one check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Exec { argv: Vec<String> },
}

/// A probe of a container, with the pod's named ports resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub check: Check,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn port(port: &IntOrString, container: &Container) -> Result<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| anyhow!("port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| anyhow!("the container has no port named {name}")),
    }
}

fn seconds(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

fn count(value: Option<i32>) -> u32 {
    value
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(1)
}

impl Spec {
    /// The probe as the Pod spec gives it, with the kubelet's defaults (period 10 s, timeout
    /// 1 s, success 1, failure 3).
    pub fn of(probe: &Probe, container: &Container) -> Result<Spec> {
        let check = if let Some(get) = &probe.http_get {
            if get.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                bail!("the kubelet stand-in probes plain HTTP only");
            }
            Check::Http {
                port: port(&get.port, container)?,
                path: get.path.clone().unwrap_or_else(|| "/".to_owned()),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            Check::Tcp {
                port: port(&tcp.port, container)?,
            }
        } else if let Some(exec) = &probe.exec {
            Check::Exec {
                argv: exec.command.clone().unwrap_or_default(),
            }
        } else {
            bail!("a probe with no handler");
        };
        Ok(Spec {
            check,
            initial_delay: seconds(probe.initial_delay_seconds, 0),
            period: seconds(probe.period_seconds, 10),
            timeout: seconds(probe.timeout_seconds, 1),
            success_threshold: count(probe.success_threshold),
            failure_threshold: probe
                .failure_threshold
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(3),
        })
    }
}

/// Where a check runs: the pod's address, and the container's process for `exec`.
#[derive(Clone, Debug)]
pub struct Target {
    pub ip: IpAddr,
    pub pid: u32,
    pub user: Option<(i64, i64)>,
    pub env: Vec<(String, String)>,
}

/// One check.
pub async fn check(spec: &Spec, target: &Target) -> bool {
    match &spec.check {
        Check::Http { port, path } => {
            let address = SocketAddr::new(target.ip, *port);
            tokio::time::timeout(spec.timeout, http_status(address, path))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|status| (200..400).contains(&status))
        }
        Check::Tcp { port } => tokio::time::timeout(
            spec.timeout,
            TcpStream::connect(SocketAddr::new(target.ip, *port)),
        )
        .await
        .is_ok_and(|c| c.is_ok()),
        Check::Exec { argv } => {
            runtime::exec(target.pid, target.user, &target.env, argv, spec.timeout)
                .await
                .unwrap_or(false)
        }
    }
}

/// The status code of `GET path`, as the kubelet sends it.
pub async fn http_status(address: SocketAddr, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(address).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: kube-probe/1.20\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..]).await?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&head[..read]);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {line:?}"))
}

/// Turns check results into the probe's state: it flips only after `success_threshold`
/// passes or `failure_threshold` failures in a row.
#[derive(Clone, Debug)]
pub struct Tally {
    passing: bool,
    streak: u32,
}

impl Tally {
    /// A probe starts failing: a container is not ready until its readiness probe passed.
    pub fn new() -> Tally {
        Tally {
            passing: false,
            streak: 0,
        }
    }

    /// Count one result; the probe's state when it flipped.
    pub fn record(&mut self, spec: &Spec, passed: bool) -> Option<bool> {
        if passed == self.passing {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let threshold = if passed {
            spec.success_threshold
        } else {
            spec.failure_threshold
        };
        (self.streak >= threshold).then(|| {
            self.passing = passed;
            self.streak = 0;
            passed
        })
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    fn container() -> Container {
        Container {
            name: "broker".to_owned(),
            ports: Some(vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: 4151,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        }
    }

    #[test]
    fn named_ports_and_defaults() {
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".to_owned()),
                port: IntOrString::String("http".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        };
        let spec = Spec::of(&probe, &container()).expect("spec");
        assert_eq!(
            spec,
            Spec {
                check: Check::Http {
                    port: 4151,
                    path: "/readyz".to_owned()
                },
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
            }
        );
        let mut unknown = probe.clone();
        unknown.http_get.as_mut().expect("get").port = IntOrString::String("grpc".to_owned());
        assert!(Spec::of(&unknown, &container()).is_err());
    }

    #[test]
    fn thresholds_flip_the_state() {
        let spec = Spec {
            check: Check::Tcp { port: 1 },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        };
        let mut tally = Tally::new();
        assert_eq!(tally.record(&spec, true), None);
        assert_eq!(tally.record(&spec, true), Some(true));
        assert_eq!(tally.record(&spec, false), None);
        assert_eq!(
            tally.record(&spec, true),
            None,
            "a pass resets the failures"
        );
        assert_eq!(tally.record(&spec, false), None);
        assert_eq!(tally.record(&spec, false), None);
        assert_eq!(tally.record(&spec, false), Some(false));
    }
}
