//! Draining and handing off: how a broker leaves the cluster without stranding a message.
//!
//! A drain starts with `POST /drain`, `PUT /config/drain`, or SIGTERM under `--sigterm=drain`
//! ([`crate::broker::Broker::start_drain`] refuses publishes and new topics and channels from
//! then on). The drain task ([`drain`]) then watches every topic and channel: consumers keep
//! taking what is queued, on disk, deferred and requeued; a channel without consumers (and a
//! topic without channels) is handed off at once; once `--drain-timeout` has passed, consumers
//! are disconnected, what they held goes back to the queues, and everything left is handed
//! off. When nothing is left the broker unregisters from its lookupds and exits 0 (or stays up
//! idle with `--stay-up-when-drained`).
//!
//! Handing off ([`sender`]) moves batches of messages over gRPC to peer brokers, which store
//! them in the same topic and channel with their ID, body, timestamp, attempts and due time
//! ([`receiver`]). A message leaves this broker only once a peer acknowledged its batch, and
//! a message read from disk stays on this broker's disk until then, so a crash of either side
//! can repeat a batch but never lose one. When no peer can take a batch the messages stay,
//! the drain reports itself `blocked` with the reason, and tries again.

pub(crate) mod receiver;
pub(crate) mod sender;

use crate::broker::{Broker, DrainState, DrainStatus};
use crate::queue::{Channel, Handed, Topic};
pub(crate) use sender::{PeerSource, Peers};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Messages per batch sent to a peer.
const BATCH: usize = 500;
/// How often the drain looks at what is left.
const TICK: Duration = Duration::from_millis(100);

/// A queue being handed off: a channel, or a topic's own queue.
enum Source<'a> {
    Topic(&'a Topic),
    Channel(&'a Channel),
}

impl Source<'_> {
    fn take(&self) -> Vec<Handed> {
        match self {
            Source::Topic(t) => t.take_for_handoff(BATCH),
            Source::Channel(c) => c.take_for_handoff(BATCH),
        }
    }

    fn handed_off(&self, batch: Vec<Handed>) {
        match self {
            Source::Topic(t) => t.handed_off(batch),
            Source::Channel(c) => c.handed_off(batch),
        }
    }

    fn give_back(&self, batch: Vec<Handed>) {
        match self {
            Source::Topic(t) => t.return_handed(batch),
            Source::Channel(c) => c.return_handed(batch),
        }
    }
}

/// What one look over the queues did.
#[derive(Default)]
struct Pass {
    handed_off: u64,
    /// Why some messages could not be handed off, if so.
    blocked: Option<String>,
}

/// Waits for a drain to start, then drains until nothing is left (or `stop` is cancelled),
/// keeping the broker's drain status up to date. Returns whether it finished.
pub(crate) async fn drain(
    broker: Arc<Broker>,
    mut peers: Peers,
    timeout: Duration,
    stop: CancellationToken,
) -> bool {
    tokio::select! {
        _ = stop.cancelled() => return false,
        _ = broker.drain_started() => {}
    }
    let started = Instant::now();
    let mut status = DrainStatus {
        state: DrainState::Draining,
        ..DrainStatus::default()
    };
    let mut evicted = false;
    loop {
        let timed_out = started.elapsed() >= timeout;
        if timed_out && !evicted {
            tracing::info!(
                ?timeout,
                "drain timeout: disconnecting consumers and handing off what is left"
            );
            evicted = true;
        }
        // Cancelled mid-batch (shutdown), the batch goes back to its queue (see `Taken`), in
        // time for the shutdown to persist it.
        let pass = tokio::select! {
            pass = hand_off(&broker, &mut peers, timed_out) => pass,
            _ = stop.cancelled() => return false,
        };
        status.handed_off_messages += pass.handed_off;
        status.remaining_messages = broker.messages_held();
        status.state = if status.remaining_messages == 0 {
            DrainState::Drained
        } else if pass.blocked.is_some() {
            DrainState::Blocked
        } else if timed_out {
            DrainState::HandingOff
        } else {
            DrainState::Draining
        };
        if let Some(reason) = &pass.blocked
            && status.reason.as_ref() != Some(reason)
        {
            tracing::warn!(%reason, remaining = status.remaining_messages, "drain blocked; retrying");
        }
        status.reason = pass.blocked;
        broker.set_drain_status(status.clone());
        if status.state == DrainState::Drained {
            tracing::info!(
                handed_off = status.handed_off_messages,
                elapsed = ?started.elapsed(),
                "drained: nothing left"
            );
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// One look over every topic and channel: hands off the queues nobody consumes (all of them
/// once `everything`), disconnecting consumers first in that case.
async fn hand_off(broker: &Broker, peers: &mut Peers, everything: bool) -> Pass {
    let mut pass = Pass::default();
    for topic in broker.topics().iter().filter(|t| !t.ephemeral) {
        let channels = topic.channels();
        // Messages wait in the topic itself while it has no channel or is paused.
        if (channels.is_empty() || everything) && topic.holds() > 0 {
            send_all(Source::Topic(topic), &topic.name, "", peers, &mut pass).await;
        }
        for channel in channels.iter().filter(|c| !c.ephemeral) {
            if !everything && channel.consumer_count() > 0 {
                continue;
            }
            // Consumers go (after the timeout) and what they held is handed off too; without
            // consumers, messages still in flight belong to clients that left, which can no
            // longer finish them.
            channel.evict_consumers();
            send_all(
                Source::Channel(channel),
                &topic.name,
                &channel.name,
                peers,
                &mut pass,
            )
            .await;
            if pass.blocked.is_some() {
                return pass;
            }
        }
        if pass.blocked.is_some() {
            return pass;
        }
    }
    pass
}

/// A batch out of its queue while a peer is asked to store it. Should the send be cancelled
/// (the broker shutting down, the offline handoff's time limit), dropping it puts the batch
/// back, so nothing taken from memory is lost: a peer that stored it meanwhile only makes a
/// duplicate (at least once).
struct Taken<'a> {
    source: &'a Source<'a>,
    batch: Vec<Handed>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.batch.is_empty() {
            self.source.give_back(std::mem::take(&mut self.batch));
        }
    }
}

/// Hands off everything `source` gives until it is empty or no peer takes a batch.
async fn send_all(
    source: Source<'_>,
    topic: &str,
    channel: &str,
    peers: &mut Peers,
    pass: &mut Pass,
) {
    loop {
        let mut taken = Taken {
            source: &source,
            batch: source.take(),
        };
        if taken.batch.is_empty() {
            return;
        }
        let sent = peers.send(topic, channel, &taken.batch).await;
        let batch = std::mem::take(&mut taken.batch);
        match sent {
            Ok(stored) => {
                tracing::debug!(
                    %topic,
                    %channel,
                    count = batch.len(),
                    peer = %stored.peer,
                    duplicates = stored.duplicates,
                    "handed off a batch"
                );
                pass.handed_off += batch.len() as u64;
                source.handed_off(batch);
            }
            Err(reason) => {
                source.give_back(batch);
                pass.blocked = Some(reason);
                return;
            }
        }
    }
}
