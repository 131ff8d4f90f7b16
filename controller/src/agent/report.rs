//! What the agent tells the cluster: its report to the controller
//! (`crate::report`), this node's Lease saying which policy generations the
//! datapath holds, with the Leases of its egress baselines and audit flows;
//! the other agents' baselines, taken in; and egress anomalies, as Warning
//! Events on their pods.

use std::{sync::Arc, time::Duration};

use bulkhead_crds::{QUARANTINE_LABEL, QUARANTINE_REASON_ANNOTATION};
use bulkhead_policy::baseline::Learned;
use futures::{FutureExt, StreamExt};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, ObjectReference, Pod},
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, reflector, Store},
        watcher, WatchStreamExt,
    },
    Api, Client,
};
use serde_json::json;
use tokio::sync::mpsc;

use super::{Anomaly, Shared};
use crate::{
    report::{
        audit_lease_name, baselines_lease_name, lease_name, reported, ReportedFlows, AGENT_LEASE_LABEL,
        AUDIT_FLOWS_ANNOTATION, BASELINE_EDITS_CONFIGMAP, EGRESS_BASELINES_ANNOTATION, RENEW, REPORTED_DESTINATIONS,
        STALE,
    },
    source::kubernetes::Reconnect,
};

/// Every agent's baselines Lease, as the watch last saw it: the initial
/// list, then only the baselines that change. Kept whole, for a workload
/// may come to this node at any time; their managed fields are dropped.
fn watch_baselines(client: &Client, namespace: &str) -> Store<Lease> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let (store, writer) = reflector::store();
    let events = watcher(leases, watcher::Config::default().labels(EGRESS_BASELINES_ANNOTATION))
        .backoff(Reconnect::new())
        .modify(|lease| lease.metadata.managed_fields = None);
    tokio::spawn(reflector(writer, events).for_each(|event| {
        if let Err(error) = event {
            tracing::warn!(%error, "watching the other agents' baselines failed; retrying");
        }
        std::future::ready(())
    }));
    store
}

/// One of this node's Leases carrying `annotation` (its label the same),
/// written only when its value changed from what the API server has.
struct PublishedLease {
    name: String,
    annotation: &'static str,
    /// The value last written; none yet since the agent started.
    written: Option<String>,
}

impl PublishedLease {
    fn new(name: String, annotation: &'static str) -> Self {
        Self { name, annotation, written: None }
    }

    /// Write `value` (JSON) unless it is what was last written. A failure
    /// is counted and logged; the next offer tries again.
    async fn offer(&mut self, leases: &Api<Lease>, node: &str, value: String, shared: &Shared) {
        if self.written.as_ref() == Some(&value) {
            return;
        }
        let (name, annotation) = (&self.name, self.annotation);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": name, "labels": { annotation: "true" }, "annotations": { annotation: value } },
            "spec": { "holderIdentity": node, "renewTime": MicroTime(Timestamp::now()) },
        });
        match leases.patch(name, &PatchParams::apply("bulkhead-agent").force(), &Patch::Apply(&lease)).await {
            Ok(_) => self.written = Some(value),
            Err(error) => {
                shared.metrics.sync_errors.with_label_values(&["report"]).inc();
                tracing::warn!(%error, lease = %name, "publishing {annotation} failed; at the next renewal");
            }
        }
    }
}

/// The other agents' egress baselines and the operator's edits (the
/// ConfigMap), offered to the loop: one baseline per workload across
/// nodes. A failure waits for the next renewal.
async fn share_baselines(configmaps: &Api<ConfigMap>, node: &str, baselines: &Store<Lease>, shared: &Shared) {
    let edits = match configmaps.get_opt(BASELINE_EDITS_CONFIGMAP).await {
        Ok(edits) => edits,
        Err(error) => {
            tracing::debug!(%error, "reading the baseline edits; at the next renewal");
            return;
        }
    };
    let others = baselines
        .state()
        .iter()
        .filter_map(|lease| reported::<Vec<Learned>>(lease, EGRESS_BASELINES_ANNOTATION))
        .filter(|(other, _)| other != node)
        .flat_map(|(_, learned)| learned)
        .collect();
    let edits = edits
        .and_then(|cm| cm.data?.get("edits.json").cloned())
        .and_then(|text| {
            serde_json::from_str(&text).map_err(|e| tracing::warn!(error = %e, "baseline edits unreadable")).ok()
        })
        .unwrap_or_default();
    shared.offer_remote_baselines(others, edits);
}

/// The baselines up to `limit` destinations in all, whole workloads only.
fn within(baselines: Vec<Learned>, limit: usize) -> Vec<Learned> {
    let mut total = 0;
    baselines
        .into_iter()
        .take_while(|learned| {
            total += learned.destinations.len();
            total <= limit
        })
        .collect()
}

/// Keep this node's Lease saying which policy generations the datapath
/// holds: renewed every `RENEW`, at once when that changes. After each
/// renewal, publish its baselines and audit flows if they changed, and
/// take in the other agents' baselines.
pub async fn report_programmed(client: Client, namespace: String, node: String, shared: Arc<Shared>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let baselines = watch_baselines(&client, &namespace);
    let name = lease_name(&node);
    let mut audit_lease = PublishedLease::new(audit_lease_name(&node), AUDIT_FLOWS_ANNOTATION);
    let mut baselines_lease = PublishedLease::new(baselines_lease_name(&node), EGRESS_BASELINES_ANNOTATION);
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
                // The flows change with every audit verdict: checked at
                // each renewal rather than moving the version.
                let (flows, omitted) = shared.audit_flows();
                audit_lease.offer(&leases, &node, json!(ReportedFlows { flows, omitted }).to_string(), &shared).await;
                let learned = within(shared.baselines(), REPORTED_DESTINATIONS);
                baselines_lease.offer(&leases, &node, json!(learned).to_string(), &shared).await;
                // Until the watch has listed them all, what the others
                // learned is unknown.
                if baselines.wait_until_ready().now_or_never().is_some() {
                    share_baselines(&configmaps, &node, &baselines, &shared).await;
                }
            }
            Err(error) => {
                shared.metrics.sync_errors.with_label_values(&["report"]).inc();
                tracing::warn!(%error, lease = %name, "reporting to the API server failed; retrying");
                tokio::time::sleep(RENEW / 2).await;
            }
        }
    }
}

/// Publish each egress anomaly as a Warning Event on its pod (reason
/// `EgressAnomaly`, the destination in the note), after labelling the pod
/// for quarantine when asked. The agent reports a destination once per
/// workload and baseline, so the Events are too.
pub async fn publish_anomalies(
    client: Client,
    node: String,
    shared: Arc<Shared>,
    mut anomalies: mpsc::Receiver<Anomaly>,
) {
    let reporter = Reporter { controller: "bulkhead-agent".into(), instance: Some(node) };
    while let Some(anomaly) = anomalies.recv().await {
        if anomaly.quarantine {
            quarantine(&client, &reporter, &shared, &anomaly).await;
        }
        // A recorder of its own: one recorder folds Events of the same
        // reason on the same pod into one, keeping the first note, and
        // each destination is to be read.
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let pod = pod_reference(&anomaly);
        let event = Event {
            type_: EventType::Warning,
            reason: "EgressAnomaly".into(),
            note: Some(format!(
                "egress to {} is outside the learned baseline of workload {}",
                anomaly.destination, anomaly.workload
            )),
            action: "Connect".into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &pod).await {
            shared.metrics.sync_errors.with_label_values(&["event"]).inc();
            tracing::warn!(pod = %anomaly.pod, %error, "publishing an EgressAnomaly Event failed");
        }
    }
}

/// Label the anomalous pod `bulkhead.io/quarantine` (the shipped
/// `bulkhead-quarantine` policy then isolates it but for DNS), say why in
/// an annotation, and tell: a Warning Event `Quarantined` and
/// `bulkhead_quarantined_pods_total`. A failure is logged and counted
/// under `sync_errors{operation="quarantine"}`.
async fn quarantine(client: &Client, reporter: &Reporter, shared: &Shared, anomaly: &Anomaly) {
    let reason = format!("egress to {} at {}", anomaly.destination, Timestamp::now());
    let patch = json!({ "metadata": {
        "labels": { QUARANTINE_LABEL: "egress-anomaly" },
        "annotations": { QUARANTINE_REASON_ANNOTATION: reason },
    }});
    let pod = &anomaly.pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    if let Err(error) = pods.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        shared.metrics.sync_errors.with_label_values(&["quarantine"]).inc();
        tracing::warn!(%pod, %error, "quarantining the pod failed: it stays as it was");
        return;
    }
    shared.metrics.quarantined_pods.with_label_values(&[pod.namespace.as_str(), anomaly.workload.as_str()]).inc();
    tracing::warn!(%pod, destination = %anomaly.destination, "pod quarantined: labelled {QUARANTINE_LABEL}");
    let event = Event {
        type_: EventType::Warning,
        reason: "Quarantined".into(),
        note: Some(format!(
            "labelled {QUARANTINE_LABEL} after egress to {} outside workload {}'s baseline; `bulkhead quarantine release` undoes it",
            anomaly.destination, anomaly.workload
        )),
        action: "Quarantine".into(),
        secondary: None,
    };
    let recorder = Recorder::new(client.clone(), reporter.clone());
    if let Err(error) = recorder.publish(&event, &pod_reference(anomaly)).await {
        shared.metrics.sync_errors.with_label_values(&["event"]).inc();
        tracing::warn!(%pod, %error, "publishing a Quarantined Event failed");
    }
}

fn pod_reference(anomaly: &Anomaly) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(anomaly.pod.namespace.to_string()),
        name: Some(anomaly.pod.name.to_string()),
        uid: anomaly.uid.clone(),
        ..Default::default()
    }
}
