//! `knsq-bench`: connects every connection first, then runs the writers and/or readers
//! together until `--runfor` passes, `--count` messages are done or Ctrl-C, and reports.

pub(crate) mod args;
pub(crate) mod conn;
pub(crate) mod floor;
pub(crate) mod reader;
pub(crate) mod stats;
pub(crate) mod writer;

#[cfg(test)]
mod fake;

use anyhow::{Context, Result, anyhow, bail};
use args::{Mode, Side};
use conn::{Conn, IdentifyOpts, TlsSetup};
use proto::wire::command::Name;
use stats::{Histogram, Report};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long writers wait for acknowledgements of batches already sent once told to stop.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// The `--count` limit of one side, shared by its connections.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: Option<u64>,
    used: AtomicU64,
}

impl Budget {
    pub(crate) fn new(limit: Option<u64>) -> Self {
        Budget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Claims up to `n` messages to publish; how many were granted (0 when none are left).
    pub(crate) fn take(&self, n: u64) -> u64 {
        let Some(limit) = self.limit else {
            return n;
        };
        let prev = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < limit).then(|| used.saturating_add(n).min(limit))
            });
        match prev {
            Ok(used) => n.min(limit - used),
            Err(_) => 0,
        }
    }

    /// Counts `n` messages consumed; true once the limit is reached.
    pub(crate) fn consume(&self, n: u64) -> bool {
        let used = self.used.fetch_add(n, Ordering::Relaxed) + n;
        self.limit.is_some_and(|limit| used >= limit)
    }
}

/// What one connection did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) msgs: u64,
    /// When its last message (or batch) completed.
    pub(crate) last: Option<Instant>,
    pub(crate) latency: Histogram,
    /// Why the connection ended early, if it did.
    pub(crate) error: Option<anyhow::Error>,
}

fn name(kind: &str, text: &str) -> Result<Name> {
    Name::new(text).ok_or_else(|| anyhow!("{kind} name {text:?} is not a valid NSQ name"))
}

/// Runs `mode` to completion. Cancelling `root` (Ctrl-C) stops every side early; the
/// numbers so far are still reported.
pub(crate) async fn run(mode: &Mode, root: CancellationToken) -> Result<Vec<Report>> {
    let Some(o) = mode.opts() else {
        bail!("the floor server is not a load run");
    };
    let topics = (0..o.topics)
        .map(|i| name("topic", &o.topic_name(i)))
        .collect::<Result<Vec<_>>>()?;
    let channels = (0..o.channels)
        .map(|i| name("channel", &o.channel_name(i)))
        .collect::<Result<Vec<_>>>()?;
    let identify = IdentifyOpts {
        output_buffer_size: o.output_buffer_size,
        output_buffer_timeout: o.output_buffer_timeout,
        tls_v1: o.tls,
        snappy: o.snappy,
        deflate: o.deflate,
        deflate_level: o.deflate_level,
    };
    let tls = match (o.tls, &o.tls_root_ca_file, o.tls_skip_verify) {
        (false, _, _) => None,
        (true, None, false) => bail!("--tls needs --tls-root-ca-file or --tls-skip-verify"),
        (true, ca, _) => Some(TlsSetup::new(&o.address, ca.as_deref())?),
    };

    // Connect everything before the clock starts; readers subscribe before anything is sent.
    let mut conns: Vec<(Side, Conn)> = Vec::new();
    for &side in mode.sides() {
        for i in 0..o.connections_of(side) {
            let (mut conn, negotiated) = Conn::open(&o.address, &identify, tls.as_ref())
                .await
                .with_context(|| format!("{} connection {i}", side.as_str()))?;
            if side == Side::Reader {
                let rdy = o.rdy.min(negotiated.max_rdy_count.unwrap_or(u64::MAX));
                // Reader i: topic i mod T, then the next channel of it each time round.
                let topic = &topics[i as usize % topics.len()];
                let channel = &channels[(i as usize / topics.len()) % channels.len()];
                reader::subscribe(&mut conn, topic, channel, rdy).await?;
            }
            conns.push((side, conn));
        }
    }

    let start = Instant::now();
    if !o.runfor.is_zero() {
        let root = root.clone();
        let runfor = o.runfor;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(runfor) => root.cancel(),
                _ = root.cancelled() => {}
            }
        });
    }
    let plan = Arc::new(writer::WriterPlan::new(
        topics,
        o.size,
        o.batch_size,
        o.pipeline,
        o.rate,
        o.connections_of(Side::Writer),
    ));
    // Every connection of every side in one set, so a failure anywhere is seen at once.
    let mut tasks = JoinSet::new();
    for &side in mode.sides() {
        let stop = root.child_token();
        // Every message reaches each channel of its topic: readers share count × channels.
        let limit = match side {
            Side::Writer => o.count,
            Side::Reader => o.count.map(|n| n.saturating_mul(u64::from(o.channels))),
        };
        let budget = Arc::new(Budget::new(limit));
        let abort = CancellationToken::new();
        if side == Side::Writer {
            let (stop, abort, root) = (stop.clone(), abort.clone(), root.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {
                        tokio::time::sleep(DRAIN_GRACE).await;
                        abort.cancel();
                    }
                    // The run is over (all tasks joined) before stop was cancelled.
                    _ = root.cancelled() => {}
                }
            });
        }
        let side_conns = conns.extract_if(.., |(s, _)| *s == side);
        for (i, (_, conn)) in side_conns.enumerate() {
            let (budget, stop) = (budget.clone(), stop.clone());
            match side {
                Side::Writer => {
                    let (plan, abort) = (plan.clone(), abort.clone());
                    tasks.spawn(async move {
                        (side, writer::run(conn, plan, i, budget, stop, abort).await)
                    })
                }
                Side::Reader => {
                    tasks.spawn(async move { (side, reader::run(conn, budget, stop).await) })
                }
            };
        }
    }

    let mut reports: Vec<Report> = mode
        .sides()
        .iter()
        .map(|&side| Report {
            side: side.as_str(),
            msgs: 0,
            elapsed: Duration::ZERO,
            size: o.size,
            batch_size: o.batch_size,
            connections: o.connections_of(side),
            latency_kind: match side {
                Side::Writer => "batch",
                Side::Reader => "e2e",
            },
            latency: Histogram::default(),
            error: None,
        })
        .collect();
    let mut last: Vec<Option<Instant>> = vec![None; reports.len()];
    while let Some(joined) = tasks.join_next().await {
        let (side, outcome) = joined.context("a connection task panicked")?;
        let i = mode.sides().iter().position(|&s| s == side).unwrap_or(0);
        let report = &mut reports[i];
        report.msgs += outcome.msgs;
        report.latency.merge(&outcome.latency);
        last[i] = last[i].max(outcome.last);
        if let Some(e) = outcome.error {
            // A failure ends the whole run; what was done so far is still reported.
            root.cancel();
            report.error.get_or_insert(format!("{e:#}"));
        }
    }
    for (report, last) in reports.iter_mut().zip(last) {
        report.elapsed = last.map_or_else(|| start.elapsed(), |last| last - start);
    }
    // Let the timer tasks end.
    root.cancel();
    // Writers print first, as the natural order of the pipeline.
    reports.sort_by_key(|r| r.side != "writer");
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_without_limit_grants_everything() {
        let b = Budget::new(None);
        assert_eq!(b.take(200), 200);
        assert!(!b.consume(1_000_000));
    }

    #[test]
    fn budget_grants_up_to_the_limit() {
        let b = Budget::new(Some(450));
        assert_eq!(b.take(200), 200);
        assert_eq!(b.take(200), 200);
        assert_eq!(b.take(200), 50);
        assert_eq!(b.take(200), 0);
        let c = Budget::new(Some(10));
        assert!(!c.consume(9));
        assert!(c.consume(1));
        assert!(c.consume(5));
    }

    use super::args::Cli;
    use clap::Parser;
    use std::sync::atomic::Ordering::Relaxed;

    fn mode(args: &[&str]) -> Mode {
        Cli::try_parse_from(std::iter::once("knsq-bench").chain(args.iter().copied()))
            .unwrap()
            .mode
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    // On a current-thread runtime, as the tool runs with one connection.
    #[tokio::test]
    async fn writer_publishes_exactly_count_with_mpub() {
        let (addr, seen) = fake::start(0).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "writer",
            "--address",
            &addr,
            "--batch-size",
            "100",
            "--count",
            "250",
        ]);
        let reports = run(&m, CancellationToken::new()).await.unwrap();
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!((r.side, r.msgs), ("writer", 250));
        assert_eq!(r.latency.count(), 3, "one latency sample per batch");
        assert!(r.elapsed < Duration::from_secs(5));
        assert_eq!(seen.published.load(Relaxed), 250);
        assert_eq!(seen.mpub_commands.load(Relaxed), 3);
        assert_eq!(seen.pub_commands.load(Relaxed), 0);
        assert_eq!(seen.identifies.load(Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writer_with_batch_one_uses_pub_on_every_connection() {
        let (addr, seen) = fake::start(0).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "writer",
            "--address",
            &addr,
            "--batch-size",
            "1",
            "--count",
            "50",
            "-c",
            "3",
        ]);
        let reports = run(&m, CancellationToken::new()).await.unwrap();
        assert_eq!(reports[0].msgs, 50);
        assert_eq!(reports[0].latency.count(), 50);
        assert_eq!(seen.pub_commands.load(Relaxed), 50);
        assert_eq!(seen.mpub_commands.load(Relaxed), 0);
        assert_eq!(seen.identifies.load(Relaxed), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timed_pipelined_writer_counts_only_acknowledged_batches() {
        let (addr, seen) = fake::start(0).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "writer",
            "--address",
            &addr,
            "--batch-size",
            "10",
            "--size",
            "50",
            "--pipeline",
            "4",
            "--runfor",
            "300ms",
        ]);
        let reports = run(&m, CancellationToken::new()).await.unwrap();
        let r = &reports[0];
        assert!(r.msgs > 0);
        assert_eq!(r.msgs % 10, 0);
        assert_eq!(r.msgs, seen.published.load(Relaxed));
        assert!(r.elapsed <= Duration::from_millis(2000), "{:?}", r.elapsed);
        assert!(r.text().starts_with("writer: "));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rate_limit_paces_the_writer() {
        let (addr, seen) = fake::start(0).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "writer",
            "--address",
            &addr,
            "--batch-size",
            "10",
            "--rate",
            "1000",
            "--runfor",
            "500ms",
        ]);
        let reports = run(&m, CancellationToken::new()).await.unwrap();
        let published = seen.published.load(Relaxed);
        // 1000 msgs/s for half a second: about 500, never thousands.
        assert!((300..=700).contains(&published), "{published}");
        assert_eq!(reports[0].msgs, published);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reader_fins_every_message_and_answers_heartbeats() {
        let (addr, seen) = fake::start(1000).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "reader",
            "--address",
            &addr,
            "--rdy",
            "100",
            "--count",
            "1000",
        ]);
        let reports = run(&m, CancellationToken::new()).await.unwrap();
        let r = &reports[0];
        assert_eq!((r.side, r.msgs), ("reader", 1000));
        assert_eq!(r.latency.count(), 1000);
        // The fake stamps messages a millisecond before sending them.
        assert!(r.latency.percentile(50.0) >= 990_000, "{}", r.text());
        eventually("1000 FINs", || seen.fins.load(Relaxed) == 1000).await;
        eventually("a NOP", || seen.nops.load(Relaxed) == 1).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reader_reports_time_to_last_message() {
        let (addr, seen) = fake::start(30).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&["reader", "--address", &addr, "-c", "2", "--runfor", "500ms"]);
        let reports = run(&m, CancellationToken::new()).await.unwrap();
        assert_eq!(reports[0].msgs, 30);
        assert!(reports[0].elapsed < Duration::from_millis(400));
        eventually("30 FINs", || seen.fins.load(Relaxed) == 30).await;
    }

    // On a current-thread runtime, as the tool runs with one connection.
    #[tokio::test]
    async fn both_runs_writers_and_readers_and_prints_json() {
        let (addr, seen) = fake::start(500).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "both",
            "--address",
            &addr,
            "--count",
            "500",
            "-c",
            "2",
            "--json",
        ]);
        let reports = run(&m, CancellationToken::new()).await.unwrap();
        let sides: Vec<_> = reports.iter().map(|r| (r.side, r.msgs)).collect();
        assert_eq!(sides, [("writer", 500), ("reader", 500)]);
        assert_eq!(seen.published.load(Relaxed), 500);
        assert!(
            reports[1]
                .json()
                .starts_with("{\"side\":\"reader\",\"msgs\":500,")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelling_stops_an_unbounded_run() {
        let (addr, _seen) = fake::start(0).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "writer",
            "--address",
            &addr,
            "--runfor",
            "0",
            "--batch-size",
            "5",
        ]);
        let root = CancellationToken::new();
        let cancel = root.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let reports = tokio::time::timeout(Duration::from_secs(10), run(&m, root))
            .await
            .expect("run ignored cancellation")
            .unwrap();
        assert!(reports[0].msgs > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_errors_end_the_run_but_keep_the_report() {
        let (addr, _seen) = fake::start(5).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&[
            "both",
            "--address",
            &addr,
            "--topic",
            "fail",
            "--runfor",
            "5s",
        ]);
        let reports =
            tokio::time::timeout(Duration::from_secs(3), run(&m, CancellationToken::new()))
                .await
                .expect("a failed writer did not end the run")
                .unwrap();
        let w = &reports[0];
        assert_eq!((w.side, w.msgs), ("writer", 0));
        let err = w.error.as_deref().unwrap();
        assert!(err.contains("E_MPUB_FAILED MPUB failed: test"), "{err}");
        assert!(w.text().contains("; error: "));
        assert_eq!(reports[1].msgs, 5);
        assert_eq!(reports[1].error, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn setup_errors_are_reported() {
        let m = mode(&["writer", "--address", "127.0.0.1:1", "--runfor", "1s"]);
        let err = run(&m, CancellationToken::new()).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("connecting to 127.0.0.1:1"),
            "{err:#}"
        );
        let (addr, _seen) = fake::start(0).await.unwrap();
        let addr = addr.to_string();
        let m = mode(&["reader", "--address", &addr, "--topic", "bad topic"]);
        let err = run(&m, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("not a valid NSQ name"), "{err}");
    }

    /// A fake that agrees to TLS with a certificate from a fresh CA, and that CA's file.
    fn tls_features() -> (fake::Features, ::tests::certs::TestCa) {
        let ca = ::tests::certs::TestCa::new().unwrap();
        let (certs, key) = ca.server("fake").unwrap().load().unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let features = fake::Features {
            tls: Some(Arc::new(config)),
            ..fake::Features::default()
        };
        (features, ca)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_wire_upgrades_writers_and_readers() {
        let (features, ca) = tls_features();
        let ca_file = ca.ca_file().to_str().unwrap().to_string();
        let wires: [&[&str]; 6] = [
            &["--snappy"],
            &["--deflate"],
            &["--deflate", "--deflate-level", "1"],
            &["--tls", "--tls-root-ca-file", &ca_file],
            &["--tls", "--tls-root-ca-file", &ca_file, "--snappy"],
            &["--tls", "--tls-skip-verify", "--deflate"],
        ];
        for wire in wires {
            let (addr, seen) = fake::start_with(300, features.clone()).await.unwrap();
            let addr = addr.to_string();
            let mut args = vec!["both", "--address", &addr, "--count", "300"];
            args.extend_from_slice(&["--batch-size", "7", "--size", "5000"]);
            args.extend_from_slice(wire);
            let reports = run(&mode(&args), CancellationToken::new()).await.unwrap();
            let sides: Vec<_> = reports
                .iter()
                .map(|r| (r.side, r.msgs, r.error.clone()))
                .collect();
            assert_eq!(
                sides,
                [("writer", 300, None), ("reader", 300, None)],
                "{wire:?}"
            );
            assert_eq!(seen.published.load(Relaxed), 300, "{wire:?}");
            eventually("300 FINs", || seen.fins.load(Relaxed) == 300).await;
            let has = |flag: &str| wire.contains(&flag);
            let upgraded = |n: &AtomicU64, on: bool| n.load(Relaxed) == if on { 2 } else { 0 };
            assert!(upgraded(&seen.tls, has("--tls")), "{wire:?}");
            assert!(upgraded(&seen.snappy, has("--snappy")), "{wire:?}");
            assert!(upgraded(&seen.deflate, has("--deflate")), "{wire:?}");
        }
    }

    #[tokio::test]
    async fn refused_upgrades_are_setup_errors() {
        let refusing = fake::Features {
            refuse_compression: true,
            ..fake::Features::default()
        };
        let (addr, _seen) = fake::start_with(0, refusing).await.unwrap();
        let addr = addr.to_string();
        for (flag, want) in [
            ("--snappy", "server refused snappy"),
            ("--deflate", "server refused deflate"),
        ] {
            let err = run(
                &mode(&["writer", "--address", &addr, flag]),
                CancellationToken::new(),
            )
            .await
            .unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
        let tls = ["writer", "--address", &addr, "--tls", "--tls-skip-verify"];
        let err = run(&mode(&tls), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("server refused TLS"), "{err:#}");
        let unverified = ["writer", "--address", &addr, "--tls"];
        let err = run(&mode(&unverified), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("--tls-root-ca-file or --tls-skip-verify"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_untrusted_broker_certificate_fails_the_handshake() {
        let (features, _ca) = tls_features();
        let other = ::tests::certs::TestCa::new().unwrap();
        let (addr, _seen) = fake::start_with(0, features).await.unwrap();
        let addr = addr.to_string();
        let ca_file = other.ca_file().to_str().unwrap();
        let args = [
            "writer",
            "--address",
            &addr,
            "--tls",
            "--tls-root-ca-file",
            ca_file,
        ];
        let err = run(&mode(&args), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
    }
}
