//! Egress baselines: for a while after a workload is first enforced here,
//! every egress destination it reaches (or tries to) is learned; after that,
//! a destination it never used before is an anomaly — counted once, as
//! `bulkhead_egress_anomalies_total`, logged, and learned. Pure: the clock
//! comes in as `now`.
//!
//! A workload is a namespace and the pod's `app.kubernetes.io/name` label,
//! else its `app` label, else the pod's name; a destination is the workload
//! of the pod at the address (so a replaced pod is still known), else the
//! address, with the protocol and port. The agent keeps them in its state
//! directory (a restart neither learns again nor forgets) and shares them
//! through its report, so a workload on several nodes has one baseline
//! ([`EgressBaselines::merge`]); the operator's [`Edits`] reset or extend them.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use crate::Pod;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
}

impl Workload {
    pub fn of(pod: &Pod) -> Self {
        Self { namespace: pod.namespace.to_string(), name: crate::audit::workload_name(pod) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Destination {
    /// `namespace/workload` of a pod, or an address.
    pub peer: String,
    pub protocol: u8,
    pub port: u16,
}

/// One workload's baseline: since when (Unix seconds) it is learned, and
/// what it reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    pub workload: Workload,
    pub since: u64,
    pub destinations: BTreeSet<Destination>,
}

pub struct EgressBaselines {
    learning: Duration,
    workloads: BTreeMap<Workload, Learned>,
    /// Changed since `take_changed` was last asked.
    changed: bool,
}

impl EgressBaselines {
    pub fn new(learning: Duration) -> Self {
        Self { learning, workloads: BTreeMap::new(), changed: false }
    }

    /// Baselines kept from before (a restart): taken as they are.
    pub fn restore(&mut self, kept: Vec<Learned>) {
        self.workloads.extend(kept.into_iter().map(|learned| (learned.workload.clone(), learned)));
    }

    /// Every baseline, by workload.
    pub fn learned(&self) -> Vec<Learned> {
        self.workloads.values().cloned().collect()
    }

    /// Whether anything changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Start learning a workload's baseline now (Unix seconds), unless it already is.
    pub fn start(&mut self, workload: &Workload, now: u64) {
        if !self.workloads.contains_key(workload) {
            let learned = Learned { workload: workload.clone(), since: now, destinations: BTreeSet::new() };
            self.workloads.insert(workload.clone(), learned);
            self.changed = true;
        }
    }

    /// Note an egress connection; true when it is an anomaly (a new
    /// destination after the learning period).
    pub fn observe(&mut self, workload: &Workload, destination: Destination, now: u64) -> bool {
        self.start(workload, now);
        let learned = self.workloads.get_mut(workload).expect("started above");
        let learning = now.saturating_sub(learned.since) < self.learning.as_secs();
        let new = learned.destinations.insert(destination);
        self.changed |= new;
        new && !learning
    }

    /// Forget workloads no pod of which is enforced here any more.
    pub fn retain(&mut self, present: &BTreeSet<Workload>) {
        let before = self.workloads.len();
        self.workloads.retain(|w, _| present.contains(w));
        self.changed |= self.workloads.len() != before;
    }

    /// What other nodes learned of the workloads enforced here (their
    /// reports): their destinations are known here too, and a workload's
    /// learning started when the first node started it. One baseline per
    /// workload across nodes, converging as reports come. A report from
    /// before an edit's reset of that workload is not taken.
    pub fn merge(&mut self, others: impl IntoIterator<Item = Learned>, edits: &Edits) {
        for other in others {
            let Some(mine) = self.workloads.get_mut(&other.workload) else { continue };
            if other.since < edits.reset_at(&other.workload) {
                continue;
            }
            let before = (mine.since, mine.destinations.len());
            mine.since = mine.since.min(other.since);
            mine.destinations.extend(other.destinations);
            self.changed |= before != (mine.since, mine.destinations.len());
        }
    }

    /// The operator's edits: a reset forgets what a workload learned before
    /// it and learns again from then; an allow adds a destination.
    /// Idempotent: applied again (each report, each restart) they change
    /// nothing more.
    pub fn apply(&mut self, edits: &Edits) {
        for edit in &edits.edits {
            let Some(learned) = self.workloads.get_mut(&edit.workload()) else { continue };
            match &edit.change {
                Change::Reset if learned.since < edit.at => {
                    learned.since = edit.at;
                    learned.destinations.clear();
                    self.changed = true;
                }
                Change::Reset => {}
                Change::Allow(destination) => self.changed |= learned.destinations.insert(destination.clone()),
            }
        }
    }
}

/// The operator's changes to baselines (`bulkhead baseline reset|allow`),
/// oldest first: kept whole, in the ConfigMap `bulkhead-baseline-edits`
/// (Kubernetes mode) or the state directory (dir mode), and applied by
/// every agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edits {
    pub edits: Vec<Edit>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edit {
    /// Unix seconds.
    pub at: u64,
    pub namespace: String,
    pub workload: String,
    pub change: Change,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    Reset,
    Allow(Destination),
}

impl Edit {
    fn workload(&self) -> Workload {
        Workload { namespace: self.namespace.clone(), name: self.workload.clone() }
    }
}

impl Edits {
    /// When the workload was last reset (0: never).
    pub fn reset_at(&self, workload: &Workload) -> u64 {
        self.edits
            .iter()
            .filter(|e| e.change == Change::Reset && e.workload() == *workload)
            .map(|e| e.at)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(peer: &str, port: u16) -> Destination {
        Destination { peer: peer.into(), protocol: 6, port }
    }

    #[test]
    fn new_destinations_after_learning_are_anomalies_once() {
        let start = 1_000_000;
        let web = Workload { namespace: "shop".into(), name: "web".into() };
        let mut baselines = EgressBaselines::new(Duration::from_secs(60));
        baselines.start(&web, start);
        assert!(!baselines.observe(&web, to("shop/db", 5432), start + 10), "learning");
        let later = start + 120;
        assert!(!baselines.observe(&web, to("shop/db", 5432), later), "learned");
        assert!(baselines.observe(&web, to("203.0.113.7", 443), later), "new");
        assert!(!baselines.observe(&web, to("203.0.113.7", 443), later), "counted once");
        assert!(baselines.observe(&web, to("shop/db", 5433), later), "a new port is a new destination");
        let other = Workload { namespace: "shop".into(), name: "worker".into() };
        assert!(!baselines.observe(&other, to("203.0.113.7", 443), later), "another workload learns on its own");
        baselines.retain(&BTreeSet::from([other.clone()]));
        assert!(!baselines.observe(&web, to("198.51.100.1", 80), later), "a forgotten workload learns again");
    }

    #[test]
    fn restored_baselines_go_on_where_they_were() {
        let web = Workload { namespace: "shop".into(), name: "web".into() };
        let mut before = EgressBaselines::new(Duration::from_secs(60));
        before.observe(&web, to("shop/db", 5432), 100);
        assert!(before.take_changed());
        assert!(!before.take_changed(), "asked once");
        let kept = serde_json::to_string(&before.learned()).unwrap();

        let mut after = EgressBaselines::new(Duration::from_secs(60));
        after.restore(serde_json::from_str(&kept).unwrap());
        assert!(!after.observe(&web, to("shop/db", 5432), 500), "still known");
        assert!(after.observe(&web, to("shop/cache", 6379), 500), "learning ended before the restart");
    }

    #[test]
    fn nodes_share_one_baseline_and_edits_win_over_older_reports() {
        let web = Workload { namespace: "shop".into(), name: "web".into() };
        let (mut a, mut b) =
            (EgressBaselines::new(Duration::from_secs(60)), EgressBaselines::new(Duration::from_secs(60)));
        a.observe(&web, to("shop/db", 5432), 100);
        b.observe(&web, to("203.0.113.7", 443), 130);
        let none = Edits::default();
        a.merge(b.learned(), &none);
        assert!(!a.observe(&web, to("203.0.113.7", 443), 500), "learned on b: known on a");
        assert_eq!(a.learned()[0].since, 100, "learning started with the first node");
        let other = Workload { namespace: "lab".into(), name: "x".into() };
        let mut c = EgressBaselines::new(Duration::from_secs(60));
        c.observe(&other, to("10.0.0.1", 80), 100);
        a.merge(c.learned(), &none);
        assert_eq!(a.learned().len(), 1, "a workload not enforced here stays the other node's");

        let edits = Edits {
            edits: vec![
                Edit { at: 1000, namespace: "shop".into(), workload: "web".into(), change: Change::Reset },
                Edit {
                    at: 1001,
                    namespace: "shop".into(),
                    workload: "web".into(),
                    change: Change::Allow(to("198.51.100.4", 25)),
                },
            ],
        };
        a.apply(&edits);
        a.apply(&edits);
        assert_eq!(a.learned()[0].since, 1000);
        assert_eq!(a.learned()[0].destinations, BTreeSet::from([to("198.51.100.4", 25)]), "reset, then allowed");
        a.merge(b.learned(), &edits);
        assert!(!a.learned()[0].destinations.contains(&to("203.0.113.7", 443)), "b's report predates the reset");
        assert!(!a.observe(&web, to("203.0.113.7", 443), 1010), "learning again after the reset");
        assert!(!a.observe(&web, to("198.51.100.4", 25), 2000), "allowed");
        assert!(a.observe(&web, to("198.51.100.5", 25), 2000), "the rest is an anomaly again");
    }

    #[test]
    fn a_workload_is_named_by_its_labels_or_its_pod() {
        let mut pod = Pod {
            namespace: "x".into(),
            name: "web-7d4b9".into(),
            labels: Default::default(),
            ips: vec![],
            ports: Vec::new().into(),
            node_name: None,
            uid: None,
        };
        assert_eq!(Workload::of(&pod).name, "web-7d4b9");
        std::sync::Arc::make_mut(&mut pod.labels).insert("app".into(), "web".into());
        assert_eq!(Workload::of(&pod).name, "web");
        std::sync::Arc::make_mut(&mut pod.labels).insert("app.kubernetes.io/name".into(), "shop-web".into());
        assert_eq!(Workload::of(&pod).name, "shop-web");
    }
}
