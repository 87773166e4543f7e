//! Command-line flags of `knsq-bench`, named after nsq's `bench_writer` and `bench_reader`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Load generator for NSQ-compatible brokers: publishes (`writer`), consumes (`reader`) or
/// both at once (`both`, which measures true end-to-end latency), then prints throughput and
/// latency percentiles. MB/s counts message bodies in 10^6 bytes.
#[derive(Debug, Parser)]
#[command(name = "knsq-bench", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Writer,
    Reader,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Writer => "writer",
            Side::Reader => "reader",
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Mode {
    /// Publish with PUB (--batch-size 1) or MPUB; latency is the publish round trip per batch.
    Writer(Opts),
    /// Subscribe, keep RDY at --rdy and FIN every message; latency is end to end, from the
    /// message's publish timestamp to its receipt.
    Reader(Opts),
    /// Run writers and readers at once on the same topic.
    Both(Opts),
    /// Serve as the round-trip floor: a do-nothing NSQ server that answers every publish with
    /// `OK` and keeps nothing, to time publishers against (runs until killed).
    Floor(FloorOpts),
}

#[derive(Debug, Clone, Args)]
pub(crate) struct FloorOpts {
    /// Address to listen on (port 0 picks one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:4150")]
    pub(crate) address: String,
}

impl Mode {
    /// The load options; `None` for the floor server.
    pub(crate) fn opts(&self) -> Option<&Opts> {
        match self {
            Mode::Writer(o) | Mode::Reader(o) | Mode::Both(o) => Some(o),
            Mode::Floor(_) => None,
        }
    }

    /// The sides this mode runs, readers first so they subscribe before anything is published.
    pub(crate) fn sides(&self) -> &'static [Side] {
        match self {
            Mode::Writer(_) => &[Side::Writer],
            Mode::Reader(_) => &[Side::Reader],
            Mode::Both(_) => &[Side::Reader, Side::Writer],
            Mode::Floor(_) => &[],
        }
    }
}

impl Opts {
    /// Connections of `side`.
    pub(crate) fn connections_of(&self, side: Side) -> u32 {
        match side {
            Side::Writer => self.writers.unwrap_or(self.connections),
            Side::Reader => self.connections,
        }
    }

    /// The name of topic `i` of `--topics`.
    pub(crate) fn topic_name(&self, i: u32) -> String {
        numbered(&self.topic, self.topics, i)
    }

    /// The name of channel `i` of `--channels`.
    pub(crate) fn channel_name(&self, i: u32) -> String {
        numbered(&self.channel, self.channels, i)
    }
}

/// `base` alone when there is one, else `base` and the index.
fn numbered(base: &str, count: u32, i: u32) -> String {
    if count == 1 {
        base.to_string()
    } else {
        format!("{base}{i}")
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct Opts {
    /// Broker TCP address.
    #[arg(long, default_value = "127.0.0.1:4150", env = "KNSQ_BENCH_ADDRESS")]
    pub(crate) address: String,
    /// Topic to publish to and subscribe on.
    #[arg(long, default_value = "bench")]
    pub(crate) topic: String,
    /// Channel the readers subscribe to.
    #[arg(long, default_value = "ch")]
    pub(crate) channel: String,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) size: u32,
    /// Messages per MPUB; 1 publishes one PUB at a time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) batch_size: u32,
    /// How long to run (`10s`, `1m30s`, `500ms`; `0` = until --count or Ctrl-C).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) runfor: Duration,
    /// RDY count each reader connection keeps (capped by the broker's max_rdy_count).
    #[arg(long, default_value_t = 2500)]
    pub(crate) rdy: u64,
    /// Concurrent connections per side.
    #[arg(short = 'c', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) connections: u32,
    /// Writer connections, when they should differ from -c (e.g. `both` with one publisher
    /// and many consumers).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) writers: Option<u32>,
    /// Spread over this many topics (`<topic>0`, `<topic>1`, …): each writer sends its batches
    /// to them in turn, and reader connections subscribe to them in turn.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) topics: u32,
    /// Spread reader connections over this many channels of each topic (`<channel>0`, …):
    /// with `-c` = topics × channels every channel gets one consumer (fan-out).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) channels: u32,
    /// Stop each side after this many messages (across its connections).
    #[arg(long)]
    pub(crate) count: Option<u64>,
    /// Batches a writer connection may have sent but not yet seen acknowledged (1 waits for
    /// each OK before the next batch, as bench_writer does).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) pipeline: u32,
    /// Publish at most this many messages per second in total (for latency at a fixed load).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) rate: Option<u64>,
    /// IDENTIFY output_buffer_size for readers (bytes; -1 disables buffering).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) output_buffer_size: Option<i64>,
    /// IDENTIFY output_buffer_timeout for readers (milliseconds; -1 disables timed flushes).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) output_buffer_timeout: Option<i64>,
    /// Upgrade every connection to TLS (IDENTIFY tls_v1); needs --tls-root-ca-file or
    /// --tls-skip-verify.
    #[arg(long)]
    pub(crate) tls: bool,
    /// PEM file of the CA(s) that signed the broker's certificate, which must name the host
    /// of --address.
    #[arg(long, requires = "tls")]
    pub(crate) tls_root_ca_file: Option<PathBuf>,
    /// Accept any broker certificate.
    #[arg(long, requires = "tls", conflicts_with = "tls_root_ca_file")]
    pub(crate) tls_skip_verify: bool,
    /// Compress every connection with snappy (IDENTIFY snappy).
    #[arg(long, conflicts_with = "deflate")]
    pub(crate) snappy: bool,
    /// Compress every connection with deflate (IDENTIFY deflate).
    #[arg(long)]
    pub(crate) deflate: bool,
    /// IDENTIFY deflate_level (1-9; the broker caps it at its --max-deflate-level).
    #[arg(long, requires = "deflate", value_parser = clap::value_parser!(u32).range(1..=9))]
    pub(crate) deflate_level: Option<u32>,
    /// Runtime worker threads (default: one per connection, at most one per core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Print one JSON line per side instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Parses a duration the way Go's `time.ParseDuration` does (`1h2m3.5s`, `250ms`, `10us`,
/// `10µs`, `5ns`); a bare number is seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<f64>() {
        return secs_to_duration(secs, text);
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {text:?} is missing a unit"))?;
        if num_len == 0 {
            return Err(format!("duration {text:?}: expected a number at {rest:?}"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("duration {text:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => return Err(format!("duration {text:?}: unknown unit {unit:?}")),
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    secs_to_duration(total, text)
}

fn secs_to_duration(secs: f64, text: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("knsq-bench").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_nsq_bench_tools() {
        let cli = parse(&["writer"]).unwrap();
        let Mode::Writer(o) = &cli.mode else {
            panic!("not writer: {cli:?}")
        };
        assert_eq!(o.address, "127.0.0.1:4150");
        assert_eq!(o.topic, "bench");
        assert_eq!(o.channel, "ch");
        assert_eq!(o.size, 200);
        assert_eq!(o.batch_size, 200);
        assert_eq!(o.runfor, Duration::from_secs(10));
        assert_eq!(o.rdy, 2500);
        assert_eq!(o.connections, 1);
        assert_eq!(o.pipeline, 1);
        assert_eq!(o.count, None);
        assert_eq!(o.rate, None);
        assert!(!o.tls && !o.tls_skip_verify && !o.snappy && !o.deflate);
        assert_eq!(o.tls_root_ca_file, None);
        assert_eq!(o.deflate_level, None);
        assert!(!o.json);
        assert_eq!(cli.mode.sides(), &[Side::Writer]);
    }

    #[test]
    fn every_flag_parses() {
        let cli = parse(&[
            "both",
            "--address",
            "10.0.0.1:4150",
            "--topic",
            "t#ephemeral",
            "--channel",
            "c",
            "--size",
            "1000",
            "--batch-size",
            "1",
            "--runfor",
            "1m30s",
            "--rdy",
            "100",
            "-c",
            "4",
            "--count",
            "5000",
            "--pipeline",
            "2",
            "--rate",
            "50000",
            "--output-buffer-size",
            "-1",
            "--output-buffer-timeout",
            "25",
            "--threads",
            "3",
            "--json",
        ])
        .unwrap();
        let o = cli.mode.opts().unwrap();
        assert_eq!(o.address, "10.0.0.1:4150");
        assert_eq!(o.topic, "t#ephemeral");
        assert_eq!(o.size, 1000);
        assert_eq!(o.batch_size, 1);
        assert_eq!(o.runfor, Duration::from_secs(90));
        assert_eq!(o.rdy, 100);
        assert_eq!(o.connections, 4);
        assert_eq!(o.count, Some(5000));
        assert_eq!(o.pipeline, 2);
        assert_eq!(o.rate, Some(50000));
        assert_eq!(o.output_buffer_size, Some(-1));
        assert_eq!(o.output_buffer_timeout, Some(25));
        assert_eq!(o.threads, Some(3));
        assert!(o.json);
        assert_eq!(cli.mode.sides(), &[Side::Reader, Side::Writer]);
        assert!(matches!(parse(&["reader"]).unwrap().mode, Mode::Reader(_)));
    }

    #[test]
    fn spread_flags_name_topics_and_channels() {
        let cli = parse(&["both", "-c", "6", "--writers", "2", "--topics", "3"]).unwrap();
        let o = cli.mode.opts().unwrap();
        assert_eq!(o.connections_of(Side::Writer), 2);
        assert_eq!(o.connections_of(Side::Reader), 6);
        assert_eq!(o.topic_name(2), "bench2");
        assert_eq!(o.channel_name(0), "ch");
        let one = parse(&["reader", "--channels", "10"]).unwrap();
        let o = one.mode.opts().unwrap();
        assert_eq!(
            (o.topic_name(0), o.channel_name(9)),
            ("bench".into(), "ch9".into())
        );
        assert_eq!(o.connections_of(Side::Writer), 1);
        assert!(matches!(
            parse(&["floor", "--address", "127.0.0.1:0"]).unwrap().mode,
            Mode::Floor(_)
        ));
    }

    #[test]
    fn wire_flags_parse() {
        let cli = parse(&[
            "reader",
            "--tls",
            "--tls-root-ca-file",
            "/ca.pem",
            "--snappy",
        ])
        .unwrap();
        let o = cli.mode.opts().unwrap();
        assert!(o.tls && o.snappy && !o.deflate && !o.tls_skip_verify);
        assert_eq!(o.tls_root_ca_file, Some(PathBuf::from("/ca.pem")));
        let cli = parse(&[
            "writer",
            "--tls",
            "--tls-skip-verify",
            "--deflate",
            "--deflate-level",
            "9",
        ])
        .unwrap();
        let o = cli.mode.opts().unwrap();
        assert!(o.tls && o.tls_skip_verify && o.deflate && !o.snappy);
        assert_eq!(o.deflate_level, Some(9));
        assert!(
            parse(&["both", "--deflate"])
                .unwrap()
                .mode
                .opts()
                .unwrap()
                .deflate
        );
    }

    #[test]
    fn inconsistent_wire_flags_are_rejected() {
        for bad in [
            &["writer", "--snappy", "--deflate"][..],
            &["writer", "--tls-root-ca-file", "/ca.pem"],
            &["writer", "--tls-skip-verify"],
            &[
                "writer",
                "--tls",
                "--tls-skip-verify",
                "--tls-root-ca-file",
                "/ca.pem",
            ],
            &["writer", "--deflate-level", "6"],
            &["writer", "--deflate", "--deflate-level", "0"],
            &["writer", "--deflate", "--deflate-level", "10"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn bad_flags_are_rejected() {
        for bad in [
            &["writer", "--size", "0"][..],
            &["writer", "--batch-size", "0"],
            &["writer", "-c", "0"],
            &["writer", "--runfor", "ten"],
            &["writer", "--rdy", "-1"],
            &["writer", "--bogus"],
            &["sideways"],
            &[],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn durations_parse_like_go() {
        let ok = [
            ("10s", Duration::from_secs(10)),
            ("10", Duration::from_secs(10)),
            ("0", Duration::ZERO),
            ("1.5s", Duration::from_millis(1500)),
            ("250ms", Duration::from_millis(250)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("2h1m1s", Duration::from_secs(7261)),
            ("100us", Duration::from_micros(100)),
            ("100µs", Duration::from_micros(100)),
            ("7ns", Duration::from_nanos(7)),
        ];
        for (text, want) in ok {
            let got = parse_duration(text).unwrap();
            let diff = got.abs_diff(want);
            assert!(diff <= Duration::from_nanos(1), "{text}: {got:?}");
        }
        for bad in ["", "s", "10x", "-1s", "1.2.3s", "10s5", "ms10", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}
