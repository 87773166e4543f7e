//! The operator's own checks of a cluster's spec. API servers before 1.25 do not run the CRD's
//! CEL rules (and drop them from the CRD), so the operator refuses the same specs itself, with
//! the same messages ([`crate::crd::messages`]): the cluster turns `Degraded` with reason
//! `InvalidSpec` naming the field, and nothing is applied. A few checks have no CEL twin: what
//! the operator's own names reserve, and what needs the objects already applied (storage).

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;

use crate::children::{CLUSTER_TLS_VOLUME, Component, DATA_VOLUME, TLS_VOLUME, reserved_env};
use crate::crd::{
    BrokerSpec, NSQCluster, STORAGE_SIZE_ANNOTATION, TlsRequired, UpdateStrategy, Violation,
    messages,
};
use crate::quantity::{bytes, requested_storage};

fn violation(field: impl Into<String>, message: impl Into<String>) -> Violation {
    Violation {
        field: field.into(),
        message: message.into(),
    }
}

/// Nanoseconds of a Go duration (`1m30s`, `500ms`); the schema's pattern guarantees the form.
pub fn go_duration(text: &str) -> Option<u128> {
    let mut total = 0u128;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let (number, tail) = rest.split_at(digits);
        let number: u128 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        total = total.checked_add(number.checked_mul(scale)?)?;
        rest = tail;
    }
    Some(total)
}

/// Twins of the CRD's CEL rules that need only the spec.
fn cel_twins(cluster: &NSQCluster) -> Vec<Violation> {
    let mut out = Vec::new();
    if cluster.name_any().len() > 40 {
        out.push(violation("metadata.name", messages::NAME_LENGTH));
    }
    let broker = &cluster.spec.broker;
    if let Some(tls) = &broker.tls
        && tls.client_auth_policy.is_some()
        && tls.required == Some(TlsRequired::False)
    {
        out.push(violation(
            "spec.broker.tls.clientAuthPolicy",
            messages::CLIENT_AUTH_NEEDS_TLS,
        ));
    }
    for component in [Component::Broker, Component::Lookupd, Component::Admin] {
        if let Some(pod) = component.pod_settings(cluster)
            && pod
                .pod_metadata
                .labels
                .keys()
                .any(|k| k.starts_with("app.kubernetes.io/"))
        {
            out.push(violation(
                format!("{}.podMetadata.labels", component.spec_path()),
                messages::RESERVED_LABELS,
            ));
        }
    }
    if broker.storage.ephemeral && broker.storage.storage_class_name.is_some() {
        out.push(violation(
            "spec.broker.storage.storageClassName",
            messages::EPHEMERAL_CLASS,
        ));
    }
    let settings = &broker.settings;
    if settings.max_body_size < settings.max_msg_size {
        out.push(violation(
            "spec.broker.settings.maxBodySize",
            messages::BODY_SIZE,
        ));
    }
    if let (Some(timeout), Some(max)) = (
        go_duration(&settings.msg_timeout),
        go_duration(&settings.max_msg_timeout),
    ) && timeout > max
    {
        out.push(violation(
            "spec.broker.settings.msgTimeout",
            messages::MSG_TIMEOUT,
        ));
    }
    if let Some(budget) = stopping_budget(broker)
        && budget
            > u128::from(broker.termination_grace_period_seconds.unsigned_abs()) * 1_000_000_000
    {
        out.push(violation(
            "spec.broker.terminationGracePeriodSeconds",
            messages::GRACE_BUDGET,
        ));
    }
    if settings.max_deflate_level.is_some() && settings.deflate == Some(false) {
        out.push(violation(
            "spec.broker.settings.maxDeflateLevel",
            messages::DEFLATE_LEVEL,
        ));
    }
    out
}

/// Nanoseconds a stopping broker may take: the lame-duck delay, then the shutdown (after the
/// drain, when SIGTERM drains).
fn stopping_budget(broker: &BrokerSpec) -> Option<u128> {
    let drain = match broker.update_strategy {
        UpdateStrategy::Drain => go_duration(&broker.drain_timeout)?,
        UpdateStrategy::CleanShutdown => 0,
    };
    go_duration(&broker.shutdown_delay)?
        .checked_add(go_duration(&broker.shutdown_timeout)?)?
        .checked_add(drain)
}

/// Names the user's pod settings may not take, because the operator's would clash with them.
fn reserved_names(cluster: &NSQCluster) -> Vec<Violation> {
    let mut out = Vec::new();
    for component in [Component::Broker, Component::Lookupd, Component::Admin] {
        let Some(pod) = component.pod_settings(cluster) else {
            continue;
        };
        let path = component.spec_path();
        let reserved_env = reserved_env(cluster, component);
        let reserved_volumes: &[&str] = match component {
            Component::Broker => &[DATA_VOLUME, TLS_VOLUME, CLUSTER_TLS_VOLUME],
            Component::Lookupd => &[CLUSTER_TLS_VOLUME],
            Component::Admin => &[],
        };
        let main = component.as_str();
        let lists = [
            (
                "env",
                pod.env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
                reserved_env.iter().map(String::as_str).collect::<Vec<_>>(),
            ),
            (
                "volumes",
                pod.volumes.iter().map(|v| v.name.as_str()).collect(),
                reserved_volumes.to_vec(),
            ),
            (
                "sidecars",
                pod.sidecars
                    .iter()
                    .chain(&pod.init_containers)
                    .map(|c| c.name.as_str())
                    .collect(),
                vec![main],
            ),
        ];
        for (field, names, reserved) in lists {
            let mut seen = BTreeSet::new();
            for name in names {
                if reserved.contains(&name) {
                    out.push(violation(
                        format!("{path}.{field}"),
                        format!("{name} is the operator's own name; choose another"),
                    ));
                } else if !seen.insert(name) {
                    out.push(violation(
                        format!("{path}.{field}"),
                        format!("{name} appears twice"),
                    ));
                }
            }
        }
        let template_labels = pod
            .pod_template
            .as_ref()
            .and_then(|t| t["metadata"]["labels"].as_object());
        if template_labels.is_some_and(|l| l.keys().any(|k| k.starts_with("app.kubernetes.io/"))) {
            out.push(violation(
                format!("{path}.podTemplate.metadata.labels"),
                messages::RESERVED_LABELS,
            ));
        }
    }
    out
}

/// Everything wrong with the spec that needs no object of the cluster's.
pub fn check(cluster: &NSQCluster) -> Vec<Violation> {
    let mut out = cel_twins(cluster);
    out.extend(reserved_names(cluster));
    out
}

/// The claim template of a broker StatefulSet as applied, with the size last asked for.
pub fn applied_storage(broker: &StatefulSet) -> Option<AppliedStorage> {
    let spec = broker.spec.as_ref()?;
    let Some(claim) = spec.volume_claim_templates.as_ref().and_then(|v| v.first()) else {
        return Some(AppliedStorage::Ephemeral);
    };
    let claim_spec = claim.spec.as_ref()?;
    let template_size = requested_storage(claim)?.0.clone();
    let size = broker
        .annotations()
        .get(STORAGE_SIZE_ANNOTATION)
        .cloned()
        .unwrap_or(template_size);
    Some(AppliedStorage::Claims {
        storage_class_name: claim_spec.storage_class_name.clone(),
        size,
    })
}

/// The brokers' storage as the cluster's StatefulSet has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppliedStorage {
    Ephemeral,
    Claims {
        storage_class_name: Option<String>,
        /// The size the claims were last asked for.
        size: String,
    },
}

/// Twins of the CEL transition rules (`oldSelf`), checked against what was applied, and the
/// size that may only grow.
pub fn check_storage(cluster: &NSQCluster, applied: &AppliedStorage) -> Vec<Violation> {
    let storage = &cluster.spec.broker.storage;
    let mut out = Vec::new();
    match applied {
        AppliedStorage::Ephemeral if !storage.ephemeral => {
            out.push(violation(
                "spec.broker.storage.ephemeral",
                messages::EPHEMERAL_IMMUTABLE,
            ));
        }
        AppliedStorage::Ephemeral => {}
        AppliedStorage::Claims { .. } if storage.ephemeral => {
            out.push(violation(
                "spec.broker.storage.ephemeral",
                messages::EPHEMERAL_IMMUTABLE,
            ));
        }
        AppliedStorage::Claims {
            storage_class_name,
            size,
        } => {
            if storage_class_name != &storage.storage_class_name {
                out.push(violation(
                    "spec.broker.storage.storageClassName",
                    messages::STORAGE_CLASS_IMMUTABLE,
                ));
            }
            match (bytes(&storage.size.0), bytes(size)) {
                (Some(new), Some(old)) if new < old => out.push(violation(
                    "spec.broker.storage.size",
                    format!(
                        "volumes only grow: the claims are {size}, so {} is too small",
                        storage.size.0
                    ),
                )),
                (None, _) => out.push(violation(
                    "spec.broker.storage.size",
                    format!("{} is not a quantity", storage.size.0),
                )),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("60s"), Some(60_000_000_000));
        assert_eq!(go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(go_duration("1h2m3s4ms5us6ns"), Some(3_723_004_005_006));
        assert_eq!(go_duration("15m"), Some(900_000_000_000));
        assert_eq!(go_duration("5x"), None);
        assert_eq!(go_duration("s"), None);
    }
}
