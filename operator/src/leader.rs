//! Leader election through a `coordination.k8s.io/v1` Lease, so several operator replicas can
//! run and only one reconciles. Updates use the Lease's `resourceVersion`, so two candidates
//! racing for an expired Lease cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("talking to the API server about Lease {namespace}/{name}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the leader Lease {namespace}/{name} to {holder}")]
    Lost {
        namespace: String,
        name: String,
        holder: String,
    },
}

/// Who competes for which Lease, and how long a leadership lasts without renewal.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// What a candidate should do with the Lease as it finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it holding it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Another holder's Lease has expired (or was released): take it over.
    TakeOver,
    /// Another holder's Lease is live: wait.
    Wait { holder: String },
}

/// Decide from the Lease's current state.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_none() {
            Decision::Create
        } else {
            Decision::TakeOver
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let live = match &spec.renew_time {
        Some(renewed) => !holder.is_empty() && renewed.0 + duration > now,
        None => false,
    };
    if live {
        Decision::Wait { holder }
    } else {
        Decision::TakeOver
    }
}

/// A Lease spec held by `identity`, renewed `now`.
fn held_spec(
    config: &LeaseConfig,
    previous: Option<&LeaseSpec>,
    now: Timestamp,
    taking_over: bool,
) -> LeaseSpec {
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(
            i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX),
        ),
        acquire_time: if taking_over {
            Some(MicroTime(now))
        } else {
            previous.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if taking_over && previous.is_some() {
            transitions + 1
        } else {
            transitions
        }),
        ..LeaseSpec::default()
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn api_error(&self, source: kube::Error) -> Error {
        Error::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    /// One round: `Ok(None)` when we hold the Lease afterwards, `Ok(Some(holder))` when another
    /// replica does. A lost race (409 Conflict) counts as another holder.
    pub async fn try_acquire_or_renew(&self) -> Result<Option<String>, Error> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error(e))?;
        let result = match decide(current.as_ref(), &self.config.identity, now) {
            Decision::Wait { holder } => return Ok(Some(holder)),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(held_spec(&self.config, None, now, true)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            decision => {
                let mut lease = current.unwrap_or_default();
                lease.spec = Some(held_spec(
                    &self.config,
                    lease.spec.as_ref(),
                    now,
                    decision == Decision::TakeOver,
                ));
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(None),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                Ok(Some("another candidate".to_owned()))
            }
            Err(e) => Err(self.api_error(e)),
        }
    }

    /// Wait until we hold the Lease; `false` when cancelled first.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Result<bool, Error> {
        loop {
            match self.try_acquire_or_renew().await? {
                None => {
                    info!(lease = %self.config.name, identity = %self.config.identity, "became leader");
                    return Ok(true);
                }
                Some(holder) => info!(%holder, "waiting for the leader Lease"),
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(false),
                () = tokio::time::sleep(self.config.renew_every) => {}
            }
        }
    }

    /// Renew the Lease until cancelled; an error when it is lost or cannot be renewed before it
    /// expires (the caller must stop reconciling then).
    pub async fn keep(&self, cancel: &CancellationToken) -> Result<(), Error> {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.config.renew_every) => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(None) => last_renewed = tokio::time::Instant::now(),
                Ok(Some(holder)) => {
                    return Err(Error::Lost {
                        namespace: self.config.namespace.clone(),
                        name: self.config.name.clone(),
                        holder,
                    });
                }
                Err(error) if last_renewed.elapsed() < self.config.lease_duration => {
                    warn!(error = %error, "could not renew the leader Lease; retrying");
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Give the Lease up on shutdown so another replica takes over at once.
    pub async fn release(&self) -> Result<(), Error> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error(e))?
        else {
            return Ok(());
        };
        if decide(Some(&lease), &self.config.identity, Timestamp::now()) != Decision::Renew {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map_err(|e| self.api_error(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: Option<i64>, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).expect("time"))),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("time")
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", at(100)), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), Some(10), 15)), "a", at(100)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), Some(90), 15)), "a", at(100)),
            Decision::Wait {
                holder: "b".to_owned()
            }
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), Some(80), 15)), "a", at(100)),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(None, None, 15)), "a", at(100)),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&Lease::default()), "a", at(100)),
            Decision::TakeOver
        );
    }

    #[test]
    fn taking_over_counts_a_transition() {
        let config = LeaseConfig {
            name: "knsq-operator".to_owned(),
            namespace: "knsq-system".to_owned(),
            identity: "a".to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        let previous = LeaseSpec {
            lease_transitions: Some(2),
            acquire_time: Some(MicroTime(at(1))),
            ..LeaseSpec::default()
        };
        let taken = held_spec(&config, Some(&previous), at(100), true);
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(100))));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        let renewed = held_spec(&config, Some(&previous), at(100), false);
        assert_eq!(renewed.lease_transitions, Some(2));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(1))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(100))));
        assert_eq!(
            held_spec(&config, None, at(100), true).lease_transitions,
            Some(0)
        );
    }
}
