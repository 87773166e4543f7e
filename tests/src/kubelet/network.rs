//! Pod networking as a CNI bridge plugin would do it, inside the test's own network namespace
//! and on loopback addresses only: every pod gets a network namespace of its own (so each can
//! listen on `0.0.0.0:4150` as its Pod spec says) with a veth on the bridge `knsq0`, and a
//! loopback address of the form `127.1.S.N` (S: the stand-in's subnet, N: one per pod name,
//! kept when the pod is made again, as the DNS name is). Linux routes `127.0.0.0/8` between
//! interfaces once `route_localnet` is on and each namespace's loopback keeps only
//! `127.0.0.1/32` (`scripts/test-operator.sh` does the same for the test's own namespace).
//! Names resolve through one hosts file, shared by the pods and the test process, that only
//! ever grows (a line appended is never torn by a reader).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// The bridge every pod's veth is attached to; the test process reaches pods through it.
pub const BRIDGE: &str = "knsq0";
/// The bridge's own address: the node's, as pods see it.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);
const PREFIX_LEN: u8 = 16;

/// A pod's network: its namespace and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// The network namespace, under `/run/netns/`.
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// The pods' addresses and names of one stand-in.
#[derive(Debug)]
pub struct Network {
    subnet: u8,
    hosts: PathBuf,
    /// Pod name → sandbox, and the last host number handed out.
    sandboxes: tokio::sync::Mutex<(BTreeMap<String, Sandbox>, u8)>,
    /// Names already in the hosts file.
    known: Mutex<BTreeMap<String, Ipv4Addr>>,
}

/// Run `program` with `args`; its error output when it fails.
async fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

async fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).await
}

/// Let loopback addresses cross interfaces in namespace `netns` (the current one when `None`).
async fn route_localnet(netns: Option<&str>) -> Result<()> {
    let set = "for c in all default; do echo 1 >/proc/sys/net/ipv4/conf/$c/route_localnet; done";
    match netns {
        Some(ns) => ip(&["netns", "exec", ns, "sh", "-c", set]).await,
        None => run("sh", &["-c", set]).await,
    }
}

/// Refuse to touch a network namespace that is not the test's own: one holding anything but
/// loopback and the stand-in's bridge and veths is some machine's real network.
pub async fn ensure_isolated() -> Result<()> {
    if std::env::var_os("KNSQ_E2E_ISOLATED").is_none() {
        bail!(
            "the kubelet stand-in plumbs network namespaces and runs only inside the private one `scripts/test-operator.sh --e2e` makes"
        );
    }
    let output = Command::new("ip").args(["-o", "link"]).output().await?;
    let links = String::from_utf8_lossy(&output.stdout);
    for line in links.lines() {
        let name = line.split(':').nth(1).unwrap_or_default().trim();
        let name = name.split('@').next().unwrap_or_default();
        if !(name == "lo" || name == BRIDGE || name.starts_with("kv")) {
            bail!("this network namespace has {name}: not the test's own, refusing to plumb it");
        }
    }
    Ok(())
}

impl Network {
    /// The pods of subnet `127.1.<subnet>.0/24`, named in `hosts` (which the caller has
    /// mounted over `/etc/hosts` for the test process).
    pub async fn new(subnet: u8, hosts: &Path) -> Result<Network> {
        ensure_isolated().await?;
        if subnet == 0 {
            bail!("subnet 0 holds the gateway");
        }
        // Several stand-ins (one per test) share the bridge.
        if ip(&["link", "show", BRIDGE]).await.is_err() {
            route_localnet(None).await?;
            ip(&["link", "add", BRIDGE, "type", "bridge"]).await?;
            ip(&[
                "addr",
                "add",
                &format!("{GATEWAY}/{PREFIX_LEN}"),
                "dev",
                BRIDGE,
            ])
            .await?;
            ip(&["link", "set", BRIDGE, "up"]).await?;
        }
        Ok(Network {
            subnet,
            hosts: hosts.to_path_buf(),
            sandboxes: tokio::sync::Mutex::new((BTreeMap::new(), 1)),
            known: Mutex::default(),
        })
    }

    /// The sandbox of pod `name`, made on first use and kept for a pod of that name later.
    pub async fn sandbox(&self, name: &str) -> Result<Sandbox> {
        let mut guard = self.sandboxes.lock().await;
        let (sandboxes, last) = &mut *guard;
        if let Some(sandbox) = sandboxes.get(name) {
            return Ok(sandbox.clone());
        }
        let host = last.checked_add(1).filter(|h| *h < 255);
        let Some(host) = host else {
            bail!("subnet 127.1.{}.0/24 is full", self.subnet);
        };
        *last = host;
        let sandbox = Sandbox {
            netns: format!("knsq{}-{host}", self.subnet),
            ip: Ipv4Addr::new(127, 1, self.subnet, host),
        };
        let veth = format!("kv{}x{host}", self.subnet);
        let ns = sandbox.netns.as_str();
        ip(&["netns", "add", ns]).await?;
        // Before the veth is made, so its interface inherits the setting.
        route_localnet(Some(ns)).await?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])
        .await?;
        ip(&["link", "set", &veth, "master", BRIDGE, "up"]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        // The pod's own loopback is 127.0.0.1 alone: the rest of 127/8 is the pods' network.
        ip(&["-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo"]).await?;
        ip(&["-n", ns, "addr", "add", "127.0.0.1/32", "dev", "lo"]).await?;
        let address = format!("{}/{PREFIX_LEN}", sandbox.ip);
        ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"]).await?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        sandboxes.insert(name.to_owned(), sandbox.clone());
        Ok(sandbox)
    }

    /// Make `names` resolve to `ip`, for the pods and the test process alike.
    pub fn publish(&self, ip: Ipv4Addr, names: &[String]) -> Result<()> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let fresh: Vec<&String> = names
            .iter()
            .filter(|n| known.get(n.as_str()) != Some(&ip))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let line = format!(
            "{ip}\t{}\n",
            fresh
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
        // One write of a whole line to a file opened for appending: readers see it whole.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.hosts)
            .with_context(|| format!("opening {}", self.hosts.display()))?;
        file.write_all(line.as_bytes())?;
        for name in fresh {
            known.insert(name.clone(), ip);
        }
        Ok(())
    }

    pub fn hosts_file(&self) -> &Path {
        &self.hosts
    }
}
