//! The NSQ TCP protocol V2 server side: one connection's state machine ([`connection`]), its
//! outbox and writer task ([`outbox`], [`writer`]), IDENTIFY negotiation ([`identify`]) and the client as the
//! queues see it ([`client`]).

mod client;
mod connection;
mod identify;
mod outbox;
mod transport;
mod writer;

pub(crate) use client::Client;
pub(crate) use connection::serve;
