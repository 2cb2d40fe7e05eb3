//! Every manifest in `deploy/` reads into the Kubernetes API's own types, and says what the
//! hardened reference's tiers need: workers that reach only the worker listener, secrets as
//! read-only files, a scaler that may touch only the workers' scale.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");

/// Every document of every manifest, as JSON, by file.
fn documents() -> BTreeMap<String, Vec<Value>> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(DEPLOY).expect("deploy/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("manifest");
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("YAML"))
            .filter(|v| !v.is_null())
            .collect();
        let name = Path::new(&path)
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        all.insert(name, docs);
    }
    all
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value, file: &str) -> T {
    serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not read as its type: {e}", doc["kind"]))
}

#[test]
fn every_manifest_reads_into_the_kubernetes_types() {
    let all = documents();
    for file in [
        "namespace.yaml",
        "gateway.yaml",
        "workers.yaml",
        "scaler.yaml",
        "network-policies.yaml",
        "keda.yaml",
    ] {
        assert!(all.contains_key(file), "deploy/{file}");
    }
    let mut kinds = Vec::new();
    for (file, docs) in &all {
        for doc in docs {
            let kind = doc["kind"].as_str().expect("kind").to_string();
            match kind.as_str() {
                "Namespace" => drop(typed::<Namespace>(doc, file)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(doc, file)),
                "Deployment" => drop(typed::<Deployment>(doc, file)),
                "Service" => drop(typed::<Service>(doc, file)),
                "Role" => drop(typed::<Role>(doc, file)),
                "RoleBinding" => drop(typed::<RoleBinding>(doc, file)),
                "NetworkPolicy" => drop(typed::<NetworkPolicy>(doc, file)),
                "ScaledObject" => {
                    assert_eq!(doc["apiVersion"], "keda.sh/v1alpha1");
                    assert_eq!(doc["spec"]["scaleTargetRef"]["name"], "sparkle-worker");
                    let query = doc["spec"]["triggers"][0]["metadata"]["query"]
                        .as_str()
                        .unwrap_or_default();
                    assert!(query.contains("sparkle_workers_desired"), "{query}");
                }
                other => panic!("{file}: a {other} no test reads"),
            }
            kinds.push(kind);
        }
    }
    assert!(kinds.iter().filter(|k| *k == "NetworkPolicy").count() >= 4);
}

fn find<'a>(all: &'a BTreeMap<String, Vec<Value>>, kind: &str, name: &str) -> &'a Value {
    all.values()
        .flatten()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn workers_ask_for_a_gpu_hold_only_their_enrollment_and_reach_only_the_worker_listener() {
    let all = documents();
    let workers: Deployment = typed(find(&all, "Deployment", "sparkle-worker"), "workers.yaml");
    let pod = workers.spec.expect("spec").template.spec.expect("pod");
    let container = &pod.containers[0];
    let limits = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("limits");
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert!(
        container
            .env
            .iter()
            .flatten()
            .all(|e| e.value_from.is_none()),
        "no secret in the environment"
    );
    let secrets: Vec<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref())
        .filter_map(|s| s.secret_name.clone())
        .collect();
    assert_eq!(
        secrets,
        ["sparkle-enrollment"],
        "the enrollment secret alone"
    );
    assert!(
        pod.termination_grace_period_seconds.unwrap_or(30) >= 60,
        "time to drain a batch"
    );
    let egress: NetworkPolicy = typed(
        find(&all, "NetworkPolicy", "worker-egress"),
        "network-policies.yaml",
    );
    let rules = egress.spec.expect("spec").egress.expect("egress");
    let ports: Vec<String> = rules
        .iter()
        .flat_map(|r| r.ports.iter().flatten())
        .filter_map(|p| p.port.as_ref())
        .map(|p| match p {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
        })
        .collect();
    assert_eq!(
        ports,
        ["8444", "53", "53"],
        "the worker listener and DNS, nothing else"
    );
    let deny: NetworkPolicy = typed(
        find(&all, "NetworkPolicy", "default-deny"),
        "network-policies.yaml",
    );
    let spec = deny.spec.expect("spec");
    let selects_all = spec
        .pod_selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_none() && s.match_expressions.is_none());
    assert!(selects_all && spec.ingress.is_none() && spec.egress.is_none());
}

#[test]
fn the_scaler_may_touch_the_workers_scale_and_nothing_else() {
    let all = documents();
    let role: Role = typed(find(&all, "Role", "sparkle-scaler"), "scaler.yaml");
    let rules = role.rules.expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["deployments/scale".to_string()][..])
    );
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&["sparkle-worker".to_string()][..])
    );
    for secret_mount in all.values().flatten().filter(|d| d["kind"] == "Deployment") {
        let deployment: Deployment = typed(secret_mount, "deploy");
        let pod = deployment.spec.expect("spec").template.spec.expect("pod");
        for volume in pod.volumes.iter().flatten() {
            if let Some(secret) = &volume.secret {
                assert_eq!(secret.default_mode, Some(0o400), "{:?}", volume.name);
            }
        }
        for container in &pod.containers {
            let sc = container
                .security_context
                .as_ref()
                .expect("securityContext");
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
        }
    }
}
