//! Policy coverage: for each pod, which directions some policy governs, and
//! per namespace how many pods are isolated or open. What `bulkhead
//! coverage` prints and the agent's `bulkhead_endpoints` gauge counts.
//!
//! A direction of a pod is *isolated* when an enforced (not Audit-mode)
//! accepted policy selecting the pod has rules for that direction or
//! isolates it; otherwise it is *open*: no policy has a say, and every
//! connection that way is allowed. An Audit-mode policy isolates nothing,
//! since it denies nothing; it is what a rollout runs before it does.

use std::collections::{BTreeMap, BTreeSet};

use datapath_common::{EGRESS, INGRESS};
use serde::Serialize;

use crate::{rules::Policy, selection::Selection, snapshot::Snapshot, PodRef};

/// Whether a policy has a say in a direction: rules for it, or isolation.
pub fn governs(policy: &Policy, direction: u8) -> bool {
    let direction = usize::from(direction);
    policy.isolates[direction] || !policy.rules[direction].is_empty()
}

/// The directions some enforced policy governs for a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Isolation {
    pub ingress: bool,
    pub egress: bool,
}

impl Isolation {
    pub fn of<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut isolation = Isolation::default();
        for policy in policies.into_iter().filter(|p| !p.audit) {
            isolation.ingress |= governs(policy, INGRESS);
            isolation.egress |= governs(policy, EGRESS);
        }
        isolation
    }

    /// The `isolation` label: `none`, `ingress`, `egress` or `both`.
    pub fn label(self) -> &'static str {
        match (self.ingress, self.egress) {
            (false, false) => "none",
            (true, false) => "ingress",
            (false, true) => "egress",
            (true, true) => "both",
        }
    }
}

/// One namespace's pods (those with an address: a pod without one has no
/// connection to police), by direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceCoverage {
    pub pods: usize,
    pub ingress_isolated: usize,
    pub egress_isolated: usize,
    /// Pods no enforced policy governs in either direction.
    pub open_pods: Vec<String>,
    /// Pods an agent reports its programs attached to; known from a
    /// cluster's agent reports only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced: Option<usize>,
    /// Pods no agent reports enforcing: their connections are not policed,
    /// whatever the policies say.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_enforced: Vec<String>,
}

/// Every namespace with pods, by name.
pub fn coverage(snapshot: &Snapshot) -> BTreeMap<String, NamespaceCoverage> {
    let selection = Selection::new(snapshot);
    let mut namespaces: BTreeMap<String, NamespaceCoverage> = BTreeMap::new();
    for (pod_ref, pod) in &snapshot.pods {
        if pod.ips.is_empty() {
            continue;
        }
        let isolation = pod_isolation(snapshot, &selection, pod_ref);
        let namespace = namespaces.entry(pod_ref.namespace.to_string()).or_default();
        namespace.pods += 1;
        namespace.ingress_isolated += usize::from(isolation.ingress);
        namespace.egress_isolated += usize::from(isolation.egress);
        if isolation == Isolation::default() {
            namespace.open_pods.push(pod_ref.name.to_string());
        }
    }
    namespaces
}

/// Add what the agents report enforcing (`namespace/pod`) to a coverage of
/// the same snapshot.
pub fn add_enforcement(
    coverage: &mut BTreeMap<String, NamespaceCoverage>,
    snapshot: &Snapshot,
    enforced: &BTreeSet<String>,
) {
    for (pod_ref, pod) in &snapshot.pods {
        let Some(namespace) = coverage.get_mut(pod_ref.namespace.as_str()).filter(|_| !pod.ips.is_empty()) else {
            continue;
        };
        let count = namespace.enforced.get_or_insert(0);
        if enforced.contains(&pod_ref.to_string()) {
            *count += 1;
        } else {
            namespace.not_enforced.push(pod_ref.name.to_string());
        }
    }
}

fn pod_isolation(snapshot: &Snapshot, selection: &Selection, pod: &PodRef) -> Isolation {
    Isolation::of(selection.policies_of(pod).iter().filter_map(|policy| snapshot.policies.get(policy)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;

    fn snapshot(text: &str) -> Snapshot {
        manifest::parse("test", text).unwrap().into_iter().collect()
    }

    const PODS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: lab}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {app: db}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: shop, labels: {app: db}}\nspec: {containers: [{name: c}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: toy, namespace: lab}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.3}\n";

    #[test]
    fn each_direction_counts_where_an_enforced_policy_governs_it() {
        let policies = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-in, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ClusterConnectionPolicy\nmetadata: {name: egress-everywhere}\nspec:\n  tier: Baseline\n  priority: 10\n  subject: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}}\n  egress: [{action: Deny, to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]\n";
        let coverage = coverage(&snapshot(&format!("{PODS}{policies}")));
        let shop = &coverage["shop"];
        assert_eq!((shop.pods, shop.ingress_isolated, shop.egress_isolated), (2, 1, 2), "{shop:?}");
        assert!(shop.open_pods.is_empty(), "{shop:?}");
        assert_eq!(coverage["lab"].open_pods, ["toy"], "no policy selects toy");
    }

    #[test]
    fn an_audit_policy_isolates_nothing() {
        let audit = "---\napiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: rollout, namespace: lab}\nspec:\n  podSelector: {}\n  mode: Audit\n  policyTypes: [Ingress, Egress]\n";
        let coverage = coverage(&snapshot(&format!("{PODS}{audit}")));
        assert_eq!(coverage["lab"].open_pods, ["toy"]);
        let enforced = coverage_of(&audit.replace("  mode: Audit\n", ""));
        assert_eq!((enforced.ingress_isolated, enforced.egress_isolated), (1, 1));
        assert!(enforced.open_pods.is_empty());
    }

    fn coverage_of(policies: &str) -> NamespaceCoverage {
        coverage(&snapshot(&format!("{PODS}{policies}")))["lab"].clone()
    }

    #[test]
    fn pods_no_agent_enforces_are_named() {
        let snapshot = snapshot(PODS);
        let mut coverage = coverage(&snapshot);
        assert_eq!(coverage["shop"].enforced, None, "unknown offline");
        add_enforcement(&mut coverage, &snapshot, &BTreeSet::from(["shop/web".to_string(), "lab/toy".to_string()]));
        assert_eq!(
            (coverage["shop"].enforced, coverage["shop"].not_enforced.clone()),
            (Some(1), vec!["db".to_string()])
        );
        assert_eq!((coverage["lab"].enforced, coverage["lab"].not_enforced.len()), (Some(1), 0));
    }

    #[test]
    fn labels_name_the_isolated_directions() {
        let labels: Vec<&str> = [(false, false), (true, false), (false, true), (true, true)]
            .into_iter()
            .map(|(ingress, egress)| Isolation { ingress, egress }.label())
            .collect();
        assert_eq!(labels, ["none", "ingress", "egress", "both"]);
    }
}
