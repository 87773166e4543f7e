//! Client commands: a line `NAME param…\n`, then for some commands a binary body.
//!
//! [`Decoder::decode`] takes one command at a time off a read buffer. It checks the input in
//! nsqd's order (parameters, names, sizes, body) and reports nsqd's error code and text, so
//! a client cannot tell the two apart. Bodies are slices of the read buffer, never copies.

use super::error::{ErrorCode, ProtocolError};
use super::message::MessageId;
use super::names::{is_valid_channel_name, is_valid_topic_name};
use super::quote::go_quote;
use bytes::{BufMut, Bytes, BytesMut};
use std::ops::Range;

/// The longest command line accepted, as nsqd's 16 KiB read buffer.
pub const MAX_LINE_LEN: usize = 16 * 1024;

/// The server limits the decoder enforces while reading a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single message body (`--max-msg-size`).
    pub max_msg_size: u64,
    /// Largest MPUB, IDENTIFY or AUTH body (`--max-body-size`).
    pub max_body_size: u64,
    /// Largest RDY count (`--max-rdy-count`).
    pub max_rdy_count: u64,
    /// Largest DPUB delay in milliseconds (`--max-req-timeout`).
    pub max_req_timeout_ms: u64,
}

impl Default for Limits {
    /// nsqd's defaults.
    fn default() -> Self {
        Limits {
            max_msg_size: 1024 * 1024,
            max_body_size: 5 * 1024 * 1024,
            max_rdy_count: 2500,
            max_req_timeout_ms: 60 * 60 * 1000,
        }
    }
}

/// Which command a line names, for the checks a server makes before the rest is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    Identify,
    Auth,
    Sub,
    Pub,
    Mpub,
    Dpub,
    Rdy,
    Fin,
    Req,
    Touch,
    Cls,
    Nop,
}

impl CommandName {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Identify => "IDENTIFY",
            CommandName::Auth => "AUTH",
            CommandName::Sub => "SUB",
            CommandName::Pub => "PUB",
            CommandName::Mpub => "MPUB",
            CommandName::Dpub => "DPUB",
            CommandName::Rdy => "RDY",
            CommandName::Fin => "FIN",
            CommandName::Req => "REQ",
            CommandName::Touch => "TOUCH",
            CommandName::Cls => "CLS",
            CommandName::Nop => "NOP",
        }
    }

    fn parse(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"IDENTIFY" => CommandName::Identify,
            b"AUTH" => CommandName::Auth,
            b"SUB" => CommandName::Sub,
            b"PUB" => CommandName::Pub,
            b"MPUB" => CommandName::Mpub,
            b"DPUB" => CommandName::Dpub,
            b"RDY" => CommandName::Rdy,
            b"FIN" => CommandName::Fin,
            b"REQ" => CommandName::Req,
            b"TOUCH" => CommandName::Touch,
            b"CLS" => CommandName::Cls,
            b"NOP" => CommandName::Nop,
            _ => return None,
        })
    }
}

/// A topic or channel name that passed validation (ASCII only).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Name(Bytes);

impl Name {
    /// A name from text; `None` when it breaks the naming rule.
    pub fn new(name: &str) -> Option<Name> {
        is_valid_topic_name(name.as_bytes()).then(|| Name(Bytes::copy_from_slice(name.as_bytes())))
    }

    pub fn as_str(&self) -> &str {
        // Validated names are ASCII, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// A decoded client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Identify(Bytes),
    Auth(Bytes),
    Sub {
        topic: Name,
        channel: Name,
    },
    Pub {
        topic: Name,
        body: Bytes,
    },
    Mpub {
        topic: Name,
        bodies: Vec<Bytes>,
    },
    Dpub {
        topic: Name,
        defer_ms: u64,
        body: Bytes,
    },
    Rdy(u64),
    Fin(MessageId),
    Req {
        id: MessageId,
        timeout_ms: u64,
    },
    Touch(MessageId),
    Cls,
    Nop,
}

impl Command {
    pub fn name(&self) -> CommandName {
        match self {
            Command::Identify(_) => CommandName::Identify,
            Command::Auth(_) => CommandName::Auth,
            Command::Sub { .. } => CommandName::Sub,
            Command::Pub { .. } => CommandName::Pub,
            Command::Mpub { .. } => CommandName::Mpub,
            Command::Dpub { .. } => CommandName::Dpub,
            Command::Rdy(_) => CommandName::Rdy,
            Command::Fin(_) => CommandName::Fin,
            Command::Req { .. } => CommandName::Req,
            Command::Touch(_) => CommandName::Touch,
            Command::Cls => CommandName::Cls,
            Command::Nop => CommandName::Nop,
        }
    }

    /// Appends this command as a client sends it.
    pub fn encode(&self, dst: &mut BytesMut) {
        let name = self.name().as_str().as_bytes();
        match self {
            Command::Identify(body) | Command::Auth(body) => {
                put_line(dst, &[name]);
                put_sized(dst, body);
            }
            Command::Sub { topic, channel } => put_line(dst, &[name, &topic.0, &channel.0]),
            Command::Pub { topic, body } => {
                put_line(dst, &[name, &topic.0]);
                put_sized(dst, body);
            }
            Command::Mpub { topic, bodies } => {
                put_line(dst, &[name, &topic.0]);
                let size: usize = 4 + bodies.iter().map(|b| 4 + b.len()).sum::<usize>();
                dst.put_u32(size as u32);
                dst.put_u32(bodies.len() as u32);
                for body in bodies {
                    put_sized(dst, body);
                }
            }
            Command::Dpub {
                topic,
                defer_ms,
                body,
            } => {
                put_line(dst, &[name, &topic.0, defer_ms.to_string().as_bytes()]);
                put_sized(dst, body);
            }
            Command::Rdy(count) => put_line(dst, &[name, count.to_string().as_bytes()]),
            Command::Fin(id) | Command::Touch(id) => put_line(dst, &[name, &id.0]),
            Command::Req { id, timeout_ms } => {
                put_line(dst, &[name, &id.0, timeout_ms.to_string().as_bytes()])
            }
            Command::Cls | Command::Nop => put_line(dst, &[name]),
        }
    }
}

fn put_line(dst: &mut BytesMut, parts: &[&[u8]]) {
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            dst.put_u8(b' ');
        }
        dst.put_slice(part);
    }
    dst.put_u8(b'\n');
}

fn put_sized(dst: &mut BytesMut, body: &[u8]) {
    dst.put_u32(body.len() as u32);
    dst.put_slice(body);
}

/// What the decoder does after a precheck passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precheck {
    /// Read and check the rest of the command.
    #[default]
    Parse,
    /// Consume the line without looking at its parameters and report [`Command::Nop`]: how
    /// nsqd ignores RDY on a closing connection. Commands with a body are parsed regardless.
    Skip,
}

impl From<()> for Precheck {
    fn from((): ()) -> Precheck {
        Precheck::Parse
    }
}

/// Decodes commands from a connection's read buffer.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    /// How far a partly received MPUB has been checked, so each read scans only new bytes.
    mpub: MpubScan,
}

#[derive(Debug, Default)]
struct MpubScan {
    /// Offset of the next message's size field, 0 when no MPUB is pending.
    next: usize,
    /// The pending MPUB's topic passed the caller's check.
    topic_checked: bool,
    bodies: Vec<Range<usize>>,
}

/// What a command needs after its line, in nsqd's reading order.
enum Parsed {
    /// Complete: take this many bytes and build the command from them.
    Done(usize, Shape),
    Incomplete,
}

enum Shape {
    Identify(Range<usize>),
    Auth(Range<usize>),
    Sub(Range<usize>, Range<usize>),
    Pub(Range<usize>, Range<usize>),
    Mpub(Range<usize>),
    Dpub(Range<usize>, u64, Range<usize>),
    Rdy(u64),
    Fin(MessageId),
    Req(MessageId, u64),
    Touch(MessageId),
    Cls,
    Nop,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            mpub: MpubScan::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes one command off the front of `src`. Returns `Ok(None)` while the command is
    /// incomplete (nothing is consumed). `precheck` runs as soon as the line names a known
    /// command, before its parameters and body are examined, where nsqd checks the connection's
    /// state; an error it returns is returned as is. Every error is final for the connection
    /// except the ones [`ProtocolError::is_fatal`] says are not (the decoder makes none of those).
    pub fn decode<R>(
        &mut self,
        src: &mut BytesMut,
        precheck: impl FnMut(CommandName) -> Result<R, ProtocolError>,
    ) -> Result<Option<Command>, ProtocolError>
    where
        R: Into<Precheck>,
    {
        self.decode_with(src, precheck, |_| Ok(()))
    }

    /// [`Decoder::decode`], with `mpub_topic_check` run on an MPUB's topic once the name is
    /// valid and before the body is read: where nsqd checks that the client may publish.
    pub fn decode_with<R>(
        &mut self,
        src: &mut BytesMut,
        mut precheck: impl FnMut(CommandName) -> Result<R, ProtocolError>,
        mut mpub_topic_check: impl FnMut(&str) -> Result<(), ProtocolError>,
    ) -> Result<Option<Command>, ProtocolError>
    where
        R: Into<Precheck>,
    {
        let Some(nl) = src.iter().take(MAX_LINE_LEN + 1).position(|&b| b == b'\n') else {
            if src.len() > MAX_LINE_LEN {
                return Err(ProtocolError::invalid(format!(
                    "command line longer than {MAX_LINE_LEN} bytes"
                )));
            }
            return Ok(None);
        };
        let line_end = if nl > 0 && src[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        let parsed = self.parse(
            &src[..],
            line_end,
            nl + 1,
            &mut precheck,
            &mut mpub_topic_check,
        );
        let (len, shape) = match parsed {
            Ok(Parsed::Done(len, shape)) => (len, shape),
            Ok(Parsed::Incomplete) => return Ok(None),
            Err(e) => {
                self.mpub = MpubScan::default();
                return Err(e);
            }
        };
        let frame = src.split_to(len).freeze();
        let name = |r: Range<usize>| Name(frame.slice(r));
        Ok(Some(match shape {
            Shape::Identify(body) => Command::Identify(frame.slice(body)),
            Shape::Auth(body) => Command::Auth(frame.slice(body)),
            Shape::Sub(t, c) => Command::Sub {
                topic: name(t),
                channel: name(c),
            },
            Shape::Pub(t, body) => Command::Pub {
                topic: name(t),
                body: frame.slice(body),
            },
            Shape::Mpub(t) => {
                let bodies = self.mpub.bodies.drain(..).map(|r| frame.slice(r)).collect();
                self.mpub.next = 0;
                self.mpub.topic_checked = false;
                Command::Mpub {
                    topic: name(t),
                    bodies,
                }
            }
            Shape::Dpub(t, defer_ms, body) => Command::Dpub {
                topic: name(t),
                defer_ms,
                body: frame.slice(body),
            },
            Shape::Rdy(n) => Command::Rdy(n),
            Shape::Fin(id) => Command::Fin(id),
            Shape::Req(id, ms) => Command::Req { id, timeout_ms: ms },
            Shape::Touch(id) => Command::Touch(id),
            Shape::Cls => Command::Cls,
            Shape::Nop => Command::Nop,
        }))
    }

    fn parse<R>(
        &mut self,
        src: &[u8],
        line_end: usize,
        body_start: usize,
        precheck: &mut impl FnMut(CommandName) -> Result<R, ProtocolError>,
        mpub_topic_check: &mut impl FnMut(&str) -> Result<(), ProtocolError>,
    ) -> Result<Parsed, ProtocolError>
    where
        R: Into<Precheck>,
    {
        let params = split_params(&src[..line_end]);
        let Some(cmd) = CommandName::parse(&src[params[0].clone()]) else {
            return Err(ProtocolError::invalid(format!(
                "invalid command {}",
                String::from_utf8_lossy(&src[params[0].clone()])
            )));
        };
        let has_body = matches!(
            cmd,
            CommandName::Identify
                | CommandName::Auth
                | CommandName::Pub
                | CommandName::Mpub
                | CommandName::Dpub
        );
        if precheck(cmd)?.into() == Precheck::Skip && !has_body {
            return Ok(Parsed::Done(body_start, Shape::Nop));
        }
        let lim = self.limits;
        let param = |i: usize| &src[params[i].clone()];
        let done = |shape| Ok(Parsed::Done(body_start, shape));
        match cmd {
            CommandName::Nop => done(Shape::Nop),
            CommandName::Cls => done(Shape::Cls),
            CommandName::Rdy => {
                let mut count = 1;
                if params.len() > 1 {
                    count = parse_base10(param(1)).ok_or_else(|| {
                        ProtocolError::invalid(format!(
                            "RDY could not parse count {}",
                            String::from_utf8_lossy(param(1))
                        ))
                    })?;
                }
                if count > lim.max_rdy_count {
                    return Err(ProtocolError::invalid(format!(
                        "RDY count {count} out of range 0-{}",
                        lim.max_rdy_count
                    )));
                }
                done(Shape::Rdy(count))
            }
            CommandName::Fin | CommandName::Touch => {
                if params.len() < 2 {
                    return Err(ProtocolError::invalid(format!(
                        "{} insufficient number of params",
                        cmd.as_str()
                    )));
                }
                let id = message_id(param(1))?;
                done(if cmd == CommandName::Fin {
                    Shape::Fin(id)
                } else {
                    Shape::Touch(id)
                })
            }
            CommandName::Req => {
                if params.len() < 3 {
                    return Err(ProtocolError::invalid("REQ insufficient number of params"));
                }
                let id = message_id(param(1))?;
                let ms = parse_base10(param(2)).ok_or_else(|| {
                    ProtocolError::invalid(format!(
                        "REQ could not parse timeout {}",
                        String::from_utf8_lossy(param(2))
                    ))
                })?;
                done(Shape::Req(id, ms))
            }
            CommandName::Sub => {
                if params.len() < 3 {
                    return Err(ProtocolError::invalid(
                        "SUB insufficient number of parameters",
                    ));
                }
                if !is_valid_topic_name(param(1)) {
                    return Err(ProtocolError::new(
                        ErrorCode::BadTopic,
                        format!("SUB topic name {} is not valid", go_quote(param(1))),
                    ));
                }
                if !is_valid_channel_name(param(2)) {
                    return Err(ProtocolError::new(
                        ErrorCode::BadChannel,
                        format!("SUB channel name {} is not valid", go_quote(param(2))),
                    ));
                }
                done(Shape::Sub(params[1].clone(), params[2].clone()))
            }
            CommandName::Identify | CommandName::Auth => {
                let what = cmd.as_str();
                if cmd == CommandName::Auth && params.len() != 1 {
                    return Err(ProtocolError::invalid("AUTH invalid number of parameters"));
                }
                let Some(size) = read_len(src, body_start) else {
                    return Ok(Parsed::Incomplete);
                };
                let bad = |t: String| ProtocolError::new(ErrorCode::BadBody, t);
                if i64::from(size) > lim.max_body_size as i64 {
                    return Err(bad(format!(
                        "{what} body too big {size} > {}",
                        lim.max_body_size
                    )));
                }
                if size <= 0 {
                    return Err(bad(format!("{what} invalid body size {size}")));
                }
                let body = body_start + 4..body_start + 4 + size as usize;
                if src.len() < body.end {
                    return Ok(Parsed::Incomplete);
                }
                let end = body.end;
                Ok(Parsed::Done(
                    end,
                    if cmd == CommandName::Identify {
                        Shape::Identify(body)
                    } else {
                        Shape::Auth(body)
                    },
                ))
            }
            CommandName::Pub | CommandName::Dpub => {
                let what = cmd.as_str();
                let needed = if cmd == CommandName::Pub { 2 } else { 3 };
                if params.len() < needed {
                    return Err(ProtocolError::invalid(format!(
                        "{what} insufficient number of parameters"
                    )));
                }
                check_topic(what, param(1), "")?;
                let mut defer_ms = 0;
                if cmd == CommandName::Dpub {
                    defer_ms = parse_base10(param(2)).ok_or_else(|| {
                        ProtocolError::invalid(format!(
                            "DPUB could not parse timeout {}",
                            String::from_utf8_lossy(param(2))
                        ))
                    })?;
                    if defer_ms > lim.max_req_timeout_ms {
                        return Err(ProtocolError::invalid(format!(
                            "DPUB timeout {defer_ms} out of range 0-{}",
                            lim.max_req_timeout_ms
                        )));
                    }
                }
                let Some(size) = read_len(src, body_start) else {
                    return Ok(Parsed::Incomplete);
                };
                let bad = |t: String| ProtocolError::new(ErrorCode::BadMessage, t);
                if size <= 0 {
                    return Err(bad(format!("{what} invalid message body size {size}")));
                }
                if size as u64 > lim.max_msg_size {
                    return Err(bad(format!(
                        "{what} message too big {size} > {}",
                        lim.max_msg_size
                    )));
                }
                let body = body_start + 4..body_start + 4 + size as usize;
                if src.len() < body.end {
                    return Ok(Parsed::Incomplete);
                }
                let end = body.end;
                let topic = params[1].clone();
                Ok(Parsed::Done(
                    end,
                    if cmd == CommandName::Pub {
                        Shape::Pub(topic, body)
                    } else {
                        Shape::Dpub(topic, defer_ms, body)
                    },
                ))
            }
            CommandName::Mpub => {
                if params.len() < 2 {
                    return Err(ProtocolError::invalid(
                        "MPUB insufficient number of parameters",
                    ));
                }
                // nsqd repeats the code inside the text for MPUB; clients may match on it.
                check_topic("MPUB", param(1), "E_BAD_TOPIC ")?;
                // Once per MPUB, not again for each read of its body.
                if !self.mpub.topic_checked {
                    mpub_topic_check(std::str::from_utf8(param(1)).unwrap_or_default())?;
                    self.mpub.topic_checked = true;
                }
                self.scan_mpub(src, body_start, params[1].clone())
            }
        }
    }

    /// Checks an MPUB body as far as it has arrived. Like nsqd, the messages are read one by
    /// one by their own sizes; the declared body size is only range-checked.
    fn scan_mpub(
        &mut self,
        src: &[u8],
        body_start: usize,
        topic: Range<usize>,
    ) -> Result<Parsed, ProtocolError> {
        let lim = self.limits;
        let Some(size) = read_len(src, body_start) else {
            return Ok(Parsed::Incomplete);
        };
        let bad_body = |t: String| ProtocolError::new(ErrorCode::BadBody, t);
        if size <= 0 {
            return Err(bad_body(format!("MPUB invalid body size {size}")));
        }
        if size as u64 > lim.max_body_size {
            return Err(bad_body(format!(
                "MPUB body too big {size} > {}",
                lim.max_body_size
            )));
        }
        let Some(count) = read_len(src, body_start + 4) else {
            return Ok(Parsed::Incomplete);
        };
        check_mpub_count(count, &lim)?;
        if self.mpub.next == 0 {
            self.mpub.next = body_start + 8;
            self.mpub.bodies.clear();
        }
        while self.mpub.bodies.len() < count as usize {
            let i = self.mpub.bodies.len();
            let Some(msg_size) = read_len(src, self.mpub.next) else {
                return Ok(Parsed::Incomplete);
            };
            check_mpub_message_size(i, msg_size, &lim)?;
            let body = self.mpub.next + 4..self.mpub.next + 4 + msg_size as usize;
            if src.len() < body.end {
                return Ok(Parsed::Incomplete);
            }
            self.mpub.next = body.end;
            self.mpub.bodies.push(body);
        }
        Ok(Parsed::Done(self.mpub.next, Shape::Mpub(topic)))
    }
}

/// Splits a complete MPUB message list, `[4B count]([4B size][message])*`, as HTTP's binary
/// `/mpub` receives it, with the TCP command's checks and errors.
pub fn split_mpub_messages(body: &Bytes, limits: &Limits) -> Result<Vec<Bytes>, ProtocolError> {
    let count = read_len(body, 0).ok_or_else(|| {
        ProtocolError::new(ErrorCode::BadBody, "MPUB failed to read message count")
    })?;
    check_mpub_count(count, limits)?;
    let mut at = 4;
    let mut messages = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let size = read_len(body, at).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::BadMessage,
                format!("MPUB failed to read message({i}) body size"),
            )
        })?;
        check_mpub_message_size(i, size, limits)?;
        let end = at + 4 + size as usize;
        if body.len() < end {
            return Err(ProtocolError::new(
                ErrorCode::BadMessage,
                "MPUB failed to read message body",
            ));
        }
        messages.push(body.slice(at + 4..end));
        at = end;
    }
    Ok(messages)
}

fn check_mpub_count(count: i32, limits: &Limits) -> Result<(), ProtocolError> {
    let max_count = limits.max_body_size.saturating_sub(4) / 5;
    if count <= 0 || count as u64 > max_count {
        return Err(ProtocolError::new(
            ErrorCode::BadBody,
            format!("MPUB invalid message count {count}"),
        ));
    }
    Ok(())
}

fn check_mpub_message_size(i: usize, size: i32, limits: &Limits) -> Result<(), ProtocolError> {
    let bad = |t: String| Err(ProtocolError::new(ErrorCode::BadMessage, t));
    if size <= 0 {
        return bad(format!("MPUB invalid message({i}) body size {size}"));
    }
    if size as u64 > limits.max_msg_size {
        return bad(format!(
            "MPUB message too big {size} > {}",
            limits.max_msg_size
        ));
    }
    Ok(())
}

fn check_topic(what: &str, topic: &[u8], prefix: &str) -> Result<(), ProtocolError> {
    if is_valid_topic_name(topic) {
        return Ok(());
    }
    Err(ProtocolError::new(
        ErrorCode::BadTopic,
        format!("{prefix}{what} topic name {} is not valid", go_quote(topic)),
    ))
}

/// Splits a command line on single spaces, as nsqd does (empty parameters are kept).
fn split_params(line: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(3);
    let mut start = 0;
    for (i, &b) in line.iter().enumerate() {
        if b == b' ' {
            out.push(start..i);
            start = i + 1;
        }
    }
    out.push(start..line.len());
    out
}

/// A big-endian signed 32-bit length at `at`, as nsqd reads sizes (so 2^31 and up are negative).
fn read_len(src: &[u8], at: usize) -> Option<i32> {
    let bytes = src.get(at..at + 4)?;
    Some(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// nsqd's unsigned base-10 parser: digits only (no sign); an empty string is 0.
fn parse_base10(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

fn message_id(param: &[u8]) -> Result<MessageId, ProtocolError> {
    MessageId::from_slice(param).ok_or_else(|| ProtocolError::invalid("invalid message ID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<Option<Command>, ProtocolError> {
        let mut d = Decoder::new(Limits::default());
        d.decode(&mut BytesMut::from(input), |_| Ok(()))
    }

    fn err_text(input: &[u8]) -> String {
        decode_all(input).unwrap_err().to_string()
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn simple_commands() {
        assert_eq!(decode_all(b"NOP\n").unwrap(), Some(Command::Nop));
        assert_eq!(decode_all(b"CLS\r\n").unwrap(), Some(Command::Cls));
        assert_eq!(decode_all(b"RDY 100\n").unwrap(), Some(Command::Rdy(100)));
        assert_eq!(decode_all(b"RDY\n").unwrap(), Some(Command::Rdy(1)));
        assert_eq!(
            decode_all(b"SUB t c\n").unwrap(),
            Some(Command::Sub {
                topic: name("t"),
                channel: name("c")
            })
        );
        let id = MessageId(*b"0123456789abcdef");
        assert_eq!(
            decode_all(b"FIN 0123456789abcdef\n").unwrap(),
            Some(Command::Fin(id))
        );
        assert_eq!(
            decode_all(b"TOUCH 0123456789abcdef\n").unwrap(),
            Some(Command::Touch(id))
        );
        assert_eq!(
            decode_all(b"REQ 0123456789abcdef 500\n").unwrap(),
            Some(Command::Req {
                id,
                timeout_ms: 500
            })
        );
    }

    #[test]
    fn bodies() {
        assert_eq!(
            decode_all(b"PUB t\n\x00\x00\x00\x02hi").unwrap(),
            Some(Command::Pub {
                topic: name("t"),
                body: Bytes::from_static(b"hi")
            })
        );
        assert_eq!(
            decode_all(b"DPUB t 1000\n\x00\x00\x00\x01x").unwrap(),
            Some(Command::Dpub {
                topic: name("t"),
                defer_ms: 1000,
                body: Bytes::from_static(b"x")
            })
        );
        assert_eq!(
            decode_all(
                b"MPUB t\n\x00\x00\x00\x0d\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x00"
            )
            .unwrap_err()
            .to_string(),
            "E_BAD_MESSAGE MPUB invalid message(1) body size 0"
        );
        assert_eq!(
            decode_all(
                b"MPUB t\n\x00\x00\x00\x0e\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x01b"
            )
            .unwrap(),
            Some(Command::Mpub {
                topic: name("t"),
                bodies: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
            })
        );
        assert_eq!(
            decode_all(b"IDENTIFY\n\x00\x00\x00\x02{}").unwrap(),
            Some(Command::Identify(Bytes::from_static(b"{}")))
        );
        assert_eq!(
            decode_all(b"AUTH\n\x00\x00\x00\x03abc").unwrap(),
            Some(Command::Auth(Bytes::from_static(b"abc")))
        );
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let whole = b"MPUB t\n\x00\x00\x00\x0e\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x01b";
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            buf.put_u8(*b);
            let got = d.decode(&mut buf, |_| Ok(())).unwrap();
            if i + 1 < whole.len() {
                assert_eq!(got, None, "at byte {i}");
                assert_eq!(buf.len(), i + 1);
            } else {
                assert!(matches!(got, Some(Command::Mpub { .. })));
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn error_texts_match_nsqd() {
        let cases: &[(&[u8], &str)] = &[
            (b"FOO\n", "E_INVALID invalid command FOO"),
            (b"PUB\n", "E_INVALID PUB insufficient number of parameters"),
            (
                b"PUB a$b\n",
                "E_BAD_TOPIC PUB topic name \"a$b\" is not valid",
            ),
            (
                b"MPUB a$b\n",
                "E_BAD_TOPIC E_BAD_TOPIC MPUB topic name \"a$b\" is not valid",
            ),
            (
                b"PUB t\n\x00\x00\x00\x00",
                "E_BAD_MESSAGE PUB invalid message body size 0",
            ),
            (
                b"PUB t\n\x00\x10\x00\x01",
                "E_BAD_MESSAGE PUB message too big 1048577 > 1048576",
            ),
            (
                b"PUB t\n\xff\xff\xff\xff",
                "E_BAD_MESSAGE PUB invalid message body size -1",
            ),
            (
                b"DPUB t\n",
                "E_INVALID DPUB insufficient number of parameters",
            ),
            (b"DPUB t x\n", "E_INVALID DPUB could not parse timeout x"),
            (b"DPUB t -1\n", "E_INVALID DPUB could not parse timeout -1"),
            (
                b"DPUB t 3600001\n",
                "E_INVALID DPUB timeout 3600001 out of range 0-3600000",
            ),
            (
                b"MPUB t\n\x00\x00\x00\x00",
                "E_BAD_BODY MPUB invalid body size 0",
            ),
            (
                b"MPUB t\n\x00\x50\x00\x01",
                "E_BAD_BODY MPUB body too big 5242881 > 5242880",
            ),
            (
                b"MPUB t\n\x00\x00\x00\x10\x00\x00\x00\x00",
                "E_BAD_BODY MPUB invalid message count 0",
            ),
            (
                b"MPUB t\n\x00\x00\x00\x10\x00\x10\x00\x00",
                "E_BAD_BODY MPUB invalid message count 1048576",
            ),
            (
                b"MPUB t\n\x00\x00\x00\x10\x00\x00\x00\x01\x00\x10\x00\x01",
                "E_BAD_MESSAGE MPUB message too big 1048577 > 1048576",
            ),
            (
                b"SUB t\n",
                "E_INVALID SUB insufficient number of parameters",
            ),
            (
                b"SUB t! c\n",
                "E_BAD_TOPIC SUB topic name \"t!\" is not valid",
            ),
            (
                b"SUB t c!\n",
                "E_BAD_CHANNEL SUB channel name \"c!\" is not valid",
            ),
            (b"RDY x\n", "E_INVALID RDY could not parse count x"),
            (
                b"RDY 2501\n",
                "E_INVALID RDY count 2501 out of range 0-2500",
            ),
            (b"FIN\n", "E_INVALID FIN insufficient number of params"),
            (b"FIN 123\n", "E_INVALID invalid message ID"),
            (b"TOUCH\n", "E_INVALID TOUCH insufficient number of params"),
            (
                b"REQ 0123456789abcdef\n",
                "E_INVALID REQ insufficient number of params",
            ),
            (
                b"REQ 0123456789abcdef x\n",
                "E_INVALID REQ could not parse timeout x",
            ),
            (
                b"IDENTIFY\n\x00\x00\x00\x00",
                "E_BAD_BODY IDENTIFY invalid body size 0",
            ),
            (
                b"IDENTIFY\n\x00\x50\x00\x01",
                "E_BAD_BODY IDENTIFY body too big 5242881 > 5242880",
            ),
            (b"AUTH x\n", "E_INVALID AUTH invalid number of parameters"),
            (
                b"AUTH\n\x80\x00\x00\x00",
                "E_BAD_BODY AUTH invalid body size -2147483648",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                &err_text(input),
                want,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_skipped_command_is_consumed_unparsed_as_nop() {
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"RDY nonsense\nNOP\n"[..]);
        let skip = |_| Ok(Precheck::Skip);
        assert_eq!(d.decode(&mut buf, skip), Ok(Some(Command::Nop)));
        assert_eq!(&buf[..], b"NOP\n");
    }

    #[test]
    fn precheck_runs_before_the_body_is_read() {
        let mut d = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"IDENTIFY\n"[..]);
        let err = d
            .decode(&mut buf, |name| {
                assert_eq!(name, CommandName::Identify);
                Err::<(), _>(ProtocolError::invalid("cannot IDENTIFY in current state"))
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "E_INVALID cannot IDENTIFY in current state"
        );
    }

    #[test]
    fn mpub_topic_check_runs_after_the_name_and_before_the_body() {
        let refuse = |topic: &str| {
            Err(ProtocolError::new(
                ErrorCode::Unauthorized,
                format!("AUTH failed for MPUB on {topic:?} \"\""),
            ))
        };
        let mut d = Decoder::new(Limits::default());
        // The body has not arrived: refused at once.
        let mut buf = BytesMut::from(&b"MPUB t\n"[..]);
        let err = d.decode_with(&mut buf, |_| Ok(()), refuse).unwrap_err();
        assert_eq!(
            err.to_string(),
            "E_UNAUTHORIZED AUTH failed for MPUB on \"t\" \"\""
        );
        // A bad name is refused first, as in nsqd.
        let mut buf = BytesMut::from(&b"MPUB b$d\n"[..]);
        let err = d.decode_with(&mut buf, |_| Ok(()), refuse).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadTopic);
        // Checked once per MPUB however its body arrives.
        let mut checks = 0;
        let mut buf = BytesMut::from(&b"MPUB t\n\x00\x00\x00\x09"[..]);
        let mut count = |_: &str| {
            checks += 1;
            Ok(())
        };
        assert_eq!(d.decode_with(&mut buf, |_| Ok(()), &mut count), Ok(None));
        buf.extend_from_slice(b"\x00\x00\x00\x01\x00\x00\x00\x01x");
        let got = d.decode_with(&mut buf, |_| Ok(()), &mut count).unwrap();
        assert!(matches!(got, Some(Command::Mpub { .. })));
        assert_eq!(checks, 1);
    }

    #[test]
    fn overlong_line_is_refused() {
        let line = vec![b'A'; MAX_LINE_LEN + 1];
        assert!(decode_all(&line).unwrap_err().is_fatal());
        assert_eq!(decode_all(&line[..MAX_LINE_LEN]).unwrap(), None);
    }

    #[test]
    fn split_mpub_messages_checks_like_the_command() {
        let lim = Limits::default();
        let ok = Bytes::from_static(b"\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x02bc");
        assert_eq!(
            split_mpub_messages(&ok, &lim).unwrap(),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
        );
        let cases: &[(&[u8], &str)] = &[
            (b"", "E_BAD_BODY MPUB failed to read message count"),
            (
                b"\x00\x00\x00\x00",
                "E_BAD_BODY MPUB invalid message count 0",
            ),
            (
                b"\x00\x00\x00\x01",
                "E_BAD_MESSAGE MPUB failed to read message(0) body size",
            ),
            (
                b"\x00\x00\x00\x01\x00\x00\x00\x00",
                "E_BAD_MESSAGE MPUB invalid message(0) body size 0",
            ),
            (
                b"\x00\x00\x00\x01\x00\x00\x00\x05ab",
                "E_BAD_MESSAGE MPUB failed to read message body",
            ),
        ];
        for (body, want) in cases {
            let got = split_mpub_messages(&Bytes::copy_from_slice(body), &lim).unwrap_err();
            assert_eq!(&got.to_string(), want);
        }
    }

    #[test]
    fn base10_matches_nsqd() {
        assert_eq!(parse_base10(b""), Some(0));
        assert_eq!(parse_base10(b"0042"), Some(42));
        assert_eq!(parse_base10(b"+1"), None);
        assert_eq!(parse_base10(b"99999999999999999999999"), None);
    }
}
