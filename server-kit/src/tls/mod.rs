//! TLS, one place per role.
//!
//! - The files flags name (certificates, keys, CA files, the system's CAs) are read here, so a
//!   bad one fails at start with the same words and the name of its flag.
//! - [`server`]: what knsq serves over TLS: the rustls config for NSQ TCP and HTTPS clients
//!   (with nsqd's client certificate policies), the HTTPS listener, the gRPC listener's config,
//!   and what a finished handshake tells `/stats` and the auth server.
//! - [`client`]: what knsq connects to over TLS: lookupds (gRPC) and `https://` auth servers.

pub mod client;
mod files;
pub mod server;

#[cfg(any(test, feature = "testing"))]
pub use files::self_signed;
pub use files::{
    Identity, Roots, cert_and_key, crypto_provider, identity, root_store, system_roots,
};
