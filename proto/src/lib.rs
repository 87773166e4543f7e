//! Everything that crosses a wire in knsq.
//!
//! - [`wire`]: the NSQ TCP protocol V2 codec, sans-IO: bytes in, commands and frames out, and
//!   back. Shared by the broker, the integration tests and the `knsq-bench` load tool.
//! - `cluster` (feature `cluster`): the gRPC API brokers use to register with lookupds,
//!   generated from `proto/knsq/cluster/v1/cluster.proto`.

pub mod wire;

#[cfg(feature = "cluster")]
pub mod cluster;
