//! Quoting of untrusted names in error texts the way Go's `%q` does, so error frames read
//! byte for byte like nsqd's (`PUB topic name "a$b" is not valid`).

/// Quotes `bytes` as Go's `strconv.Quote` would.
pub(crate) fn go_quote(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\x07' => out.push_str("\\a"),
                '\x08' => out.push_str("\\b"),
                '\x0c' => out.push_str("\\f"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\x0b' => out.push_str("\\v"),
                c if c.is_ascii_graphic() || c == ' ' => out.push(c),
                c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
                c if !c.is_control() => out.push(c),
                c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push_str(&format!("\\U{:08x}", c as u32)),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::go_quote;

    #[test]
    fn quotes_like_go() {
        assert_eq!(go_quote(b"a$b"), r#""a$b""#);
        assert_eq!(go_quote(b"a\"b\\"), r#""a\"b\\""#);
        assert_eq!(go_quote(b"\n\t\x01"), r#""\n\t\x01""#);
        assert_eq!(go_quote(b"\xff"), r#""\xff""#);
        assert_eq!(go_quote("ü".as_bytes()), "\"ü\"");
    }
}
