//! The generated CRD: the committed copies must not drift from it, its schema carries the
//! defaults, bounds and printer columns, and its CEL rules accept and reject what they should
//! (evaluated client-side by kube's `cel` feature, since the test API server predates CEL).

use std::path::{Path, PathBuf};

use std::collections::BTreeSet;

use kube::core::cel::Validator;
use operator::children::{Children, DefaultImages};
use operator::crd::Violation;
use operator::crd::{NSQCluster, NSQClusterSpec, crd_yaml, definition, messages};
use operator::validation;
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn committed_crds_match_the_generated_one() {
    let generated = crd_yaml().expect("render");
    for copy in [
        "deploy/crds/nsqclusters.knsq.io.yaml",
        "charts/knsq/crds/nsqclusters.knsq.io.yaml",
    ] {
        let committed = std::fs::read_to_string(repo_root().join(copy)).expect("committed CRD");
        assert!(
            committed == generated,
            "{copy} is out of date: regenerate it with `cargo run -p operator --bin knsq-operator -- crd > {copy}`"
        );
    }
}

fn schema() -> Value {
    let crd = serde_json::to_value(definition()).expect("encode");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn schema_has_names_defaults_bounds_and_columns() {
    let crd = serde_json::to_value(definition()).expect("encode");
    assert_eq!(crd["metadata"]["name"], "nsqclusters.knsq.io");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["nsqc"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(columns, ["Brokers", "Lookupds", "Ready", "Age"]);

    let broker = &schema()["properties"]["spec"]["properties"]["broker"]["properties"];
    assert_eq!(broker["replicas"]["default"], 3);
    assert_eq!(broker["replicas"]["minimum"], 0.0);
    assert_eq!(
        broker["settings"]["properties"]["memQueueSize"]["default"],
        10000
    );
    assert_eq!(
        broker["settings"]["properties"]["msgTimeout"]["pattern"],
        "^([0-9]+(ns|us|ms|s|m|h))+$"
    );
    assert_eq!(broker["storage"]["properties"]["size"]["default"], "10Gi");
    let lookupd = &schema()["properties"]["spec"]["properties"]["lookupd"]["properties"];
    assert_eq!(lookupd["replicas"]["minimum"], 1.0);
}

/// Evaluate every CEL rule of the schema on `object` (with `old` for transition rules); the
/// messages of the rules that failed.
fn cel_failures(object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema(), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

fn object(spec: Value) -> Value {
    json!({"apiVersion": "knsq.io/v1alpha1", "kind": "NSQCluster", "metadata": {"name": "events", "namespace": "prod"}, "spec": spec})
}

#[test]
fn cel_accepts_valid_clusters() {
    assert_eq!(cel_failures(&object(json!({})), None), Vec::<String>::new());
    let typed = NSQCluster::new("events", NSQClusterSpec::default());
    typed
        .validate_cel()
        .expect("the default cluster passes every rule");
    let tuned = object(
        json!({"broker": {"settings": {"msgTimeout": "1m30s", "maxMsgTimeout": "2m", "maxMsgSize": 10, "maxBodySize": 10}}}),
    );
    assert_eq!(cel_failures(&tuned, None), Vec::<String>::new());
}

#[test]
fn cel_rejects_cross_field_mistakes() {
    let cases = [
        (
            json!({"broker": {"settings": {"maxMsgSize": 2048, "maxBodySize": 1024}}}),
            "maxBodySize must be at least maxMsgSize",
        ),
        (
            json!({"broker": {"settings": {"msgTimeout": "20m"}}}),
            "msgTimeout must not exceed maxMsgTimeout",
        ),
        (
            json!({"broker": {"storage": {"ephemeral": true, "storageClassName": "fast"}}}),
            "storageClassName has no meaning when storage is ephemeral",
        ),
        (
            json!({"lookupd": {"podMetadata": {"labels": {"app.kubernetes.io/component": "x"}}}}),
            "labels under app.kubernetes.io/ are set by the operator and select its pods",
        ),
    ];
    for (spec, message) in cases {
        assert_eq!(
            cel_failures(&object(spec.clone()), None),
            [message],
            "{spec}"
        );
    }
}

#[test]
fn grace_period_budget_counts_the_drain_only_when_sigterm_drains() {
    for (spec, fits) in [
        (json!({}), true),
        (json!({"broker": {"updateStrategy": "drain"}}), true),
        (
            json!({"broker": {"updateStrategy": "drain", "drainTimeout": "1m"}}),
            false,
        ),
        (json!({"broker": {"drainTimeout": "1m"}}), true),
        (
            json!({"broker": {"updateStrategy": "drain", "drainTimeout": "1m", "terminationGracePeriodSeconds": 90}}),
            true,
        ),
        (
            json!({"broker": {"shutdownDelay": "1m", "shutdownTimeout": "1ms"}}),
            false,
        ),
        (
            json!({"broker": {"shutdownDelay": "0s", "shutdownTimeout": "1m", "terminationGracePeriodSeconds": 60}}),
            true,
        ),
    ] {
        let object = object(spec.clone());
        let cel = cel_failures(&object, None);
        let twin = validation::check(&typed(&object));
        assert_eq!(cel.is_empty(), fits, "CEL on {spec}: {cel:?}");
        assert_eq!(twin.is_empty(), fits, "the operator on {spec}: {twin:?}");
    }
}

#[test]
fn cel_rejects_long_names() {
    let mut long = object(json!({}));
    long["metadata"]["name"] = json!("a".repeat(41));
    let failures = cel_failures(&long, None);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].starts_with("metadata.name must be at most 40 characters"),
        "{failures:?}"
    );
}

#[test]
fn cel_lets_storage_grow_but_not_change_kind() {
    let old = object(json!({"broker": {"storage": {"size": "10Gi"}}}));
    let resized = object(json!({"broker": {"storage": {"size": "20Gi"}}}));
    assert_eq!(cel_failures(&resized, Some(&old)), Vec::<String>::new());
    let scaled = object(json!({"broker": {"replicas": 7, "storage": {"size": "10Gi"}}}));
    assert_eq!(cel_failures(&scaled, Some(&old)), Vec::<String>::new());
    let classed =
        object(json!({"broker": {"storage": {"size": "10Gi", "storageClassName": "fast"}}}));
    assert_eq!(
        cel_failures(&classed, Some(&old)),
        [messages::STORAGE_CLASS_IMMUTABLE]
    );
    let ephemeral = object(json!({"broker": {"storage": {"ephemeral": true}}}));
    assert_eq!(
        cel_failures(&ephemeral, Some(&old)),
        [messages::EPHEMERAL_IMMUTABLE]
    );

    let mut typed_old = NSQCluster::new("events", NSQClusterSpec::default());
    typed_old.metadata.namespace = Some("prod".to_owned());
    let mut typed_new = typed_old.clone();
    typed_new.spec.broker.storage.ephemeral = true;
    assert!(typed_new.validate_cel_update(&typed_old).is_err());
}

/// Every CEL message of the schema, once each.
fn cel_messages() -> BTreeSet<String> {
    fn walk(schema: &Value, out: &mut BTreeSet<String>) {
        match schema {
            Value::Object(fields) => {
                for rule in fields
                    .get("x-kubernetes-validations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.insert(rule["message"].as_str().expect("message").to_owned());
                }
                fields.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(&schema(), &mut out);
    out
}

fn typed(object: &Value) -> NSQCluster {
    serde_json::from_value(object.clone()).expect("typed cluster")
}

/// API servers before 1.25 run no CEL: the operator must refuse exactly what each rule refuses,
/// with its message, naming the field. A rule added without its twin fails here.
#[test]
fn the_operator_refuses_what_every_cel_rule_refuses() {
    let mut long = object(json!({}));
    long["metadata"]["name"] = json!("a".repeat(41));
    let spec_cases = [
        (long, "metadata.name", messages::NAME_LENGTH),
        (
            object(
                json!({"broker": {"tls": {"secretName": "t", "required": "false", "clientAuthPolicy": "require"}}}),
            ),
            "spec.broker.tls.clientAuthPolicy",
            messages::CLIENT_AUTH_NEEDS_TLS,
        ),
        (
            object(
                json!({"lookupd": {"podMetadata": {"labels": {"app.kubernetes.io/part-of": "x"}}}}),
            ),
            "spec.lookupd.podMetadata.labels",
            messages::RESERVED_LABELS,
        ),
        (
            object(json!({"broker": {"storage": {"ephemeral": true, "storageClassName": "fast"}}})),
            "spec.broker.storage.storageClassName",
            messages::EPHEMERAL_CLASS,
        ),
        (
            object(json!({"broker": {"settings": {"maxMsgSize": 2048, "maxBodySize": 1024}}})),
            "spec.broker.settings.maxBodySize",
            messages::BODY_SIZE,
        ),
        (
            object(
                json!({"broker": {"settings": {"msgTimeout": "1h", "maxMsgTimeout": "59m59s"}}}),
            ),
            "spec.broker.settings.msgTimeout",
            messages::MSG_TIMEOUT,
        ),
        (
            object(json!({"broker": {"settings": {"deflate": false, "maxDeflateLevel": 4}}})),
            "spec.broker.settings.maxDeflateLevel",
            messages::DEFLATE_LEVEL,
        ),
        (
            object(
                json!({"broker": {"terminationGracePeriodSeconds": 30, "shutdownDelay": "15s", "shutdownTimeout": "16s"}}),
            ),
            "spec.broker.terminationGracePeriodSeconds",
            messages::GRACE_BUDGET,
        ),
        (
            // The default budget (10s + 20s) with a 30s drain no longer fits the default 60s.
            object(json!({"broker": {"updateStrategy": "drain", "drainTimeout": "31s"}})),
            "spec.broker.terminationGracePeriodSeconds",
            messages::GRACE_BUDGET,
        ),
    ];
    let mut covered = BTreeSet::new();
    for (object, field, message) in spec_cases {
        assert_eq!(cel_failures(&object, None), [message], "{object}");
        assert_eq!(
            validation::check(&typed(&object)),
            [Violation {
                field: field.to_owned(),
                message: message.to_owned()
            }],
            "{object}"
        );
        covered.insert(message.to_owned());
    }

    // Transition rules: the operator compares with the StatefulSet it applied.
    let images = DefaultImages {
        broker: "b".to_owned(),
        lookupd: "l".to_owned(),
    };
    let transitions = [
        (
            json!({"broker": {"storage": {"size": "10Gi"}}}),
            json!({"broker": {"storage": {"size": "10Gi", "storageClassName": "fast"}}}),
            "spec.broker.storage.storageClassName",
            messages::STORAGE_CLASS_IMMUTABLE,
        ),
        (
            json!({"broker": {"storage": {"size": "10Gi", "storageClassName": "fast"}}}),
            json!({"broker": {"storage": {"size": "10Gi", "storageClassName": "slow"}}}),
            "spec.broker.storage.storageClassName",
            messages::STORAGE_CLASS_IMMUTABLE,
        ),
        (
            json!({"broker": {"storage": {"size": "10Gi"}}}),
            json!({"broker": {"storage": {"ephemeral": true}}}),
            "spec.broker.storage.ephemeral",
            messages::EPHEMERAL_IMMUTABLE,
        ),
        (
            json!({"broker": {"storage": {"ephemeral": true}}}),
            json!({"broker": {"storage": {"ephemeral": false}}}),
            "spec.broker.storage.ephemeral",
            messages::EPHEMERAL_IMMUTABLE,
        ),
    ];
    for (old, new, field, message) in transitions {
        let (old, new) = (object(old), object(new));
        assert_eq!(cel_failures(&new, Some(&old)), [message], "{old} -> {new}");
        let mut old_cluster = typed(&old);
        old_cluster.metadata.namespace = Some("prod".to_owned());
        let applied = Children::build(&old_cluster, &images)
            .expect("valid")
            .broker;
        let applied = validation::applied_storage(&applied).expect("storage");
        assert_eq!(
            validation::check_storage(&typed(&new), &applied),
            [Violation {
                field: field.to_owned(),
                message: message.to_owned()
            }],
            "{old} -> {new}"
        );
        covered.insert(message.to_owned());
    }
    assert_eq!(
        covered,
        cel_messages(),
        "a CEL rule has no operator twin here"
    );
}

#[test]
fn the_operator_refuses_shrinking_volumes_which_cel_cannot_see() {
    let images = DefaultImages {
        broker: "b".to_owned(),
        lookupd: "l".to_owned(),
    };
    let mut old = typed(&object(json!({"broker": {"storage": {"size": "20Gi"}}})));
    old.metadata.namespace = Some("prod".to_owned());
    let applied = Children::build(&old, &images).expect("valid").broker;
    let applied = validation::applied_storage(&applied).expect("storage");
    let grown = typed(&object(
        json!({"broker": {"storage": {"size": "21474836481"}}}),
    ));
    assert_eq!(validation::check_storage(&grown, &applied), []);
    let shrunk = typed(&object(json!({"broker": {"storage": {"size": "20G"}}})));
    assert_eq!(
        validation::check_storage(&shrunk, &applied),
        [Violation {
            field: "spec.broker.storage.size".to_owned(),
            message: "volumes only grow: the claims are 20Gi, so 20G is too small".to_owned()
        }]
    );
}

#[test]
fn examples_parse_and_pass_every_rule() {
    let dir = repo_root().join("deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/examples") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        let typed: NSQCluster =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let raw: Value = serde_saphyr::from_str(&text).expect("example as JSON");
        assert_eq!(
            cel_failures(&raw, None),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
        typed
            .validate_cel()
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        seen += 1;
    }
    assert!(seen >= 3, "expected the examples in {}", dir.display());
}

#[test]
fn tls_schema_is_optional_with_flag_values() {
    let spec = &schema()["properties"]["spec"]["properties"];
    let tls = &spec["broker"]["properties"]["tls"];
    assert_eq!(tls["required"], json!(["secretName"]));
    assert_eq!(tls["properties"]["secretName"]["minLength"], 1);
    let values = |field: &str| -> Vec<Value> {
        tls["properties"][field]["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .filter(|v| !v.is_null())
            .cloned()
            .collect()
    };
    assert_eq!(
        values("required"),
        [json!("false"), json!("true"), json!("tcp-https")]
    );
    assert_eq!(
        values("clientAuthPolicy"),
        [json!("require"), json!("require-verify")]
    );
    assert_eq!(values("minVersion"), [json!("tls1.2"), json!("tls1.3")]);
    assert_eq!(spec["clusterTls"]["required"], json!(["secretName"]));
    // Unset means today's behaviour: no defaults that would add flags to existing clusters.
    assert_eq!(spec["broker"]["default"].get("tls"), None);
    assert_eq!(spec.get("clusterTls").and_then(|c| c.get("default")), None);
    let settings = &spec["broker"]["properties"]["settings"];
    assert_eq!(settings["properties"]["maxDeflateLevel"]["maximum"], 9.0);
    assert_eq!(settings["default"].get("snappy"), None);
    // --max-attempts takes a u16; unset adds no flag, so existing clusters keep their pods.
    assert_eq!(settings["properties"]["maxAttempts"]["minimum"], 0.0);
    assert_eq!(settings["properties"]["maxAttempts"]["maximum"], 65535.0);
    assert_eq!(settings["default"].get("maxAttempts"), None);
}

#[test]
fn cel_accepts_tls_settings() {
    let cases = [
        json!({"broker": {"tls": {"secretName": "events-tls"}}}),
        json!({"broker": {"tls": {"secretName": "events-tls", "required": "tcp-https", "minVersion": "tls1.3"}}}),
        json!({"broker": {"tls": {"secretName": "events-tls", "clientAuthPolicy": "require-verify"}}}),
        json!({"broker": {"tls": {"secretName": "events-tls", "required": "true", "clientAuthPolicy": "require"}}}),
        json!({"broker": {"tls": {"secretName": "events-tls", "required": "tcp-https", "clientAuthPolicy": "require-verify"}}}),
        json!({"clusterTls": {"secretName": "events-cluster-tls"}}),
        json!({"broker": {"settings": {"snappy": false, "deflate": true, "maxDeflateLevel": 9}}}),
        json!({"broker": {"settings": {"maxDeflateLevel": 1}}}),
    ];
    for spec in cases {
        assert_eq!(
            cel_failures(&object(spec.clone()), None),
            Vec::<String>::new(),
            "{spec}"
        );
        let typed: NSQClusterSpec = serde_json::from_value(spec.clone()).expect("typed spec");
        NSQCluster::new("events", typed)
            .validate_cel()
            .unwrap_or_else(|e| panic!("{spec}: {e:?}"));
    }
}

#[test]
fn cel_rejects_contradicting_tls_settings() {
    let auth_message = "clientAuthPolicy makes TLS required: set required to \"true\" or \"tcp-https\", or leave it unset";
    let cases = [
        (
            json!({"broker": {"tls": {"secretName": "t", "required": "false", "clientAuthPolicy": "require"}}}),
            auth_message,
        ),
        (
            json!({"broker": {"settings": {"deflate": false, "maxDeflateLevel": 4}}}),
            "maxDeflateLevel has no meaning when deflate is off",
        ),
    ];
    for (spec, message) in cases {
        assert_eq!(
            cel_failures(&object(spec.clone()), None),
            [message],
            "{spec}"
        );
    }
}

#[test]
fn tls_values_round_trip_as_flag_strings() {
    let spec: NSQClusterSpec = serde_json::from_value(json!({
        "broker": {"tls": {"secretName": "t", "required": "tcp-https", "clientAuthPolicy": "require-verify", "minVersion": "tls1.2"}},
        "clusterTls": {"secretName": "m"}
    }))
    .expect("parse");
    let back = serde_json::to_value(&spec).expect("encode");
    assert_eq!(back["broker"]["tls"]["required"], "tcp-https");
    assert_eq!(back["broker"]["tls"]["clientAuthPolicy"], "require-verify");
    assert_eq!(back["clusterTls"], json!({"secretName": "m"}));
    assert!(
        serde_json::from_value::<NSQClusterSpec>(
            json!({"broker": {"tls": {"secretName": "t", "required": true}}})
        )
        .is_err(),
        "a YAML boolean is not one of the flag's strings"
    );
    let plain = serde_json::to_value(NSQClusterSpec::default()).expect("encode");
    assert_eq!(plain.get("clusterTls"), None);
    assert_eq!(plain["broker"].get("tls"), None);
}
