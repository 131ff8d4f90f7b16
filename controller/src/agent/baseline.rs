//! Egress baselines: for a while after a workload is first enforced here,
//! every egress destination it reaches (or tries to) is learned; after that,
//! a destination it never used before is an anomaly — counted once, as
//! `bulkhead_egress_anomalies_total`, logged, and learned. Pure: the clock
//! comes in as `now`.
//!
//! A workload is a namespace and the pod's `app.kubernetes.io/name` label,
//! else its `app` label, else the pod's name; a destination is the workload
//! of the pod at the address (so a replaced pod is still known), else the
//! address, with the protocol and port. Baselines live in memory: a
//! restarted agent learns again.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use bulkhead_policy::Pod;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
}

impl Workload {
    pub fn of(pod: &Pod) -> Self {
        Self { namespace: pod.namespace.clone(), name: bulkhead_policy::audit::workload_name(pod) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    /// `namespace/workload` of a pod, or an address.
    pub peer: String,
    pub protocol: u8,
    pub port: u16,
}

struct Learned {
    since: Instant,
    destinations: BTreeSet<Destination>,
}

pub struct EgressBaselines {
    learning: Duration,
    workloads: BTreeMap<Workload, Learned>,
}

impl EgressBaselines {
    pub fn new(learning: Duration) -> Self {
        Self { learning, workloads: BTreeMap::new() }
    }

    /// Start learning a workload's baseline now, unless it already is.
    pub fn start(&mut self, workload: &Workload, now: Instant) {
        self.workloads.entry(workload.clone()).or_insert_with(|| Learned { since: now, destinations: BTreeSet::new() });
    }

    /// Note an egress connection; true when it is an anomaly (a new
    /// destination after the learning period).
    pub fn observe(&mut self, workload: &Workload, destination: Destination, now: Instant) -> bool {
        self.start(workload, now);
        let learned = self.workloads.get_mut(workload).expect("started above");
        let learning = now.duration_since(learned.since) < self.learning;
        learned.destinations.insert(destination) && !learning
    }

    /// Forget workloads no pod of which is enforced here any more.
    pub fn retain(&mut self, present: &BTreeSet<Workload>) {
        self.workloads.retain(|w, _| present.contains(w));
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
        let start = Instant::now();
        let web = Workload { namespace: "shop".into(), name: "web".into() };
        let mut baselines = EgressBaselines::new(Duration::from_secs(60));
        baselines.start(&web, start);
        assert!(!baselines.observe(&web, to("shop/db", 5432), start + Duration::from_secs(10)), "learning");
        let later = start + Duration::from_secs(120);
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
    fn a_workload_is_named_by_its_labels_or_its_pod() {
        let mut pod = Pod {
            namespace: "x".into(),
            name: "web-7d4b9".into(),
            labels: Default::default(),
            ips: vec![],
            ports: vec![],
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
