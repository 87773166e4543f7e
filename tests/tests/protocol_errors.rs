//! TCP protocol V2 error paths, byte for byte: the exact error frame nsqd 1.3 sends for each
//! bad input, and whether the connection closes after it (every error but E_FIN_FAILED,
//! E_REQ_FAILED and E_TOUCH_FAILED is fatal). Also the limits around them: full memory
//! queues (spill to disk, never an error), consumer limits and disk write failures.

#[allow(dead_code)]
mod common;

use anyhow::{Result, ensure};
use common::*;
use serde_json::json;
use tests::{NsqConn, TestBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a connection has done before the bad command is sent.
#[derive(Debug, Clone, Copy)]
enum Prelude {
    /// Only the magic.
    Fresh,
    /// `SUB t c`.
    Subscribed,
    /// `SUB t c` then `CLS`.
    Closing,
}

async fn open(b: &TestBroker, prelude: Prelude) -> Result<NsqConn> {
    match prelude {
        Prelude::Fresh => b.connect().await,
        Prelude::Subscribed => subscribe(b, "t", "c", None).await,
        Prelude::Closing => {
            let mut c = subscribe(b, "t", "c", None).await?;
            c.send_raw(b"CLS\n").await?;
            c.expect_response(b"CLOSE_WAIT").await?;
            Ok(c)
        }
    }
}

/// Sends each case's bytes on its own connection and expects exactly that error frame, then
/// the connection closing. Reports every mismatch at once.
async fn check_fatal(b: &TestBroker, cases: &[(Prelude, Vec<u8>, String)]) -> Result<()> {
    let mut failures = Vec::new();
    for (prelude, bytes, want) in cases {
        let result = async {
            let mut c = open(b, *prelude).await?;
            c.send_raw(bytes).await?;
            expect_fatal(&mut c, want).await
        }
        .await;
        if let Err(e) = result {
            failures.push(format!(
                "{prelude:?} + {:?}: {e:#}",
                String::from_utf8_lossy(bytes)
            ));
        }
    }
    ensure!(failures.is_empty(), "\n{}", failures.join("\n"));
    Ok(())
}

fn at(
    prelude: Prelude,
    bytes: impl Into<Vec<u8>>,
    want: impl Into<String>,
) -> (Prelude, Vec<u8>, String) {
    (prelude, bytes.into(), want.into())
}

fn fresh(bytes: impl Into<Vec<u8>>, want: impl Into<String>) -> (Prelude, Vec<u8>, String) {
    at(Prelude::Fresh, bytes, want)
}

#[tokio::test]
async fn bad_magic_gets_e_bad_protocol_frame_then_close() -> Result<()> {
    let b = broker().await?;
    let mut s = TcpStream::connect(b.tcp_address()).await?;
    s.write_all(b"  V1").await?;
    let mut got = Vec::new();
    tokio::time::timeout(tests::WAIT, s.read_to_end(&mut got)).await??;
    // size 4 + 14, type 1 (error), "E_BAD_PROTOCOL", then EOF.
    assert_eq!(got, b"\x00\x00\x00\x12\x00\x00\x00\x01E_BAD_PROTOCOL");

    // The harness's view of the same thing, with another wrong magic.
    let mut c = NsqConn::connect_raw(b.tcp_address()).await?;
    c.send_raw(b"V2  ").await?;
    expect_fatal(&mut c, "E_BAD_PROTOCOL").await
}

#[tokio::test]
async fn short_magic_closes_silently() -> Result<()> {
    let b = broker().await?;
    let mut s = TcpStream::connect(b.tcp_address()).await?;
    s.write_all(b"  ").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(tests::WAIT, s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"", "no frame when the magic is cut short");
    Ok(())
}

#[tokio::test]
async fn good_magic_then_ok_frame_bytes() -> Result<()> {
    let b = broker().await?;
    let mut s = TcpStream::connect(b.tcp_address()).await?;
    s.write_all(b"  V2SUB t c\n").await?;
    let mut got = [0u8; 10];
    tokio::time::timeout(tests::WAIT, s.read_exact(&mut got)).await??;
    assert_eq!(&got, b"\x00\x00\x00\x06\x00\x00\x00\x00OK");
    s.write_all(b"CLS\n").await?;
    let mut got = [0u8; 18];
    tokio::time::timeout(tests::WAIT, s.read_exact(&mut got)).await??;
    assert_eq!(&got, b"\x00\x00\x00\x0e\x00\x00\x00\x00CLOSE_WAIT");
    Ok(())
}

#[tokio::test]
async fn unknown_commands_are_fatal() -> Result<()> {
    let b = broker().await?;
    check_fatal(
        &b,
        &[
            fresh("FOO\n", "E_INVALID invalid command FOO"),
            // Command names are case-sensitive.
            fresh("nop\n", "E_INVALID invalid command nop"),
            fresh("PUBX t\n", "E_INVALID invalid command PUBX"),
            fresh("\n", "E_INVALID invalid command "),
            at(
                Prelude::Subscribed,
                b"HELLO world\n".to_vec(),
                "E_INVALID invalid command HELLO",
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn consumer_commands_before_sub_are_fatal() -> Result<()> {
    let b = broker().await?;
    check_fatal(
        &b,
        &[
            fresh(
                format!("FIN {UNKNOWN_ID}\n"),
                "E_INVALID cannot FIN in current state",
            ),
            fresh("RDY 1\n", "E_INVALID cannot RDY in current state"),
            fresh(
                format!("REQ {UNKNOWN_ID} 0\n"),
                "E_INVALID cannot REQ in current state",
            ),
            fresh(
                format!("TOUCH {UNKNOWN_ID}\n"),
                "E_INVALID cannot TOUCH in current state",
            ),
            fresh("CLS\n", "E_INVALID cannot CLS in current state"),
        ],
    )
    .await
}

#[tokio::test]
async fn identify_sub_auth_after_sub_are_fatal() -> Result<()> {
    let b = broker().await?;
    let sub = Prelude::Subscribed;
    let closing = Prelude::Closing;
    check_fatal(
        &b,
        &[
            at(
                sub,
                b"IDENTIFY\n".to_vec(),
                "E_INVALID cannot IDENTIFY in current state",
            ),
            at(
                sub,
                b"SUB t c\n".to_vec(),
                "E_INVALID cannot SUB in current state",
            ),
            at(
                sub,
                b"SUB other c\n".to_vec(),
                "E_INVALID cannot SUB in current state",
            ),
            at(
                sub,
                b"AUTH\n".to_vec(),
                "E_INVALID cannot AUTH in current state",
            ),
            at(
                closing,
                b"CLS\n".to_vec(),
                "E_INVALID cannot CLS in current state",
            ),
            at(
                closing,
                b"SUB t c\n".to_vec(),
                "E_INVALID cannot SUB in current state",
            ),
            at(
                closing,
                b"IDENTIFY\n".to_vec(),
                "E_INVALID cannot IDENTIFY in current state",
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn sub_with_heartbeats_disabled_is_fatal() -> Result<()> {
    let b = broker().await?;
    let mut c = b.connect().await?;
    c.send_raw(&identify_cmd(&json!({"heartbeat_interval": -1})))
        .await?;
    c.expect_response(b"OK").await?;
    c.send_raw(b"SUB t c\n").await?;
    expect_fatal(&mut c, "E_INVALID cannot SUB with heartbeats disabled").await?;

    // Publishing needs no heartbeats.
    let mut p = b.connect().await?;
    p.send_raw(&identify_cmd(&json!({"heartbeat_interval": -1})))
        .await?;
    p.expect_response(b"OK").await?;
    sync(&mut p).await
}

#[tokio::test]
async fn sub_parameter_and_name_errors_are_fatal() -> Result<()> {
    let b = broker().await?;
    let long = "a".repeat(65);
    check_fatal(
        &b,
        &[
            fresh("SUB\n", "E_INVALID SUB insufficient number of parameters"),
            fresh("SUB t\n", "E_INVALID SUB insufficient number of parameters"),
            fresh(
                "SUB a$b c\n",
                r#"E_BAD_TOPIC SUB topic name "a$b" is not valid"#,
            ),
            fresh("SUB  c\n", r#"E_BAD_TOPIC SUB topic name "" is not valid"#),
            // Go's %q escapes what is not printable.
            fresh(
                "SUB a\tb c\n",
                r#"E_BAD_TOPIC SUB topic name "a\tb" is not valid"#,
            ),
            fresh(
                "SUB a\x01b c\n",
                r#"E_BAD_TOPIC SUB topic name "a\x01b" is not valid"#,
            ),
            fresh(
                format!("SUB {long} c\n"),
                format!(r#"E_BAD_TOPIC SUB topic name "{long}" is not valid"#),
            ),
            fresh(
                "SUB t c$d\n",
                r#"E_BAD_CHANNEL SUB channel name "c$d" is not valid"#,
            ),
            fresh(
                "SUB t \n",
                r#"E_BAD_CHANNEL SUB channel name "" is not valid"#,
            ),
            fresh(
                format!("SUB t {long}\n"),
                format!(r#"E_BAD_CHANNEL SUB channel name "{long}" is not valid"#),
            ),
            // The topic is checked before the channel.
            fresh(
                "SUB a/b c/d\n",
                r#"E_BAD_TOPIC SUB topic name "a/b" is not valid"#,
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn name_rules_length_and_ephemeral_suffix() -> Result<()> {
    let b = broker().await?;
    let max = "n".repeat(64);
    let max_eph = format!("{}#ephemeral", "e".repeat(54));
    let too_long_eph = format!("{}#ephemeral", "e".repeat(55));
    let valid = [
        "a",
        "A.b_c-9",
        max.as_str(),
        "t#ephemeral",
        max_eph.as_str(),
        "...",
        "-_-",
    ];
    for name in valid {
        // PUB accepts the topic, SUB accepts it as topic and as channel.
        let mut p = b.connect().await?;
        p.send_raw(&pub_cmd(name, b"x")).await?;
        p.expect_response(b"OK").await?;
        subscribe(&b, name, name, None).await?;
    }
    let invalid = [
        "#ephemeral".to_string(),
        "a#ephemeral#ephemeral".into(),
        "a#eph".into(),
        "a#ephemeralx".into(),
        "a#Ephemeral".into(),
        "a:b".into(),
        "ü".into(),
        too_long_eph.clone(),
        "n".repeat(65),
    ];
    let mut cases = Vec::new();
    for n in &invalid {
        // The name alone on the line: nsqd rejects it before reading the body size.
        cases.push(fresh(
            format!("PUB {n}\n"),
            format!(r#"E_BAD_TOPIC PUB topic name "{n}" is not valid"#),
        ));
        cases.push(fresh(
            format!("SUB {n} c\n"),
            format!(r#"E_BAD_TOPIC SUB topic name "{n}" is not valid"#),
        ));
        cases.push(fresh(
            format!("SUB t {n}\n"),
            format!(r#"E_BAD_CHANNEL SUB channel name "{n}" is not valid"#),
        ));
    }
    check_fatal(&b, &cases).await
}

#[tokio::test]
async fn pub_errors_are_fatal() -> Result<()> {
    let b = TestBroker::start(|o| o.max_msg_size = 100).await?;
    check_fatal(
        &b,
        &[
            fresh("PUB\n", "E_INVALID PUB insufficient number of parameters"),
            fresh(
                "PUB a$b\n",
                r#"E_BAD_TOPIC PUB topic name "a$b" is not valid"#,
            ),
            fresh(
                line_and_size("PUB t", 0),
                "E_BAD_MESSAGE PUB invalid message body size 0",
            ),
            fresh(
                line_and_size("PUB t", -1),
                "E_BAD_MESSAGE PUB invalid message body size -1",
            ),
            fresh(
                line_and_size("PUB t", 101),
                "E_BAD_MESSAGE PUB message too big 101 > 100",
            ),
            fresh(
                line_and_size("PUB t", 1 << 30),
                "E_BAD_MESSAGE PUB message too big 1073741824 > 100",
            ),
        ],
    )
    .await?;
    // Exactly max-msg-size is fine, and so is a CRLF line ending.
    let mut c = b.connect().await?;
    c.send_raw(&pub_cmd("t", &[b'x'; 100])).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&sized("PUB t\r", b"crlf")).await?;
    c.expect_response(b"OK").await
}

#[tokio::test]
async fn dpub_errors_are_fatal() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_msg_size = 100;
        o.max_req_timeout = std::time::Duration::from_secs(10);
    })
    .await?;
    check_fatal(
        &b,
        &[
            fresh("DPUB\n", "E_INVALID DPUB insufficient number of parameters"),
            fresh(
                "DPUB t\n",
                "E_INVALID DPUB insufficient number of parameters",
            ),
            fresh(
                "DPUB a$b 10\n",
                r#"E_BAD_TOPIC DPUB topic name "a$b" is not valid"#,
            ),
            fresh("DPUB t x\n", "E_INVALID DPUB could not parse timeout x"),
            fresh("DPUB t -1\n", "E_INVALID DPUB could not parse timeout -1"),
            fresh(
                "DPUB t 10001\n",
                "E_INVALID DPUB timeout 10001 out of range 0-10000",
            ),
            fresh(
                line_and_size("DPUB t 10", 0),
                "E_BAD_MESSAGE DPUB invalid message body size 0",
            ),
            fresh(
                line_and_size("DPUB t 10", 101),
                "E_BAD_MESSAGE DPUB message too big 101 > 100",
            ),
        ],
    )
    .await?;
    // The bounds themselves are accepted (DPUB is rejected above the max, not clamped).
    let mut c = b.connect().await?;
    c.send_raw(&dpub_cmd("t", 10000, b"at the limit")).await?;
    c.expect_response(b"OK").await?;
    c.send_raw(&dpub_cmd("t", 0, b"no delay")).await?;
    c.expect_response(b"OK").await
}

#[tokio::test]
async fn mpub_errors_are_fatal() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_msg_size = 100;
        o.max_body_size = 1000;
    })
    .await?;
    let mpub_head = |body_size: i32, count: i32| {
        let mut v = b"MPUB t\n".to_vec();
        v.extend_from_slice(&body_size.to_be_bytes());
        v.extend_from_slice(&count.to_be_bytes());
        v
    };
    let with_messages = |sizes: &[i32]| {
        let mut v = mpub_head(900, 2);
        for (i, &size) in sizes.iter().enumerate() {
            v.extend_from_slice(&size.to_be_bytes());
            if i + 1 < sizes.len() {
                v.extend(std::iter::repeat_n(b'm', size as usize));
            }
        }
        v
    };
    check_fatal(
        &b,
        &[
            fresh("MPUB\n", "E_INVALID MPUB insufficient number of parameters"),
            // nsqd repeats the code inside the text for MPUB.
            fresh(
                "MPUB a$b\n",
                r#"E_BAD_TOPIC E_BAD_TOPIC MPUB topic name "a$b" is not valid"#,
            ),
            fresh(
                line_and_size("MPUB t", 0),
                "E_BAD_BODY MPUB invalid body size 0",
            ),
            fresh(
                line_and_size("MPUB t", -5),
                "E_BAD_BODY MPUB invalid body size -5",
            ),
            fresh(
                line_and_size("MPUB t", 1001),
                "E_BAD_BODY MPUB body too big 1001 > 1000",
            ),
            fresh(mpub_head(4, 0), "E_BAD_BODY MPUB invalid message count 0"),
            fresh(mpub_head(4, -1), "E_BAD_BODY MPUB invalid message count -1"),
            // At most (max-body-size - 4) / 5 = 199 messages.
            fresh(
                mpub_head(1000, 200),
                "E_BAD_BODY MPUB invalid message count 200",
            ),
            fresh(
                with_messages(&[0]),
                "E_BAD_MESSAGE MPUB invalid message(0) body size 0",
            ),
            fresh(
                with_messages(&[5, -2]),
                "E_BAD_MESSAGE MPUB invalid message(1) body size -2",
            ),
            fresh(
                with_messages(&[5, 101]),
                "E_BAD_MESSAGE MPUB message too big 101 > 100",
            ),
        ],
    )
    .await?;
    // 199 messages is the most, and each may be max-msg-size.
    let bodies: Vec<&[u8]> = vec![b"x"; 199];
    let mut c = b.connect().await?;
    c.send_raw(&mpub_cmd("t", &bodies)).await?;
    c.expect_response(b"OK").await?;
    let big = [b'y'; 100];
    c.send_raw(&mpub_cmd("t", &[&big, &big])).await?;
    c.expect_response(b"OK").await
}

#[tokio::test]
async fn mpub_with_a_bad_message_publishes_nothing() -> Result<()> {
    let b = TestBroker::start(|o| o.max_msg_size = 100).await?;
    let mut consumer = consumer(&b, "t", "c", 10).await?;
    let mut bad = b"MPUB t\n".to_vec();
    bad.extend_from_slice(&200i32.to_be_bytes());
    bad.extend_from_slice(&2i32.to_be_bytes());
    bad.extend_from_slice(&5i32.to_be_bytes());
    bad.extend_from_slice(b"first");
    bad.extend_from_slice(&101i32.to_be_bytes());
    let mut p = b.connect().await?;
    p.send_raw(&bad).await?;
    expect_fatal(&mut p, "E_BAD_MESSAGE MPUB message too big 101 > 100").await?;
    consumer
        .expect_nothing_for(std::time::Duration::from_millis(500))
        .await?;
    let topic = b.stats().await?;
    let t = topic_stats(&topic, "t").cloned().unwrap_or_default();
    assert_eq!(t["message_count"], 0, "{t}");
    Ok(())
}

#[tokio::test]
async fn rdy_errors_are_fatal() -> Result<()> {
    let b = TestBroker::start(|o| o.max_rdy_count = 10).await?;
    let sub = Prelude::Subscribed;
    check_fatal(
        &b,
        &[
            at(
                sub,
                b"RDY x\n".to_vec(),
                "E_INVALID RDY could not parse count x",
            ),
            at(
                sub,
                b"RDY -1\n".to_vec(),
                "E_INVALID RDY could not parse count -1",
            ),
            at(
                sub,
                b"RDY 11\n".to_vec(),
                "E_INVALID RDY count 11 out of range 0-10",
            ),
            at(
                sub,
                b"RDY 99999999999\n".to_vec(),
                "E_INVALID RDY count 99999999999 out of range 0-10",
            ),
        ],
    )
    .await?;
    // The default maximum is 2500.
    let d = broker().await?;
    let mut c = subscribe(&d, "t", "c", None).await?;
    c.send_raw(b"RDY 2500\n").await?;
    sync(&mut c).await?;
    c.send_raw(b"RDY 2501\n").await?;
    expect_fatal(&mut c, "E_INVALID RDY count 2501 out of range 0-2500").await
}

#[tokio::test]
async fn fin_req_touch_parameter_errors_are_fatal() -> Result<()> {
    let b = broker().await?;
    let sub = Prelude::Subscribed;
    let case = |line: &str, want: &str| at(sub, line.as_bytes(), want);
    check_fatal(
        &b,
        &[
            case("FIN\n", "E_INVALID FIN insufficient number of params"),
            case("FIN abc\n", "E_INVALID invalid message ID"),
            case("FIN 0123456789abcdef0\n", "E_INVALID invalid message ID"),
            case("FIN \n", "E_INVALID invalid message ID"),
            case("REQ\n", "E_INVALID REQ insufficient number of params"),
            case(
                "REQ 0123456789abcdef\n",
                "E_INVALID REQ insufficient number of params",
            ),
            case("REQ abc 0\n", "E_INVALID invalid message ID"),
            case(
                "REQ 0123456789abcdef x\n",
                "E_INVALID REQ could not parse timeout x",
            ),
            case(
                "REQ 0123456789abcdef -5\n",
                "E_INVALID REQ could not parse timeout -5",
            ),
            case("TOUCH\n", "E_INVALID TOUCH insufficient number of params"),
            case("TOUCH 0123456789abcde\n", "E_INVALID invalid message ID"),
        ],
    )
    .await
}

#[tokio::test]
async fn fin_req_touch_of_unknown_ids_are_not_fatal() -> Result<()> {
    let b = broker().await?;
    let mut c = subscribe(&b, "t", "c", None).await?;
    c.send_raw(format!("FIN {UNKNOWN_ID}\n").as_bytes()).await?;
    c.expect_error(&format!(
        "E_FIN_FAILED FIN {UNKNOWN_ID} failed ID not in flight"
    ))
    .await?;
    c.send_raw(format!("REQ {UNKNOWN_ID} 0\n").as_bytes())
        .await?;
    c.expect_error(&format!(
        "E_REQ_FAILED REQ {UNKNOWN_ID} failed ID not in flight"
    ))
    .await?;
    c.send_raw(format!("TOUCH {UNKNOWN_ID}\n").as_bytes())
        .await?;
    c.expect_error(&format!(
        "E_TOUCH_FAILED TOUCH {UNKNOWN_ID} failed ID not in flight"
    ))
    .await?;

    // The connection still works: it consumes, FINs, and publishes.
    rdy_cmd(&mut c, 1).await?;
    publish(&b, "t", &[b"after errors"]).await?;
    let m = c.expect_message().await?;
    assert_eq!(body(&m), "after errors");
    fin(&mut c, &m).await?;
    sync(&mut c).await?;
    // A FIN of the same ID again is not in flight any more.
    fin(&mut c, &m).await?;
    c.expect_error(&format!(
        "E_FIN_FAILED FIN {} failed ID not in flight",
        m.id
    ))
    .await?;
    sync(&mut c).await
}

#[tokio::test]
async fn fin_req_touch_of_another_consumers_message_are_not_fatal() -> Result<()> {
    let b = broker().await?;
    let mut owner = consumer(&b, "t", "c", 1).await?;
    let mut other = subscribe(&b, "t", "c", None).await?;
    // A consumer of another channel sees the same ID, but not in its own channel's flight.
    let mut elsewhere = subscribe(&b, "t", "other", None).await?;
    publish(&b, "t", &[b"owned"]).await?;
    let m = owner.expect_message().await?;
    let id = m.id;

    other.send_raw(format!("FIN {id}\n").as_bytes()).await?;
    other
        .expect_error(&format!(
            "E_FIN_FAILED FIN {id} failed client does not own message"
        ))
        .await?;
    other.send_raw(format!("REQ {id} 0\n").as_bytes()).await?;
    other
        .expect_error(&format!(
            "E_REQ_FAILED REQ {id} failed client does not own message"
        ))
        .await?;
    other.send_raw(format!("TOUCH {id}\n").as_bytes()).await?;
    other
        .expect_error(&format!(
            "E_TOUCH_FAILED TOUCH {id} failed client does not own message"
        ))
        .await?;
    sync(&mut other).await?;

    elsewhere.send_raw(format!("FIN {id}\n").as_bytes()).await?;
    elsewhere
        .expect_error(&format!("E_FIN_FAILED FIN {id} failed ID not in flight"))
        .await?;

    // The owner's FIN still works; the other consumer is still connected and consumes.
    fin(&mut owner, &m).await?;
    sync(&mut owner).await?;
    owner.send_raw(b"RDY 0\n").await?;
    sync(&mut owner).await?;
    rdy_cmd(&mut other, 1).await?;
    publish(&b, "t", &[b"next"]).await?;
    let n = other.expect_message().await?;
    assert_eq!(body(&n), "next");
    Ok(())
}

#[tokio::test]
async fn auth_is_disabled_and_its_errors_are_fatal() -> Result<()> {
    let b = broker().await?;
    // --max-body-size defaults to 5 MiB.
    let limit = 5 * 1024 * 1024;
    check_fatal(
        &b,
        &[
            fresh(sized("AUTH", b"secret"), "E_AUTH_DISABLED AUTH disabled"),
            fresh("AUTH x\n", "E_INVALID AUTH invalid number of parameters"),
            fresh(
                line_and_size("AUTH", 0),
                "E_BAD_BODY AUTH invalid body size 0",
            ),
            fresh(
                line_and_size("AUTH", limit + 1),
                format!("E_BAD_BODY AUTH body too big {} > {limit}", limit + 1),
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn identify_body_errors_are_fatal() -> Result<()> {
    let b = TestBroker::start(|o| {
        o.max_msg_size = 500;
        o.max_body_size = 1000;
    })
    .await?;
    check_fatal(
        &b,
        &[
            fresh(
                line_and_size("IDENTIFY", 0),
                "E_BAD_BODY IDENTIFY invalid body size 0",
            ),
            fresh(
                line_and_size("IDENTIFY", -3),
                "E_BAD_BODY IDENTIFY invalid body size -3",
            ),
            fresh(
                line_and_size("IDENTIFY", 1001),
                "E_BAD_BODY IDENTIFY body too big 1001 > 1000",
            ),
            fresh(
                sized("IDENTIFY", b"{"),
                "E_BAD_BODY IDENTIFY failed to decode JSON body",
            ),
            fresh(
                sized("IDENTIFY", b"not json"),
                "E_BAD_BODY IDENTIFY failed to decode JSON body",
            ),
            fresh(
                sized("IDENTIFY", br#"{"heartbeat_interval":"1000"}"#),
                "E_BAD_BODY IDENTIFY failed to decode JSON body",
            ),
            fresh(
                sized("IDENTIFY", br#"{"msg_timeout":1500.5}"#),
                "E_BAD_BODY IDENTIFY failed to decode JSON body",
            ),
            fresh(
                sized("IDENTIFY", br#"{"feature_negotiation":"yes"}"#),
                "E_BAD_BODY IDENTIFY failed to decode JSON body",
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn identify_range_errors_are_fatal() -> Result<()> {
    let b = broker().await?;
    let bad = |field: &str, value: i64, what: &str| {
        fresh(
            identify_cmd(&json!({ field: value })),
            format!("E_BAD_BODY IDENTIFY {what} ({value}) is invalid"),
        )
    };
    check_fatal(
        &b,
        &[
            bad("heartbeat_interval", 999, "heartbeat interval"),
            bad("heartbeat_interval", 60001, "heartbeat interval"),
            bad("heartbeat_interval", -2, "heartbeat interval"),
            bad("output_buffer_size", 63, "output buffer size"),
            bad("output_buffer_size", 65537, "output buffer size"),
            bad("output_buffer_size", -2, "output buffer size"),
            bad("output_buffer_timeout", 24, "output buffer timeout"),
            bad("output_buffer_timeout", 30001, "output buffer timeout"),
            bad("output_buffer_timeout", -2, "output buffer timeout"),
            bad("sample_rate", 100, "sample rate"),
            bad("sample_rate", -1, "sample rate"),
            bad("msg_timeout", 999, "msg timeout"),
            bad("msg_timeout", 900001, "msg timeout"),
            bad("msg_timeout", -1, "msg timeout"),
        ],
    )
    .await?;
    // Every bound itself is accepted.
    for (field, value) in [
        ("heartbeat_interval", 1000),
        ("heartbeat_interval", 60000),
        ("output_buffer_size", 64),
        ("output_buffer_size", 65536),
        ("output_buffer_timeout", 25),
        ("output_buffer_timeout", 30000),
        ("sample_rate", 0),
        ("sample_rate", 99),
        ("msg_timeout", 1000),
        ("msg_timeout", 900000),
    ] {
        let mut c = b.connect().await?;
        c.send_raw(&identify_cmd(&json!({ field: value }))).await?;
        c.expect_response(b"OK").await?;
        sync(&mut c).await?;
    }
    Ok(())
}

#[tokio::test]
async fn sub_fails_when_the_channel_has_max_consumers() -> Result<()> {
    let b = TestBroker::start(|o| o.max_channel_consumers = 2).await?;
    let _first = subscribe(&b, "t", "c", None).await?;
    let _second = subscribe(&b, "t", "c", None).await?;
    let mut third = b.connect().await?;
    third.send_raw(b"SUB t c\n").await?;
    expect_fatal(
        &mut third,
        "E_SUB_FAILED SUB failed consumers for t:c exceeds limit of 2",
    )
    .await?;
    // The limit is per channel.
    subscribe(&b, "t", "other", None).await?;
    // A consumer leaving makes room again.
    drop(_second);
    wait_for_stats(&b, "one consumer left", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["client_count"] == 1)
    })
    .await?;
    subscribe(&b, "t", "c", None).await?;
    Ok(())
}

#[tokio::test]
async fn a_full_topic_memory_queue_spills_to_disk_and_drops_nothing() -> Result<()> {
    // nsqd writes to the disk queue when the memory queue is full: no error, no loss.
    let b = TestBroker::start(|o| o.mem_queue_size = 5).await?;
    let mut p = b.connect().await?;
    let mut want = Vec::new();
    for i in 0..8 {
        let body = format!("p{i}");
        p.send_raw(&pub_cmd("t", body.as_bytes())).await?;
        p.expect_response(b"OK").await?;
        want.push(body);
    }
    p.send_raw(&mpub_cmd("t", &[b"m0", b"m1", b"m2"])).await?;
    p.expect_response(b"OK").await?;
    want.extend(["m0", "m1", "m2"].map(String::from));
    let stats = b.stats().await?;
    let t = topic_stats(&stats, "t").unwrap();
    // nsqd's topic depth counts memory and disk; backend_depth the disk part.
    assert_eq!(t["depth"], 11, "{t}");
    assert_eq!(t["backend_depth"], 6, "{t}");

    let mut c = consumer(&b, "t", "c", 20).await?;
    let mut got: Vec<String> = messages(&mut c, 11, true).await?.iter().map(body).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    c.expect_nothing_for(std::time::Duration::from_millis(300))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_full_channel_memory_queue_spills_to_disk_and_drops_nothing() -> Result<()> {
    let b = TestBroker::start(|o| o.mem_queue_size = 5).await?;
    // Subscribed with RDY 0: messages stay queued in the channel.
    let mut c = subscribe(&b, "t", "c", None).await?;
    let mut p = b.connect().await?;
    p.send_raw(&mpub_cmd("t", &[b"a0", b"a1", b"a2"])).await?;
    p.expect_response(b"OK").await?;
    p.send_raw(&mpub_cmd("t", &[b"b0", b"b1", b"b2"])).await?;
    p.expect_response(b"OK").await?;
    p.send_raw(&pub_cmd("t", b"c0")).await?;
    p.expect_response(b"OK").await?;
    // Deferred messages wait in their own queue, not the memory queue.
    p.send_raw(&dpub_cmd("t", 100, b"d0")).await?;
    p.expect_response(b"OK").await?;
    let ch = wait_for_stats(&b, "7 queued", |s| {
        channel_stats(s, "t", "c").is_some_and(|c| c["depth"] == 7)
    })
    .await?;
    let ch = channel_stats(&ch, "t", "c").unwrap();
    assert_eq!(ch["backend_depth"], 2, "{ch}");

    rdy_cmd(&mut c, 20).await?;
    let mut got: Vec<String> = messages(&mut c, 8, true).await?.iter().map(body).collect();
    got.sort();
    assert_eq!(got, ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "d0"]);
    c.expect_nothing_for(std::time::Duration::from_millis(300))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_disk_write_error_is_fatal_e_pub_failed() -> Result<()> {
    // No memory queue: every message goes to disk, and the data directory is replaced by a
    // plain file (a permission change would not stop root).
    let b = TestBroker::start(|o| o.mem_queue_size = 0).await?;
    // Let the broker finish starting up (its first metadata write) before the rug is pulled.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    b.stats().await?;
    std::fs::remove_dir_all(b.data_path())?;
    std::fs::write(b.data_path(), b"not a directory")?;
    let mut p = b.connect().await?;
    p.send_raw(&pub_cmd("t", b"nowhere to go")).await?;
    match p.next_frame().await? {
        proto::wire::Frame::Error(e) if e.starts_with(b"E_PUB_FAILED PUB failed ") => {}
        other => anyhow::bail!("expected E_PUB_FAILED PUB failed <error>, got {other:?}"),
    }
    p.expect_closed().await
}

#[tokio::test]
async fn rdy_after_cls_is_ignored_even_when_malformed() -> Result<()> {
    // nsqd checks for the closing state before it parses the count.
    let b = TestBroker::start(|o| o.max_rdy_count = 10).await?;
    let mut c = open(&b, Prelude::Closing).await?;
    c.send_raw(b"RDY 5\nRDY x\nRDY 11\nRDY -1\n").await?;
    sync(&mut c).await?;
    let ch = channel(&b, "t", "c").await?;
    assert_eq!(ch["clients"][0]["ready_count"], 0, "{ch}");
    assert_eq!(ch["clients"][0]["state"], 4, "{ch}");
    Ok(())
}
