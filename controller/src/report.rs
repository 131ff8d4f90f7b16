//! What each agent tells the controller through the API server: a Lease of
//! its own (`bulkhead-agent-<node>`), renewed every `RENEW`, annotated with
//! the generation of every policy that selects one of its pods as its
//! datapath holds it, the local pods it enforces, and those it cannot, with
//! why. Its size follows the node, not the cluster. The agent writes it
//! (`agent::report`), the controller reads it (`controller`).
//!
//! What changes less often, or more, than the datapath goes on Leases of
//! its own, written only when it changed (checked at each renewal) and
//! labelled with their annotation's name: the egress baselines
//! (`bulkhead-baselines-<node>`), which every agent watches, and the audit
//! flows (`bulkhead-audit-<node>`), which `bulkhead rollout` reads. On the
//! renewed Lease, each renewal would rewrite them in etcd, send them to the
//! controller and, for the baselines, send every node's to every node: N² a
//! `RENEW`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use bulkhead_policy::audit::Flow;
use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};

/// The annotation on an agent's Lease: `{"<Kind> <namespace>/<name>": generation}`.
pub const PROGRAMMED_ANNOTATION: &str = "bulkhead.io/programmed";
/// `["<namespace>/<pod>", ...]`: local pods with their programs attached.
pub const ENFORCED_ANNOTATION: &str = "bulkhead.io/enforced";
/// `{"<namespace>/<pod>": "why"}`: local pods unenforced past the grace.
pub const UNENFORCED_ANNOTATION: &str = "bulkhead.io/unenforced";
/// On the audit Lease, `{"flows": [...], "omitted": n}`: the audit flows
/// the node saw most recently (`bulkhead_policy::audit::Flow`), and how
/// many more it keeps.
pub const AUDIT_FLOWS_ANNOTATION: &str = "bulkhead.io/audit-flows";
/// On the baselines Lease, `[{"workload": ..., "since": ...,
/// "destinations": [...]}]`: the egress baselines of the workloads enforced
/// on the node (at most `REPORTED_DESTINATIONS` destinations in all).
pub const EGRESS_BASELINES_ANNOTATION: &str = "bulkhead.io/egress-baselines";
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

pub fn audit_lease_name(node: &str) -> String {
    format!("bulkhead-audit-{node}")
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
    };
    Some((node, report))
}

/// The node and what one of its Leases carries under `annotation`.
pub fn reported<T: serde::de::DeserializeOwned + Default>(lease: &Lease, annotation: &str) -> Option<(String, T)> {
    let node = lease.spec.as_ref()?.holder_identity.clone()?;
    Some((node, read(lease.metadata.annotations.as_ref()?, annotation)))
}

/// An annotation's JSON, or the default when absent or unreadable.
fn read<T: serde::de::DeserializeOwned + Default>(annotations: &BTreeMap<String, String>, name: &str) -> T {
    annotations.get(name).and_then(|text| serde_json::from_str(text).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    use super::*;

    fn lease(holder: Option<&str>, annotation: Option<&str>) -> Lease {
        let mut lease = Lease {
            spec: Some(LeaseSpec { holder_identity: holder.map(String::from), ..Default::default() }),
            ..Default::default()
        };
        lease.metadata.annotations =
            annotation.map(|text| [(AUDIT_FLOWS_ANNOTATION.to_string(), text.to_string())].into());
        lease
    }

    #[test]
    fn a_lease_tells_its_node_and_what_it_carries() {
        let carried = lease(Some("node-a"), Some(r#"{"flows": [], "omitted": 7}"#));
        let (node, flows) = reported::<ReportedFlows>(&carried, AUDIT_FLOWS_ANNOTATION).unwrap();
        assert_eq!((node.as_str(), flows.omitted), ("node-a", 7));
        // Unreadable or absent, the value is empty; without a holder, no node.
        let unreadable = lease(Some("node-a"), Some("{"));
        assert_eq!(reported::<ReportedFlows>(&unreadable, AUDIT_FLOWS_ANNOTATION).unwrap().1, ReportedFlows::default());
        let other = reported::<Vec<String>>(&carried, EGRESS_BASELINES_ANNOTATION).unwrap();
        assert_eq!(other, ("node-a".to_string(), Vec::new()));
        assert_eq!(reported::<ReportedFlows>(&lease(None, Some("{}")), AUDIT_FLOWS_ANNOTATION), None);
    }
}
