//! A knsq binary running as a child process: its stderr log, signals, exit.

use crate::{WAIT, binary_path};
use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A workspace binary started by a test; killed when dropped.
pub struct ChildProcess {
    name: &'static str,
    child: Child,
    log: mpsc::Receiver<String>,
    /// Every line read so far, for [`ChildProcess::find_log`].
    history: Vec<String>,
}

impl ChildProcess {
    /// Starts `target/<profile>/<name>` with these arguments and environment additions.
    pub fn spawn(name: &'static str, args: &[String], env: &[(&str, &str)]) -> Result<Self> {
        let bin = binary_path(name);
        if !bin.exists() {
            bail!(
                "{} is missing: build it first with `cargo build --workspace --bins`",
                bin.display()
            );
        }
        let mut command = Command::new(&bin);
        command.args(args).envs(env.iter().copied());
        Self::start(name, command)
    }

    /// Starts any program (a shell that sets limits and then execs a binary, say), with the
    /// same log handling.
    pub fn spawn_command(program: &'static str, args: &[String]) -> Result<Self> {
        let mut command = Command::new(program);
        command.args(args);
        Self::start(program, command)
    }

    fn start(name: &'static str, mut command: Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ChildProcess {
            name,
            child,
            log,
            history: Vec::new(),
        })
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + WAIT * 2;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.history.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!("{} did not log {needle:?} in time", self.name),
            }
        }
    }

    /// The first log line containing `needle`, among those read already (while waiting for
    /// another line, say) or, if none has it yet, the next one.
    pub fn find_log(&mut self, needle: &str) -> Result<String> {
        match self.history.iter().find(|line| line.contains(needle)) {
            Some(line) => Ok(line.clone()),
            None => self.wait_for_log(needle),
        }
    }

    /// Waits for a `<marker><address>` log line (`TCP: listening on 127.0.0.1:4150`).
    pub fn wait_for_address(&mut self, marker: &str) -> Result<SocketAddr> {
        let line = self.wait_for_log(marker)?;
        let address = line
            .split(marker)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default();
        address
            .parse()
            .with_context(|| format!("bad address {address:?} in {line:?}"))
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, …).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory (`VmRSS`), in bytes.
    pub fn rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
