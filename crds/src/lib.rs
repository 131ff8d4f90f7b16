//! The `bulkhead.io/v1alpha1` custom resources (../shared/design/api.md).
//!
//! Validation lives in the structural OpenAPI schema (enums, ranges,
//! required fields) and in the compiler's own checks, never in CEL, so the
//! CRDs load on a Kubernetes 1.20 API server.

// kube-derive takes one `printcolumn(name = .., type_ = ..)` per column: the repeated keys are its syntax.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{Condition, LabelSelector},
    util::intstr::IntOrString,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod policy_networking;

pub const GROUP: &str = "bulkhead.io";
/// What the schemas accept as a CIDR; the compiler checks the rest.
pub const CIDR_PATTERN: &str = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$";
pub const VERSION: &str = "v1alpha1";

/// The application team's allowlist: NetworkPolicy semantics, plus `mode`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "bulkhead.io",
    version = "v1alpha1",
    kind = "ConnectionPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "bhcp",
    printcolumn(name = "MODE", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "ACCEPTED", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(
        name = "PROGRAMMED",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(name = "SELECTED", type_ = "integer", json_path = ".status.selectedPods"),
    printcolumn(name = "ENFORCED", type_ = "integer", json_path = ".status.enforcedPods"),
    printcolumn(name = "AGE", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPolicySpec {
    /// Pods of this namespace the policy applies to; `{}` selects all.
    pub pod_selector: LabelSelector,
    /// Directions this policy isolates. Left out: Ingress, plus Egress when
    /// `egress` rules are given (as NetworkPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<PolicyType>>,
    /// Enforce (default) or Audit.
    #[serde(default)]
    pub mode: Mode,
    /// Connections the selected pods accept: each rule allows what it
    /// matches; with Ingress isolated, nothing else comes in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Connections the selected pods may open: each rule allows what it
    /// matches; with Egress isolated, nothing else goes out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// A direction a policy isolates.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// Enforce drops what the policy denies; Audit only reports what it would
/// deny (bulkhead_audit_denied_connections_total, the agent's log).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Sources allowed; left out or empty: every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    /// Destination ports allowed; left out or empty: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Destinations allowed; left out or empty: every destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    /// Destination ports allowed; left out or empty: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Pods with these labels: in the policy's own namespace, or with
    /// `namespaceSelector`, in the namespaces it selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Every pod of the namespaces with these labels (narrowed by
    /// `podSelector` when both are given); `{}` selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Addresses in a CIDR, pod addresses included; not combined with the selectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    /// An IPv4 or IPv6 CIDR, e.g. 10.0.0.0/8 or fd00::/8. Host bits are
    /// masked off (10.1.2.3/16 is 10.1.0.0/16), with a Warning Event.
    #[schemars(regex(pattern = CIDR_PATTERN))]
    pub cidr: String,
    /// CIDRs strictly inside `cidr` that it does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Protocol,
    /// A number or the name of a container port of the destination pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// With a numeric `port`: the inclusive end of a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
}

/// A transport protocol.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

/// The operator's guardrails (AdminNetworkPolicy / BaselineAdminNetworkPolicy shape).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "bulkhead.io",
    version = "v1alpha1",
    kind = "ClusterConnectionPolicy",
    status = "PolicyStatus",
    shortname = "bhccp",
    printcolumn(name = "TIER", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "PRIORITY", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "MODE", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "ACCEPTED", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(
        name = "PROGRAMMED",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(name = "SELECTED", type_ = "integer", json_path = ".status.selectedPods"),
    printcolumn(name = "ENFORCED", type_ = "integer", json_path = ".status.enforcedPods"),
    printcolumn(name = "AGE", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConnectionPolicySpec {
    /// Admin (default): evaluated before ConnectionPolicies; Baseline: after.
    #[serde(default)]
    pub tier: Tier,
    /// Lower first within the tier; ties broken by name.
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,
    /// The pods the policy applies to; left out: every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
    /// Enforce (default) or Audit.
    #[serde(default)]
    pub mode: Mode,
    /// Ingress rules, in order: the first that matches a connection decides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<ClusterIngressRule>>,
    /// Egress rules, in order: the first that matches a connection decides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<ClusterEgressRule>>,
}

/// Admin policies come before ConnectionPolicies and NetworkPolicies,
/// Baseline ones after them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum Tier {
    #[default]
    Admin,
    Baseline,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Namespaces whose pods the policy applies to; left out: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods (of those namespaces) the policy applies to; left out: every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Allow and Deny decide; Pass hands the connection to the next tier
/// (ConnectionPolicies and NetworkPolicies, then Baseline).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Action {
    Allow,
    Deny,
    Pass,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterIngressRule {
    /// What a matching connection gets: Allow, Deny or Pass.
    pub action: Action,
    /// Sources the rule matches; left out or empty: every one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    /// Destination ports the rule matches; left out or empty: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEgressRule {
    /// What a matching connection gets: Allow, Deny or Pass.
    pub action: Action,
    /// Destinations the rule matches; left out or empty: every one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    /// Destination ports the rule matches; left out or empty: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Accepted (valid, or why not) and Programmed (enforced on every
    /// selected pod, or which are behind).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Pods the policy selects (those with an address: a pod without one
    /// has no connection to police).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i32>,
    /// Selected pods whose node's agent holds this generation with its
    /// programs attached to them. Programmed is True when it equals
    /// selectedPods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced_pods: Option<i32>,
    /// The metadata.generation this status speaks of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The label an agent run with `--on-anomaly=quarantine` puts on a pod with
/// an egress anomaly; the shipped `bulkhead-quarantine` policy isolates
/// pods that carry it (its value says why: `egress-anomaly`).
pub const QUARANTINE_LABEL: &str = "bulkhead.io/quarantine";
/// On a quarantined pod: what the anomaly was, and when.
pub const QUARANTINE_REASON_ANNOTATION: &str = "bulkhead.io/quarantine-reason";
/// The namespace label that opts a namespace's pods in to quarantine.
pub const ON_ANOMALY_LABEL: &str = "bulkhead.io/on-anomaly";

/// The CRD manifests as written to manifests/crds/: (file name, YAML).
pub fn manifests() -> Vec<(&'static str, String)> {
    let yaml = |crd| {
        let mut crd = serde_json::to_value(crd).expect("a CRD serializes");
        tighten(&mut crd);
        serde_saphyr::to_string(&crd).expect("a CRD serializes")
    };
    vec![
        ("connectionpolicies.bulkhead.io.yaml", yaml(ConnectionPolicy::crd())),
        ("clusterconnectionpolicies.bulkhead.io.yaml", yaml(ClusterConnectionPolicy::crd())),
        ("clusternetworkpolicies.policy.networking.k8s.io.yaml", yaml(policy_networking::crd())),
    ]
}

/// What the derived schema says loosely, said exactly: a field left out is
/// absent, never `null` (no `nullable`); each `except` entry is a CIDR as
/// `cidr` is; a selector requirement's `operator` is one of the four
/// Kubernetes knows (LabelSelector's own schema leaves it a free string).
fn tighten(schema: &mut serde_json::Value) {
    use serde_json::Value;
    match schema {
        Value::Object(object) => {
            if object.get("nullable") == Some(&Value::Bool(true)) {
                object.remove("nullable");
            }
            if let Some(properties) = object.get_mut("properties").and_then(Value::as_object_mut) {
                let pattern = properties.get("cidr").and_then(|cidr| cidr.get("pattern")).cloned();
                if let (Some(pattern), Some(items)) =
                    (pattern, properties.get_mut("except").and_then(|except| except.get_mut("items")))
                {
                    items["pattern"] = pattern;
                }
                if properties.contains_key("key") && properties.contains_key("values") {
                    if let Some(operator) = properties.get_mut("operator") {
                        operator["enum"] = serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"]);
                    }
                }
            }
            object.values_mut().for_each(tighten);
        }
        Value::Array(items) => items.iter_mut().for_each(tighten),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every property of our own types explains itself to `kubectl explain`
    /// (the Kubernetes types embedded, LabelSelector and Condition, carry
    /// their own descriptions), and none is nullable.
    #[test]
    fn every_field_has_a_description_and_none_is_nullable() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            assert!(schema.get("nullable").is_none(), "{path} is nullable");
            for (name, property) in schema.get("properties").and_then(|p| p.as_object()).into_iter().flatten() {
                let path = format!("{path}.{name}");
                if property.get("description").is_none() {
                    missing.push(path.clone());
                }
                walk(&path, property, missing);
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        for (file, yaml) in manifests() {
            let crd: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            let mut missing = Vec::new();
            for part in ["spec", "status"] {
                walk(part, &schema["properties"][part], &mut missing);
            }
            assert!(missing.is_empty(), "{file}: fields without a description: {missing:?}");
            assert!(yaml.contains("pattern"), "{file}: CIDRs carry a pattern");
            let operators = yaml.matches("- DoesNotExist").count();
            assert!(operators >= 2, "{file}: every selector's operator is an enum ({operators} found)");
        }
    }

    #[test]
    fn committed_crd_manifests_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
        for (file, yaml) in manifests() {
            let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            assert!(committed == yaml, "manifests/crds/{file} is stale: run `cargo xtask crds`");
        }
    }

    #[test]
    fn schema_is_structural_without_cel() {
        for (file, yaml) in manifests() {
            assert!(!yaml.contains("x-kubernetes-validations"), "{file} uses CEL, which a 1.20 API server rejects");
        }
        let crd: serde_json::Value = serde_saphyr::from_str(&manifests()[1].1).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["priority"]["minimum"], 0.0);
        assert_eq!(spec["properties"]["priority"]["maximum"], 1000.0);
        assert!(spec["required"].as_array().unwrap().contains(&"priority".into()));
        let tier = &spec["properties"]["tier"]["enum"];
        assert_eq!(tier, &serde_json::json!(["Admin", "Baseline"]));
    }

    #[test]
    fn api_md_examples_parse() {
        let policy: ConnectionPolicy = serde_saphyr::from_str(
            r#"
apiVersion: bulkhead.io/v1alpha1
kind: ConnectionPolicy
metadata: {name: payment-from-gateway, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payment-service}}
  policyTypes: [Ingress, Egress]
  mode: Enforce
  ingress:
    - from:
        - podSelector: {matchLabels: {app: api-gateway}}
          namespaceSelector: {matchLabels: {team: edge}}
        - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}
      ports:
        - {protocol: TCP, port: 8080}
        - {protocol: TCP, port: 9000, endPort: 9100}
        - {protocol: TCP, port: http}
  egress:
    - to: [{podSelector: {matchLabels: {app: postgres}}}]
      ports: [{protocol: TCP, port: 5432}]
"#,
        )
        .unwrap();
        assert_eq!(policy.spec.ingress.unwrap()[0].ports.as_ref().unwrap()[1].end_port, Some(9100));
        let cluster: ClusterConnectionPolicy = serde_saphyr::from_str(
            r#"
apiVersion: bulkhead.io/v1alpha1
kind: ClusterConnectionPolicy
metadata: {name: default-deny-shop}
spec:
  tier: Baseline
  priority: 100
  subject:
    namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}
    podSelector: {}
  mode: Audit
  ingress:
    - {action: Allow, from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]}
    - {action: Deny}
  egress:
    - {action: Allow, to: [{ipBlock: {cidr: 10.96.0.10/32}}], ports: [{protocol: UDP, port: 53}]}
    - {action: Deny}
"#,
        )
        .unwrap();
        assert_eq!(cluster.spec.tier, Tier::Baseline);
        assert_eq!(cluster.spec.egress.unwrap()[1].action, Action::Deny);
    }
}
