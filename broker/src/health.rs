//! The broker's health: the last disk write error, until a later write succeeds, as nsqd's
//! `/ping` reports it (`500 NOK - <reason>`).

use prometheus::{IntCounter, IntGauge};
use std::sync::Mutex;

#[derive(Debug)]
pub(crate) struct Health {
    error: Mutex<Option<String>>,
    healthy: IntGauge,
    write_errors: IntCounter,
}

impl Health {
    pub(crate) fn new(healthy: IntGauge, write_errors: IntCounter) -> Health {
        healthy.set(1);
        Health {
            error: Mutex::new(None),
            healthy,
            write_errors,
        }
    }

    /// A write failed: the broker is unhealthy until one succeeds.
    pub(crate) fn write_failed(&self, error: &dyn std::fmt::Display) {
        tracing::error!(%error, "disk write failed");
        self.write_errors.inc();
        self.healthy.set(0);
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    /// A write succeeded.
    pub(crate) fn write_succeeded(&self) {
        if self.healthy.get() == 1 {
            return;
        }
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if error.take().is_some() {
            tracing::info!("disk writes succeed again; healthy");
        }
        self.healthy.set(1);
    }

    /// `None` when healthy, else the reason.
    pub(crate) fn problem(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// nsqd's health string: `OK` or `NOK - <reason>`.
    pub(crate) fn status(&self) -> String {
        match self.problem() {
            None => "OK".into(),
            Some(reason) => format!("NOK - {reason}"),
        }
    }
}
