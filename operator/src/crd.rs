//! The `NSQCluster` custom resource (`knsq.io/v1alpha1`): its spec, status, schema defaults,
//! bounds and CEL rules. The CRD YAML committed under `deploy/crds/` and `charts/knsq/crds/` is
//! generated from these types (`knsq-operator crd`).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, LocalObjectReference, PodSecurityContext, ResourceRequirements,
    SecurityContext, Toleration, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// Annotation that stops the operator from changing anything of the cluster while it is `"true"`.
pub const PAUSE_ANNOTATION: &str = "knsq.io/pause-reconciliation";
/// Annotation that, while `"true"`, lowers the broker StatefulSet without waiting for the
/// leaving brokers to drain; their volumes are then recovered by the offline handoff.
pub const FORCE_SCALE_DOWN_ANNOTATION: &str = "knsq.io/force-scale-down";

/// What each CEL rule says when it fails. The operator refuses the same specs with the same
/// words (`crate::validation`), for API servers too old to run CEL (before 1.25).
pub mod messages {
    pub const NAME_LENGTH: &str = "metadata.name must be at most 40 characters so the names of the StatefulSets and Services derived from it stay valid";
    pub const CLIENT_AUTH_NEEDS_TLS: &str = "clientAuthPolicy makes TLS required: set required to \"true\" or \"tcp-https\", or leave it unset";
    pub const RESERVED_LABELS: &str =
        "labels under app.kubernetes.io/ are set by the operator and select its pods";
    pub const EPHEMERAL_IMMUTABLE: &str = "storage.ephemeral cannot change once the cluster exists";
    pub const STORAGE_CLASS_IMMUTABLE: &str =
        "storage.storageClassName cannot change once the cluster exists";
    pub const EPHEMERAL_CLASS: &str = "storageClassName has no meaning when storage is ephemeral";
    pub const BODY_SIZE: &str = "maxBodySize must be at least maxMsgSize";
    pub const MSG_TIMEOUT: &str = "msgTimeout must not exceed maxMsgTimeout";
    pub const DEFLATE_LEVEL: &str = "maxDeflateLevel has no meaning when deflate is off";
    pub const GRACE_BUDGET: &str = "terminationGracePeriodSeconds must cover shutdownDelay + shutdownTimeout (+ drainTimeout with updateStrategy drain), or the kubelet kills brokers still writing their queues";
}

/// Go duration strings as nsqd's flags take them (`60s`, `1m30s`, `500ms`).
const DURATION_PATTERN: &str = r"^([0-9]+(ns|us|ms|s|m|h))+$";

/// Desired state of a knsq cluster: lookupds, brokers, and how they are exposed and monitored.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "knsq.io",
    version = "v1alpha1",
    kind = "NSQCluster",
    plural = "nsqclusters",
    shortname = "nsqc",
    category = "knsq",
    namespaced,
    cel,
    status = "NSQClusterStatus",
    derive = "PartialEq",
    doc = "A knsq cluster: NSQ-compatible brokers with their lookupds, run by the knsq operator.",
    printcolumn(name = "Brokers", type_ = "integer", description = "Ready brokers", json_path = ".status.broker.readyReplicas"),
    printcolumn(name = "Lookupds", type_ = "integer", description = "Ready lookupds", json_path = ".status.lookupd.readyReplicas"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40").message(messages::NAME_LENGTH)
)]
#[serde(rename_all = "camelCase")]
pub struct NSQClusterSpec {
    /// The brokers (knsq-broker, nsqd-compatible).
    #[serde(default)]
    pub broker: BrokerSpec,
    /// The lookupds (knsq-lookupd, nsqlookupd-compatible).
    #[serde(default)]
    pub lookupd: LookupdSpec,
    /// Prometheus integration.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// Mutual TLS between brokers and lookupds (the brokers' gRPC registration); plain when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_tls: Option<ClusterTlsSpec>,
    /// nsqadmin, NSQ's web UI, pointed at the cluster's lookupds; not deployed when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminSpec>,
}

/// The nsqadmin Deployment (NSQ's own image), its Service and an optional Ingress.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdminSpec {
    /// Number of nsqadmin pods.
    #[serde(default = "default_admin_replicas")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// Image (`nsqio/nsq:v1.3.0` when unset), resources, scheduling and pod metadata.
    #[serde(flatten)]
    pub pod: PodSettings,
    /// An Ingress in front of the Service; none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<AdminIngressSpec>,
}

/// How nsqadmin is exposed outside the cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdminIngressSpec {
    /// The IngressClass; the cluster's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_class_name: Option<String>,
    /// Host name the Ingress answers; every host when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix nsqadmin is served under (its `--base-path`).
    #[serde(default = "default_admin_path")]
    #[schemars(regex(pattern = r"^/[^ ]*$"))]
    pub path: String,
    /// Annotations of the Ingress (authentication, rewrites, … of the ingress controller).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// A `kubernetes.io/tls` Secret for HTTPS on `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
}

/// The broker StatefulSet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    // The kubelet kills a pod at the end of its grace period: the broker's whole stopping budget
    // must fit in it.
    validation = Rule::new("duration(self.shutdownDelay) + duration(self.shutdownTimeout) + (self.updateStrategy == 'drain' ? duration(self.drainTimeout) : duration('0s')) <= duration(string(self.terminationGracePeriodSeconds) + 's')").message(messages::GRACE_BUDGET)
)]
pub struct BrokerSpec {
    /// Number of broker pods.
    #[serde(default = "default_broker_replicas")]
    #[schemars(range(min = 0, max = 1023))]
    pub replicas: i32,
    /// Image, resources, scheduling and pod metadata.
    #[serde(flatten)]
    pub pod: PodSettings,
    /// Message storage.
    #[serde(default)]
    pub storage: StorageSpec,
    /// nsqd options, passed to every broker.
    #[serde(default)]
    pub settings: BrokerSettings,
    /// The PodDisruptionBudget of the brokers.
    #[serde(default)]
    pub pdb: PdbSpec,
    /// Seconds the kubelet gives a stopping broker before killing it; must cover
    /// `shutdownDelay` + `shutdownTimeout` (+ `drainTimeout` with `updateStrategy: drain`).
    #[serde(default = "default_termination_grace")]
    #[schemars(range(min = 10, max = 3600))]
    pub termination_grace_period_seconds: i64,
    /// `--shutdown-delay`: how long a stopping broker keeps serving while it reports not-ready,
    /// so Services stop sending it clients before it closes (the lame-duck delay).
    #[serde(default = "default_shutdown_delay")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub shutdown_delay: String,
    /// `--shutdown-timeout`: the longest a broker takes to close and flush its queues to disk
    /// (and, when draining, to finish its handoff) once it stops serving.
    #[serde(default = "default_shutdown_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub shutdown_timeout: String,
    /// `--drain-timeout`: how long a draining broker leaves its messages to its consumers before
    /// handing the rest off to the other brokers (scale-down, and rolls with
    /// `updateStrategy: drain`).
    #[serde(default = "default_drain_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub drain_timeout: String,
    /// What a broker does when its pod is stopped (rolling updates, evictions):
    /// `clean-shutdown` keeps its messages on its volume for the pod that replaces it, `drain`
    /// lets consumers empty it and hands the rest off to the other brokers (`--sigterm`).
    #[serde(default)]
    #[schemars(schema_with = "update_strategy_schema")]
    pub update_strategy: UpdateStrategy,
    /// TLS with clients (TCP upgrade through IDENTIFY, and HTTPS on port 4152); off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BrokerTlsSpec>,
}

/// TLS between brokers and their clients, from a `kubernetes.io/tls` Secret in the cluster's
/// namespace (`tls.crt`, `tls.key`, and `ca.crt` for `require-verify`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    // nsqd treats a client auth policy as TLS required; saying otherwise would be a lie.
    validation = Rule::new("!has(self.clientAuthPolicy) || !has(self.required) || self.required != 'false'").message(messages::CLIENT_AUTH_NEEDS_TLS)
)]
pub struct BrokerTlsSpec {
    /// The Secret with the brokers' certificate; it must cover the names clients connect to
    /// (the client Service and the pods' stable DNS names).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// `--tls-required`: `"true"` (TCP clients must upgrade and plain HTTP is refused),
    /// `"tcp-https"` (TCP only) or `"false"` (TLS offered, not required; the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tls_required_schema")]
    pub required: Option<TlsRequired>,
    /// `--tls-client-auth-policy`: `require` (clients show any certificate) or `require-verify`
    /// (one signed by the Secret's `ca.crt`); no client certificates when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "client_auth_policy_schema")]
    pub client_auth_policy: Option<ClientAuthPolicy>,
    /// `--tls-min-version`: the oldest TLS version accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tls_version_schema")]
    pub min_version: Option<TlsVersion>,
}

/// What a broker does on SIGTERM, as `--sigterm` takes it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateStrategy {
    #[default]
    CleanShutdown,
    Drain,
}

impl UpdateStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStrategy::CleanShutdown => "clean-shutdown",
            UpdateStrategy::Drain => "drain",
        }
    }
}

/// Values of nsqd's `--tls-required`, strings as the flag takes them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsRequired {
    #[serde(rename = "false")]
    False,
    #[serde(rename = "true")]
    True,
    #[serde(rename = "tcp-https")]
    TcpHttps,
}

/// Values of nsqd's `--tls-client-auth-policy`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthPolicy {
    Require,
    RequireVerify,
}

/// TLS versions knsq speaks (`--tls-min-version`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    #[serde(rename = "tls1.2")]
    Tls12,
    #[serde(rename = "tls1.3")]
    Tls13,
}

/// Mutual TLS on the lookupds' gRPC port, from one `kubernetes.io/tls` Secret with `tls.crt`,
/// `tls.key` and `ca.crt`: lookupds serve with the certificate and accept only brokers showing
/// one signed by `ca.crt`; brokers show the same certificate and verify the lookupds with `ca.crt`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTlsSpec {
    /// The Secret; its certificate must name every lookupd pod
    /// (`*.<cluster>-lookupd-headless.<namespace>.svc`).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

// schemars renders an optional enum with `null` among its values, which the API server (1.20 at
// least) rejects; these give the plain string enum instead.
fn string_enum(values: &[&str]) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": values})
}
fn update_strategy_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["clean-shutdown", "drain"], "default": "clean-shutdown"})
}
fn tls_required_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_enum(&["false", "true", "tcp-https"])
}
fn client_auth_policy_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_enum(&["require", "require-verify"])
}
fn tls_version_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_enum(&["tls1.2", "tls1.3"])
}
fn quantiles_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "array", "maxItems": 10, "items": {"type": "number", "exclusiveMinimum": true, "minimum": 0, "maximum": 1}})
}
/// An object the API server keeps as given (the pod template override, checked by the operator).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

impl TlsRequired {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsRequired::False => "false",
            TlsRequired::True => "true",
            TlsRequired::TcpHttps => "tcp-https",
        }
    }
}

impl ClientAuthPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthPolicy::Require => "require",
            ClientAuthPolicy::RequireVerify => "require-verify",
        }
    }
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "tls1.2",
            TlsVersion::Tls13 => "tls1.3",
        }
    }
}

impl BrokerTlsSpec {
    /// Whether plain HTTP is refused: `--tls-required=true`, or a client auth policy (which
    /// makes TLS required) unless `tcp-https` keeps plain HTTP.
    pub fn https_only(&self) -> bool {
        match self.required {
            Some(TlsRequired::True) => true,
            Some(TlsRequired::TcpHttps) => false,
            _ => self.client_auth_policy.is_some(),
        }
    }
}

/// The lookupd StatefulSet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LookupdSpec {
    /// Number of lookupd pods; every broker registers with each of them.
    #[serde(default = "default_lookupd_replicas")]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,
    /// Image, resources, scheduling and pod metadata.
    #[serde(flatten)]
    pub pod: PodSettings,
    /// nsqlookupd options.
    #[serde(default)]
    pub settings: LookupdSettings,
    /// The PodDisruptionBudget of the lookupds.
    #[serde(default)]
    pub pdb: PdbSpec,
}

/// What the pods of every component take from the spec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Container image; the operator's `--broker-image` or `--lookupd-image` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Compute resources of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the pods may run.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Extra pod annotations and labels.
    #[serde(default)]
    pub pod_metadata: PodMetadata,
    /// Secrets holding the credentials to pull the images of a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// The pods' PriorityClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The ServiceAccount the pods run as; the namespace's `default` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Extra environment variables of the main container, after the operator's own (so they
    /// may refer to them as `$(POD_NAME)`); the operator's names are reserved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Extra pod volumes, for `volumeMounts` and the sidecars; the operator's names (`data`,
    /// `tls`, `cluster-tls`) are reserved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Extra mounts of the main container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Containers running beside the main one (log shippers, proxies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<Container>,
    /// Containers run to completion, in order, before the main one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
    /// The pods' security context, in place of the operator's (user and group 65532, non-root,
    /// `RuntimeDefault` seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,
    /// The main container's security context, in place of the operator's (no privilege
    /// escalation, read-only root filesystem, every capability dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// A pod template merged last into the one the operator generates, for what no field
    /// covers: objects merge key by key, lists of named items (containers, volumes, env,
    /// volumeMounts, ports, imagePullSecrets) merge by name (an item with `$patch: delete`
    /// removes its namesake), other lists and values replace, and `null` removes a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub pod_template: Option<serde_json::Value>,
}

/// Pod scheduling constraints, copied into the pod template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
}

/// Annotations and labels added to every pod of a component.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('app.kubernetes.io/'))").message(messages::RESERVED_LABELS))]
    pub labels: BTreeMap<String, String>,
}

/// Broker storage: a PersistentVolumeClaim per broker, or an emptyDir when ephemeral. Whether it
/// is ephemeral and its StorageClass cannot change after creation; the size of the claims can
/// grow (never shrink), which the operator does claim by claim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.ephemeral == oldSelf.ephemeral").message(messages::EPHEMERAL_IMMUTABLE),
    validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)").message(messages::STORAGE_CLASS_IMMUTABLE),
    validation = Rule::new("!self.ephemeral || !has(self.storageClassName)").message(messages::EPHEMERAL_CLASS)
)]
pub struct StorageSpec {
    /// Keep messages on an emptyDir that dies with the pod instead of a PersistentVolumeClaim.
    #[serde(default)]
    pub ephemeral: bool,
    /// Size of each broker's volume (or the emptyDir size limit when ephemeral). Raising it
    /// expands every broker's claim (its StorageClass must allow volume expansion); lowering it
    /// is refused.
    #[serde(default = "default_storage_size")]
    pub size: Quantity,
    /// StorageClass of the claims; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Delete the claims of brokers removed by a scale-down once they are empty (whatever is
    /// left on one is first handed off to the other brokers); `false` keeps them for a later
    /// scale-up.
    #[serde(default = "enabled")]
    pub delete_claim_on_scale_down: bool,
}

/// The nsqd options users tune, passed to every broker under nsqd's flag names.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.maxBodySize >= self.maxMsgSize").message(messages::BODY_SIZE),
    validation = Rule::new("duration(self.msgTimeout) <= duration(self.maxMsgTimeout)").message(messages::MSG_TIMEOUT),
    validation = Rule::new("!has(self.maxDeflateLevel) || !has(self.deflate) || self.deflate").message(messages::DEFLATE_LEVEL)
)]
pub struct BrokerSettings {
    /// `--mem-queue-size`: messages kept in memory per topic and channel before going to disk.
    #[serde(default = "default_mem_queue_size")]
    #[schemars(range(min = 0))]
    pub mem_queue_size: i64,
    /// `--msg-timeout`: default time a consumer has to finish a message.
    #[serde(default = "default_msg_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub msg_timeout: String,
    /// `--max-msg-timeout`: the longest timeout a consumer may ask for.
    #[serde(default = "default_max_msg_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_msg_timeout: String,
    /// `--max-msg-size`: largest single message, in bytes.
    #[serde(default = "default_max_msg_size")]
    #[schemars(range(min = 1))]
    pub max_msg_size: i64,
    /// `--max-body-size`: largest command body (MPUB), in bytes.
    #[serde(default = "default_max_body_size")]
    #[schemars(range(min = 1))]
    pub max_body_size: i64,
    /// `--max-rdy-count`: the highest RDY a consumer may set.
    #[serde(default = "default_max_rdy_count")]
    #[schemars(range(min = 1))]
    pub max_rdy_count: i64,
    /// `--sync-every`: messages between fsyncs of a disk queue.
    #[serde(default = "default_sync_every")]
    #[schemars(range(min = 1))]
    pub sync_every: i64,
    /// `--sync-timeout`: longest time between fsyncs of a disk queue.
    #[serde(default = "default_sync_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub sync_timeout: String,
    // The compression options stay unset (nsqd's defaults, no flag) unless given, so clusters
    // created before they existed keep their pods.
    /// `--snappy`: offer snappy compression to TCP clients (nsqd's default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snappy: Option<bool>,
    /// `--deflate`: offer deflate compression to TCP clients (nsqd's default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deflate: Option<bool>,
    /// `--max-deflate-level`: highest deflate level a client may ask for (nsqd's default: 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9))]
    pub max_deflate_level: Option<i64>,
    /// `--max-attempts` (knsq only): deliveries of a message before it goes to its channel's
    /// dead-letter topic instead of being delivered again; 0 means no limit (nsqd's behaviour).
    /// Channels may override it over the broker's HTTP API (`POST /channel/config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub max_attempts: Option<i64>,
    /// `--e2e-processing-latency-percentile`: quantiles of publish-to-finish latency the brokers
    /// report in `/stats` and `/metrics` (e.g. `[0.99, 0.95, 0.5]`); none when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "quantiles_schema")]
    pub e2e_processing_latency_percentiles: Vec<f64>,
}

/// The nsqlookupd options users tune.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LookupdSettings {
    /// `--inactive-producer-timeout`: how long a silent broker stays registered.
    #[serde(default = "default_inactive_producer_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub inactive_producer_timeout: String,
    /// `--tombstone-lifetime`: how long a tombstoned producer stays hidden.
    #[serde(default = "default_tombstone_lifetime")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub tombstone_lifetime: String,
}

/// A PodDisruptionBudget limiting voluntary evictions of a component.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PdbSpec {
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Pods that may be down at once through voluntary disruptions.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

/// Prometheus integration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// A ServiceMonitor scraping brokers and lookupds, when the Prometheus operator's CRD exists.
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
    /// A PrometheusRule with knsq's alerts for this cluster, when the Prometheus operator's CRD
    /// exists.
    #[serde(default)]
    pub prometheus_rule: PrometheusRuleSpec,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusRuleSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Labels the Prometheus instance selects rules by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval.
    #[serde(default = "default_scrape_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: String,
    /// Labels the Prometheus instance selects ServiceMonitors by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Observed state, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NSQClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub broker: ComponentStatus,
    #[serde(default)]
    pub lookupd: ComponentStatus,
    /// The nsqadmin Deployment, when `spec.admin` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<ComponentStatus>,
    /// The brokers' volumes, when they are claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStatus>,
    /// Where clients connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// A scale-down of the brokers under way: the leaving brokers drain before the StatefulSet
    /// is lowered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScaleDownStatus>,
    /// Claims of brokers that are gone, being emptied by an offline handoff Job before they are
    /// deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_recovery: Vec<VolumeRecovery>,
    /// The lookupd addresses every running broker was last seen to use (they change at runtime,
    /// without restarting the brokers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lookupd_addresses: Vec<String>,
}

/// The brokers a scale-down removes, draining until they are empty.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownStatus {
    /// Broker replicas when the scale-down began.
    pub from: i32,
    /// The replicas the spec asks for.
    pub to: i32,
    /// The leaving brokers, highest ordinal first.
    #[serde(default)]
    pub brokers: Vec<DrainingBroker>,
}

/// One leaving broker's drain as the operator last saw it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DrainingBroker {
    /// The pod's name.
    pub name: String,
    /// The pod asked to drain, and its container's restart count then: a pod replaced, or a
    /// broker restarted by a crash, is asked again; a broker that exited 0 after the request
    /// has drained.
    pub pod_uid: String,
    pub restarts: i32,
    /// `draining`, `handing_off`, `drained` or `blocked` as the broker reports it;
    /// `unreachable` while it cannot be asked.
    pub state: String,
    /// Messages still on the broker.
    pub remaining_messages: u64,
    /// Why the broker cannot finish, when blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the drain was asked for, or `remainingMessages` last went down (RFC 3339).
    pub progressed_at: String,
}

/// A claim with no broker to come back to, being emptied by an offline handoff Job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecovery {
    pub claim: String,
    pub job: String,
    /// `running`, or `failed` (retried with a new Job).
    pub state: String,
}

/// Replica counts of one StatefulSet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub updated_replicas: i32,
}

/// The brokers' PersistentVolumeClaims.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    /// The size every broker claim is asked for.
    pub size: String,
    /// Claims asked to grow whose volume is not that size yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resizing: Vec<String>,
}

/// The in-cluster addresses clients use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// NSQ TCP protocol of the brokers (`host:port`), for producers.
    pub broker_tcp: String,
    /// HTTP API of the brokers (`http://host:port`).
    pub broker_http: String,
    /// HTTP API of the lookupds (`http://host:port`), for consumers' `/lookup`.
    pub lookupd_http: String,
    /// nsqadmin's web UI inside the cluster (`http://host:port`), when deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_http: Option<String>,
}

impl Default for BrokerSpec {
    fn default() -> Self {
        Self {
            replicas: default_broker_replicas(),
            pod: PodSettings::default(),
            storage: StorageSpec::default(),
            settings: BrokerSettings::default(),
            pdb: PdbSpec::default(),
            termination_grace_period_seconds: default_termination_grace(),
            shutdown_delay: default_shutdown_delay(),
            shutdown_timeout: default_shutdown_timeout(),
            drain_timeout: default_drain_timeout(),
            update_strategy: UpdateStrategy::default(),
            tls: None,
        }
    }
}

impl Default for LookupdSpec {
    fn default() -> Self {
        Self {
            replicas: default_lookupd_replicas(),
            pod: PodSettings::default(),
            settings: LookupdSettings::default(),
            pdb: PdbSpec::default(),
        }
    }
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            ephemeral: false,
            size: default_storage_size(),
            storage_class_name: None,
            delete_claim_on_scale_down: true,
        }
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            mem_queue_size: default_mem_queue_size(),
            msg_timeout: default_msg_timeout(),
            max_msg_timeout: default_max_msg_timeout(),
            max_msg_size: default_max_msg_size(),
            max_body_size: default_max_body_size(),
            max_rdy_count: default_max_rdy_count(),
            sync_every: default_sync_every(),
            sync_timeout: default_sync_timeout(),
            snappy: None,
            deflate: None,
            max_deflate_level: None,
            max_attempts: None,
            e2e_processing_latency_percentiles: Vec::new(),
        }
    }
}

impl Default for LookupdSettings {
    fn default() -> Self {
        Self {
            inactive_producer_timeout: default_inactive_producer_timeout(),
            tombstone_lifetime: default_tombstone_lifetime(),
        }
    }
}

impl Default for PdbSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: default_max_unavailable(),
        }
    }
}

impl Default for ServiceMonitorSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: default_scrape_interval(),
            labels: BTreeMap::new(),
        }
    }
}

impl NSQCluster {
    /// Whether the pause annotation stops reconciliation.
    pub fn is_paused(&self) -> bool {
        self.annotation_true(PAUSE_ANNOTATION)
    }

    /// Whether the force annotation lowers the brokers without draining them.
    pub fn forces_scale_down(&self) -> bool {
        self.annotation_true(FORCE_SCALE_DOWN_ANNOTATION)
    }

    fn annotation_true(&self, name: &str) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(name))
            .is_some_and(|v| v == "true")
    }
}

/// Fields whose schema comes from Kubernetes' own types: their descriptions are left out of the
/// CRD (`kubectl explain` on the core types has them), which keeps it about a third of the size,
/// well under the 256 KiB `kubectl apply` can annotate.
const KUBERNETES_TYPED: &[&str] = &[
    "resources",
    "scheduling",
    "imagePullSecrets",
    "env",
    "volumes",
    "volumeMounts",
    "sidecars",
    "initContainers",
    "podSecurityContext",
    "securityContext",
    "conditions",
];

/// The CustomResourceDefinition as it is installed.
pub fn definition() -> CustomResourceDefinition {
    let mut crd = NSQCluster::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip_kubernetes_descriptions(schema);
        }
    }
    crd
}

fn strip_kubernetes_descriptions(schema: &mut JSONSchemaProps) {
    fn strip(schema: &mut JSONSchemaProps) {
        schema.description = None;
        each_child(schema, strip);
    }
    if let Some(properties) = &mut schema.properties {
        for (name, child) in properties.iter_mut() {
            if KUBERNETES_TYPED.contains(&name.as_str()) {
                // The field's own description stays; what is inside is Kubernetes'.
                each_child(child, strip);
            } else {
                strip_kubernetes_descriptions(child);
            }
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &mut schema.items {
        strip_kubernetes_descriptions(items);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &mut schema.additional_properties {
        strip_kubernetes_descriptions(values);
    }
}

/// Applies `f` to every direct subschema.
fn each_child(schema: &mut JSONSchemaProps, f: fn(&mut JSONSchemaProps)) {
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        f(child);
    }
    match &mut schema.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => f(items),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter_mut().for_each(f),
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &mut schema.additional_properties {
        f(values);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of] {
        list.iter_mut().flatten().for_each(f);
    }
}

/// Field manager of the CRD when the operator's binary applies it (`knsq-operator crd --apply`,
/// the chart's pre-upgrade hook).
pub const CRD_MANAGER: &str = "knsq-crd";

/// Server-side apply the CRD, taking over its fields from whoever installed it (Helm's
/// `crds/`, `kubectl apply`): what `helm upgrade` runs before it applies the new templates, so
/// the new fields are in the schema (and not pruned) by the time a new spec uses them. API
/// servers before 1.25 run no CEL and refuse the rules as unknown fields, so there they go; the
/// operator refuses the same specs itself.
pub async fn apply_definition(
    client: &kube::Client,
) -> Result<CustomResourceDefinition, kube::Error> {
    let mut crd = definition();
    let version = client.apiserver_version().await?;
    if !runs_cel(&version.major, &version.minor) {
        for schema in crd
            .spec
            .versions
            .iter_mut()
            .filter_map(|v| v.schema.as_mut()?.open_api_v3_schema.as_mut())
        {
            strip_validations(schema);
        }
    }
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &kube::api::PatchParams::apply(CRD_MANAGER).force(),
        &kube::api::Patch::Apply(&crd),
    )
    .await
}

/// Whether an API server of this version evaluates `x-kubernetes-validations` (beta and on by
/// default from 1.25). Minor versions may carry a `+` (`"28+"`).
pub fn runs_cel(major: &str, minor: &str) -> bool {
    let number = |s: &str| s.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    (number(major), number(minor)) >= (1, 25)
}

fn strip_validations(schema: &mut JSONSchemaProps) {
    fn strip(schema: &mut JSONSchemaProps) {
        schema.x_kubernetes_validations = None;
        each_child(schema, strip);
    }
    strip(schema);
}

/// The CRD as YAML, as `knsq-operator crd` prints it and the committed copies hold it.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&definition())
}

fn default_broker_replicas() -> i32 {
    3
}
fn default_lookupd_replicas() -> i32 {
    3
}
fn default_termination_grace() -> i64 {
    60
}
fn default_shutdown_delay() -> String {
    "10s".to_owned()
}
fn default_shutdown_timeout() -> String {
    "20s".to_owned()
}
fn default_drain_timeout() -> String {
    "30s".to_owned()
}
fn default_storage_size() -> Quantity {
    Quantity("10Gi".to_owned())
}
fn default_mem_queue_size() -> i64 {
    10_000
}
fn default_msg_timeout() -> String {
    "60s".to_owned()
}
fn default_max_msg_timeout() -> String {
    "15m".to_owned()
}
fn default_max_msg_size() -> i64 {
    1_048_576
}
fn default_max_body_size() -> i64 {
    5_242_880
}
fn default_max_rdy_count() -> i64 {
    2500
}
fn default_sync_every() -> i64 {
    2500
}
fn default_sync_timeout() -> String {
    "2s".to_owned()
}
fn default_inactive_producer_timeout() -> String {
    "300s".to_owned()
}
fn default_tombstone_lifetime() -> String {
    "45s".to_owned()
}
fn default_admin_replicas() -> i32 {
    1
}
fn default_admin_path() -> String {
    "/".to_owned()
}
fn enabled() -> bool {
    true
}
fn default_max_unavailable() -> i32 {
    1
}
fn default_scrape_interval() -> String {
    "30s".to_owned()
}

/// Annotation on the broker StatefulSet recording the claim size last applied: volumes only
/// grow, and the StatefulSet's own claim template cannot change to say so.
pub const STORAGE_SIZE_ANNOTATION: &str = "knsq.io/storage-size";

/// A field of the spec and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}
