//! Golden bytes of `Command::encode` for every command, as a client puts them on the wire.

use bytes::{Bytes, BytesMut};
use proto::wire::command::Name;
use proto::wire::{Command, Decoder, Limits, MessageId};

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

const ID: MessageId = MessageId(*b"0a1b2c3d4e5f6789");

fn cases() -> Vec<(Command, &'static [u8])> {
    vec![
        (
            Command::Identify(Bytes::from_static(br#"{"feature_negotiation":true}"#)),
            b"IDENTIFY\n\x00\x00\x00\x1c{\"feature_negotiation\":true}",
        ),
        (
            Command::Auth(Bytes::from_static(b"s3cret")),
            b"AUTH\n\x00\x00\x00\x06s3cret",
        ),
        (
            Command::Sub {
                topic: name("events"),
                channel: name("archive#ephemeral"),
            },
            b"SUB events archive#ephemeral\n",
        ),
        (
            Command::Pub {
                topic: name("t.1_-x"),
                body: Bytes::from_static(b"hello"),
            },
            b"PUB t.1_-x\n\x00\x00\x00\x05hello",
        ),
        (
            Command::Pub {
                topic: name("t"),
                body: Bytes::from_static(b"\n\x00 "),
            },
            b"PUB t\n\x00\x00\x00\x03\n\x00 ",
        ),
        (
            Command::Mpub {
                topic: name("t"),
                bodies: vec![Bytes::from_static(b"x")],
            },
            b"MPUB t\n\x00\x00\x00\x09\x00\x00\x00\x01\x00\x00\x00\x01x",
        ),
        (
            Command::Mpub {
                topic: name("t"),
                bodies: vec![
                    Bytes::from_static(b"ab"),
                    Bytes::from_static(b"c"),
                    Bytes::from_static(b"def"),
                ],
            },
            b"MPUB t\n\x00\x00\x00\x16\x00\x00\x00\x03\
              \x00\x00\x00\x02ab\x00\x00\x00\x01c\x00\x00\x00\x03def",
        ),
        (
            Command::Dpub {
                topic: name("t"),
                defer_ms: 0,
                body: Bytes::from_static(b"x"),
            },
            b"DPUB t 0\n\x00\x00\x00\x01x",
        ),
        (
            Command::Dpub {
                topic: name("t"),
                defer_ms: 3_600_000,
                body: Bytes::from_static(b"later"),
            },
            b"DPUB t 3600000\n\x00\x00\x00\x05later",
        ),
        (Command::Rdy(0), b"RDY 0\n"),
        (Command::Rdy(1), b"RDY 1\n"),
        (Command::Rdy(2500), b"RDY 2500\n"),
        (Command::Fin(ID), b"FIN 0a1b2c3d4e5f6789\n"),
        (
            Command::Req {
                id: ID,
                timeout_ms: 0,
            },
            b"REQ 0a1b2c3d4e5f6789 0\n",
        ),
        (
            Command::Req {
                id: ID,
                timeout_ms: 60_000,
            },
            b"REQ 0a1b2c3d4e5f6789 60000\n",
        ),
        (Command::Touch(ID), b"TOUCH 0a1b2c3d4e5f6789\n"),
        (Command::Cls, b"CLS\n"),
        (Command::Nop, b"NOP\n"),
    ]
}

#[test]
fn every_command_encodes_to_exact_bytes() {
    for (cmd, want) in cases() {
        let mut buf = BytesMut::new();
        cmd.encode(&mut buf);
        assert_eq!(
            &buf[..],
            want,
            "{:?}: got {:?}",
            cmd.name(),
            String::from_utf8_lossy(&buf)
        );
    }
}

#[test]
fn encode_appends_to_what_is_already_buffered() {
    let mut buf = BytesMut::from(&b"  V2"[..]);
    Command::Nop.encode(&mut buf);
    Command::Rdy(7).encode(&mut buf);
    assert_eq!(&buf[..], b"  V2NOP\nRDY 7\n");
}

#[test]
fn the_golden_bytes_decode_back() {
    let mut decoder = Decoder::new(Limits::default());
    for (cmd, bytes) in cases() {
        let mut src = BytesMut::from(bytes);
        assert_eq!(
            decoder.decode(&mut src, |_| Ok(())).unwrap(),
            Some(cmd),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        assert!(src.is_empty());
    }
}

#[test]
fn every_command_kind_is_covered() {
    let mut names: Vec<&str> = cases().iter().map(|(c, _)| c.name().as_str()).collect();
    names.dedup();
    assert_eq!(
        names,
        [
            "IDENTIFY", "AUTH", "SUB", "PUB", "MPUB", "DPUB", "RDY", "FIN", "REQ", "TOUCH", "CLS",
            "NOP"
        ]
    );
}
