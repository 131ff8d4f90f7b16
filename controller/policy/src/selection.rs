//! Which pods each accepted policy selects, kept up to date change by
//! change: what a policy's status counts (`selectedPods`) and checks
//! (`enforcedPods`). A change costs what it touches: a pod, the policies of
//! its namespace and the cluster ones; a policy, the pods it can select; a
//! namespace, its pods. Each answer names the policies whose selection
//! changed, so a status writer recomputes only those.
//!
//! Only pods with an address are counted: a pod that has none yet has no
//! connection to police.

use std::collections::BTreeSet;

use foldhash::HashMap;

use crate::{
    compile::Changed,
    model::{Pod, PodRef, PolicyRef},
    rules::{NamespaceScope, Policy},
    shared::Name,
    snapshot::Snapshot,
};

#[derive(Default)]
pub struct Selection {
    /// Pods numbered, so the per-policy sets stay small at 150k pods.
    numbers: HashMap<PodRef, u32>,
    refs: Vec<Option<PodRef>>,
    /// Each counted pod's node, by number: what a status looks up per pod.
    nodes: Vec<Option<Name>>,
    free: Vec<u32>,
    /// Counted pods by namespace.
    by_namespace: HashMap<Name, BTreeSet<u32>>,
    /// Counted pods by node: what a node's agent coming or going touches.
    by_node: HashMap<Name, BTreeSet<u32>>,
    /// For each counted pod, the policies selecting it.
    by_pod: HashMap<u32, Vec<PolicyRef>>,
    /// For each accepted policy, the pods it selects.
    by_policy: HashMap<PolicyRef, BTreeSet<u32>>,
    /// Accepted policies by the namespace of their subject; cluster ones under "".
    subjects: HashMap<String, BTreeSet<PolicyRef>>,
}

impl Selection {
    pub fn new(snapshot: &Snapshot) -> Self {
        let mut selection = Selection::default();
        for (policy_ref, policy) in &snapshot.policies {
            selection.subjects.entry(subject_namespace(policy)).or_default().insert(policy_ref.clone());
            selection.by_policy.entry(policy_ref.clone()).or_default();
        }
        // Pods come ordered by namespace: the policies whose subject takes in
        // a namespace are found once for all its pods, not looked up again
        // for each (400 cluster policies by 150k pods took two minutes).
        let mut namespace: Option<&Name> = None;
        let mut candidates: Vec<(&PolicyRef, &Policy)> = Vec::new();
        for (pod_ref, pod) in snapshot.pods.iter().filter(|(_, pod)| !pod.ips.is_empty()) {
            if namespace != Some(&pod.namespace) {
                let labels = snapshot.namespace_labels(&pod.namespace);
                candidates = snapshot
                    .policies
                    .iter()
                    .filter(|(_, policy)| policy.selects_namespace(&pod.namespace, &labels))
                    .collect();
                namespace = Some(&pod.namespace);
            }
            let wanted: Vec<PolicyRef> = candidates
                .iter()
                .filter(|(_, policy)| policy.subject_pods.matches(&pod.labels))
                .map(|(policy_ref, _)| (*policy_ref).clone())
                .collect();
            let number = selection.number(pod_ref);
            for policy in &wanted {
                selection.by_policy.entry(policy.clone()).or_default().insert(number);
            }
            selection.keep_counted(number, pod, wanted);
        }
        selection
    }

    /// How many pods a policy selects (`None`: no such accepted policy).
    pub fn count(&self, policy: &PolicyRef) -> Option<usize> {
        self.by_policy.get(policy).map(BTreeSet::len)
    }

    /// The pods a policy selects, each with its node.
    pub fn pods_of<'a>(&'a self, policy: &PolicyRef) -> impl Iterator<Item = (&'a PodRef, Option<&'a Name>)> + 'a {
        self.by_policy
            .get(policy)
            .into_iter()
            .flatten()
            .filter_map(|n| Some((self.refs[*n as usize].as_ref()?, self.nodes[*n as usize].as_ref())))
    }

    /// The policies selecting pods on `node`, once per pod.
    pub fn policies_on<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a PolicyRef> + 'a {
        self.by_node.get(node).into_iter().flatten().flat_map(|n| self.by_pod.get(n)).flatten()
    }

    /// The policies selecting a pod.
    pub fn policies_of(&self, pod: &PodRef) -> &[PolicyRef] {
        self.numbers.get(pod).and_then(|n| self.by_pod.get(n)).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Bring the selection to `snapshot`, which differs from the last one in
    /// `changed`; the policies whose selection changed (or that changed).
    pub fn update<'a>(
        &mut self,
        snapshot: &Snapshot,
        changed: impl IntoIterator<Item = &'a Changed>,
    ) -> BTreeSet<PolicyRef> {
        let mut affected = BTreeSet::new();
        for change in changed {
            match change {
                Changed::Pod(pod) => affected.extend(self.update_pod(snapshot, pod)),
                Changed::Policy(policy) => {
                    self.update_policy(snapshot, policy);
                    affected.insert(policy.clone());
                }
                Changed::Namespace(name) => {
                    let pods: Vec<PodRef> = self
                        .by_namespace
                        .get(name.as_str())
                        .into_iter()
                        .flatten()
                        .filter_map(|n| self.refs[*n as usize].clone())
                        .collect();
                    for pod in pods {
                        affected.extend(self.update_pod(snapshot, &pod));
                    }
                }
                Changed::NodeAddresses => {}
            }
        }
        affected
    }

    fn number(&mut self, pod: &PodRef) -> u32 {
        if let Some(n) = self.numbers.get(pod) {
            return *n;
        }
        let n = match self.free.pop() {
            Some(n) => {
                self.refs[n as usize] = Some(pod.clone());
                n
            }
            None => {
                self.refs.push(Some(pod.clone()));
                self.nodes.push(None);
                (self.refs.len() - 1) as u32
            }
        };
        self.numbers.insert(pod.clone(), n);
        n
    }

    /// One pod again; the policies that gained or lost it.
    fn update_pod(&mut self, snapshot: &Snapshot, pod_ref: &PodRef) -> Vec<PolicyRef> {
        let wanted: Vec<PolicyRef> = match snapshot.pods.get(pod_ref).filter(|pod| !pod.ips.is_empty()) {
            Some(pod) => {
                let labels = snapshot.namespace_labels(&pod.namespace);
                let candidates =
                    [pod.namespace.as_str(), ""].into_iter().flat_map(|ns| self.subjects.get(ns)).flatten();
                candidates
                    .filter(|r| {
                        snapshot.policies.get(*r).is_some_and(|p| p.selects(&pod.namespace, &labels, &pod.labels))
                    })
                    .cloned()
                    .collect()
            }
            None => Vec::new(),
        };
        let number = self.number(pod_ref);
        let had = self.by_pod.remove(&number).unwrap_or_default();
        let mut affected = Vec::new();
        for policy in had.iter().filter(|p| !wanted.contains(p)) {
            if let Some(pods) = self.by_policy.get_mut(policy) {
                pods.remove(&number);
            }
            affected.push(policy.clone());
        }
        for policy in wanted.iter().filter(|p| !had.contains(p)) {
            self.by_policy.entry(policy.clone()).or_default().insert(number);
            affected.push(policy.clone());
        }
        match snapshot.pods.get(pod_ref).filter(|pod| !pod.ips.is_empty()) {
            Some(pod) => self.keep_counted(number, pod, wanted),
            None => {
                if let Some(pods) = self.by_namespace.get_mut(&pod_ref.namespace) {
                    pods.remove(&number);
                }
                self.numbers.remove(pod_ref);
                self.refs[number as usize] = None;
                self.place(number, None);
                self.free.push(number);
            }
        }
        affected
    }

    /// A pod counted, with the policies selecting it.
    fn keep_counted(&mut self, number: u32, pod: &Pod, policies: Vec<PolicyRef>) {
        self.by_namespace.entry(pod.namespace.clone()).or_default().insert(number);
        self.by_pod.insert(number, policies);
        self.place(number, pod.node_name.clone());
    }

    /// Keep a pod's node, and the pods by node with it.
    fn place(&mut self, number: u32, node: Option<Name>) {
        let slot = &mut self.nodes[number as usize];
        if *slot == node {
            return;
        }
        if let Some(old) = slot.take() {
            if let Some(pods) = self.by_node.get_mut(&old) {
                pods.remove(&number);
                if pods.is_empty() {
                    self.by_node.remove(&old);
                }
            }
        }
        if let Some(new) = &node {
            self.by_node.entry(new.clone()).or_default().insert(number);
        }
        self.nodes[number as usize] = node;
    }

    /// One policy again: the pods it can select, looked at.
    fn update_policy(&mut self, snapshot: &Snapshot, policy_ref: &PolicyRef) {
        for number in self.by_policy.remove(policy_ref).unwrap_or_default() {
            if let Some(policies) = self.by_pod.get_mut(&number) {
                policies.retain(|p| p != policy_ref);
            }
        }
        for policies in self.subjects.values_mut() {
            policies.remove(policy_ref);
        }
        let Some(policy) = snapshot.policies.get(policy_ref) else { return };
        self.subjects.entry(subject_namespace(policy)).or_default().insert(policy_ref.clone());
        let selected = self.scan(snapshot, policy);
        for number in &selected {
            if let Some(policies) = self.by_pod.get_mut(number) {
                policies.push(policy_ref.clone());
            }
        }
        self.by_policy.insert(policy_ref.clone(), selected);
    }

    fn scan(&self, snapshot: &Snapshot, policy: &Policy) -> BTreeSet<u32> {
        let mut selected = BTreeSet::new();
        for (namespace, pods) in &self.by_namespace {
            if !policy.selects_namespace(namespace, &snapshot.namespace_labels(namespace)) {
                continue;
            }
            for number in pods {
                let Some(pod) = self.refs[*number as usize].as_ref().and_then(|r| snapshot.pods.get(r)) else {
                    continue;
                };
                if policy.subject_pods.matches(&pod.labels) {
                    selected.insert(*number);
                }
            }
        }
        selected
    }
}

/// The namespace of a policy's subject; "" for a cluster policy.
fn subject_namespace(policy: &Policy) -> String {
    match &policy.subject_namespaces {
        NamespaceScope::Same(ns) => ns.clone(),
        NamespaceScope::Selected(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;

    fn snapshot(text: &str) -> Snapshot {
        manifest::parse("test", text).unwrap().into_iter().collect()
    }

    const CLUSTER: &str = "kind: Namespace\nmetadata: {name: a, labels: {team: red}}\n---\nkind: Namespace\nmetadata: {name: b, labels: {team: blue}}\n---\nkind: Pod\nmetadata: {name: web, namespace: a, labels: {app: web}}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n---\nkind: Pod\nmetadata: {name: db, namespace: a, labels: {app: db}}\nstatus: {podIPs: [{ip: 10.0.0.2}]}\n---\nkind: Pod\nmetadata: {name: web, namespace: b, labels: {app: web}}\nstatus: {podIPs: [{ip: 10.0.0.3}]}\n---\nkind: Pod\nmetadata: {name: pending, namespace: b, labels: {app: web}}\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: web, namespace: a}\nspec: {podSelector: {matchLabels: {app: web}}}\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ClusterConnectionPolicy\nmetadata: {name: red}\nspec: {priority: 1, subject: {namespaceSelector: {matchLabels: {team: red}}}}\n";

    fn refs(snapshot: &Snapshot) -> (PolicyRef, PolicyRef) {
        let named = |name: &str| snapshot.policies.keys().find(|k| k.name == name).unwrap().clone();
        (named("web"), named("red"))
    }

    /// Every policy's selection against one made from scratch.
    fn assert_fresh(selection: &Selection, snapshot: &Snapshot) {
        let fresh = Selection::new(snapshot);
        for policy in snapshot.policies.keys() {
            let mine: BTreeSet<_> = selection.pods_of(policy).collect();
            let theirs: BTreeSet<_> = fresh.pods_of(policy).collect();
            assert_eq!(mine, theirs, "{policy}");
        }
        let nodes: BTreeSet<&Name> = selection.by_node.keys().chain(fresh.by_node.keys()).collect();
        for node in nodes {
            let mine: Vec<_> = selection.policies_on(node).collect::<BTreeSet<_>>().into_iter().collect();
            let theirs: Vec<_> = fresh.policies_on(node).collect::<BTreeSet<_>>().into_iter().collect();
            assert_eq!(mine, theirs, "{node}");
        }
    }

    #[test]
    fn selections_follow_pods_policies_and_namespaces() {
        let mut snapshot = snapshot(CLUSTER);
        let mut selection = Selection::new(&snapshot);
        let (web, red) = refs(&snapshot);
        assert_eq!(selection.count(&web), Some(1));
        assert_eq!(selection.count(&red), Some(2), "a pod without an address is not counted");

        // b turns red: its addressed pod joins the cluster policy.
        let mut b = snapshot.namespaces["b"].clone();
        b.labels.insert("team".into(), "red".into());
        snapshot.add_namespace(b);
        let affected = selection.update(&snapshot, &[Changed::Namespace("b".into())]);
        assert_eq!(affected, [red.clone()].into());
        assert_eq!(selection.count(&red), Some(3));

        // A pod relabelled leaves the namespaced policy only.
        let pod = PodRef::new("a", "web");
        std::sync::Arc::make_mut(&mut snapshot.pods.get_mut(&pod).unwrap().labels).insert("app".into(), "api".into());
        let affected = selection.update(&snapshot, &[Changed::Pod(pod.clone())]);
        assert_eq!(affected, [web.clone()].into());
        assert_eq!(selection.policies_of(&pod), std::slice::from_ref(&red));

        // A pod's node is known with it.
        let scheduled = PodRef::new("b", "web");
        snapshot.pods.get_mut(&scheduled).unwrap().node_name = Some("n1".into());
        let affected = selection.update(&snapshot, &[Changed::Pod(scheduled.clone())]);
        assert!(affected.is_empty(), "no selection changed: {affected:?}");
        let n1 = Name::from("n1");
        assert!(selection.pods_of(&red).any(|(pod, node)| *pod == scheduled && node == Some(&n1)));

        // A policy widened, and one deleted.
        snapshot.pods.remove(&PodRef::new("a", "db"));
        snapshot.policies.remove(&red);
        let affected =
            selection.update(&snapshot, &[Changed::Pod(PodRef::new("a", "db")), Changed::Policy(red.clone())]);
        assert!(affected.contains(&red));
        assert_eq!(selection.count(&red), None);
        assert_fresh(&selection, &snapshot);
    }
}
