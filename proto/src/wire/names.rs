//! Topic and channel name rules: `^[.a-zA-Z0-9_-]+(#ephemeral)?$`, 1 to 64 bytes in all.

/// The suffix that marks a topic or channel as ephemeral (never written to disk).
pub const EPHEMERAL_SUFFIX: &str = "#ephemeral";
/// The longest valid name, suffix included.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `name` is a valid topic name.
pub fn is_valid_topic_name(name: &[u8]) -> bool {
    is_valid_name(name)
}

/// Whether `name` is a valid channel name (the same rule as topics).
pub fn is_valid_channel_name(name: &[u8]) -> bool {
    is_valid_name(name)
}

/// Whether a (valid) name carries the `#ephemeral` suffix.
pub fn is_ephemeral(name: &str) -> bool {
    name.ends_with(EPHEMERAL_SUFFIX)
}

fn is_valid_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return false;
    }
    let base = name
        .strip_suffix(EPHEMERAL_SUFFIX.as_bytes())
        .unwrap_or(name);
    !base.is_empty()
        && base
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet_and_suffix() {
        for ok in ["a", "test_topic", "A.b-c_9", "x#ephemeral", &"a".repeat(64)] {
            assert!(is_valid_topic_name(ok.as_bytes()), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        let too_long = "a".repeat(65);
        let suffix_too_long = format!("{}#ephemeral", "a".repeat(55));
        for bad in [
            "",
            "a$b",
            "a b",
            "#ephemeral",
            "a#ephemeralx",
            "a#b",
            "ü",
            too_long.as_str(),
            suffix_too_long.as_str(),
        ] {
            assert!(!is_valid_channel_name(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn ephemeral_suffix_is_detected() {
        assert!(is_ephemeral("c#ephemeral"));
        assert!(!is_ephemeral("c"));
    }
}
