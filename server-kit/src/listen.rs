//! Binding a server's listeners before it runs, so port 0 works and the real address can be
//! read back; a failure names the flag of the address.

use std::net::SocketAddr;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --{flag} {address}: {source}")]
pub struct BindError {
    pub flag: &'static str,
    pub address: String,
    #[source]
    pub source: std::io::Error,
}

/// Binds `address`, the value of `--<flag>`.
pub async fn bind(flag: &'static str, address: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError {
            flag,
            address: address.to_string(),
            source,
        })
}

/// The address a listener bound for `--<flag>` listens on.
pub fn local_address(listener: &TcpListener, flag: &'static str) -> Result<SocketAddr, BindError> {
    listener.local_addr().map_err(|source| BindError {
        flag,
        address: String::new(),
        source,
    })
}
