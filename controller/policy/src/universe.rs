//! Every identity the compiler knows, with what selectors look at, and the
//! selector → identities cache that is kept up to date as identities come
//! and go instead of being recomputed.

use std::{collections::BTreeMap, sync::Arc};

use foldhash::{HashMap, HashSet};
use ipnet::IpNet;

use crate::{
    identity::{IdentityKey, NamedPorts},
    rules::{NamespaceScope, Peer},
    selector::Labels,
    shared::Name,
};

/// What a pod identity's selectors match against.
struct PodIdentity {
    namespace: Name,
    /// The namespace's, shared by its identities.
    namespace_labels: Arc<Labels>,
    labels: Arc<Labels>,
}

/// A peer in use, interned: rules hold its number, not the peer.
pub type PeerId = usize;

/// The identities a peer selects, and how many rules use that peer.
struct Selected {
    peer: Peer,
    users: usize,
    ids: HashSet<u32>,
}

#[derive(Default)]
pub struct Universe {
    pods: HashMap<u32, PodIdentity>,
    /// The CIDR of a CIDR identity, or the ipBlock CIDR a pod identity's addresses fall in.
    cidrs: HashMap<u32, IpNet>,
    named_ports: HashMap<u32, NamedPorts>,
    by_namespace: HashMap<Name, HashSet<u32>>,
    peer_ids: HashMap<Peer, PeerId>,
    selected: Vec<Option<Selected>>,
    free: Vec<PeerId>,
}

impl Universe {
    pub fn named_ports(&self, id: u32) -> Option<&NamedPorts> {
        self.named_ports.get(&id)
    }

    pub fn identities_with_named_ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.named_ports.iter().filter(|(_, ports)| !ports.is_empty()).map(|(id, _)| *id)
    }

    /// Whether a peer in use selects an identity.
    pub fn peer_contains(&self, peer: PeerId, id: u32) -> bool {
        self.selected[peer].as_ref().is_some_and(|s| s.ids.contains(&id))
    }

    pub fn peer_ids(&self, peer: PeerId) -> impl Iterator<Item = u32> + '_ {
        self.selected[peer].iter().flat_map(|s| s.ids.iter().copied())
    }

    /// Learn an identity; every selector in use is tested against it.
    pub fn add_identity(&mut self, id: u32, key: &IdentityKey, namespace_labels: &BTreeMap<Name, Arc<Labels>>) {
        match key {
            IdentityKey::Pod { namespace, labels, named_ports, cidr } => {
                let namespace_labels = namespace_labels.get(namespace).cloned().unwrap_or_default();
                self.pods
                    .insert(id, PodIdentity { namespace: namespace.clone(), namespace_labels, labels: labels.clone() });
                self.named_ports.insert(id, named_ports.clone());
                self.by_namespace.entry(namespace.clone()).or_default().insert(id);
                if let Some(cidr) = cidr {
                    self.cidrs.insert(id, *cidr);
                }
            }
            IdentityKey::Cidr(net) => {
                self.cidrs.insert(id, *net);
            }
        }
        let Self { pods, cidrs, selected, .. } = self;
        for selected in selected.iter_mut().flatten() {
            if selects(pods, cidrs, &selected.peer, id) {
                selected.ids.insert(id);
            }
        }
    }

    /// The pod identities of a namespace.
    pub fn identities_in(&self, namespace: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = self.by_namespace.get(namespace).into_iter().flatten().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// A namespace's labels changed: its identities are matched again
    /// against every selector in use. The identities some selector now
    /// matches differently, each with those selectors: only theirs can be
    /// other entries, and only in classes whose policies use those selectors.
    pub fn relabel_namespace(&mut self, namespace: &str, labels: &Arc<Labels>) -> BTreeMap<u32, Vec<PeerId>> {
        let ids = self.identities_in(namespace);
        for id in &ids {
            if let Some(pod) = self.pods.get_mut(id) {
                pod.namespace_labels = labels.clone();
            }
        }
        let Self { pods, cidrs, selected, .. } = self;
        let mut moved: BTreeMap<u32, Vec<PeerId>> = BTreeMap::new();
        // Only a namespace selector that looks at labels can answer differently.
        let relabelled = |(_, selected): &(PeerId, &mut Selected)| matches!(&selected.peer, Peer::Pods { namespaces: NamespaceScope::Selected(s), .. } if !s.is_everything());
        let in_use = selected.iter_mut().enumerate().filter_map(|(peer, s)| Some((peer, s.as_mut()?)));
        for (peer, selected) in in_use.filter(relabelled) {
            for id in &ids {
                let changed = match selects(pods, cidrs, &selected.peer, *id) {
                    true => selected.ids.insert(*id),
                    false => selected.ids.remove(id),
                };
                if changed {
                    moved.entry(*id).or_default().push(peer);
                }
            }
        }
        moved
    }

    pub fn remove_identity(&mut self, id: u32) {
        if let Some(pod) = self.pods.remove(&id) {
            if let Some(ids) = self.by_namespace.get_mut(&pod.namespace) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_namespace.remove(&pod.namespace);
                }
            }
        }
        self.cidrs.remove(&id);
        self.named_ports.remove(&id);
        for selected in self.selected.iter_mut().flatten() {
            selected.ids.remove(&id);
        }
    }

    /// A rule starts using a peer: resolve it the first time.
    pub fn use_peer(&mut self, peer: &Peer) -> PeerId {
        if let Some(id) = self.peer_ids.get(peer) {
            self.selected[*id].as_mut().expect("interned peers are in use").users += 1;
            return *id;
        }
        let selected = Selected { peer: peer.clone(), users: 1, ids: self.resolve(peer) };
        let id = match self.free.pop() {
            Some(id) => {
                self.selected[id] = Some(selected);
                id
            }
            None => {
                self.selected.push(Some(selected));
                self.selected.len() - 1
            }
        };
        self.peer_ids.insert(peer.clone(), id);
        id
    }

    pub fn release_peer(&mut self, id: PeerId) {
        let Some(selected) = self.selected[id].as_mut() else { return };
        selected.users -= 1;
        if selected.users == 0 {
            let selected = self.selected[id].take().expect("checked");
            self.peer_ids.remove(&selected.peer);
            self.free.push(id);
        }
    }

    /// Every known identity a peer selects.
    fn resolve(&self, peer: &Peer) -> HashSet<u32> {
        match peer {
            Peer::Pods { namespaces: NamespaceScope::Same(ns), .. } => self
                .by_namespace
                .get(ns.as_str())
                .into_iter()
                .flatten()
                .copied()
                .filter(|id| selects(&self.pods, &self.cidrs, peer, *id))
                .collect(),
            Peer::Pods { .. } => {
                self.pods.keys().copied().filter(|id| selects(&self.pods, &self.cidrs, peer, *id)).collect()
            }
            Peer::IpBlock { .. } => {
                self.cidrs.keys().copied().filter(|id| selects(&self.pods, &self.cidrs, peer, *id)).collect()
            }
        }
    }
}

/// Whether a peer selects one identity: a pod selector by namespace and pod
/// labels; an ipBlock by the CIDR the identity stands for (a pod identity
/// inside an ipBlock CIDR is matched like that CIDR).
fn selects(pods: &HashMap<u32, PodIdentity>, cidrs: &HashMap<u32, IpNet>, peer: &Peer, id: u32) -> bool {
    match peer {
        Peer::Pods { namespaces, pods: selector } => pods.get(&id).is_some_and(|pod| {
            let namespace_ok = match namespaces {
                NamespaceScope::Same(ns) => *ns == pod.namespace,
                NamespaceScope::Selected(selector) => selector.matches(&pod.namespace_labels),
            };
            namespace_ok && selector.matches(&pod.labels)
        }),
        Peer::IpBlock { cidr, except } => {
            cidrs.get(&id).is_some_and(|prefix| cidr.contains(prefix) && !except.iter().any(|e| e.contains(prefix)))
        }
    }
}
