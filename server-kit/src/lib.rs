//! What every knsq server needs, shared by knsq-broker and knsq-lookupd:
//!
//! - [`flags`]: nsqd's Go flag syntax, Go durations and booleans, log levels, the error naming a
//!   bad flag.
//! - [`tls`]: PEM files, and TLS in one place per role: [`tls::server`] for what knsq serves
//!   (TCP clients, HTTPS, gRPC) and [`tls::client`] for what it connects to (lookupds, auth
//!   servers).
//! - [`listen`]: binding listeners, errors naming their flag.
//! - [`signals`] and [`process`]: how a server binary starts, logs and stops.
//! - [`http`]: nsqd's HTTP conventions: the `{"message": …}` error, V1 responses, and Go's
//!   strict query parsing.

pub mod flags;
pub mod http;
pub mod listen;
pub mod process;
pub mod signals;
pub mod tls;

/// The NSQ release whose behaviour knsq matches; reported where clients read nsqd's or
/// nsqlookupd's version.
pub const NSQ_COMPAT_VERSION: &str = "1.3.0";

/// An error and its chain of sources, `: `-separated, each said once (hyper's and tonic's own
/// texts hide the cause, such as a refused connection).
pub fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let said = e.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        source = e.source();
    }
    text
}
