//! The broker's TCP clients: their ids, and every one open, for shutdown and `/stats`.

use super::client::Client;
use crate::stats::ClientStats;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub(crate) struct Clients {
    open: Mutex<HashMap<u64, Arc<Client>>>,
    next_id: AtomicU64,
}

impl Default for Clients {
    fn default() -> Clients {
        Clients {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }
}

impl Clients {
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    pub(crate) fn add(&self, client: Arc<Client>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.insert(client.id, client);
    }

    pub(crate) fn remove(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&id);
    }

    /// Closes every client connection (shutdown).
    pub(crate) fn close_all(&self) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for client in open.values() {
            client.close();
        }
    }

    /// The broker drains: every connection that is not a consumer closes once it has answered
    /// what it read.
    pub(crate) fn send_producers_away(&self) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for client in open.values() {
            client.leave_when_idle.cancel();
        }
    }

    /// TCP clients that have published; `None` when there are none, as nsqd's nil list.
    pub(crate) fn producers(&self, topic: Option<&str>) -> Option<Vec<ClientStats>> {
        let clients: Vec<Arc<Client>> = {
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.values().cloned().collect()
        };
        let mut producers: Vec<ClientStats> = clients
            .iter()
            .filter(|c| c.has_published())
            .map(|c| c.stats(topic))
            .collect();
        producers.sort_by(|a, b| a.remote_address.cmp(&b.remote_address));
        (!producers.is_empty()).then_some(producers)
    }
}
