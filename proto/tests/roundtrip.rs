//! Property tests for the codec: every valid command and frame survives encode → decode, in
//! one piece or split anywhere, and no input at all makes the decoders panic or spin.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proto::wire::command::{MAX_LINE_LEN, Name};
use proto::wire::{
    Command, Decoder, Frame, Limits, Message, MessageId, ProtocolError, split_mpub_messages,
};

const MAX_FRAME: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// Strategies

fn name() -> impl Strategy<Value = Name> {
    ("[.a-zA-Z0-9_-]{1,54}", any::<bool>()).prop_map(|(base, ephemeral)| {
        let text = if ephemeral {
            format!("{base}#ephemeral")
        } else {
            base
        };
        Name::new(&text).expect("strategy makes valid names")
    })
}

/// An ID as a client may echo it: any bytes a command line can carry as one parameter
/// (no space, no newline, and no carriage return, which would be taken as a line ending).
fn message_id() -> impl Strategy<Value = MessageId> {
    prop_oneof![
        any::<u64>().prop_map(MessageId::from_u64),
        proptest::array::uniform16(
            any::<u8>().prop_filter("separator", |b| { !matches!(b, b' ' | b'\n' | b'\r') })
        )
        .prop_map(MessageId),
    ]
}

fn body(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 1..=max).prop_map(Bytes::from)
}

fn command() -> impl Strategy<Value = Command> {
    let lim = Limits::default();
    prop_oneof![
        body(300).prop_map(Command::Identify),
        body(64).prop_map(Command::Auth),
        (name(), name()).prop_map(|(topic, channel)| Command::Sub { topic, channel }),
        (name(), body(300)).prop_map(|(topic, body)| Command::Pub { topic, body }),
        (name(), vec(body(64), 1..20)).prop_map(|(topic, bodies)| Command::Mpub { topic, bodies }),
        (name(), 0..=lim.max_req_timeout_ms, body(300)).prop_map(|(topic, defer_ms, body)| {
            Command::Dpub {
                topic,
                defer_ms,
                body,
            }
        }),
        (0..=lim.max_rdy_count).prop_map(Command::Rdy),
        message_id().prop_map(Command::Fin),
        (message_id(), any::<u64>()).prop_map(|(id, timeout_ms)| Command::Req { id, timeout_ms }),
        message_id().prop_map(Command::Touch),
        Just(Command::Cls),
        Just(Command::Nop),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        vec(any::<u8>(), 0..300).prop_map(|b| Frame::Response(b.into())),
        vec(any::<u8>(), 0..300).prop_map(|b| Frame::Error(b.into())),
        (
            any::<i64>(),
            any::<u16>(),
            proptest::array::uniform16(any::<u8>()),
            vec(any::<u8>(), 0..300)
        )
            .prop_map(|(timestamp, attempts, id, body)| Frame::Message(Message {
                timestamp,
                attempts,
                id: MessageId(id),
                body: body.into(),
            })),
    ]
}

/// Cut points into a buffer of `len` bytes, sorted, possibly repeated.
fn cuts(len: usize) -> impl Strategy<Value = Vec<usize>> {
    vec(0..=len, 0..8).prop_map(|mut v| {
        v.sort_unstable();
        v
    })
}

/// Input that is mostly shaped like commands: a known or unknown name, parameters drawn
/// from good and bad values, a line ending, then size fields and body bytes; mixed with real
/// encoded commands and noise, so the decoder's deeper paths are reached often.
fn command_soup() -> impl Strategy<Value = Vec<u8>> {
    let keyword = prop::sample::select(vec![
        &b"IDENTIFY"[..],
        b"AUTH",
        b"SUB",
        b"PUB",
        b"MPUB",
        b"DPUB",
        b"RDY",
        b"FIN",
        b"REQ",
        b"TOUCH",
        b"CLS",
        b"NOP",
        b"nop",
        b"",
    ]);
    let param = prop_oneof![
        prop::sample::select(vec![
            &b"t"[..],
            b"c#ephemeral",
            b"a$b",
            b"#ephemeral",
            b"0123456789abcdef",
            b"0123456789abcde",
            b"-1",
            b"0",
            b"10",
            b"2500",
            b"3600000",
            b"",
        ])
        .prop_map(<[u8]>::to_vec),
        any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        "[.a-z#$ ]{0,70}".prop_map(String::into_bytes),
    ];
    let body_part = prop_oneof![
        (0u32..40).prop_map(|n| n.to_be_bytes().to_vec()),
        any::<u32>().prop_map(|n| n.to_be_bytes().to_vec()),
        vec(any::<u8>(), 0..24),
    ];
    let line = (
        keyword,
        vec(param, 0..4),
        prop::sample::select(vec![&b"\n"[..], b"\r\n", b""]),
        vec(body_part, 0..5),
    )
        .prop_map(|(keyword, params, end, body)| {
            let mut out = keyword.to_vec();
            for p in params {
                out.push(b' ');
                out.extend_from_slice(&p);
            }
            out.extend_from_slice(end);
            out.extend(body.concat());
            out
        });
    let chunk = prop_oneof![
        6 => line,
        2 => command().prop_map(|c| encode(&c).to_vec()),
        1 => vec(any::<u8>(), 0..32),
    ];
    vec(chunk, 0..8).prop_map(|chunks| chunks.concat())
}

fn small_limits() -> Limits {
    Limits {
        max_msg_size: 16,
        max_body_size: 64,
        max_rdy_count: 10,
        max_req_timeout_ms: 1000,
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn encode(cmd: &Command) -> BytesMut {
    let mut buf = BytesMut::new();
    cmd.encode(&mut buf);
    buf
}

type Decoded = Result<Command, ProtocolError>;

/// Decodes everything `src` holds until the decoder wants more or fails, checking that each
/// command consumes at least one byte (so the loop always ends).
fn drain(decoder: &mut Decoder, src: &mut BytesMut, out: &mut Vec<Decoded>) -> bool {
    loop {
        let before = src.len();
        match decoder.decode(src, |_| Ok(())) {
            Ok(Some(cmd)) => {
                assert!(src.len() < before, "{cmd:?} consumed nothing");
                out.push(Ok(cmd));
            }
            Ok(None) => {
                assert_eq!(src.len(), before, "an incomplete command consumed input");
                return true;
            }
            Err(e) => {
                out.push(Err(e));
                return false;
            }
        }
    }
}

/// Decodes `input` fed in the pieces `cuts` makes, stopping at the first error.
fn decode_in_pieces(limits: Limits, input: &[u8], cuts: &[usize]) -> Vec<Decoded> {
    let mut decoder = Decoder::new(limits);
    let mut src = BytesMut::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        src.extend_from_slice(&input[from..cut.max(from)]);
        from = cut.max(from);
        if !drain(&mut decoder, &mut src, &mut out) {
            break;
        }
    }
    out
}

fn decode_frames(src: &mut BytesMut, max: usize, out: &mut Vec<Result<Frame, String>>) -> bool {
    loop {
        let before = src.len();
        match Frame::decode(src, max) {
            Ok(Some(frame)) => {
                assert!(src.len() < before, "frame consumed nothing");
                out.push(Ok(frame));
            }
            Ok(None) => {
                assert_eq!(src.len(), before, "an incomplete frame consumed input");
                return true;
            }
            Err(e) => {
                out.push(Err(e.to_string()));
                return false;
            }
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config())]

    #[test]
    fn command_round_trips_and_consumes_exactly_its_bytes(
        cmd in command(),
        trailer in vec(any::<u8>(), 0..32),
    ) {
        let encoded = encode(&cmd);
        let mut src = encoded.clone();
        src.extend_from_slice(&trailer);
        let mut decoder = Decoder::new(Limits::default());
        let got = decoder.decode(&mut src, |name| {
            assert_eq!(name, cmd.name());
            Ok(())
        });
        prop_assert_eq!(got, Ok(Some(cmd)));
        prop_assert_eq!(&src[..], &trailer[..]);
    }

    #[test]
    fn command_split_anywhere_waits_then_round_trips(cmd in command(), cut_seed in cuts(4096)) {
        let encoded = encode(&cmd);
        let len = encoded.len();
        let cuts: Vec<usize> = cut_seed.iter().map(|c| c % (len + 1)).collect();
        let mut decoder = Decoder::new(Limits::default());
        let mut src = BytesMut::new();
        let mut from = 0;
        let mut sorted = cuts.clone();
        sorted.sort_unstable();
        for cut in sorted {
            src.extend_from_slice(&encoded[from..cut.max(from)]);
            from = cut.max(from);
            if from < len {
                let held = src.len();
                prop_assert_eq!(decoder.decode(&mut src, |_| Ok(())), Ok(None));
                prop_assert_eq!(src.len(), held);
            }
        }
        src.extend_from_slice(&encoded[from..]);
        prop_assert_eq!(decoder.decode(&mut src, |_| Ok(())), Ok(Some(cmd)));
        prop_assert!(src.is_empty());
    }

    #[test]
    fn every_prefix_of_a_command_is_incomplete(cmd in command()) {
        let encoded = encode(&cmd);
        let mut decoder = Decoder::new(Limits::default());
        // One byte at a time, through the same decoder (which remembers MPUB progress).
        let mut src = BytesMut::new();
        for (i, &b) in encoded.iter().enumerate() {
            src.extend_from_slice(&[b]);
            let got = decoder.decode(&mut src, |_| Ok(()));
            if i + 1 < encoded.len() {
                prop_assert_eq!(got, Ok(None), "at byte {}", i);
                prop_assert_eq!(src.len(), i + 1);
            } else {
                prop_assert_eq!(got, Ok(Some(cmd.clone())));
            }
        }
        prop_assert!(src.is_empty());
    }

    #[test]
    fn command_streams_round_trip_in_any_pieces(
        cmds in vec(command(), 1..8),
        cut_seed in cuts(1 << 16),
    ) {
        let mut stream = BytesMut::new();
        for cmd in &cmds {
            cmd.encode(&mut stream);
        }
        let mut cuts: Vec<usize> = cut_seed.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let got = decode_in_pieces(Limits::default(), &stream, &cuts);
        let want: Vec<Decoded> = cmds.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn frame_round_trips(frames in vec(frame(), 1..6), cut_seed in cuts(1 << 12)) {
        let mut stream = BytesMut::new();
        for f in &frames {
            f.encode(&mut stream);
        }
        // Whole.
        let mut src = stream.clone();
        let mut got = Vec::new();
        prop_assert!(decode_frames(&mut src, MAX_FRAME, &mut got));
        prop_assert!(src.is_empty());
        let want: Vec<Result<Frame, String>> = frames.iter().cloned().map(Ok).collect();
        prop_assert_eq!(&got, &want);
        // In pieces.
        let mut cuts: Vec<usize> = cut_seed.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain(std::iter::once(stream.len())) {
            src.extend_from_slice(&stream[from..cut.max(from)]);
            from = cut.max(from);
            prop_assert!(decode_frames(&mut src, MAX_FRAME, &mut got));
        }
        prop_assert_eq!(&got, &want);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_command_decoder(
        prefix in prop::sample::select(vec![
            &b""[..],
            b"PUB t\n",
            b"MPUB t\n",
            b"DPUB t 100\n",
            b"IDENTIFY\n",
            b"AUTH\n",
            b"SUB t c\n",
            b"RDY ",
            b"FIN ",
            b"REQ 0123456789abcdef ",
            b"MPUB t\n\x00\x00\x00\x20\x00\x00\x00\x03",
        ]),
        noise in vec(any::<u8>(), 0..600),
        small in any::<bool>(),
        cut_seed in cuts(1 << 10),
    ) {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&noise);
        let limits = if small { small_limits() } else { Limits::default() };
        let whole = decode_in_pieces(limits, &input, &[]);
        let mut cuts: Vec<usize> = cut_seed.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        // Feeding the same bytes in pieces gives the same commands and the same error.
        prop_assert_eq!(decode_in_pieces(limits, &input, &cuts), whole);
    }

    #[test]
    fn command_shaped_input_never_panics_and_pieces_agree(
        input in command_soup(),
        small in any::<bool>(),
        cut_seed in cuts(1 << 10),
    ) {
        let limits = if small { small_limits() } else { Limits::default() };
        let whole = decode_in_pieces(limits, &input, &[]);
        let mut cuts: Vec<usize> = cut_seed.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_in_pieces(limits, &input, &cuts), whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(
        prefix in prop::sample::select(vec![
            &b""[..],
            b"\x00\x00\x00\x06\x00\x00\x00\x00OK",
            b"\x00\x00\x00\x1e\x00\x00\x00\x02",
            b"\x00\x00\x00\x04",
        ]),
        noise in vec(any::<u8>(), 0..600),
        max in prop_oneof![Just(0usize), Just(4), Just(64), Just(MAX_FRAME)],
    ) {
        let mut src = BytesMut::from(prefix);
        src.extend_from_slice(&noise);
        let mut got = Vec::new();
        decode_frames(&mut src, max, &mut got);
    }
}

proptest! {
    #![proptest_config(config())]

    /// HTTP `/mpub?binary=true` bodies are the MPUB command's body without its size field.
    #[test]
    fn split_mpub_messages_agrees_with_the_mpub_command(
        topic in name(),
        bodies in vec(body(64), 1..20),
    ) {
        let encoded = encode(&Command::Mpub { topic: topic.clone(), bodies: bodies.clone() });
        let line = format!("MPUB {}\n", topic.as_str()).len();
        let body = encoded.freeze().slice(line + 4..);
        prop_assert_eq!(split_mpub_messages(&body, &Limits::default()), Ok(bodies));
    }

    #[test]
    fn split_mpub_messages_never_panics(
        input in vec(any::<u8>(), 0..300),
        small in any::<bool>(),
    ) {
        let limits = if small { small_limits() } else { Limits::default() };
        let input = Bytes::from(input);
        if let Ok(messages) = split_mpub_messages(&input, &limits) {
            // What was split is exactly a count and sized messages at the front of the input.
            let mut again = BytesMut::new();
            again.extend_from_slice(&(messages.len() as u32).to_be_bytes());
            for m in &messages {
                prop_assert!(!m.is_empty() && m.len() as u64 <= limits.max_msg_size);
                again.extend_from_slice(&(m.len() as u32).to_be_bytes());
                again.extend_from_slice(m);
            }
            prop_assert_eq!(&input[..again.len()], &again[..]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Edges the strategies reach rarely

#[test]
fn bodies_at_the_limits_round_trip() {
    let lim = Limits::default();
    let topic = Name::new(&format!("{}#ephemeral", "a".repeat(54))).unwrap();
    let big = Bytes::from(vec![7u8; lim.max_msg_size as usize]);
    let cmds = [
        Command::Pub {
            topic: topic.clone(),
            body: big.clone(),
        },
        Command::Dpub {
            topic: topic.clone(),
            defer_ms: lim.max_req_timeout_ms,
            body: big.clone(),
        },
        // 4 + 5 * (4 + 1 MiB) would pass 5 MiB, so four at the message limit.
        Command::Mpub {
            topic: topic.clone(),
            bodies: vec![big; 4],
        },
        Command::Identify(Bytes::from(vec![b'{'; lim.max_body_size as usize])),
        Command::Rdy(lim.max_rdy_count),
        Command::Req {
            id: MessageId::from_u64(u64::MAX),
            timeout_ms: u64::MAX,
        },
    ];
    for cmd in cmds {
        let mut src = encode(&cmd);
        let got = Decoder::new(lim).decode(&mut src, |_| Ok(())).unwrap();
        assert_eq!(got.as_ref(), Some(&cmd), "{:?}", cmd.name());
        assert!(src.is_empty());
    }
}

#[test]
fn a_huge_line_without_newline_is_refused_once_it_is_too_long() {
    let mut decoder = Decoder::new(Limits::default());
    let mut src = BytesMut::from(&vec![b'A'; MAX_LINE_LEN][..]);
    assert_eq!(decoder.decode(&mut src, |_| Ok(())), Ok(None));
    src.extend_from_slice(b"A");
    assert!(decoder.decode(&mut src, |_| Ok(())).is_err());
}

#[test]
fn many_commands_in_one_buffer() {
    let cmds: Vec<Command> = (0..1000)
        .map(|i| Command::Fin(MessageId::from_u64(i)))
        .collect();
    let mut stream = BytesMut::new();
    for c in &cmds {
        c.encode(&mut stream);
    }
    let got = decode_in_pieces(Limits::default(), &stream, &[]);
    assert_eq!(got, cmds.into_iter().map(Ok).collect::<Vec<_>>());
}
