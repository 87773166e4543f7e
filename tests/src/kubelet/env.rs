//! A container's environment and command line as the kubelet makes them: `env` in order (each
//! value may use the variables before it as `$(NAME)`), `valueFrom` resolved from the pod
//! (downward API), ConfigMaps and Secrets, and `$(NAME)` expanded in `command` and `args`.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::{Api, Client, ResourceExt};

/// Expand `$(NAME)` references the way the kubelet does: a defined name is replaced, an
/// undefined reference stays as written, and `$$` is a literal `$`.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match lookup(name) {
                Some(value) => out.push_str(&value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A downward API field of the pod, as `fieldRef.fieldPath` names it.
pub fn pod_field(pod: &Pod, path: &str, pod_ip: &str, host_ip: &str) -> Result<String> {
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|p| p.strip_prefix("['"))
            .and_then(|p| p.strip_suffix("']"))
    };
    let value = match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.podIP" | "status.podIPs" => pod_ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_owned(),
        _ => {
            if let Some(key) = quoted("metadata.labels") {
                pod.labels().get(key).cloned().unwrap_or_default()
            } else if let Some(key) = quoted("metadata.annotations") {
                pod.annotations().get(key).cloned().unwrap_or_default()
            } else {
                bail!("fieldRef {path} is not supported by the kubelet stand-in")
            }
        }
    };
    Ok(value)
}

/// The environment of `container` in `pod`, in the order the kubelet sets it (later entries win).
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
    host_ip: &str,
) -> Result<Vec<(String, String)>> {
    let namespace = pod.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut env: Vec<(String, String)> = Vec::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(r) = &source.config_map_ref {
            let data = config_maps
                .get_opt(&r.name)
                .await?
                .and_then(|c| c.data)
                .unwrap_or_default();
            env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
        }
        if let Some(r) = &source.secret_ref {
            let data = secrets
                .get_opt(&r.name)
                .await?
                .and_then(|s| s.data)
                .unwrap_or_default();
            env.extend(data.into_iter().map(|(k, v)| {
                (
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v.0).into_owned(),
                )
            }));
        }
    }
    for var in container.env.iter().flatten() {
        let value = value(var, pod, pod_ip, host_ip, &config_maps, &secrets, &env).await?;
        if let Some(value) = value {
            env.retain(|(k, _)| k != &var.name);
            env.push((var.name.clone(), value));
        }
    }
    Ok(env)
}

async fn value(
    var: &EnvVar,
    pod: &Pod,
    pod_ip: &str,
    host_ip: &str,
    config_maps: &Api<ConfigMap>,
    secrets: &Api<Secret>,
    before: &[(String, String)],
) -> Result<Option<String>> {
    let Some(source) = &var.value_from else {
        let defined: BTreeMap<&str, &str> = before
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let raw = var.value.clone().unwrap_or_default();
        return Ok(Some(expand(&raw, &|name| {
            defined.get(name).map(|v| (*v).to_owned())
        })));
    };
    if let Some(field) = &source.field_ref {
        return pod_field(pod, &field.field_path, pod_ip, host_ip).map(Some);
    }
    if let Some(key) = &source.config_map_key_ref {
        let data = config_maps
            .get_opt(&key.name)
            .await
            .with_context(|| format!("reading ConfigMap {}", key.name))?
            .and_then(|c| c.data);
        return match data.and_then(|d| d.get(&key.key).cloned()) {
            Some(value) => Ok(Some(value)),
            None if key.optional == Some(true) => Ok(None),
            None => Err(anyhow!(
                "couldn't find key {} in ConfigMap {}",
                key.key,
                key.name
            )),
        };
    }
    if let Some(key) = &source.secret_key_ref {
        let data = secrets
            .get_opt(&key.name)
            .await
            .with_context(|| format!("reading Secret {}", key.name))?
            .and_then(|s| s.data);
        return match data.and_then(|d| d.get(&key.key).cloned()) {
            Some(value) => Ok(Some(String::from_utf8_lossy(&value.0).into_owned())),
            None if key.optional == Some(true) => Ok(None),
            None => Err(anyhow!(
                "couldn't find key {} in Secret {}",
                key.key,
                key.name
            )),
        };
    }
    bail!(
        "env {}: this valueFrom is not supported by the kubelet stand-in",
        var.name
    )
}

/// `command` and `args` of the container with `$(NAME)` expanded from its environment; an
/// unset `command` is the image's entrypoint, unset `args` the image's command.
pub fn command_line(
    container: &Container,
    env: &[(String, String)],
    entrypoint: &[String],
    image_command: &[String],
) -> Vec<String> {
    let defined: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let lookup = |name: &str| defined.get(name).map(|v| (*v).to_owned());
    let expand_all =
        |items: &[String]| -> Vec<String> { items.iter().map(|s| expand(s, &lookup)).collect() };
    match (&container.command, &container.args) {
        (Some(command), Some(args)) => [expand_all(command), expand_all(args)].concat(),
        (Some(command), None) => expand_all(command),
        (None, Some(args)) => [entrypoint.to_vec(), expand_all(args)].concat(),
        (None, None) => [entrypoint, image_command].concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(name: &str) -> Option<String> {
        match name {
            "POD_NAME" => Some("events-broker-2".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        assert_eq!(
            expand("--node-id=$(POD_NAME)", &vars),
            "--node-id=events-broker-2"
        );
        assert_eq!(expand("$(MISSING)-$(EMPTY)x", &vars), "$(MISSING)-x");
        assert_eq!(expand("$$(POD_NAME)", &vars), "$(POD_NAME)");
        assert_eq!(expand("a$b$", &vars), "a$b$");
        assert_eq!(expand("$(unclosed", &vars), "$(unclosed");
        assert_eq!(expand("$$$$", &vars), "$$");
    }

    #[test]
    fn downward_api_fields() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u",
                         "labels": {"app.kubernetes.io/name": "knsq"}},
            "spec": {"nodeName": "node", "containers": []}
        }))
        .expect("pod");
        let field = |path| pod_field(&pod, path, "127.1.1.2", "127.1.0.1").expect(path);
        assert_eq!(field("metadata.name"), "p");
        assert_eq!(field("metadata.namespace"), "ns");
        assert_eq!(field("spec.nodeName"), "node");
        assert_eq!(field("status.podIP"), "127.1.1.2");
        assert_eq!(field("metadata.labels['app.kubernetes.io/name']"), "knsq");
        assert_eq!(field("metadata.labels['missing']"), "");
        assert!(pod_field(&pod, "spec.something", "", "").is_err());
    }

    #[test]
    fn command_lines_from_the_image_and_the_spec() {
        let entrypoint = ["/usr/local/bin/knsq-broker".to_owned()];
        let cmd = ["--data-path=/data".to_owned()];
        let env = [("POD_NAME".to_owned(), "b-1".to_owned())];
        let container = |command: Option<&[&str]>, args: Option<&[&str]>| Container {
            command: command.map(|c| c.iter().map(|s| (*s).to_owned()).collect()),
            args: args.map(|a| a.iter().map(|s| (*s).to_owned()).collect()),
            ..Container::default()
        };
        assert_eq!(
            command_line(&container(None, None), &env, &entrypoint, &cmd),
            ["/usr/local/bin/knsq-broker", "--data-path=/data"]
        );
        assert_eq!(
            command_line(
                &container(None, Some(&["--node-id=$(POD_NAME)"])),
                &env,
                &entrypoint,
                &cmd
            ),
            ["/usr/local/bin/knsq-broker", "--node-id=b-1"]
        );
        assert_eq!(
            command_line(
                &container(Some(&["/bin/sh", "-c"]), Some(&["echo $(POD_NAME)"])),
                &env,
                &entrypoint,
                &cmd
            ),
            ["/bin/sh", "-c", "echo b-1"]
        );
    }
}
