//! Go's `flag` package syntax, turned into the GNU syntax clap parses. Existing nsqd command
//! lines use `-data-path=/data`, `-mem-queue-size 100` and bare booleans; all keep working.

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

/// Parses a command line in Go's flag syntax (or GNU's) into the options `P`.
pub fn parse_go_command_line<P, T>(args: impl IntoIterator<Item = T>) -> Result<P, clap::Error>
where
    P: clap::Parser,
    T: Into<String>,
{
    P::try_parse_from(normalize_go_flags(args.into_iter().map(Into::into)))
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
