//! What each agent tells the controller through the API server: a Lease of
//! its own (`bulkhead-agent-<node>`), renewed every `RENEW`, annotated with
//! the generation of every policy that selects one of its pods as its
//! datapath holds it, the local pods it enforces, and those it cannot, with
//! why, and the audit flows it saw (the newest few hundred). Its size follows
//! the node, not the cluster. The agent writes it
//! (`agent::report`), the controller reads it (`controller`).
//!
//! Each agent's egress baselines go on a second Lease
//! (`bulkhead-baselines-<node>`), written only when they change. Every agent
//! watches every other agent's baselines; on the renewed Lease, each renewal
//! would send every node's baselines to every node, N² a `RENEW`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use bulkhead_policy::{audit::Flow, baseline::Learned};
use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};

/// The annotation on an agent's Lease: `{"<Kind> <namespace>/<name>": generation}`.
pub const PROGRAMMED_ANNOTATION: &str = "bulkhead.io/programmed";
/// `["<namespace>/<pod>", ...]`: local pods with their programs attached.
pub const ENFORCED_ANNOTATION: &str = "bulkhead.io/enforced";
/// `{"<namespace>/<pod>": "why"}`: local pods unenforced past the grace.
pub const UNENFORCED_ANNOTATION: &str = "bulkhead.io/unenforced";
/// `{"flows": [...], "omitted": n}`: the audit flows the node saw most
/// recently (`bulkhead_policy::audit::Flow`), and how many more it keeps.
pub const AUDIT_FLOWS_ANNOTATION: &str = "bulkhead.io/audit-flows";
/// On the baselines Lease, `[{"workload": ..., "since": ...,
/// "destinations": [...]}]`: the egress baselines of the workloads enforced
/// on the node (at most `REPORTED_DESTINATIONS` destinations in all).
pub const EGRESS_BASELINES_ANNOTATION: &str = "bulkhead.io/egress-baselines";
/// The label of the baselines Leases, which the agents watch.
pub const BASELINES_LEASE_LABEL: &str = "bulkhead.io/egress-baselines";
/// The annotation must stay well under the API server's 256 KiB.
pub const REPORTED_DESTINATIONS: usize = 2000;
/// The ConfigMap (in the agents' namespace) holding the operator's baseline
/// edits, key `edits.json`.
pub const BASELINE_EDITS_CONFIGMAP: &str = "bulkhead-baseline-edits";
pub const AGENT_LEASE_LABEL: &str = "bulkhead.io/agent-report";
/// An agent renews its Lease this often; one silent for `STALE` is gone.
pub const RENEW: Duration = Duration::from_secs(10);
pub const STALE: Duration = Duration::from_secs(45);

pub fn lease_name(node: &str) -> String {
    format!("bulkhead-agent-{node}")
}

pub fn baselines_lease_name(node: &str) -> String {
    format!("bulkhead-baselines-{node}")
}

/// What one agent says its datapath holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeReport {
    /// Since the Lease was renewed.
    pub age: Duration,
    /// The policies selecting its pods, and the generation it enforces.
    pub programmed: BTreeMap<String, i64>,
    pub enforced: BTreeSet<String>,
    pub unenforced: BTreeMap<String, String>,
    pub audit_flows: ReportedFlows,
}

/// The audit flows in a report.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportedFlows {
    pub flows: Vec<Flow>,
    /// Flows the node keeps but left out of its report.
    pub omitted: usize,
}

impl NodeReport {
    /// The Lease's annotations.
    pub fn annotations(&self) -> BTreeMap<&'static str, String> {
        let json = |value: serde_json::Value| value.to_string();
        [
            (PROGRAMMED_ANNOTATION, json(serde_json::json!(self.programmed))),
            (ENFORCED_ANNOTATION, json(serde_json::json!(self.enforced))),
            (UNENFORCED_ANNOTATION, json(serde_json::json!(self.unenforced))),
            (AUDIT_FLOWS_ANNOTATION, json(serde_json::json!(self.audit_flows))),
        ]
        .into()
    }
}

/// The node and its report, from an agent's Lease.
pub fn node_report(lease: &Lease, now: Timestamp) -> Option<(String, NodeReport)> {
    let node = lease.spec.as_ref()?.holder_identity.clone()?;
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0;
    let age = now.duration_since(renewed).unsigned_abs();
    let annotations = lease.metadata.annotations.as_ref()?;
    let report = NodeReport {
        age,
        programmed: read(annotations, PROGRAMMED_ANNOTATION),
        enforced: read(annotations, ENFORCED_ANNOTATION),
        unenforced: read(annotations, UNENFORCED_ANNOTATION),
        audit_flows: read(annotations, AUDIT_FLOWS_ANNOTATION),
    };
    Some((node, report))
}

/// The node and its egress baselines, from its baselines Lease.
pub fn reported_baselines(lease: &Lease) -> Option<(String, Vec<Learned>)> {
    let node = lease.spec.as_ref()?.holder_identity.clone()?;
    Some((node, read(lease.metadata.annotations.as_ref()?, EGRESS_BASELINES_ANNOTATION)))
}

/// An annotation's JSON, or the default when absent or unreadable.
fn read<T: serde::de::DeserializeOwned + Default>(annotations: &BTreeMap<String, String>, name: &str) -> T {
    annotations.get(name).and_then(|text| serde_json::from_str(text).ok()).unwrap_or_default()
}
