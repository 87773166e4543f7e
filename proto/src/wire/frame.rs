//! Server frames: `[4B size = 4 + len(data)][4B frame type][data]`, big-endian.

use super::error::ProtocolError;
use super::message::{MSG_HEADER_LEN, Message, MessageId, encode_message};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before a frame's data: size and type.
pub const FRAME_HEADER_LEN: usize = 8;

/// The three kinds of server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum FrameType {
    Response = 0,
    Error = 1,
    Message = 2,
}

/// A decoded server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Response(Bytes),
    Error(Bytes),
    Message(Message),
}

/// Why a byte stream is not a valid sequence of frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame size {size} is out of range 4-{max}")]
    BadSize { size: i64, max: usize },
    #[error("unknown frame type {0}")]
    UnknownType(i32),
    #[error("message frame of {0} bytes is shorter than a message header")]
    ShortMessage(usize),
}

/// Appends a response frame.
pub fn write_response(dst: &mut BytesMut, data: &[u8]) {
    put_header(dst, FrameType::Response, data.len());
    dst.put_slice(data);
}

/// Appends an error frame carrying `"<CODE> <text>"`, or just the code when there is no text
/// (as nsqd's `E_BAD_PROTOCOL`).
pub fn write_error(dst: &mut BytesMut, err: &ProtocolError) {
    let code = err.code.as_str();
    if err.text.is_empty() {
        put_header(dst, FrameType::Error, code.len());
        dst.put_slice(code.as_bytes());
        return;
    }
    put_header(dst, FrameType::Error, code.len() + 1 + err.text.len());
    dst.put_slice(code.as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(err.text.as_bytes());
}

/// Appends a message frame built from its parts.
pub fn write_message(
    dst: &mut BytesMut,
    timestamp: i64,
    attempts: u16,
    id: &MessageId,
    body: &[u8],
) {
    put_header(dst, FrameType::Message, MSG_HEADER_LEN + body.len());
    encode_message(dst, timestamp, attempts, id, body);
}

/// Bytes a message frame with a body of `body_len` takes.
pub fn message_frame_len(body_len: usize) -> usize {
    FRAME_HEADER_LEN + MSG_HEADER_LEN + body_len
}

fn put_header(dst: &mut BytesMut, kind: FrameType, data_len: usize) {
    dst.reserve(FRAME_HEADER_LEN + data_len);
    // Data never exceeds the body limits, which are far below i32::MAX.
    dst.put_u32((4 + data_len) as u32);
    dst.put_i32(kind as i32);
}

impl Frame {
    /// Appends this frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Response(data) => write_response(dst, data),
            Frame::Error(data) => {
                put_header(dst, FrameType::Error, data.len());
                dst.put_slice(data);
            }
            Frame::Message(m) => write_message(dst, m.timestamp, m.attempts, &m.id, &m.body),
        }
    }

    /// Takes one frame off the front of `src`: `Ok(None)` until a whole frame is there. Frames
    /// larger than `max_size` bytes are refused, so a broken peer cannot make us buffer forever.
    pub fn decode(src: &mut BytesMut, max_size: usize) -> Result<Option<Frame>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let size = i64::from(i32::from_be_bytes([src[0], src[1], src[2], src[3]]));
        if size < 4 || size as u64 > max_size as u64 {
            return Err(FrameError::BadSize {
                size,
                max: max_size,
            });
        }
        let size = size as usize;
        if src.len() < 4 + size {
            src.reserve(4 + size - src.len());
            return Ok(None);
        }
        src.advance(4);
        let kind = src.get_i32();
        let data = src.split_to(size - 4).freeze();
        match kind {
            0 => Ok(Some(Frame::Response(data))),
            1 => Ok(Some(Frame::Error(data))),
            2 => {
                let len = data.len();
                Message::decode(data)
                    .map(|m| Some(Frame::Message(m)))
                    .ok_or(FrameError::ShortMessage(len))
            }
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::error::ErrorCode;

    #[test]
    fn response_frame_bytes() {
        let mut buf = BytesMut::new();
        write_response(&mut buf, b"OK");
        assert_eq!(&buf[..], b"\x00\x00\x00\x06\x00\x00\x00\x00OK");
        let mut buf = BytesMut::new();
        write_response(&mut buf, b"_heartbeat_");
        assert_eq!(&buf[..], b"\x00\x00\x00\x0f\x00\x00\x00\x00_heartbeat_");
    }

    #[test]
    fn error_frame_bytes() {
        let mut buf = BytesMut::new();
        write_error(&mut buf, &ProtocolError::new(ErrorCode::Invalid, "x"));
        assert_eq!(&buf[..], b"\x00\x00\x00\x0f\x00\x00\x00\x01E_INVALID x");
        let mut buf = BytesMut::new();
        write_error(&mut buf, &ProtocolError::new(ErrorCode::BadProtocol, ""));
        assert_eq!(&buf[..], b"\x00\x00\x00\x12\x00\x00\x00\x01E_BAD_PROTOCOL");
    }

    #[test]
    fn message_frame_bytes() {
        let mut buf = BytesMut::new();
        write_message(&mut buf, 1, 1, &MessageId(*b"0000000000000001"), b"a");
        let mut want = Vec::new();
        want.extend_from_slice(&(4u32 + 26 + 1).to_be_bytes());
        want.extend_from_slice(&2u32.to_be_bytes());
        want.extend_from_slice(&1i64.to_be_bytes());
        want.extend_from_slice(&1u16.to_be_bytes());
        want.extend_from_slice(b"0000000000000001a");
        assert_eq!(&buf[..], &want[..]);
        assert_eq!(buf.len(), message_frame_len(1));
    }

    #[test]
    fn decode_waits_for_a_whole_frame_then_takes_it() {
        let mut whole = BytesMut::new();
        write_response(&mut whole, b"OK");
        write_error(&mut whole, &ProtocolError::invalid("bad"));
        let mut src = BytesMut::new();
        let mut frames = Vec::new();
        for b in whole.iter() {
            src.put_u8(*b);
            while let Some(f) = Frame::decode(&mut src, 1024).unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(
            frames,
            vec![
                Frame::Response(Bytes::from_static(b"OK")),
                Frame::Error(Bytes::from_static(b"E_INVALID bad")),
            ]
        );
        assert!(src.is_empty());
    }

    #[test]
    fn decode_refuses_bad_sizes_and_types() {
        let mut src = BytesMut::from(&b"\x00\x00\x00\x02\x00\x00"[..]);
        assert!(matches!(
            Frame::decode(&mut src, 64),
            Err(FrameError::BadSize { .. })
        ));
        let mut src = BytesMut::from(&b"\x00\x00\x01\x00"[..]);
        assert!(matches!(
            Frame::decode(&mut src, 64),
            Err(FrameError::BadSize { .. })
        ));
        let mut src = BytesMut::from(&b"\x00\x00\x00\x04\x00\x00\x00\x07"[..]);
        assert_eq!(Frame::decode(&mut src, 64), Err(FrameError::UnknownType(7)));
        let mut src = BytesMut::from(&b"\x00\x00\x00\x05\x00\x00\x00\x02x"[..]);
        assert_eq!(
            Frame::decode(&mut src, 64),
            Err(FrameError::ShortMessage(1))
        );
    }
}
