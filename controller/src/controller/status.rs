//! The status every policy should have, kept change by change: the objects
//! (through the one validating `Snapshot`), which pods each policy selects
//! (`Selection`) and what each node's agent reports. A change marks only the
//! policies it can affect, and only those are computed again. Pure: no API
//! client, and the clock comes in as arguments.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use bulkhead_crds::PolicyStatus;
use bulkhead_policy::{
    rules::{ValidationError, ValidationWarning},
    selection::Selection,
    Change, Changed, Name, Object, ObjectKey, ObjectKind, PodRef, PolicyObject, PolicyRef, Snapshot,
};
use foldhash::{HashMap, HashSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::report::{NodeReport, STALE};

/// The status a policy should have, its rejection if any, and what was
/// accepted but changed on the way in.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub status: PolicyStatus,
    pub rejection: Option<ValidationError>,
    pub warnings: Vec<ValidationWarning>,
}

/// How many pods behind a policy its Programmed message names.
const NAMED_BEHIND: usize = 5;

/// The least time between two computations of statuses; the marks made in
/// between are gathered. A policy's status walks every pod it selects, so
/// computed after every change, a policy selecting a third of a 150k-pod
/// cluster kept the controller's one thread busy under churn (BENCHMARKS.md).
pub const STATUS_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Default)]
pub struct Engine {
    snapshot: Snapshot,
    selection: Option<Selection>,
    /// The policy objects as the API server has them: their present status
    /// and what an Event refers to.
    objects: BTreeMap<PolicyRef, PolicyObject>,
    /// Each node's report, as of its last renewal (`age` at that time 0).
    reports: BTreeMap<String, Reported>,
    /// Nodes whose report was live at the last look.
    live: BTreeSet<String>,
    dirty: BTreeSet<PolicyRef>,
    synced: bool,
}

impl Engine {
    /// The source's first complete view is in.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn object(&self, key: &PolicyRef) -> Option<&PolicyObject> {
        self.objects.get(key)
    }

    /// Keep what the API server answered a status write with, so the same
    /// status is not written again.
    pub fn written(&mut self, object: PolicyObject) {
        self.objects.insert(object.policy_ref(), object);
    }

    /// Watch-shaped changes from the source.
    pub fn apply(&mut self, changes: Vec<Change>) {
        let mut changed = BTreeSet::new();
        let mut relisted = false;
        for change in changes {
            match &change {
                Change::Applied(object) => {
                    changed.insert(changed_of(object.key()));
                }
                Change::Deleted(key) => {
                    changed.insert(changed_of(key.clone()));
                }
                Change::Relisted(..) => relisted = true,
                Change::Synced => self.synced = true,
            }
            self.keep_object(&change);
            self.snapshot.apply(change);
        }
        match self.selection.as_mut().filter(|_| !relisted) {
            Some(selection) => {
                let affected = selection.update(&self.snapshot, &changed);
                self.dirty.extend(affected);
                self.dirty.extend(changed.into_iter().filter_map(|c| match c {
                    Changed::Policy(policy) => Some(policy),
                    _ => None,
                }));
            }
            None => {
                self.selection = Some(Selection::new(&self.snapshot));
                self.mark_all();
            }
        }
    }

    fn keep_object(&mut self, change: &Change) {
        match change {
            Change::Applied(Object::Policy(policy)) => {
                self.objects.insert(policy.policy_ref(), (**policy).clone());
            }
            Change::Deleted(ObjectKey::Policy(key)) => {
                self.objects.remove(key);
            }
            Change::Relisted(ObjectKind::Policy(kind), objects) => {
                self.objects.retain(|key, _| key.kind != *kind);
                for object in objects {
                    if let Object::Policy(policy) = object {
                        self.objects.insert(policy.policy_ref(), (**policy).clone());
                    }
                }
            }
            _ => {}
        }
    }

    /// The policies selecting any of `pods` (`namespace/name`), at their
    /// generations: what a node enforcing those pods reports.
    pub fn programmed_for(&self, pods: &BTreeSet<String>) -> BTreeMap<String, i64> {
        let Some(selection) = &self.selection else { return BTreeMap::new() };
        let mut programmed = BTreeMap::new();
        for pod in pods.iter().filter_map(|pod| pod_ref(pod)) {
            for policy in selection.policies_of(&pod) {
                let generation = self.snapshot.policies.get(policy).and_then(|p| p.generation).unwrap_or(0);
                programmed.insert(policy.to_string(), generation);
            }
        }
        programmed
    }

    /// Every policy needs its status looked at (a new leader).
    pub fn mark_all(&mut self) {
        self.dirty.extend(self.snapshot.policies.keys().cloned());
        self.dirty.extend(self.snapshot.rejected.keys().cloned());
    }

    /// A node's report, renewed `age` ago. Marks the policies whose
    /// enforcement on that node it changes.
    pub fn report(&mut self, node: &str, report: NodeReport, age: Duration) {
        let empty = NodeReport::default();
        let before = self.reports.get(node).map(|r| &r.report).unwrap_or(&empty);
        let same_enforced = before.enforced == report.enforced;
        if before.programmed != report.programmed || !same_enforced || before.unenforced != report.unenforced {
            let mut affected: BTreeSet<PolicyRef> = BTreeSet::new();
            let policies = before.programmed.keys().chain(report.programmed.keys());
            let changed_policies: BTreeSet<&String> =
                policies.filter(|p| before.programmed.get(*p) != report.programmed.get(*p)).collect();
            if !changed_policies.is_empty() {
                let changed = self.snapshot.policies.keys().filter(|k| changed_policies.contains(&k.to_string()));
                affected.extend(changed.cloned());
            }
            let pods = before.enforced.symmetric_difference(&report.enforced).chain(
                before
                    .unenforced
                    .keys()
                    .chain(report.unenforced.keys())
                    .filter(|p| before.unenforced.get(*p) != report.unenforced.get(*p)),
            );
            if let Some(selection) = &self.selection {
                for pod in pods.filter_map(|pod| pod_ref(pod)) {
                    affected.extend(selection.policies_of(&pod).iter().cloned());
                }
            }
            self.dirty.extend(affected);
        }
        // A renewal mostly repeats the last report: its references are kept.
        let enforced = match self.reports.remove(node) {
            Some(last) if same_enforced => last.enforced,
            _ => report.enforced.iter().filter_map(|pod| pod_ref(pod)).collect(),
        };
        self.reports.insert(node.to_string(), Reported { report, enforced, age });
        if age < STALE && self.live.insert(node.to_string()) {
            self.mark_nodes(&[node.to_string()].into());
        }
    }

    /// Mark the policies selecting pods on these nodes.
    fn mark_nodes(&mut self, nodes: &BTreeSet<String>) {
        let Some(selection) = &self.selection else { return };
        for node in nodes {
            self.dirty.extend(selection.policies_on(node).cloned());
        }
    }

    /// Time passed: reports go stale after `STALE` without renewal, and
    /// their nodes' policies need a look.
    pub fn age_reports(&mut self, elapsed: Duration) {
        for reported in self.reports.values_mut() {
            reported.age += elapsed;
        }
        let live: BTreeSet<String> =
            self.reports.iter().filter(|(_, reported)| reported.age < STALE).map(|(n, _)| n.clone()).collect();
        let flipped: BTreeSet<String> = live.symmetric_difference(&self.live).cloned().collect();
        self.live = live;
        if !flipped.is_empty() {
            self.mark_nodes(&flipped);
        }
    }

    /// Whether some policy is marked: `take_desired` has work.
    pub fn has_marked(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The desired status of every policy marked since the last call.
    pub fn take_desired(&mut self, now: &Time) -> BTreeMap<PolicyRef, Desired> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().filter_map(|key| Some((key.clone(), self.desired(&key, now)?))).collect()
    }

    fn desired(&self, key: &PolicyRef, now: &Time) -> Option<Desired> {
        let rejection = self.snapshot.rejected.get(key);
        let accepted = self.snapshot.policies.get(key);
        let generation = match (rejection, accepted) {
            (Some(rejected), _) => rejected.generation,
            (None, Some(policy)) => policy.generation,
            (None, None) => return None,
        };
        let before = self.objects.get(key).and_then(current_status).unwrap_or_default();
        let condition = |type_: &str, ok: bool, reason: &str, message: String| {
            condition(type_, ok, reason, message, generation, &before.conditions, now)
        };
        let accepted_condition = match rejection {
            None => condition("Accepted", true, "Accepted", "the policy is valid".into()),
            Some(rejected) => {
                let error = &rejected.error;
                condition("Accepted", false, &error.reason.to_string(), format!("{}: {}", error.field, error.message))
            }
        };
        let selection = self.selection.as_ref()?;
        let name = key.to_string();
        let wanted = generation.unwrap_or(0);
        let mut selected = 0;
        let mut enforced = 0;
        let mut behind = Vec::new();
        // What a node holds of this policy is looked up once per node, not
        // once per pod: a policy may select tens of thousands of pods on a
        // few thousand nodes.
        let mut holding: HashMap<&str, (Holding, bool)> = HashMap::default();
        let mut nodes = 0;
        for (pod_ref, node) in selection.pods_of(key) {
            selected += 1;
            let node = node.map(Name::as_str).unwrap_or_default();
            let (holds, counted) = holding.entry(node).or_insert_with(|| (self.holding(node, &name, wanted), false));
            let why = match *holds {
                Holding::Holds(reported) if reported.enforced.contains(pod_ref) => None,
                Holding::Holds(reported) => Some(Behind::Unenforced(&reported.report)),
                Holding::NoReport => Some(Behind::NoReport),
                Holding::Generation(held) => Some(Behind::Generation(held)),
                Holding::NotHeld => Some(Behind::NotHeld),
            };
            match why {
                None => {
                    enforced += 1;
                    if !*counted {
                        *counted = true;
                        nodes += 1;
                    }
                }
                Some(why) if behind.len() < NAMED_BEHIND => {
                    behind.push(format!("{pod_ref}: {}", why.text(node, pod_ref)))
                }
                Some(_) => {}
            }
        }
        let programmed = if rejection.is_some() {
            let message = "an invalid policy is not programmed; its last accepted version stays enforced";
            condition("Programmed", false, "NotAccepted", message.into())
        } else if selected == 0 {
            condition("Programmed", true, "Programmed", "it selects no pod".into())
        } else if enforced == selected {
            condition(
                "Programmed",
                true,
                "Programmed",
                format!("enforced on all {selected} selected pods, on {nodes} node(s)"),
            )
        } else if self.live.is_empty() {
            condition("Programmed", false, "NoAgents", "no agent has reported".into())
        } else {
            let more = if selected - enforced > behind.len() {
                format!(" and {} more", selected - enforced - behind.len())
            } else {
                String::new()
            };
            condition(
                "Programmed",
                false,
                "Pending",
                format!("{enforced} of {selected} selected pods enforced; behind: {}{more}", behind.join("; ")),
            )
        };
        let status = PolicyStatus {
            conditions: vec![accepted_condition, programmed],
            selected_pods: Some(selected as i32),
            enforced_pods: Some(enforced as i32),
            observed_generation: generation,
        };
        let warnings = match (rejection, accepted) {
            (None, Some(policy)) => policy.warnings.clone(),
            _ => Vec::new(),
        };
        Some(Desired { status, rejection: rejection.map(|r| r.error.clone()), warnings })
    }

    /// What `node` holds of the policy `name` wanted at `generation`.
    fn holding(&self, node: &str, name: &str, generation: i64) -> Holding<'_> {
        match self.reports.get(node).filter(|_| self.live.contains(node)) {
            None => Holding::NoReport,
            Some(reported) => match reported.report.programmed.get(name) {
                Some(held) if *held == generation => Holding::Holds(reported),
                Some(held) => Holding::Generation(*held),
                None => Holding::NotHeld,
            },
        }
    }
}

/// A node's hold on one policy, as its live report tells.
#[derive(Clone, Copy)]
enum Holding<'a> {
    NoReport,
    NotHeld,
    Generation(i64),
    Holds(&'a Reported),
}

/// A pod as a node report names it, `namespace/name`.
fn pod_ref(text: &str) -> Option<PodRef> {
    text.split_once('/').map(|(namespace, name)| PodRef::new(namespace, name))
}

/// A node's last report; its enforced pods again as references, what a
/// status looks up for every pod it selects; its age at the last renewal.
struct Reported {
    report: NodeReport,
    enforced: HashSet<PodRef>,
    age: Duration,
}

/// Why a selected pod is not enforced, put in words only for the few a
/// status names.
enum Behind<'a> {
    NoReport,
    NotHeld,
    Generation(i64),
    Unenforced(&'a NodeReport),
}

impl Behind<'_> {
    fn text(&self, node: &str, pod: &PodRef) -> String {
        match self {
            Behind::NoReport => format!("no agent reports from node {node:?}"),
            Behind::NotHeld => format!("node {node} does not hold it yet"),
            Behind::Generation(held) => format!("node {node} holds generation {held}"),
            Behind::Unenforced(report) => {
                report.unenforced.get(&pod.to_string()).map_or("not attached yet", String::as_str).to_string()
            }
        }
    }
}

fn changed_of(key: ObjectKey) -> Changed {
    match key {
        ObjectKey::Namespace(name) => Changed::Namespace(name),
        ObjectKey::Pod(pod) => Changed::Pod(pod),
        ObjectKey::Policy(policy) => Changed::Policy(*policy),
    }
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

pub fn current_status(object: &PolicyObject) -> Option<PolicyStatus> {
    match object {
        PolicyObject::Connection(p) => p.status.clone(),
        PolicyObject::Cluster(p) => p.status.clone(),
        PolicyObject::ClusterNetwork(p) => p.status.clone(),
        PolicyObject::Network(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_policy::manifest;
    use k8s_openapi::jiff::Timestamp;

    const OBJECTS: &str = "kind: Pod\nmetadata: {name: a, namespace: x, labels: {app: a}}\nspec: {nodeName: n1, containers: []}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n---\nkind: Pod\nmetadata: {name: a2, namespace: x, labels: {app: a}}\nspec: {nodeName: n2, containers: []}\nstatus: {podIPs: [{ip: 10.0.0.3}]}\n---\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: b}}\nspec: {nodeName: n1, containers: []}\nstatus: {podIPs: [{ip: 10.0.0.2}]}\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: good, namespace: x, generation: 3}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  ingress: [{}]\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: bad, namespace: x, generation: 1}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: Near}]}\n";

    fn engine() -> Engine {
        let mut engine = Engine::default();
        let mut changes: Vec<Change> =
            manifest::parse("test", OBJECTS).unwrap().into_iter().map(Change::Applied).collect();
        changes.push(Change::Synced);
        engine.apply(changes);
        engine
    }

    fn find<'a>(status: &'a PolicyStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn report(programmed: &[(&str, i64)], enforced: &[&str], unenforced: &[(&str, &str)]) -> NodeReport {
        NodeReport {
            age: Duration::ZERO,
            programmed: programmed.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            enforced: enforced.iter().map(|p| p.to_string()).collect(),
            unenforced: unenforced.iter().map(|(p, w)| (p.to_string(), w.to_string())).collect(),
        }
    }

    #[test]
    fn programmed_only_when_every_selected_pod_is_enforced() {
        let mut engine = engine();
        let good = engine.snapshot.policies.keys().find(|k| k.name == "good").unwrap().clone();
        let bad = engine.snapshot.rejected.keys().find(|k| k.name == "bad").unwrap().clone();
        let now = Time(Timestamp::from_second(1_000_000).unwrap());

        let first = engine.take_desired(&now);
        assert_eq!(find(&first[&good].status, "Accepted").status, "True");
        assert_eq!(find(&first[&good].status, "Programmed").reason, "NoAgents");
        assert_eq!((first[&good].status.selected_pods, first[&good].status.enforced_pods), (Some(2), Some(0)));
        assert_eq!(first[&good].status.observed_generation, Some(3));
        let rejected = find(&first[&bad].status, "Accepted");
        assert_eq!((rejected.status.as_str(), rejected.reason.as_str()), ("False", "InvalidSelector"));
        assert!(rejected.message.contains("spec.podSelector.matchExpressions[0].operator"), "{}", rejected.message);
        assert!(!engine.has_marked());
        assert!(engine.take_desired(&now).is_empty(), "nothing changed: nothing to compute");

        // n1 holds the generation and enforces a; n2 has not attached a2.
        let name = good.to_string();
        engine.report("n1", report(&[(&name, 3)], &["x/a", "x/b"], &[]), Duration::ZERO);
        engine.report(
            "n2",
            report(&[(&name, 3)], &[], &[("x/a2", "the node has no route to 10.0.0.3 yet")]),
            Duration::ZERO,
        );
        engine.age_reports(Duration::from_secs(1));
        assert!(engine.has_marked(), "the reports mark the policy");
        let pending = engine.take_desired(&now);
        assert_eq!(pending.keys().collect::<Vec<_>>(), [&good], "only the policy the reports touch");
        let programmed = find(&pending[&good].status, "Programmed");
        assert_eq!((programmed.status.as_str(), programmed.reason.as_str()), ("False", "Pending"));
        assert!(
            programmed.message.contains("1 of 2") && programmed.message.contains("x/a2: the node has no route"),
            "{}",
            programmed.message
        );
        assert_eq!(pending[&good].status.enforced_pods, Some(1));
        engine.written(with_status(engine.object(&good).unwrap().clone(), pending[&good].status.clone()));

        // a2 attached: programmed.
        let later = Time(Timestamp::from_second(1_000_100).unwrap());
        engine.report("n2", report(&[(&name, 3)], &["x/a2"], &[]), Duration::ZERO);
        let done = engine.take_desired(&later);
        let programmed = find(&done[&good].status, "Programmed");
        assert_eq!(programmed.status, "True", "{}", programmed.message);
        assert!(programmed.message.contains("all 2 selected pods, on 2 node(s)"), "{}", programmed.message);
        assert_eq!(programmed.last_transition_time, later, "it changed: a new transition time");
        assert_eq!(
            find(&done[&good].status, "Accepted").last_transition_time,
            now,
            "unchanged: the old transition time"
        );

        // n2 falls silent: its pod is behind again.
        engine.age_reports(STALE);
        engine.report("n1", report(&[(&name, 3)], &["x/a", "x/b"], &[]), Duration::ZERO);
        let stale = engine.take_desired(&later);
        assert!(find(&stale[&good].status, "Programmed").message.contains("no agent reports from node \"n2\""));

        // n2 back, holding an older generation.
        engine.report("n2", report(&[(&name, 2)], &["x/a2"], &[]), Duration::ZERO);
        let older = engine.take_desired(&later);
        let programmed = find(&older[&good].status, "Programmed");
        assert!(programmed.message.contains("x/a2: node n2 holds generation 2"), "{}", programmed.message);
        assert_eq!(older[&good].status.enforced_pods, Some(1));
    }

    fn with_status(object: PolicyObject, status: PolicyStatus) -> PolicyObject {
        match object {
            PolicyObject::Connection(mut p) => {
                p.status = Some(status);
                PolicyObject::Connection(p)
            }
            other => other,
        }
    }
}
