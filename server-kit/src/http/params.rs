//! Query strings parsed as Go's `url.ParseQuery` does, so malformed ones get nsqd's
//! `INVALID_REQUEST` rather than being silently repaired.

use super::error::ApiError;
use proto::wire::names::{is_valid_channel_name, is_valid_topic_name};

#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(query: Option<&str>) -> Result<Params, ApiError> {
        let invalid = || ApiError::bad_request("INVALID_REQUEST");
        let mut pairs = Vec::new();
        for part in query.unwrap_or("").split('&') {
            if part.is_empty() {
                continue;
            }
            if part.contains(';') {
                return Err(invalid());
            }
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((
                unescape(key).ok_or_else(invalid)?,
                unescape(value).ok_or_else(invalid)?,
            ));
        }
        Ok(Params(pairs))
    }

    /// `topic` and `channel`, both present and valid, checked in nsqd's order
    /// (`http_api.GetTopicChannelArgs`, shared by nsqd and nsqlookupd).
    pub fn topic_and_channel(&self) -> Result<(&str, &str), ApiError> {
        let topic = self
            .get("topic")
            .ok_or(ApiError::bad_request("MISSING_ARG_TOPIC"))?;
        if !is_valid_topic_name(topic.as_bytes()) {
            return Err(ApiError::bad_request("INVALID_ARG_TOPIC"));
        }
        let channel = self
            .get("channel")
            .ok_or(ApiError::bad_request("MISSING_ARG_CHANNEL"))?;
        if !is_valid_channel_name(channel.as_bytes()) {
            return Err(ApiError::bad_request("INVALID_ARG_CHANNEL"));
        }
        Ok((topic, channel))
    }

    /// The first value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn unescape(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_go() {
        let p = Params::parse(Some("topic=a%2Eb&topic=second&flag&x=a+b")).unwrap();
        assert_eq!(p.get("topic"), Some("a.b"));
        assert_eq!(p.get("flag"), Some(""));
        assert_eq!(p.get("x"), Some("a b"));
        assert_eq!(p.get("nope"), None);
        assert!(Params::parse(None).unwrap().get("topic").is_none());
    }

    #[test]
    fn topic_and_channel_are_checked_in_nsqds_order() {
        for (query, want) in [
            ("channel=c", "MISSING_ARG_TOPIC"),
            ("topic=a$b", "INVALID_ARG_TOPIC"),
            ("topic=t", "MISSING_ARG_CHANNEL"),
            ("topic=t&channel=", "INVALID_ARG_CHANNEL"),
        ] {
            let params = Params::parse(Some(query)).unwrap();
            assert_eq!(
                params.topic_and_channel().unwrap_err().message,
                want,
                "{query}"
            );
        }
        let params = Params::parse(Some("topic=t&channel=c%23ephemeral")).unwrap();
        assert_eq!(params.topic_and_channel(), Ok(("t", "c#ephemeral")));
    }

    #[test]
    fn malformed_queries_are_invalid_requests() {
        for bad in ["topic=%zz", "topic=%4", "a=1;b=2"] {
            assert_eq!(
                Params::parse(Some(bad)).unwrap_err().message,
                "INVALID_REQUEST",
                "{bad}"
            );
        }
    }
}
