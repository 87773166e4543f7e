//! PodDisruptionBudgets limiting voluntary evictions (node drains) of each component.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Component, child_meta, labels, selector_labels};
use crate::crd::NSQCluster;

/// The component's PodDisruptionBudget, or `None` when the spec disables it.
pub fn pod_disruption_budget(
    cluster: &NSQCluster,
    component: Component,
) -> Option<PodDisruptionBudget> {
    let pdb = match component {
        Component::Broker => &cluster.spec.broker.pdb,
        Component::Lookupd => &cluster.spec.lookupd.pdb,
        Component::Admin => return None,
    };
    pdb.enabled.then(|| PodDisruptionBudget {
        metadata: child_meta(cluster, component.name(cluster), labels(cluster, component)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(pdb.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(cluster, component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::cluster;
    use crate::crd::NSQClusterSpec;

    #[test]
    fn selects_the_components_pods_with_max_unavailable() {
        let mut spec = NSQClusterSpec::default();
        spec.broker.pdb.max_unavailable = 2;
        let pdb =
            pod_disruption_budget(&cluster(spec), Component::Broker).expect("enabled by default");
        assert_eq!(pdb.metadata.name.as_deref(), Some("events-broker"));
        let spec = pdb.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(2)));
        assert_eq!(spec.min_available, None);
        let selector = spec
            .selector
            .and_then(|s| s.match_labels)
            .expect("selector");
        assert_eq!(selector["app.kubernetes.io/component"], "broker");
        assert_eq!(selector["app.kubernetes.io/instance"], "events");
    }

    #[test]
    fn disabled_pdb_is_not_built() {
        let mut spec = NSQClusterSpec::default();
        spec.lookupd.pdb.enabled = false;
        let c = cluster(spec);
        assert_eq!(pod_disruption_budget(&c, Component::Lookupd), None);
        assert!(pod_disruption_budget(&c, Component::Broker).is_some());
    }
}
