//! The envelope in front of a dead letter's body: where it came from, since NSQ frames have no
//! headers. Consumers never see it: a message (and its disk record) carries a flag saying it is
//! there, and only the body after it is delivered.
//!
//! | size | field |
//! |---|---|
//! | 2 | length of the rest of the envelope (u16, big-endian) |
//! | 1 | version: 1 |
//! | 1 | why it was dead-lettered: 1 requeued, 2 timed out, 3 found over the limit |
//! | 2 | its attempts then (u16) |
//! | 8 | when (i64, ns since the Unix epoch) |
//! | 1 + n | the topic it came from (length, then the name) |
//! | 1 + n | the channel it came from |

use bytes::{BufMut, Bytes, BytesMut};
use proto::wire::names::MAX_NAME_LEN;
use serde::Serialize;

const ENVELOPE_VERSION: u8 = 1;
/// Envelope bytes before the names.
const FIXED_LEN: usize = 2 + 1 + 1 + 2 + 8;
/// The largest envelope: what a dead letter's body may add to the largest message.
pub(crate) const ENVELOPE_MAX: u64 = (FIXED_LEN + 2 * (1 + MAX_NAME_LEN)) as u64;

/// What ended a dead letter's last delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Failure {
    /// The consumer sent REQ.
    Requeued,
    /// It was in flight past its timeout.
    TimedOut,
    /// Found with attempts at the limit on its way to a consumer: its last delivery ended
    /// with a restart, or the limit was lowered.
    OverLimit,
}

impl Failure {
    fn code(self) -> u8 {
        match self {
            Failure::Requeued => 1,
            Failure::TimedOut => 2,
            Failure::OverLimit => 3,
        }
    }

    fn from_code(code: u8) -> Option<Failure> {
        [Failure::Requeued, Failure::TimedOut, Failure::OverLimit]
            .into_iter()
            .find(|f| f.code() == code)
    }
}

/// Where a dead letter came from, as its envelope records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Origin {
    pub(crate) topic: String,
    pub(crate) channel: String,
    /// Its attempts when it was dead-lettered.
    pub(crate) attempts: u16,
    #[serde(rename = "reason")]
    pub(crate) failure: Failure,
    /// When its last delivery ended (the REQ or the timeout), ns since the Unix epoch.
    pub(crate) failed_at: i64,
}

impl Origin {
    /// `body` behind this envelope.
    pub(super) fn wrap(&self, body: &[u8]) -> Bytes {
        let rest = FIXED_LEN - 2 + 2 + self.topic.len() + self.channel.len();
        let mut out = BytesMut::with_capacity(2 + rest + body.len());
        out.put_u16(rest as u16);
        out.put_u8(ENVELOPE_VERSION);
        out.put_u8(self.failure.code());
        out.put_u16(self.attempts);
        out.put_i64(self.failed_at);
        for name in [&self.topic, &self.channel] {
            out.put_u8(name.len() as u8);
            out.put_slice(name.as_bytes());
        }
        out.put_slice(body);
        out.freeze()
    }

    /// The envelope in front of `body`; `None` when it is not a valid one.
    pub(super) fn read(body: &[u8]) -> Option<Origin> {
        let end = payload_start(body);
        let envelope = body.get(2..end)?;
        let (&[version, code], rest) = envelope.split_first_chunk::<2>()?;
        if version != ENVELOPE_VERSION {
            return None;
        }
        let (attempts, rest) = rest.split_first_chunk::<2>()?;
        let (failed_at, mut rest) = rest.split_first_chunk::<8>()?;
        let topic = take_name(&mut rest)?;
        let channel = take_name(&mut rest)?;
        if !rest.is_empty() {
            return None;
        }
        Some(Origin {
            topic,
            channel,
            attempts: u16::from_be_bytes(*attempts),
            failure: Failure::from_code(code)?,
            failed_at: i64::from_be_bytes(*failed_at),
        })
    }
}

/// A name (length, then its bytes) off the front of `rest`.
fn take_name(rest: &mut &[u8]) -> Option<String> {
    let (&len, tail) = rest.split_first()?;
    let (name, tail) = tail.split_at_checked(usize::from(len))?;
    *rest = tail;
    String::from_utf8(name.to_vec()).ok()
}

/// Where the original body starts in an enveloped one.
pub(crate) fn payload_start(body: &[u8]) -> usize {
    match body {
        [hi, lo, ..] => (2 + usize::from(u16::from_be_bytes([*hi, *lo]))).min(body.len()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            topic: "orders".into(),
            channel: "billing".into(),
            attempts: 5,
            failure: Failure::TimedOut,
            failed_at: 1_700_000_000_123_456_789,
        }
    }

    #[test]
    fn envelope_bytes_are_exact_and_read_back() {
        let body = origin().wrap(b"hi");
        let mut want = vec![0, 12 + 7 + 8, 1, 2, 0, 5];
        want.extend_from_slice(&1_700_000_000_123_456_789i64.to_be_bytes());
        want.extend_from_slice(b"\x06orders\x07billing");
        want.extend_from_slice(b"hi");
        assert_eq!(&body[..], &want[..]);
        assert_eq!(&body[payload_start(&body)..], b"hi");
        assert_eq!(Origin::read(&body), Some(origin()));
    }

    #[test]
    fn the_largest_envelope_fits_its_bound() {
        let long = "x".repeat(MAX_NAME_LEN);
        let o = Origin {
            topic: long.clone(),
            channel: long,
            ..origin()
        };
        let body = o.wrap(b"");
        assert_eq!(body.len() as u64, ENVELOPE_MAX);
        assert_eq!(Origin::read(&body), Some(o));
    }

    #[test]
    fn damaged_envelopes_give_no_origin_and_never_panic() {
        let body = origin().wrap(b"");
        for cut in 0..body.len() {
            let cut_body = &body[..cut];
            assert!(payload_start(cut_body) <= cut);
            assert_eq!(Origin::read(cut_body), None, "cut at {cut}");
        }
        let mut other = body.to_vec();
        other[2] = 9; // an unknown version
        assert_eq!(Origin::read(&other), None);
        let mut longer = body.to_vec();
        longer[1] += 1; // a length past the names
        longer.push(0);
        assert_eq!(Origin::read(&longer), None);
    }
}
