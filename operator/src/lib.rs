//! knsq-operator: reconciles `NSQCluster` resources into running knsq clusters.

pub mod children;
// kube's `KubeSchema` derive emits a hidden copy of each schema struct with the same
// visibility, which the lint reports as unreachable.
#[allow(unreachable_pub)]
pub mod crd;
pub mod status;
pub mod controller;
pub mod metrics;
