//! Where objects come from. Every source — the Kubernetes API server or a
//! folder of YAML files — turns what it sees into the same `Change`s, applied
//! to the agent's `Snapshot` by `apply`; everything after the watch is shared.

use std::time::Instant;

use crate::policy::{PodRef, PolicyKind, PolicyRef, Snapshot};

pub mod dir;
pub mod kubernetes;
pub mod manifest;

pub use manifest::Object;

/// Which object a change is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Namespace(String),
    Pod(PodRef),
    Policy(PolicyRef),
}

/// Which kind of object a re-list covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Namespace,
    Pod,
    Policy(PolicyKind),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(ns) => ObjectKey::Namespace(ns.name.clone()),
            Object::Pod(pod, _) => ObjectKey::Pod(pod.pod_ref()),
            Object::Policy(policy) => ObjectKey::Policy(policy.policy_ref()),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Change {
    /// Created or changed.
    Applied(Object),
    Deleted(ObjectKey),
    /// Every object of a kind, listed again (a watch that restarted): those
    /// not in the list are gone.
    Relisted(ObjectKind, Vec<Object>),
    /// The source has delivered its first complete view. Until then the agent
    /// compiles nothing: a partial view would revoke what the pinned maps of
    /// a previous agent still rightly enforce.
    Synced,
}

/// Changes a source saw together.
#[derive(Clone, Debug)]
pub struct Update {
    pub changes: Vec<Change>,
    /// When the source noticed the first of them: the start of the
    /// convergence time.
    pub observed: Instant,
    /// The source's version of the world after these changes (the content
    /// digest of a folder), reported once it is in the datapath.
    pub revision: Option<String>,
}

/// Apply one change to a snapshot.
pub fn apply(snapshot: &mut Snapshot, change: Change) {
    match change {
        Change::Applied(Object::Namespace(ns)) => snapshot.add_namespace(ns),
        Change::Applied(Object::Pod(pod, _)) => snapshot.add_pod(pod),
        Change::Applied(Object::Policy(policy)) => snapshot.add_policy(policy),
        Change::Deleted(key) => remove(snapshot, &key),
        Change::Relisted(kind, objects) => {
            match kind {
                ObjectKind::Namespace => snapshot.namespaces.clear(),
                ObjectKind::Pod => snapshot.pods.clear(),
                ObjectKind::Policy(policy_kind) => snapshot.policies.retain(|key, _| key.kind != policy_kind),
            }
            for object in objects {
                apply(snapshot, Change::Applied(object));
            }
        }
        Change::Synced => {}
    }
}

fn remove(snapshot: &mut Snapshot, key: &ObjectKey) {
    match key {
        ObjectKey::Namespace(name) => {
            snapshot.namespaces.remove(name);
        }
        ObjectKey::Pod(pod) => {
            snapshot.pods.remove(pod);
        }
        ObjectKey::Policy(policy) => {
            snapshot.policies.remove(policy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Namespace, Pod};

    fn pod(ns: &str, name: &str) -> Object {
        Object::Pod(
            Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: Default::default(),
                ips: vec![],
                ports: vec![],
                node_name: None,
                uid: None,
            },
            false,
        )
    }

    #[test]
    fn a_relist_removes_what_it_no_longer_lists() {
        let mut snapshot = Snapshot::default();
        apply(&mut snapshot, Change::Applied(pod("x", "a")));
        apply(&mut snapshot, Change::Applied(pod("x", "b")));
        apply(&mut snapshot, Change::Applied(Object::Namespace(Namespace::new("x", Default::default()))));
        apply(&mut snapshot, Change::Relisted(ObjectKind::Pod, vec![pod("x", "b")]));
        assert_eq!(snapshot.pods.keys().cloned().collect::<Vec<_>>(), vec![PodRef::new("x", "b")]);
        assert!(snapshot.namespaces.contains_key("x"), "a pod re-list leaves namespaces alone");
        apply(&mut snapshot, Change::Deleted(ObjectKey::Pod(PodRef::new("x", "b"))));
        assert!(snapshot.pods.is_empty());
    }
}
