//! Feeds arbitrary bytes to the command decoder, whole and in pieces.
//!
//! The first byte picks the limits and where the input is cut; the rest is the stream. The
//! decoder must never panic, every decoded command must consume input, an incomplete command
//! must consume nothing, and feeding the stream in pieces must give exactly what feeding it
//! whole gives.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::wire::{Command, Decoder, Limits, ProtocolError};

fn decode(limits: Limits, input: &[u8], piece: usize) -> Vec<Result<Command, ProtocolError>> {
    let mut decoder = Decoder::new(limits);
    let mut src = BytesMut::new();
    let mut out = Vec::new();
    for chunk in input.chunks(piece.max(1)) {
        src.extend_from_slice(chunk);
        loop {
            let before = src.len();
            match decoder.decode(&mut src, |_| Ok(())) {
                Ok(Some(cmd)) => {
                    assert!(src.len() < before, "{cmd:?} consumed nothing");
                    out.push(Ok(cmd));
                }
                Ok(None) => {
                    assert_eq!(src.len(), before, "incomplete command consumed input");
                    break;
                }
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let limits = if control & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_msg_size: 16,
            max_body_size: 64,
            max_rdy_count: 10,
            max_req_timeout_ms: 1000,
        }
    };
    let piece = usize::from(control >> 1);
    let whole = decode(limits, input, input.len());
    if piece > 0 {
        assert_eq!(decode(limits, input, piece), whole);
    }
    // Whatever decodes must encode back to bytes that decode to the same command.
    for cmd in whole.iter().flatten() {
        let mut buf = BytesMut::new();
        cmd.encode(&mut buf);
        let again = Decoder::new(limits).decode(&mut buf, |_| Ok(()));
        assert_eq!(again.as_ref().ok().and_then(|c| c.as_ref()), Some(cmd));
        assert!(buf.is_empty());
    }
});
