//! The cluster as the compiler sees it, and the watch-shaped changes that
//! bring it up to date. Every source (an API server's watches, a folder of
//! manifests, a scenario's steps) speaks in `Change`s, and `Snapshot::apply`
//! is the one place a policy object is validated: the snapshot holds only
//! accepted policies, so nothing downstream validates again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    model::{ContainerPort, Namespace, Pod, PodRef, PolicyKind, PolicyObject, PolicyRef},
    rules::{normalize, Policy, ValidationError},
    selector::{LabelSets, Labels},
    shared::Shared,
};

/// An object a source delivers.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    /// Boxed: a policy object is several times a pod's size, and re-lists
    /// carry every pod of the cluster as an `Object`.
    Policy(Box<PolicyObject>),
}

/// Which object a change is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Namespace(String),
    Pod(PodRef),
    /// Boxed: a policy's reference is the largest, and a source keys
    /// every pod of the cluster by this type.
    Policy(Box<PolicyRef>),
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
            Object::Pod(pod) => ObjectKey::Pod(pod.pod_ref()),
            Object::Policy(policy) => ObjectKey::Policy(Box::new(policy.policy_ref())),
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
    /// The source has delivered its first complete view. Until then an
    /// agent compiles nothing: a partial view would revoke what the pinned
    /// maps of a previous agent still rightly enforce.
    Synced,
}

/// A policy version that was not accepted, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub error: ValidationError,
    /// `metadata.generation` of the rejected version.
    pub generation: Option<i64>,
}

/// What `Snapshot::apply` made of one policy object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Accepted {
        policy: PolicyRef,
        /// Its previous version had been rejected.
        was_rejected: bool,
    },
    Rejected {
        rejection: Rejection,
        /// An accepted version stays in force.
        kept_last_good: bool,
        /// This same version was rejected before (a re-list, a resync).
        seen_before: bool,
    },
}

/// Everything the compiler needs to know about the cluster.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<PodRef, Pod>,
    /// Accepted policies, validated as they entered.
    pub policies: BTreeMap<PolicyRef, Policy>,
    /// Policies whose present version was rejected. Their last accepted
    /// version, if any, stays in `policies`: bad input never changes what is
    /// enforced.
    pub rejected: BTreeMap<PolicyRef, Rejection>,
    /// Addresses of the node itself: always allowed to and from its pods.
    pub node_addresses: BTreeSet<IpAddr>,
    common: CommonParts,
}

/// What pods have in common, held once: the replicas of a workload carry
/// the same labels and ports, the pods of a namespace or a node its name.
#[derive(Clone, Debug, Default)]
pub struct CommonParts {
    label_sets: LabelSets,
    names: Shared<str>,
    ports: Shared<[ContainerPort]>,
}

impl CommonParts {
    pub fn share(&mut self, pod: &mut Pod) {
        pod.labels = self.label_sets.share(pod.labels.clone());
        pod.ports = self.ports.share(pod.ports.clone());
        pod.namespace = std::mem::take(&mut pod.namespace).shared(&mut self.names);
        pod.node_name = pod.node_name.take().map(|node| node.shared(&mut self.names));
    }
}

/// The snapshot of these objects, as if each had been applied in turn.
impl FromIterator<Object> for Snapshot {
    fn from_iter<I: IntoIterator<Item = Object>>(objects: I) -> Self {
        let mut snapshot = Snapshot::default();
        for object in objects {
            snapshot.apply(Change::Applied(object));
        }
        snapshot
    }
}

impl Snapshot {
    pub fn add_namespace(&mut self, namespace: Namespace) {
        self.namespaces.insert(namespace.name.clone(), namespace);
    }

    pub fn add_pod(&mut self, mut pod: Pod) {
        self.common.share(&mut pod);
        self.pods.insert(pod.pod_ref(), pod);
    }

    /// Labels of a namespace; a namespace known only from its pods has just its name label.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(ns) => ns.labels.clone(),
            None => Namespace::new(name, Labels::new()).labels,
        }
    }

    /// Validate a policy object and take it when it is valid; when it is
    /// not, keep its last accepted version and record why.
    pub fn admit(&mut self, object: &PolicyObject) -> Admission {
        let key = object.policy_ref();
        let generation = object.generation();
        match normalize(object) {
            Ok(policy) => {
                self.policies.insert(key.clone(), policy);
                let was_rejected = self.rejected.remove(&key).is_some();
                Admission::Accepted { policy: key, was_rejected }
            }
            Err(error) => {
                let rejection = Rejection { error, generation };
                let seen_before = self.rejected.get(&key) == Some(&rejection);
                self.rejected.insert(key.clone(), rejection.clone());
                Admission::Rejected { rejection, kept_last_good: self.policies.contains_key(&key), seen_before }
            }
        }
    }

    /// Apply one change; what became of each policy object in it.
    pub fn apply(&mut self, change: Change) -> Vec<Admission> {
        match change {
            Change::Applied(Object::Namespace(ns)) => self.add_namespace(ns),
            Change::Applied(Object::Pod(pod)) => self.add_pod(pod),
            Change::Applied(Object::Policy(policy)) => return vec![self.admit(&policy)],
            Change::Deleted(key) => self.remove(&key),
            Change::Relisted(kind, objects) => {
                let listed: BTreeSet<ObjectKey> = objects.iter().map(Object::key).collect();
                match kind {
                    ObjectKind::Namespace => {
                        self.namespaces.retain(|name, _| listed.contains(&ObjectKey::Namespace(name.clone())))
                    }
                    ObjectKind::Pod => self.pods.retain(|pod, _| listed.contains(&ObjectKey::Pod(pod.clone()))),
                    ObjectKind::Policy(policy_kind) => {
                        let gone = |key: &PolicyRef| {
                            key.kind == policy_kind && !listed.contains(&ObjectKey::Policy(Box::new(key.clone())))
                        };
                        self.policies.retain(|key, _| !gone(key));
                        self.rejected.retain(|key, _| !gone(key));
                    }
                }
                return objects.into_iter().flat_map(|object| self.apply(Change::Applied(object))).collect();
            }
            Change::Synced => {}
        }
        Vec::new()
    }

    fn remove(&mut self, key: &ObjectKey) {
        match key {
            ObjectKey::Namespace(name) => {
                self.namespaces.remove(name);
            }
            ObjectKey::Pod(pod) => {
                self.pods.remove(pod);
            }
            ObjectKey::Policy(policy) => {
                self.policies.remove(policy);
                self.rejected.remove(policy);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Object {
        Object::Pod(Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: Default::default(),
            ips: vec![],
            ports: Vec::new().into(),
            node_name: None,
            uid: None,
        })
    }

    #[test]
    fn a_relist_removes_what_it_no_longer_lists() {
        let mut snapshot = Snapshot::default();
        snapshot.apply(Change::Applied(pod("x", "a")));
        snapshot.apply(Change::Applied(pod("x", "b")));
        snapshot.apply(Change::Applied(Object::Namespace(Namespace::new("x", Default::default()))));
        snapshot.apply(Change::Relisted(ObjectKind::Pod, vec![pod("x", "b")]));
        assert_eq!(snapshot.pods.keys().cloned().collect::<Vec<_>>(), vec![PodRef::new("x", "b")]);
        assert!(snapshot.namespaces.contains_key("x"), "a pod re-list leaves namespaces alone");
        snapshot.apply(Change::Deleted(ObjectKey::Pod(PodRef::new("x", "b"))));
        assert!(snapshot.pods.is_empty());
    }

    #[test]
    fn pods_with_equal_labels_share_one_set_and_more() {
        use std::sync::Arc;
        let mut snapshot = Snapshot::default();
        let labelled = |name: &str, app: &str| match pod("x", name) {
            Object::Pod(pod) => Object::Pod(Pod { labels: Arc::new([("app".into(), app.into())].into()), ..pod }),
            _ => unreachable!(),
        };
        for (name, app) in [("a", "web"), ("b", "web"), ("c", "db")] {
            snapshot.apply(Change::Applied(labelled(name, app)));
        }
        let labels = |name: &str| snapshot.pods[&PodRef::new("x", name)].labels.clone();
        assert!(Arc::ptr_eq(&labels("a"), &labels("b")));
        assert!(!Arc::ptr_eq(&labels("a"), &labels("c")));
        assert_eq!(labels("c")["app"], "db");
        // So are their namespace's name and their (here empty) ports.
        let pod = |name: &str| &snapshot.pods[&PodRef::new("x", name)];
        assert!(std::ptr::eq(pod("a").namespace.as_str(), pod("c").namespace.as_str()));
        assert!(Arc::ptr_eq(&pod("a").ports, &pod("c").ports));
    }
}
