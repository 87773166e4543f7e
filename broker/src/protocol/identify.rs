//! IDENTIFY: a client's JSON settings, checked against the broker's limits, and the
//! feature-negotiation response.
//!
//! Keys match case-insensitively and unknown keys and nulls are ignored, as Go's JSON decoder
//! does for nsqd (pynsq and nsqjs still send the removed `short_id` and `long_id`).

use super::client::Identity;
use crate::config::{NSQ_COMPAT_VERSION, Options};
use proto::wire::{ErrorCode, ProtocolError};
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

/// nsqd's deflate level when a client asks for deflate without one.
const DEFAULT_DEFLATE_LEVEL: i64 = 6;

/// The settings a client asked for.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct IdentifyRequest {
    client_id: String,
    hostname: String,
    user_agent: String,
    feature_negotiation: bool,
    heartbeat_interval: i64,
    output_buffer_size: i64,
    output_buffer_timeout: i64,
    sample_rate: i64,
    msg_timeout: i64,
    deflate_level: i64,
    deflate: bool,
    snappy: bool,
    tls_v1: bool,
    topology_region: String,
    topology_zone: String,
}

/// The connection upgrades agreed on: what the IDENTIFY response offers and the connection
/// then sets up, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Negotiated {
    pub(crate) tls: bool,
    pub(crate) snappy: bool,
    pub(crate) deflate: bool,
    /// 1 to 9: the client's level capped by `--max-deflate-level`.
    pub(crate) deflate_level: u32,
}

#[derive(Debug, Serialize)]
struct Response<'a> {
    max_rdy_count: u64,
    version: &'static str,
    max_msg_timeout: u64,
    msg_timeout: u64,
    tls_v1: bool,
    deflate: bool,
    deflate_level: i64,
    max_deflate_level: i64,
    snappy: bool,
    sample_rate: u8,
    auth_required: bool,
    output_buffer_size: usize,
    output_buffer_timeout: u64,
    /// This broker's `--topology-region` and `--topology-zone`.
    topology_region: &'a str,
    topology_zone: &'a str,
}

fn bad_body(text: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadBody, text)
}

impl IdentifyRequest {
    pub(crate) fn parse(body: &[u8]) -> Result<IdentifyRequest, ProtocolError> {
        let decode_failed = || bad_body("IDENTIFY failed to decode JSON body");
        let Value::Object(fields) = serde_json::from_slice(body).map_err(|_| decode_failed())?
        else {
            return Err(decode_failed());
        };
        let mut req = IdentifyRequest::default();
        for (key, value) in &fields {
            if value.is_null() {
                continue;
            }
            let int = || value.as_i64().ok_or_else(decode_failed);
            let text = || value.as_str().map(str::to_string).ok_or_else(decode_failed);
            let flag = || value.as_bool().ok_or_else(decode_failed);
            match key.to_ascii_lowercase().as_str() {
                "client_id" => req.client_id = text()?,
                "hostname" => req.hostname = text()?,
                "user_agent" => req.user_agent = text()?,
                "feature_negotiation" => req.feature_negotiation = flag()?,
                "heartbeat_interval" => req.heartbeat_interval = int()?,
                "output_buffer_size" => req.output_buffer_size = int()?,
                "output_buffer_timeout" => req.output_buffer_timeout = int()?,
                "sample_rate" => req.sample_rate = int()?,
                "msg_timeout" => req.msg_timeout = int()?,
                "deflate_level" => req.deflate_level = int()?,
                "deflate" => req.deflate = flag()?,
                "snappy" => req.snappy = flag()?,
                "tls_v1" => req.tls_v1 = flag()?,
                "topology_region" => req.topology_region = text()?,
                "topology_zone" => req.topology_zone = text()?,
                _ => {}
            }
        }
        Ok(req)
    }

    /// The client's settings after this IDENTIFY, checked in nsqd's order.
    pub(crate) fn apply(&self, current: &Identity, o: &Options) -> Result<Identity, ProtocolError> {
        let ms = |v: i64| Duration::from_millis(v as u64);
        let max_ms = |d: Duration| d.as_millis() as i64;
        let mut next = current.clone();
        next.client_id = self.client_id.clone();
        next.hostname = self.hostname.clone();
        next.user_agent = self.user_agent.clone();
        next.topology_region = self.topology_region.clone();
        next.topology_zone = self.topology_zone.clone();

        match self.heartbeat_interval {
            -1 => next.heartbeat_interval = None,
            0 => {}
            v if v >= 1000 && v <= max_ms(o.max_heartbeat_interval) => {
                next.heartbeat_interval = Some(ms(v))
            }
            v => {
                return Err(bad_body(format!(
                    "IDENTIFY heartbeat interval ({v}) is invalid"
                )));
            }
        }

        match self.output_buffer_timeout {
            -1 => next.output_buffer_timeout = Duration::ZERO,
            0 => {}
            v if v >= max_ms(o.min_output_buffer_timeout)
                && v <= max_ms(o.max_output_buffer_timeout) =>
            {
                next.output_buffer_timeout = ms(v)
            }
            v => {
                return Err(bad_body(format!(
                    "IDENTIFY output buffer timeout ({v}) is invalid"
                )));
            }
        }
        match self.output_buffer_size {
            -1 => {
                next.output_buffer_size = 1;
                next.output_buffer_timeout = Duration::ZERO;
            }
            0 => {}
            v if v >= 64 && v as u64 <= o.max_output_buffer_size => {
                next.output_buffer_size = v as usize
            }
            v => {
                return Err(bad_body(format!(
                    "IDENTIFY output buffer size ({v}) is invalid"
                )));
            }
        }

        match self.sample_rate {
            v @ 0..=99 => next.sample_rate = v as u8,
            v => return Err(bad_body(format!("IDENTIFY sample rate ({v}) is invalid"))),
        }

        match self.msg_timeout {
            0 => {}
            v if v >= 1000 && v <= max_ms(o.max_msg_timeout) => next.msg_timeout = ms(v),
            v => return Err(bad_body(format!("IDENTIFY msg timeout ({v}) is invalid"))),
        }
        Ok(next)
    }

    /// The upgrades both sides want (`tls_available`: the broker has a certificate). Only a
    /// client asking for feature negotiation gets them, and only such a client fails for
    /// asking for both compressions: nsqd answers `OK` before that check otherwise.
    pub(crate) fn negotiate(
        &self,
        o: &Options,
        tls_available: bool,
    ) -> Result<Negotiated, ProtocolError> {
        let deflate = o.tls.deflate && self.deflate;
        let snappy = o.tls.snappy && self.snappy;
        let mut level = DEFAULT_DEFLATE_LEVEL;
        if deflate && self.deflate_level > 0 {
            level = self.deflate_level;
        }
        let level = level.min(i64::from(o.tls.max_deflate_level)).max(1) as u32;
        if !self.feature_negotiation {
            return Ok(Negotiated {
                deflate_level: level,
                ..Negotiated::default()
            });
        }
        if deflate && snappy {
            return Err(ProtocolError::new(
                ErrorCode::IdentifyFailed,
                "cannot enable both deflate and snappy compression",
            ));
        }
        Ok(Negotiated {
            tls: tls_available && self.tls_v1,
            snappy,
            deflate,
            deflate_level: level,
        })
    }

    /// What to answer: `OK`, or the negotiated settings as JSON.
    pub(crate) fn response(&self, applied: &Identity, agreed: &Negotiated, o: &Options) -> Vec<u8> {
        if !self.feature_negotiation {
            return proto::wire::OK.to_vec();
        }
        let resp = Response {
            max_rdy_count: o.max_rdy_count,
            version: NSQ_COMPAT_VERSION,
            max_msg_timeout: o.max_msg_timeout.as_millis() as u64,
            msg_timeout: applied.msg_timeout.as_millis() as u64,
            tls_v1: agreed.tls,
            deflate: agreed.deflate,
            deflate_level: i64::from(agreed.deflate_level),
            max_deflate_level: i64::from(o.tls.max_deflate_level),
            snappy: agreed.snappy,
            sample_rate: applied.sample_rate,
            auth_required: !o.auth_http_addresses.is_empty(),
            output_buffer_size: applied.output_buffer_size,
            output_buffer_timeout: applied.output_buffer_timeout.as_millis() as u64,
            topology_region: &o.topology_region,
            topology_zone: &o.topology_zone,
        };
        serde_json::to_vec(&resp).unwrap_or_else(|_| proto::wire::OK.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options::for_tests(".")
    }

    fn defaults() -> Identity {
        Identity {
            client_id: "ip".into(),
            hostname: "ip".into(),
            user_agent: String::new(),
            heartbeat_interval: Some(Duration::from_secs(30)),
            output_buffer_size: 16384,
            output_buffer_timeout: Duration::from_millis(250),
            msg_timeout: Duration::from_secs(60),
            sample_rate: 0,
            topology_region: String::new(),
            topology_zone: String::new(),
        }
    }

    fn apply(json: &str) -> Result<Identity, String> {
        IdentifyRequest::parse(json.as_bytes())
            .and_then(|r| r.apply(&defaults(), &options()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn unknown_keys_nulls_and_case_are_tolerated() {
        let id = apply(
            r#"{"short_id":"x","long_id":"y","CLIENT_ID":"c","Hostname":null,"heartbeat_interval":null,"msg_timeout":5000}"#,
        )
        .unwrap();
        assert_eq!(id.client_id, "c");
        assert_eq!(id.hostname, "");
        assert_eq!(id.heartbeat_interval, Some(Duration::from_secs(30)));
        assert_eq!(id.msg_timeout, Duration::from_secs(5));
    }

    #[test]
    fn ranges_are_nsqds() {
        assert_eq!(
            apply(r#"{"heartbeat_interval":-1}"#)
                .unwrap()
                .heartbeat_interval,
            None
        );
        assert_eq!(
            apply(r#"{"heartbeat_interval":999}"#).unwrap_err(),
            "E_BAD_BODY IDENTIFY heartbeat interval (999) is invalid"
        );
        assert_eq!(
            apply(r#"{"heartbeat_interval":60001}"#).unwrap_err(),
            "E_BAD_BODY IDENTIFY heartbeat interval (60001) is invalid"
        );
        let id = apply(r#"{"output_buffer_size":-1,"output_buffer_timeout":1000}"#).unwrap();
        assert_eq!(
            (id.output_buffer_size, id.output_buffer_timeout),
            (1, Duration::ZERO)
        );
        assert_eq!(
            apply(r#"{"output_buffer_size":63}"#).unwrap_err(),
            "E_BAD_BODY IDENTIFY output buffer size (63) is invalid"
        );
        assert_eq!(
            apply(r#"{"output_buffer_timeout":24}"#).unwrap_err(),
            "E_BAD_BODY IDENTIFY output buffer timeout (24) is invalid"
        );
        assert_eq!(
            apply(r#"{"sample_rate":100}"#).unwrap_err(),
            "E_BAD_BODY IDENTIFY sample rate (100) is invalid"
        );
        assert_eq!(
            apply(r#"{"msg_timeout":999}"#).unwrap_err(),
            "E_BAD_BODY IDENTIFY msg timeout (999) is invalid"
        );
        assert_eq!(
            apply(r#"{"msg_timeout":900000}"#).unwrap().msg_timeout,
            Duration::from_secs(900)
        );
    }

    #[test]
    fn bad_json_is_bad_body() {
        for body in [
            "",
            "[1]",
            "{",
            r#"{"heartbeat_interval":"x"}"#,
            r#"{"msg_timeout":1.5}"#,
        ] {
            assert_eq!(
                apply(body).unwrap_err(),
                "E_BAD_BODY IDENTIFY failed to decode JSON body"
            );
        }
    }

    #[test]
    fn negotiation_response_has_every_field() {
        let req =
            IdentifyRequest::parse(br#"{"feature_negotiation":true,"tls_v1":true,"snappy":true}"#)
                .unwrap();
        let id = req.apply(&defaults(), &options()).unwrap();
        let agreed = req.negotiate(&options(), false).unwrap();
        let v: Value = serde_json::from_slice(&req.response(&id, &agreed, &options())).unwrap();
        for key in [
            "max_rdy_count",
            "version",
            "max_msg_timeout",
            "msg_timeout",
            "tls_v1",
            "deflate",
            "deflate_level",
            "max_deflate_level",
            "snappy",
            "sample_rate",
            "auth_required",
            "output_buffer_size",
            "output_buffer_timeout",
            "topology_region",
            "topology_zone",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        // No certificate: no TLS; snappy is on offer by default.
        assert_eq!(v["tls_v1"], false);
        assert_eq!(v["snappy"], true);
        assert_eq!(v["deflate"], false);
        assert_eq!(v["max_rdy_count"], 2500);
        assert_eq!(v["msg_timeout"], 60000);
        assert_eq!(v["auth_required"], false);
        let mut with_auth = options();
        with_auth.auth_http_addresses = vec!["127.0.0.1:4181".into()];
        let v: Value = serde_json::from_slice(&req.response(&id, &agreed, &with_auth)).unwrap();
        assert_eq!(v["auth_required"], true);
        let plain = IdentifyRequest::parse(b"{}").unwrap();
        assert_eq!(plain.response(&id, &agreed, &options()), b"OK");
    }

    fn negotiate(json: &str, o: &Options, tls: bool) -> Result<Negotiated, String> {
        IdentifyRequest::parse(json.as_bytes())
            .unwrap()
            .negotiate(o, tls)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn upgrades_need_both_sides_and_feature_negotiation() {
        let o = options();
        let all = r#"{"feature_negotiation":true,"tls_v1":true,"deflate":true,"deflate_level":9}"#;
        let agreed = negotiate(all, &o, true).unwrap();
        assert!(agreed.tls && agreed.deflate && !agreed.snappy);
        // Capped by --max-deflate-level (6).
        assert_eq!(agreed.deflate_level, 6);
        assert!(!negotiate(all, &o, false).unwrap().tls);
        let agreed = negotiate(r#"{"deflate":true,"tls_v1":true}"#, &o, true).unwrap();
        assert_eq!(
            agreed,
            Negotiated {
                deflate_level: 6,
                ..Negotiated::default()
            }
        );
        let level = |json: &str| negotiate(json, &o, false).unwrap().deflate_level;
        assert_eq!(
            level(r#"{"feature_negotiation":true,"deflate":true,"deflate_level":2}"#),
            2
        );
        assert_eq!(level(r#"{"feature_negotiation":true,"deflate":true}"#), 6);
        let mut off = options();
        off.tls.snappy = false;
        off.tls.deflate = false;
        let agreed =
            negotiate(r#"{"feature_negotiation":true,"snappy":true}"#, &off, false).unwrap();
        assert!(!agreed.snappy);
        // Turned off, asking for both is no conflict (as nsqd checks what it would grant).
        assert!(negotiate(r#"{"snappy":true,"deflate":true}"#, &off, false).is_ok());
    }

    #[test]
    fn both_compressions_fail_only_with_feature_negotiation() {
        assert_eq!(
            negotiate(
                r#"{"feature_negotiation":true,"snappy":true,"deflate":true}"#,
                &options(),
                false
            )
            .unwrap_err(),
            "E_IDENTIFY_FAILED cannot enable both deflate and snappy compression"
        );
        // nsqd answers OK before its conflict check when not negotiating features.
        assert_eq!(
            negotiate(r#"{"snappy":true,"deflate":true}"#, &options(), false).unwrap(),
            Negotiated {
                deflate_level: 6,
                ..Negotiated::default()
            }
        );
    }
}
