//! The status a policy should have, from the snapshot and what the agents
//! report. Pure: the clock comes in as `now`.

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_crds::PolicyStatus;
use bulkhead_policy::{rules::ValidationError, PolicyObject, PolicyRef, Snapshot};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::report::{NodeReport, STALE};

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

pub fn current_status(object: &PolicyObject) -> Option<PolicyStatus> {
    match object {
        PolicyObject::Connection(p) => p.status.clone(),
        PolicyObject::Cluster(p) => p.status.clone(),
        PolicyObject::Network(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_policy::{manifest, Change};
    use k8s_openapi::jiff::Timestamp;
    use std::time::Duration;

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
