//! NSQ TCP protocol V2, without I/O.
//!
//! A client opens with the 4-byte [`MAGIC_V2`], then sends newline-terminated commands, some
//! followed by a size-prefixed binary body ([`command`]). The server answers with frames
//! ([`frame`]): responses, errors and messages ([`message`]). The decoder checks its input in the
//! same order as nsqd 1.3, so a client sees the same error for the same bad input.

pub mod command;
#[cfg(feature = "compression")]
pub mod compression;
pub mod error;
pub mod frame;
pub mod message;
pub mod names;
mod quote;

pub use command::{Command, CommandName, Decoder, Limits, Name, Precheck, split_mpub_messages};
pub use error::{ErrorCode, ProtocolError};
pub use frame::{Frame, FrameError, FrameType};
pub use message::{Message, MessageId};

/// The four bytes a V2 client sends first.
pub const MAGIC_V2: &[u8; 4] = b"  V2";

/// The response a server sends to acknowledge a command.
pub const OK: &[u8] = b"OK";
/// The response to CLS.
pub const CLOSE_WAIT: &[u8] = b"CLOSE_WAIT";
/// The response frame body of a heartbeat.
pub const HEARTBEAT: &[u8] = b"_heartbeat_";
