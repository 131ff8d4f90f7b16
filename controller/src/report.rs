//! What each agent tells the controller through the API server: a Lease of
//! its own (`bulkhead-agent-<node>`), renewed every `RENEW`, annotated with
//! the generation of every policy its datapath holds. The agent writes it
//! (`agent::report`), the controller reads it (`controller`).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};

/// The annotation on an agent's Lease: `{"<Kind> <namespace>/<name>": generation}`.
pub const PROGRAMMED_ANNOTATION: &str = "bulkhead.io/programmed";
pub const AGENT_LEASE_LABEL: &str = "bulkhead.io/agent-report";
/// An agent renews its Lease this often; one silent for `STALE` is gone.
pub const RENEW: Duration = Duration::from_secs(10);
pub const STALE: Duration = Duration::from_secs(45);

pub fn lease_name(node: &str) -> String {
    format!("bulkhead-agent-{node}")
}

/// What one agent says its datapath holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeReport {
    /// Since the Lease was renewed.
    pub age: Duration,
    pub programmed: BTreeMap<String, i64>,
}

/// The node and its report, from an agent's Lease.
pub fn node_report(lease: &Lease, now: Timestamp) -> Option<(String, NodeReport)> {
    let node = lease.spec.as_ref()?.holder_identity.clone()?;
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0;
    let age = now.duration_since(renewed).unsigned_abs();
    let programmed = lease
        .metadata
        .annotations
        .as_ref()?
        .get(PROGRAMMED_ANNOTATION)
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    Some((node, NodeReport { age, programmed }))
}
