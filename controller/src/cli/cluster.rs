//! What the commands for people read from a cluster (the current
//! kubeconfig's): every object the agents follow, as one snapshot, with when
//! each policy last changed; the agents' reports; and coverage, with which
//! pods the agents enforce.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use bulkhead_crds::{policy_networking::ClusterNetworkPolicy, ClusterConnectionPolicy, ConnectionPolicy};
use bulkhead_policy::{
    coverage::{self, NamespaceCoverage},
    Object, Snapshot,
};
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1 as core, networking::v1::NetworkPolicy},
    apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Api, ListParams},
    Client,
};

use crate::{
    report::{self, node_report, NodeReport, AGENT_LEASE_LABEL, STALE},
    source::kubernetes::Watched,
};

pub async fn client() -> Result<Client> {
    Client::try_default().await.context("connecting to the cluster of the current kubeconfig")
}

/// The cluster as the agents see it.
pub struct Listed {
    pub snapshot: Snapshot,
    /// Per policy, its namespace ("" for cluster-scoped) and the Unix second
    /// of its newest change (`managedFields` times, else creation).
    pub policy_changes: Vec<(String, u64)>,
}

impl Listed {
    /// The newest change to a policy that can judge `namespace`'s pods: its
    /// own and the cluster-scoped ones.
    pub fn last_change_for(&self, namespace: &str) -> u64 {
        self.policy_changes
            .iter()
            .filter(|(ns, _)| ns.is_empty() || ns == namespace)
            .map(|(_, at)| *at)
            .max()
            .unwrap_or(0)
    }
}

pub async fn list(client: &Client) -> Result<Listed> {
    let mut objects = Vec::new();
    let mut changes = Vec::new();
    objects.extend(into_objects(listed::<ConnectionPolicy>(Api::all(client.clone())).await?, &mut changes));
    objects.extend(into_objects(listed::<NetworkPolicy>(Api::all(client.clone())).await?, &mut changes));
    objects.extend(into_objects(listed::<ClusterConnectionPolicy>(Api::all(client.clone())).await?, &mut changes));
    // The upstream CRD may be another implementation's, or absent.
    let upstream = listed::<ClusterNetworkPolicy>(Api::all(client.clone())).await.unwrap_or_default();
    objects.extend(into_objects(upstream, &mut changes));
    let policy_changes = changes;
    objects.extend(into_objects(listed::<core::Namespace>(Api::all(client.clone())).await?, &mut Vec::new()));
    objects.extend(into_objects(listed::<core::Pod>(Api::all(client.clone())).await?, &mut Vec::new()));
    Ok(Listed { snapshot: objects.into_iter().collect(), policy_changes })
}

/// Every agent's report (its Lease in `report_namespace`): node name and
/// report, whose `age` tells whether the agent still renews it (`STALE`).
pub async fn reports(client: &Client, report_namespace: &str) -> Result<Vec<(String, NodeReport)>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), report_namespace);
    let listed = leases
        .list(&ListParams::default().labels(&format!("{AGENT_LEASE_LABEL}=true")))
        .await
        .with_context(|| format!("listing the agents' reports (Leases in {report_namespace})"))?;
    Ok(listed.items.iter().filter_map(|lease| node_report(lease, Timestamp::now())).collect())
}

/// What every agent's Leases in `report_namespace` labelled `annotation`
/// carry under it: its egress baselines or its audit flows.
pub async fn reported<T: serde::de::DeserializeOwned + Default>(
    client: &Client,
    report_namespace: &str,
    annotation: &str,
) -> Result<Vec<T>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), report_namespace);
    let listed = leases
        .list(&ListParams::default().labels(annotation))
        .await
        .with_context(|| format!("listing the agents' {annotation} (Leases in {report_namespace})"))?;
    Ok(listed.items.iter().filter_map(|lease| report::reported(lease, annotation)).map(|(_, value)| value).collect())
}

/// Coverage of the cluster, with the pods each live agent (its report
/// renewed within `STALE`) says it enforces.
pub async fn coverage(report_namespace: &str) -> Result<BTreeMap<String, NamespaceCoverage>> {
    let client = client().await?;
    let snapshot = list(&client).await?.snapshot;
    let enforced: BTreeSet<String> = reports(&client, report_namespace)
        .await?
        .into_iter()
        .filter(|(_, report)| report.age < STALE)
        .flat_map(|(_, report)| report.enforced)
        .collect();
    let mut coverage = coverage::coverage(&snapshot);
    coverage::add_enforcement(&mut coverage, &snapshot, &enforced);
    Ok(coverage)
}

async fn listed<K: Watched>(api: Api<K>) -> Result<Vec<K>> {
    Ok(api.list(&ListParams::default()).await.with_context(|| format!("listing {:?}", K::KIND))?.items)
}

/// The objects, and for each the namespace and time of its newest change.
fn into_objects<K: Watched>(items: Vec<K>, changes: &mut Vec<(String, u64)>) -> Vec<Object> {
    items
        .into_iter()
        .filter_map(|item| {
            changes.push((item.meta().namespace.clone().unwrap_or_default(), last_change(item.meta())));
            item.object().ok().flatten()
        })
        .collect()
}

/// When the object's spec last changed: the newest time of a field manager
/// that owns spec fields (status writers, which the controller is and which
/// an API server before 1.22 does not mark as such, do not count), else its
/// creation.
fn last_change(meta: &ObjectMeta) -> u64 {
    let owns_spec =
        |entry: &&ManagedFieldsEntry| entry.fields_v1.as_ref().is_some_and(|fields| fields.0.get("f:spec").is_some());
    let managed = meta.managed_fields.iter().flatten().filter(owns_spec).filter_map(|f| f.time.as_ref().map(|t| t.0));
    managed
        .chain(meta.creation_timestamp.as_ref().map(|t| t.0))
        .map(|time| time.as_second().max(0) as u64)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_write_is_no_policy_change() {
        let meta: ObjectMeta = serde_json::from_value(serde_json::json!({
            "creationTimestamp": "2026-12-04T08:00:00Z",
            "managedFields": [
                {"manager": "bulkhead-rollout", "operation": "Apply", "time": "2026-12-04T08:01:40Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:mode": {}}}},
                {"manager": "bulkhead-controller", "operation": "Update", "time": "2026-12-04T09:00:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}}}},
            ],
        }))
        .unwrap();
        assert_eq!(last_change(&meta), 1_796_371_300, "the spec's apply, not the status write an hour later");
    }
}
