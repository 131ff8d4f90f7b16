//! The agent's report to the controller (`crate::report`): this node's
//! Lease, saying which policy generations the datapath holds.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};
use serde_json::json;

use super::Shared;
use crate::report::{lease_name, AGENT_LEASE_LABEL, RENEW, STALE};

/// Keep this node's Lease saying which policy generations the datapath
/// holds: renewed every `RENEW`, at once when that changes.
pub async fn report_programmed(client: Client, namespace: String, node: String, shared: Arc<Shared>) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let name = lease_name(&node);
    let mut reported: Option<u64> = None;
    let mut renewed = std::time::Instant::now() - RENEW;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !shared.is_ready() {
            continue;
        }
        let (version, report) = shared.report();
        if reported == Some(version) && renewed.elapsed() < RENEW {
            continue;
        }
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": name, "labels": { AGENT_LEASE_LABEL: "true" }, "annotations": report.annotations() },
            "spec": { "holderIdentity": node, "renewTime": MicroTime(Timestamp::now()), "leaseDurationSeconds": STALE.as_secs() },
        });
        match leases.patch(&name, &PatchParams::apply("bulkhead-agent").force(), &Patch::Apply(&lease)).await {
            Ok(_) => {
                reported = Some(version);
                renewed = std::time::Instant::now();
            }
            Err(error) => {
                tracing::warn!(%error, lease = %name, "reporting to the API server failed; retrying");
                tokio::time::sleep(RENEW / 2).await;
            }
        }
    }
}
