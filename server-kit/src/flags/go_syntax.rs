//! Go's `flag` package syntax, turned into the GNU syntax clap parses. Existing nsqd command
//! lines use `-data-path=/data`, `-mem-queue-size 100` and bare booleans; all keep working.

use super::config_file::{FileOrigins, drop_unset, file_arguments};
use clap::ArgMatches;
use std::path::PathBuf;

/// Rewrites single-dash long flags (`-data-path`) to double-dash ones. Boolean flags take
/// their value only after `=`, as in Go (`--snappy=false`).
pub fn normalize_go_flags(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut only_positional = false;
    for (i, arg) in args.enumerate() {
        if i == 0 || only_positional {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            only_positional = true;
            out.push(arg);
            continue;
        }
        let is_single_dash_long = arg.starts_with('-')
            && !arg.starts_with("--")
            && arg.len() > 2
            && arg.as_bytes()[1].is_ascii_alphabetic();
        if is_single_dash_long {
            out.push(format!("-{arg}"));
        } else {
            out.push(arg);
        }
    }
    out
}

/// Parses a command line in Go's flag syntax (or GNU's) into the options `P`, with the TOML
/// file its `--config` names, if `P` has that flag (see [`super::config_file`]; `renames`
/// maps file keys that are not a flag's name with underscores to their flag). Also returns
/// what clap matched, which says where each value came from, and which flags the file set.
pub fn parse_go_command_line<P, T>(
    args: impl IntoIterator<Item = T>,
    renames: &[(&str, &str)],
) -> Result<(P, ArgMatches, FileOrigins), clap::Error>
where
    P: clap::Parser,
    T: Into<String>,
{
    let mut cmd = P::command();
    let mut args = drop_unset(&cmd, normalize_go_flags(args.into_iter().map(Into::into)));
    let mut matches = cmd.clone().try_get_matches_from(&args)?;
    let mut origins = FileOrigins::default();
    if let Ok(Some(path)) = matches.try_get_one::<PathBuf>("config") {
        let (from_file, file_origins) =
            file_arguments(&cmd, &matches, path, renames).map_err(|e| e.into_clap(&mut cmd))?;
        origins = file_origins;
        // The file's arguments first: none of them repeats a flag the command line gives.
        let rest = args.split_off(1.min(args.len()));
        args.extend(drop_unset(&cmd, from_file));
        args.extend(rest);
        matches = cmd.clone().try_get_matches_from(&args)?;
    }
    let options = P::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    Ok((options, matches, origins))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_go_flags(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn single_dash_long_flags_get_two_dashes() {
        assert_eq!(
            norm(&[
                "bin",
                "-data-path=/d",
                "-tcp-address",
                "1:2",
                "--x",
                "-1",
                "-h"
            ]),
            [
                "bin",
                "--data-path=/d",
                "--tcp-address",
                "1:2",
                "--x",
                "-1",
                "-h"
            ]
        );
    }

    #[test]
    fn arguments_after_double_dash_are_untouched() {
        assert_eq!(norm(&["bin", "--", "-abc"]), ["bin", "--", "-abc"]);
    }
}
