//! `bulkhead controller`: policy status, written by one writer (agents never
//! write status, so no two writers race on an object).
//!
//! Each agent in Kubernetes mode reports what its datapath holds in a Lease
//! of its own (`crate::report`). The controller follows the same objects the
//! agents see and sets, for each ConnectionPolicy and ClusterConnectionPolicy,
//! `Accepted` (or why not), `Programmed` (every live agent holds this
//! generation), `selectedPods` and `observedGeneration`; each rejection also
//! becomes a Warning Event on the object. NetworkPolicy has no status
//! field: its rejections are Events only.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use bulkhead_crds::{ClusterConnectionPolicy, ConnectionPolicy, PolicyStatus};
use bulkhead_policy::{
    rules::ValidationError, Change, Object, ObjectKey, ObjectKind, PolicyKind, PolicyObject, PolicyRef, Snapshot,
};
use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::Lease,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{
    report::{node_report, NodeReport, AGENT_LEASE_LABEL, STALE},
    source::{kubernetes, Update},
};

/// The status a policy should have, and its rejection if any.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub status: PolicyStatus,
    pub rejection: Option<ValidationError>,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // The transition time moves only when the status does.
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status of every policy in the snapshot, accepted or not. Pure: the
/// clock comes in as `now`.
pub fn desired_statuses(
    snapshot: &Snapshot,
    reports: &BTreeMap<String, NodeReport>,
    previous: &BTreeMap<PolicyRef, PolicyStatus>,
    now: &Time,
) -> BTreeMap<PolicyRef, Desired> {
    let compiled = bulkhead_policy::compile(snapshot);
    let live: Vec<&NodeReport> = reports.values().filter(|r| r.age < STALE).collect();
    let keys: BTreeSet<&PolicyRef> = snapshot.policies.keys().chain(snapshot.rejected.keys()).collect();
    let mut out = BTreeMap::new();
    for key in keys {
        let rejection = snapshot.rejected.get(key);
        let generation = match rejection {
            Some(rejected) => rejected.generation,
            None => snapshot.policies[key].generation,
        };
        let empty = PolicyStatus::default();
        let before = previous.get(key).unwrap_or(&empty);
        let condition = |type_: &str, ok: bool, reason: &str, message: String| {
            condition(type_, ok, reason, message, generation, &before.conditions, now)
        };
        let accepted = match rejection {
            None => condition("Accepted", true, "Accepted", "the policy is valid".into()),
            Some(rejected) => {
                let error = &rejected.error;
                condition("Accepted", false, &error.reason.to_string(), format!("{}: {}", error.field, error.message))
            }
        };
        let programmed = if rejection.is_some() {
            let message = "an invalid policy is not programmed; its last accepted version stays enforced";
            condition("Programmed", false, "NotAccepted", message.into())
        } else if live.is_empty() {
            condition("Programmed", false, "NoAgents", "no agent has reported".into())
        } else {
            let name = key.to_string();
            let holding = live.iter().filter(|r| r.programmed.get(&name).copied() == generation.or(Some(0))).count();
            if holding == live.len() {
                condition("Programmed", true, "Programmed", format!("in the datapath of {holding} node(s)"))
            } else {
                condition(
                    "Programmed",
                    false,
                    "Pending",
                    format!("in the datapath of {holding} of {} node(s)", live.len()),
                )
            }
        };
        // What the enforced version selects: the last accepted one, when this one was rejected.
        let selected_pods = compiled.selected_pods.get(key).map(|n| *n as i32).or(before.selected_pods);
        let status =
            PolicyStatus { conditions: vec![accepted, programmed], selected_pods, observed_generation: generation };
        out.insert(key.clone(), Desired { status, rejection: rejection.map(|r| r.error.clone()) });
    }
    out
}

fn current_status(object: &PolicyObject) -> Option<PolicyStatus> {
    match object {
        PolicyObject::Connection(p) => p.status.clone(),
        PolicyObject::Cluster(p) => p.status.clone(),
        PolicyObject::Network(_) => None,
    }
}

/// The policy objects as the API server has them: their present status and
/// what an Event refers to.
#[derive(Default)]
struct Objects {
    policies: BTreeMap<PolicyRef, PolicyObject>,
}

impl Objects {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Applied(Object::Policy(policy)) => {
                self.policies.insert(policy.policy_ref(), (**policy).clone());
            }
            Change::Deleted(ObjectKey::Policy(key)) => {
                self.policies.remove(key);
            }
            Change::Relisted(ObjectKind::Policy(kind), objects) => {
                self.policies.retain(|key, _| key.kind != *kind);
                for object in objects {
                    if let Object::Policy(policy) = object {
                        self.policies.insert(policy.policy_ref(), (**policy).clone());
                    }
                }
            }
            _ => {}
        }
    }
}

/// Write policy status until the source stops.
pub async fn run(client: Client, agent_namespace: String) -> anyhow::Result<()> {
    let (updates, mut received) = mpsc::channel::<Update>(1024);
    let source = tokio::spawn(kubernetes::run(client.clone(), updates));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &agent_namespace);
    let mut lease_events = watcher(leases, watcher::Config::default().labels(AGENT_LEASE_LABEL))
        .backoff(kubernetes::Reconnect::new())
        .applied_objects()
        .boxed();
    let mut lease_objects: BTreeMap<String, Lease> = BTreeMap::new();
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "bulkhead-controller".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let mut snapshot = Snapshot::default();
    let mut objects = Objects::default();
    let mut synced = false;
    let mut evented: BTreeSet<(PolicyRef, Option<i64>)> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut dirty = false;
    loop {
        tokio::select! {
            update = received.recv() => {
                let Some(update) = update else { break };
                for change in update.changes {
                    synced |= matches!(change, Change::Synced);
                    objects.apply(&change);
                    snapshot.apply(change);
                }
                dirty = true;
            }
            lease = lease_events.next() => match lease {
                Some(Ok(lease)) => {
                    lease_objects.insert(lease.metadata.name.clone().unwrap_or_default(), lease);
                    dirty = true;
                }
                Some(Err(error)) => tracing::warn!(%error, "watching agent reports failed; retrying"),
                None => break,
            },
            _ = tick.tick() => dirty = true,
        }
        if !dirty || !synced || !received.is_empty() {
            continue;
        }
        dirty = false;
        let now = Timestamp::now();
        let reports: BTreeMap<String, NodeReport> =
            lease_objects.values().filter_map(|l| node_report(l, now)).collect();
        let previous: BTreeMap<PolicyRef, PolicyStatus> =
            objects.policies.iter().filter_map(|(k, o)| Some((k.clone(), current_status(o)?))).collect();
        for (key, wanted) in desired_statuses(&snapshot, &reports, &previous, &Time(now)) {
            let Some(object) = objects.policies.get(&key) else { continue };
            if let Some(error) = &wanted.rejection {
                if evented.insert((key.clone(), object.generation())) {
                    publish_rejection(&recorder, object, error).await;
                }
            }
            if key.kind == PolicyKind::NetworkPolicy || previous.get(&key) == Some(&wanted.status) {
                continue;
            }
            let patch = Patch::Merge(json!({ "status": wanted.status }));
            let params = PatchParams::default();
            let result = match key.kind {
                PolicyKind::ConnectionPolicy => Api::<ConnectionPolicy>::namespaced(client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &patch)
                    .await
                    .map(PolicyObject::Connection),
                _ => Api::<ClusterConnectionPolicy>::all(client.clone())
                    .patch_status(&key.name, &params, &patch)
                    .await
                    .map(PolicyObject::Cluster),
            };
            match result {
                // Keep the written status, so it is not written again.
                Ok(updated) => {
                    objects.policies.insert(key, updated);
                }
                Err(error) => {
                    tracing::warn!(policy = %key, %error, "writing status failed; retrying at the next change")
                }
            }
        }
    }
    source.abort();
    anyhow::bail!("the Kubernetes source stopped")
}

async fn publish_rejection(recorder: &Recorder, object: &PolicyObject, error: &ValidationError) {
    let reference = match object {
        PolicyObject::Connection(p) => p.object_ref(&()),
        PolicyObject::Cluster(p) => p.object_ref(&()),
        PolicyObject::Network(p) => p.object_ref(&()),
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "PolicyRejected".into(),
        note: Some(format!("{}: {}: {}", error.reason, error.field, error.message)),
        action: "Validate".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(policy = %error.policy, error = %e, "publishing the rejection Event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_policy::manifest;

    fn snapshot(text: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for object in manifest::parse("test", text).unwrap() {
            snapshot.apply(Change::Applied(object));
        }
        snapshot
    }

    const OBJECTS: &str = "kind: Pod\nmetadata: {name: a, namespace: x, labels: {app: a}}\nspec: {containers: []}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n---\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: b}}\nspec: {containers: []}\nstatus: {podIPs: [{ip: 10.0.0.2}]}\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: good, namespace: x, generation: 3}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  ingress: [{}]\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: bad, namespace: x, generation: 1}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: Near}]}\n";

    fn find<'a>(status: &'a PolicyStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn conditions_follow_validation_and_agent_reports() {
        let snapshot = snapshot(OBJECTS);
        let good = snapshot.policies.keys().find(|k| k.name == "good").unwrap().clone();
        let bad = snapshot.rejected.keys().find(|k| k.name == "bad").unwrap().clone();
        let now = Time(Timestamp::from_second(1_000_000).unwrap());
        let report = |generation: i64, age: u64| NodeReport {
            age: Duration::from_secs(age),
            programmed: [(good.to_string(), generation)].into(),
        };

        let none = desired_statuses(&snapshot, &BTreeMap::new(), &BTreeMap::new(), &now);
        assert_eq!(find(&none[&good].status, "Accepted").status, "True");
        assert_eq!(find(&none[&good].status, "Programmed").reason, "NoAgents");
        assert_eq!(none[&good].status.selected_pods, Some(1));
        assert_eq!(none[&good].status.observed_generation, Some(3));
        let rejected = find(&none[&bad].status, "Accepted");
        assert_eq!((rejected.status.as_str(), rejected.reason.as_str()), ("False", "InvalidSelector"));
        assert!(rejected.message.contains("spec.podSelector.matchExpressions[0].operator"), "{}", rejected.message);
        assert!(none[&bad].rejection.is_some());
        assert_eq!(none[&bad].status.observed_generation, Some(1));

        let reports: BTreeMap<String, NodeReport> =
            [("n1".to_string(), report(3, 1)), ("n2".to_string(), report(2, 1))].into();
        let pending = desired_statuses(&snapshot, &reports, &BTreeMap::new(), &now);
        let programmed = find(&pending[&good].status, "Programmed");
        assert_eq!((programmed.status.as_str(), programmed.reason.as_str()), ("False", "Pending"));
        assert!(programmed.message.contains("1 of 2"), "{}", programmed.message);

        // A node silent for longer than STALE no longer holds the policy back.
        let reports: BTreeMap<String, NodeReport> =
            [("n1".to_string(), report(3, 1)), ("n2".to_string(), report(2, 600))].into();
        let later = Time(Timestamp::from_second(1_000_100).unwrap());
        let previous: BTreeMap<PolicyRef, PolicyStatus> = [(good.clone(), pending[&good].status.clone())].into();
        let done = desired_statuses(&snapshot, &reports, &previous, &later);
        let programmed = find(&done[&good].status, "Programmed");
        assert_eq!(programmed.status, "True");
        assert_eq!(programmed.last_transition_time, later, "it changed: a new transition time");
        assert_eq!(
            find(&done[&good].status, "Accepted").last_transition_time,
            now,
            "unchanged: the old transition time"
        );
    }
}
