//! The gRPC registration API between brokers and lookupds (package `knsq.cluster.v1`),
//! generated at build time from `proto/knsq/cluster/v1/cluster.proto`.
//!
//! Brokers use [`v1::registry_client::RegistryClient`]; lookupds implement
//! [`v1::registry_server::Registry`].

#[allow(unreachable_pub, clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("knsq.cluster.v1");
}
