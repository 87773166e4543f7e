//! Running a container as a local process, the way a container runtime would, with the tools
//! every Linux machine has: `nsenter` into the pod's network namespace, `unshare` a mount and
//! UTS namespace, and a small shell script that builds the container's root (the host's
//! programs and libraries read-only, the image's files, the pod's volumes at the paths its spec
//! names, its own `/etc/hosts`), sets the hostname and `exec`s `chroot` and `env -i` into the
//! container's command. Every step `exec`s the next, so the process spawned is the container's
//! process itself: signals reach it and its exit status is the container's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};
use tokio::process::{Child, Command};

/// What an image holds for the stand-in: the host files it puts in the container and its
/// Dockerfile's `ENTRYPOINT`, `CMD` and `USER`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// (file on this machine, path in the container).
    pub files: Vec<(PathBuf, String)>,
    pub entrypoint: Vec<String>,
    pub command: Vec<String>,
    pub user: Option<(i64, i64)>,
}

/// A volume mounted into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Everything needed to start one container.
#[derive(Clone, Debug)]
pub struct Launch {
    pub netns: String,
    /// An empty directory the container's root is mounted on.
    pub root: PathBuf,
    pub hostname: String,
    pub hosts: PathBuf,
    pub resolv: PathBuf,
    pub image: Image,
    pub mounts: Vec<Mount>,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
    pub workdir: String,
    /// User and group to run as, and the supplementary groups (the pod's fsGroup).
    pub user: Option<(i64, i64)>,
    pub groups: Vec<i64>,
    pub read_only_root: bool,
    /// stdout and stderr are appended here.
    pub log: PathBuf,
}

/// The image's default `PATH` (Debian's), set before the container's own variables.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mounted over by the host's, so the container has none of its own there; mount targets in
/// them would reach the host.
const HOST_TREES: &[&str] = &[
    "/usr", "/dev", "/proc", "/sys", "/bin", "/sbin", "/lib", "/lib64",
];

/// Builds the root and becomes the container. Inputs in `KNSQ_*` variables; the arguments are
/// the container's `NAME=value` environment followed by its command line.
const SANDBOX: &str = r#"
set -eu
R=$KNSQ_ROOT
tab=$(printf '\t')
mount -t tmpfs -o mode=0755 knsq-root "$R"
for d in bin sbin lib lib32 lib64 libx32 usr; do
  if [ -L "/$d" ]; then
    ln -s "$(readlink "/$d")" "$R/$d"
  elif [ -d "/$d" ]; then
    mkdir "$R/$d"
    mount --rbind "/$d" "$R/$d"
    mount -o remount,bind,ro "$R/$d"
  fi
done
mkdir -p "$R/etc" "$R/dev" "$R/proc" "$R/sys" "$R/tmp" "$R/run"
# Of /etc only what programs read; the rest is the image's (and the pod's volumes).
for f in passwd group nsswitch.conf ld.so.cache localtime ssl ca-certificates; do
  [ -e "/etc/$f" ] || continue
  if [ -d "/etc/$f" ]; then mkdir "$R/etc/$f"; else : >"$R/etc/$f"; fi
  mount --rbind "/etc/$f" "$R/etc/$f"
done
: >"$R/etc/hosts"
mount --bind "$KNSQ_HOSTS" "$R/etc/hosts"
: >"$R/etc/resolv.conf"
mount --bind "$KNSQ_RESOLV" "$R/etc/resolv.conf"
printf '%s\n' "$KNSQ_HOSTNAME" >"$R/etc/hostname"
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$R/usr/local"
printf '%s' "$KNSQ_FILES" | while IFS=$tab read -r src dst; do
  [ -n "$src" ] || continue
  mkdir -p "$R$(dirname "$dst")"
  : >"$R$dst"
  mount --bind "$src" "$R$dst"
done
printf '%s' "$KNSQ_MOUNTS" | while IFS=$tab read -r src dst mode; do
  [ -n "$src" ] || continue
  mkdir -p "$R$dst"
  mount --bind "$src" "$R$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$R$dst"; fi
done
if [ "$KNSQ_READ_ONLY" = 1 ]; then mount -o remount,ro "$R"; fi
hostname "$KNSQ_HOSTNAME"
cd "$R"
# shellcheck disable=SC2086 # the user options are words
exec chroot $KNSQ_USERSPEC "$R" /usr/bin/env -i -C "$KNSQ_WORKDIR" "$@"
"#;

fn lines<'a>(rows: impl Iterator<Item = Vec<&'a str>>) -> String {
    rows.map(|row| row.join("\t") + "\n").collect()
}

fn userspec(user: Option<(i64, i64)>, groups: &[i64]) -> String {
    let Some((uid, gid)) = user else {
        return String::new();
    };
    let mut spec = format!("--userspec={uid}:{gid}");
    let mut all: Vec<i64> = vec![gid];
    all.extend(groups.iter().copied().filter(|g| *g != gid));
    spec.push_str(&format!(
        " --groups={}",
        all.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    ));
    spec
}

/// The container's environment: the image's `PATH` and the hostname, then the pod's.
fn environment(launch: &Launch) -> Vec<String> {
    let mut env = vec![
        format!("PATH={IMAGE_PATH}"),
        format!("HOSTNAME={}", launch.hostname),
    ];
    for (k, v) in &launch.env {
        env.retain(|e| !e.starts_with(&format!("{k}=")));
        env.push(format!("{k}={v}"));
    }
    env
}

/// Start the container's process.
pub fn spawn(launch: &Launch) -> Result<Child> {
    for mount in &launch.mounts {
        if HOST_TREES
            .iter()
            .any(|tree| mount.target == *tree || mount.target.starts_with(&format!("{tree}/")))
        {
            bail!(
                "mount path {} is not supported by the kubelet stand-in",
                mount.target
            );
        }
    }
    if launch.argv.is_empty() {
        bail!("no command to run");
    }
    let files = lines(
        launch
            .image
            .files
            .iter()
            .map(|(src, dst)| vec![src.to_str().unwrap_or_default(), dst.as_str()]),
    );
    let mounts = lines(launch.mounts.iter().map(|m| {
        vec![
            m.source.to_str().unwrap_or_default(),
            m.target.as_str(),
            if m.read_only { "ro" } else { "rw" },
        ]
    }));
    std::fs::create_dir_all(&launch.root)?;
    if let Some(dir) = launch.log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)
        .with_context(|| format!("opening {}", launch.log.display()))?;
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{}", launch.netns))
        .args([
            "--",
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
        ])
        .args(["--", "/bin/sh", "-c", SANDBOX, "knsq-sandbox"])
        .args(environment(launch))
        .args(&launch.argv)
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .env("KNSQ_ROOT", &launch.root)
        .env("KNSQ_HOSTS", &launch.hosts)
        .env("KNSQ_RESOLV", &launch.resolv)
        .env("KNSQ_HOSTNAME", &launch.hostname)
        .env("KNSQ_FILES", files)
        .env("KNSQ_MOUNTS", mounts)
        .env(
            "KNSQ_READ_ONLY",
            if launch.read_only_root { "1" } else { "0" },
        )
        .env("KNSQ_USERSPEC", userspec(launch.user, &launch.groups))
        .env("KNSQ_WORKDIR", &launch.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    command.spawn().context("starting nsenter")
}

/// Send `signal` to a container's process; one that is gone already is fine.
pub fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, signal);
    }
}

/// Run `argv` inside a running container (its namespaces, root, working directory, user and
/// environment), as `exec` probes and `preStop` hooks do; whether it exited 0 within `timeout`.
pub async fn exec(
    pid: u32,
    user: Option<(i64, i64)>,
    env: &[(String, String)],
    argv: &[String],
    timeout: Duration,
) -> Result<bool> {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--target={pid}"))
        .args(["--net", "--mount", "--uts", "--root", "--wd"]);
    if let Some((uid, gid)) = user {
        command
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={gid}"));
    }
    command
        .args(["--", "/usr/bin/env", "-i"])
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().context("starting nsenter")?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Ok(status?.success()),
        Err(_) => Ok(false),
    }
}

/// The resolver configuration a stand-in's pods share, under `dir`.
pub fn resolver_file(dir: &Path) -> Result<PathBuf> {
    let resolv = dir.join("resolv.conf");
    // Nothing answers on the loopback: a name missing from the hosts file fails at once.
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )?;
    Ok(resolv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_groups() {
        assert_eq!(userspec(None, &[1]), "");
        assert_eq!(
            userspec(Some((65532, 65532)), &[65532]),
            "--userspec=65532:65532 --groups=65532"
        );
        assert_eq!(
            userspec(Some((1000, 1000)), &[2000]),
            "--userspec=1000:1000 --groups=1000,2000"
        );
    }

    #[test]
    fn the_pods_variables_come_last_and_win() {
        let launch = Launch {
            netns: String::new(),
            root: PathBuf::new(),
            hostname: "b-0".to_owned(),
            hosts: PathBuf::new(),
            resolv: PathBuf::new(),
            image: Image {
                files: Vec::new(),
                entrypoint: Vec::new(),
                command: Vec::new(),
                user: None,
            },
            mounts: Vec::new(),
            env: vec![
                ("PATH".to_owned(), "/opt".to_owned()),
                ("A".to_owned(), "x=y".to_owned()),
            ],
            argv: Vec::new(),
            workdir: "/".to_owned(),
            user: None,
            groups: Vec::new(),
            read_only_root: true,
            log: PathBuf::new(),
        };
        assert_eq!(environment(&launch), ["HOSTNAME=b-0", "PATH=/opt", "A=x=y"]);
    }
}
