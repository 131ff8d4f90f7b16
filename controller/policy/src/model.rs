//! The objects the compiler reads, as plain values: namespaces, pods, and
//! policy objects as their kinds define them (validated by `rules`).

use std::{fmt, net::IpAddr, sync::Arc};

use bulkhead_crds::{policy_networking::ClusterNetworkPolicy, ClusterConnectionPolicy, ConnectionPolicy, Protocol};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::{selector::Labels, shared::Name};

/// The label every namespace carries, as the API server adds it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    pub fn new(name: &str, labels: Labels) -> Self {
        let mut labels = labels;
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        Self { name: name.to_string(), labels }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: Name,
    pub name: Name,
}

impl PodRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Shared with the other pods of the namespace (see `Snapshot::add_pod`).
    pub namespace: Name,
    /// Shared by every table that keys by this pod.
    pub name: Name,
    /// Shared: the pods of one workload carry the same set, held once (see
    /// `Snapshot::add_pod`).
    pub labels: Arc<Labels>,
    pub ips: Vec<IpAddr>,
    /// Shared: the pods of one workload declare the same ports.
    pub ports: Arc<[ContainerPort]>,
    /// Shared with the other pods of the node.
    pub node_name: Option<Name>,
    /// `metadata.uid`: how the agent finds the pod's cgroup.
    pub uid: Option<String>,
}

impl Pod {
    /// Its reference, sharing its names.
    pub fn pod_ref(&self) -> PodRef {
        PodRef { namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    ClusterConnectionPolicy,
    ConnectionPolicy,
    NetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha2`, the upstream cluster-wide policy.
    ClusterNetworkPolicy,
}

impl PolicyKind {
    /// Cluster-scoped kinds: no namespace.
    pub fn is_cluster_scoped(self) -> bool {
        matches!(self, PolicyKind::ClusterConnectionPolicy | PolicyKind::ClusterNetworkPolicy)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::ClusterConnectionPolicy => "ClusterConnectionPolicy",
            PolicyKind::ConnectionPolicy => "ConnectionPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        })
    }
}

/// Which object: kind, namespace (empty for cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
}

impl PolicyRef {
    /// The reference of an object of `kind` with this metadata (cluster
    /// policies have no namespace; others default to `default`).
    pub fn of(kind: PolicyKind, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        let namespace = if kind.is_cluster_scoped() {
            String::new()
        } else {
            meta.namespace.clone().unwrap_or_else(|| "default".into())
        };
        PolicyRef { kind, namespace, name: meta.name.clone().unwrap_or_default() }
    }

    /// `namespace/name`, `cluster/name` for ClusterConnectionPolicies and
    /// `cnp/name` (the kind's short name) for ClusterNetworkPolicies: the
    /// form verdicts, events and metrics use.
    pub fn qualified_name(&self) -> String {
        match self.kind {
            PolicyKind::ClusterConnectionPolicy => format!("cluster/{}", self.name),
            PolicyKind::ClusterNetworkPolicy => format!("cnp/{}", self.name),
            _ => format!("{}/{}", self.namespace, self.name),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

#[derive(Clone, Debug)]
pub enum PolicyObject {
    Connection(ConnectionPolicy),
    Cluster(ClusterConnectionPolicy),
    Network(NetworkPolicy),
    ClusterNetwork(ClusterNetworkPolicy),
}

impl PolicyObject {
    /// `metadata.generation`: which version of the spec a status speaks of.
    pub fn generation(&self) -> Option<i64> {
        match self {
            PolicyObject::Connection(p) => p.metadata.generation,
            PolicyObject::Cluster(p) => p.metadata.generation,
            PolicyObject::Network(p) => p.metadata.generation,
            PolicyObject::ClusterNetwork(p) => p.metadata.generation,
        }
    }

    pub fn policy_ref(&self) -> PolicyRef {
        let (kind, meta) = match self {
            PolicyObject::Connection(p) => (PolicyKind::ConnectionPolicy, &p.metadata),
            PolicyObject::Cluster(p) => (PolicyKind::ClusterConnectionPolicy, &p.metadata),
            PolicyObject::Network(p) => (PolicyKind::NetworkPolicy, &p.metadata),
            PolicyObject::ClusterNetwork(p) => (PolicyKind::ClusterNetworkPolicy, &p.metadata),
        };
        PolicyRef::of(kind, meta)
    }
}
