//! `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy: the Kubernetes
//! network-policy-api working group's cluster-scoped policy (the successor
//! of AdminNetworkPolicy and BaselineAdminNetworkPolicy), with the fields
//! of its API reference. Bulkhead enforces the standard channel; of the
//! experimental peers (`nodes`, `domainNames`) it reads only enough to
//! handle them safely, since the reference leaves an implementation without
//! them to its own devices: an Accept or Pass rule matches nothing through
//! such a peer, a Deny rule every destination, and a warning says so.
//!
//! The schema is written here, like ours, without CEL so it loads on older
//! API servers; the one-field-of-several rules the reference states are
//! checked by the compiler (and so by the webhook and `bulkhead validate`).

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::PolicyStatus;

pub const GROUP: &str = "policy.networking.k8s.io";
pub const VERSION: &str = "v1alpha2";

/// The CRD. A `*.k8s.io` group needs the API review's approval named on
/// it, or the API server refuses the definition: this is the one the
/// upstream API carries. The label lets a cluster that already has the
/// upstream CRD (another implementation installed it) apply install.yaml
/// without it: `-l 'bulkhead.io/upstream-crd!=true'`.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = ClusterNetworkPolicy::crd();
    crd.metadata.labels = Some([("bulkhead.io/upstream-crd".to_string(), "true".to_string())].into());
    crd.metadata.annotations = Some(
        [(
            "api-approved.kubernetes.io".to_string(),
            "https://github.com/kubernetes-sigs/network-policy-api/pull/347".to_string(),
        )]
        .into(),
    );
    crd
}

/// A cluster-wide network policy: Admin tier before NetworkPolicies (and
/// Bulkhead's ConnectionPolicies), Baseline tier after them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    status = "PolicyStatus",
    shortname = "cnp",
    printcolumn(name = "TIER", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "PRIORITY", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "ACCEPTED", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(
        name = "PROGRAMMED",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(name = "AGE", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// Admin: before NetworkPolicies; Baseline: after them.
    pub tier: Tier,
    /// 0..1000, lower first within the tier.
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,
    /// The pods the policy applies to: exactly one of `namespaces`, `pods`.
    pub subject: Subject,
    /// Ingress rules in order, the first matching one deciding; none: the
    /// policy does not affect ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 25))]
    pub ingress: Option<Vec<IngressRule>>,
    /// Egress rules in order, the first matching one deciding; none: the
    /// policy does not affect egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 25))]
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Tier {
    Admin,
    Baseline,
}

/// Exactly one field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Every pod of the namespaces selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// The pods selected in the namespaces selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    /// Namespaces; empty: every namespace.
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    /// Pods of those namespaces; empty: every pod.
    pub pod_selector: LabelSelector,
}

/// Accept and Deny decide (no later policy of any tier is consulted); Pass
/// skips the rest of the tier.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RuleAction {
    Accept,
    Deny,
    Pass,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// For people and logs; at most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub name: Option<String>,
    pub action: RuleAction,
    /// Sources, at least one.
    #[schemars(length(min = 1, max = 25))]
    pub from: Vec<IngressPeer>,
    /// Protocols and destination ports; left out: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<ProtocolMatch>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// For people and logs; at most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub name: Option<String>,
    pub action: RuleAction,
    /// Destinations, at least one.
    #[schemars(length(min = 1, max = 25))]
    pub to: Vec<EgressPeer>,
    /// Protocols and destination ports; left out: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<ProtocolMatch>>,
}

/// An ingress source has the subject's shape (upstream gives the two types
/// of the same fields two names).
pub type IngressPeer = Subject;

/// Exactly one field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressPeer {
    /// Every pod of the namespaces selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// The pods selected in the namespaces selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// Experimental upstream; not supported by Bulkhead (see the module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    /// CIDRs, IPv4 or IPv6 (pod addresses in them match too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25), inner(regex(pattern = crate::CIDR_PATTERN)))]
    pub networks: Option<Vec<String>>,
    /// Experimental upstream; not supported by Bulkhead (see the module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub domain_names: Option<Vec<String>>,
}

/// Exactly one field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolMatch {
    /// TCP, to `destinationPort` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPort>,
    /// UDP, to `destinationPort` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPort>,
    /// SCTP, to `destinationPort` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPort>,
    /// A destination pod's container port by name, whatever its protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPort {
    /// Left out: every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
}

/// Exactly one field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// One destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub number: Option<i32>,
    /// An inclusive range of destination ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
}

/// Inclusive; `start` below `end`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// The first port of the range.
    #[schemars(range(min = 1, max = 65535))]
    pub start: i32,
    /// The last port of the range.
    #[schemars(range(min = 1, max = 65535))]
    pub end: i32,
}
