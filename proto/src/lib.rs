//! Everything that crosses a wire in knsq.
//!
//! - [`wire`]: the NSQ TCP protocol V2 codec, sans-IO: bytes in, commands and frames out, and
//!   back. Shared by the broker, the integration tests and the `knsq-bench` load tool.

pub mod wire;
