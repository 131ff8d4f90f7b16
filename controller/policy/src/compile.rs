//! `compile(snapshot) → DesiredState`: the ipcache, the endpoints and every
//! per-endpoint policy entry, in the datapath's key format; and `Compiler`,
//! which keeps what a compile learned (identities, the selector cache, the
//! entries of each class of pods) so that a change of one pod or one policy
//! costs work in proportion to what it touches, not to the cluster.
//!
//! Pods that share a namespace's policies — the same selected policies and
//! the same named ports — form a class; a class's entries are computed once
//! (`evaluate`) and stamped onto each member's endpoint id.
//!
//! Incremental updates give exactly what a fresh compile of the new snapshot
//! gives (the property tests hold them to it). The few changes that would
//! renumber what other objects hold — a new set of ipBlock CIDRs (pod
//! addresses change identity), changed namespace labels, or a number whose
//! hash slot is taken — are handled by compiling everything again.

use std::{
    collections::{BTreeMap, BTreeSet},
    mem,
    net::IpAddr,
    rc::Rc,
    sync::Arc,
};

use datapath_common::{identity, PolicyKey, PolicyValue, EGRESS, INGRESS};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use ipnet::IpNet;

use crate::{
    diff::{MapOp, OpsPlan},
    evaluate::{Accepted, AnyPeer, Chain, ClassEntry, EntryGroups, Evaluator},
    identity::{identity_hash, longest_prefix, stable_debug_hash, IdentityKey, NamedPorts, Numbering},
    model::{Pod, PodRef, PolicyRef},
    rules::{NamespaceScope, Peer, Policy},
    selector::Labels,
    shared::Name,
    snapshot::Snapshot,
    state::{full_address_key, prefix_key, DesiredState, Endpoint, IpcacheKey, PolicyEntryKey},
    universe::{PeerId, Universe},
};

/// What changed in a snapshot since a `Compiler` last saw it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Changed {
    Namespace(String),
    Pod(PodRef),
    Policy(PolicyRef),
    NodeAddresses,
}

pub fn compile(snapshot: &Snapshot) -> DesiredState {
    Compiler::new(snapshot).into_state()
}

/// Whose allowlists a compiler writes. Every pod gets its identity (what
/// identifies it as a peer) whatever the scope; only the pods in scope get an
/// endpoint and entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every pod: the CLI and the scenario checks.
    Cluster,
    /// The pods of one node (`spec.nodeName`): an agent. A folder describes
    /// one node, so there pods without a node are this node's too.
    Node { name: String, unscheduled_are_local: bool },
}

impl Scope {
    pub fn includes(&self, pod: &Pod) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Node { name, unscheduled_are_local } => match &pod.node_name {
                Some(node) => node == name,
                None => *unscheduled_are_local,
            },
        }
    }
}

/// The policies a class's pods are selected by (sorted) and their named ports.
type ClassKey = (Vec<PolicyRef>, NamedPorts);

struct Class {
    /// Its policies in evaluation order.
    chain: Chain,
    /// Indexed by direction: the "any peer" verdict function.
    any: [AnyPeer; 2],
    groups: EntryGroups,
    members: BTreeMap<PodRef, u32>,
}

/// An identity's key, held once however many pods and addresses carry it
/// (`Compiler::identity_users` is where it is looked up).
type SharedKey = Rc<IdentityKey>;

/// A pod's plain identity, and each of its addresses with the identity it carries.
type PodIdentities = (SharedKey, Vec<(IpAddr, SharedKey)>);

/// What the compiler holds of one pod: a remote pod costs its labels' share,
/// its identities' shares and its addresses. (Its namespace is its key's.)
struct CompiledPod {
    labels: Arc<Labels>,
    plain_identity: SharedKey,
    /// Each address and the identity it carries (it differs from the plain
    /// one when the address falls in an ipBlock CIDR).
    addresses: Box<[(IpAddr, SharedKey)]>,
    /// For a pod in scope: its endpoint and class. Boxed: the pods of other
    /// nodes, nearly all the table, have none.
    placement: Option<Box<Placement>>,
}

struct Placement {
    endpoint: u32,
    class: ClassKey,
}

impl CompiledPod {
    fn identity_keys(&self) -> impl Iterator<Item = &SharedKey> {
        identity_keys(&self.plain_identity, &self.addresses)
    }
}

/// A pod's plain identity, then its addresses' (one use each).
fn identity_keys<'a>(
    plain: &'a SharedKey,
    addresses: &'a [(IpAddr, SharedKey)],
) -> impl Iterator<Item = &'a SharedKey> {
    std::iter::once(plain).chain(addresses.iter().map(|(_, k)| k))
}

/// The pods claiming one address, sorted (almost always one: a pod's
/// address is its own until it is gone).
#[derive(Default)]
struct Owners(Vec<PodRef>);

impl Owners {
    fn insert(&mut self, pod: PodRef) {
        if let Err(at) = self.0.binary_search(&pod) {
            // Room for the one owner, not the four a first push makes: one
            // per address of the cluster, 21 MB at 150k pods.
            self.0.reserve_exact(1);
            self.0.insert(at, pod);
        }
    }

    fn remove(&mut self, pod: &PodRef) {
        if let Ok(at) = self.0.binary_search(pod) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The one the ipcache gives the address to: the last by name, as a fresh compile does.
    fn last(&self) -> Option<&PodRef> {
        self.0.last()
    }
}

/// Map keys written since the last `take_ops`, with the value each had
/// before; kept only when asked for (`Compiler::tracking_changes`).
#[derive(Default)]
struct Touched {
    enabled: bool,
    policy: BTreeMap<PolicyEntryKey, Option<PolicyValue>>,
    ipcache: BTreeMap<IpcacheKey, Option<u32>>,
}

fn ref_hash<R: std::fmt::Debug>(r: &R) -> u64 {
    stable_debug_hash(r)
}

const IDENTITY_SPACE: u32 = (1 << 31) - identity::FIRST_ALLOCATED;

/// Every CIDR a policy's ipBlocks mention (cidr and except), with repeats.
fn ip_block_prefixes(policy: &Policy) -> impl Iterator<Item = IpNet> + '_ {
    policy_peers(policy).flat_map(|peer| match peer {
        Peer::IpBlock { cidr, except } => std::iter::once(*cidr).chain(except.iter().copied()).collect(),
        Peer::Pods { .. } => Vec::new(),
    })
}

fn policy_peers(policy: &Policy) -> impl Iterator<Item = &Peer> {
    policy.rules.iter().flatten().flat_map(|rule| rule.peers.iter().flatten())
}

fn by_length<'a>(prefixes: impl Iterator<Item = &'a IpNet>) -> Vec<HashSet<IpNet>> {
    let mut by_len = vec![HashSet::new(); 129];
    for p in prefixes {
        by_len[p.prefix_len() as usize].insert(*p);
    }
    by_len
}

/// Write one entry of a desired-state map, remembering (when tracking) what
/// the key held before the first write since the last `take_ops`.
fn write_entry<K: Ord + Copy, V: Copy>(
    map: &mut BTreeMap<K, V>,
    touched: Option<&mut BTreeMap<K, Option<V>>>,
    key: K,
    value: Option<V>,
) {
    let before = match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
    if let Some(touched) = touched {
        touched.entry(key).or_insert(before);
    }
}

fn write_policy(state: &mut DesiredState, touched: &mut Touched, key: PolicyEntryKey, value: Option<PolicyValue>) {
    write_entry(&mut state.policy, touched.enabled.then_some(&mut touched.policy), key, value);
}

fn write_ipcache(state: &mut DesiredState, touched: &mut Touched, key: IpcacheKey, value: Option<u32>) {
    write_entry(&mut state.ipcache, touched.enabled.then_some(&mut touched.ipcache), key, value);
}

/// A map as it was before the writes recorded in `touched`.
fn revert<K: Ord, V>(mut map: BTreeMap<K, V>, touched: BTreeMap<K, Option<V>>) -> BTreeMap<K, V> {
    for (key, before) in touched {
        match before {
            Some(value) => map.insert(key, value),
            None => map.remove(&key),
        };
    }
    map
}

/// Every key whose value differs between two maps, with its value in `before`.
fn changes_between<K: Ord + Copy, V: PartialEq + Copy>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) -> BTreeMap<K, Option<V>> {
    let changed = after
        .iter()
        .filter(|(key, value)| before.get(*key) != Some(*value))
        .map(|(key, _)| (*key, before.get(key).copied()));
    let removed = before.iter().filter(|(key, _)| !after.contains_key(*key)).map(|(key, value)| (*key, Some(*value)));
    changed.chain(removed).collect()
}

/// Write (or, with `present` false, remove) a class's entries for one endpoint.
fn stamp(state: &mut DesiredState, touched: &mut Touched, endpoint: u32, groups: &EntryGroups, present: bool) {
    for ((_, peer), entries) in groups {
        stamp_group(state, touched, endpoint, *peer, entries, present);
    }
}

fn stamp_group(
    state: &mut DesiredState,
    touched: &mut Touched,
    endpoint: u32,
    peer: u32,
    entries: &[ClassEntry],
    present: bool,
) {
    for (prefix_len, direction, protocol, port, value) in entries {
        let key = (*prefix_len, PolicyKey::new(endpoint, *direction, peer, *protocol, *port));
        write_policy(state, touched, key, present.then_some(*value));
    }
}

/// Change one endpoint's entries from one class's to another's, writing
/// only what differs.
fn restamp(state: &mut DesiredState, touched: &mut Touched, endpoint: u32, old: &EntryGroups, new: &EntryGroups) {
    for (group @ (_, peer), entries) in old {
        GroupChange::between(entries, new.get(group).map_or(&[], |e| e)).write(state, touched, endpoint, *peer);
    }
    for (group @ (_, peer), entries) in new {
        if !old.contains_key(group) {
            stamp_group(state, touched, endpoint, *peer, entries, true);
        }
    }
}

/// How one peer's entries differ between two versions of a group: worked
/// out once, written for each endpoint of a class.
#[derive(Default)]
struct GroupChange {
    removed: Vec<(u32, u8, u8, u16)>,
    written: Vec<ClassEntry>,
}

impl GroupChange {
    fn between(old: &[ClassEntry], new: &[ClassEntry]) -> Self {
        if std::ptr::eq(old, new) || old == new {
            return Self::default();
        }
        let place =
            |(prefix_len, direction, protocol, port, _): &ClassEntry| (*prefix_len, *direction, *protocol, *port);
        let kept: HashSet<(u32, u8, u8, u16)> = new.iter().map(place).collect();
        let before: HashSet<&ClassEntry> = old.iter().collect();
        GroupChange {
            removed: old.iter().map(place).filter(|p| !kept.contains(p)).collect(),
            written: new.iter().filter(|e| !before.contains(e)).copied().collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.written.is_empty()
    }

    fn write(&self, state: &mut DesiredState, touched: &mut Touched, endpoint: u32, peer: u32) {
        for (prefix_len, direction, protocol, port) in &self.removed {
            let key = (*prefix_len, PolicyKey::new(endpoint, *direction, peer, *protocol, *port));
            write_policy(state, touched, key, None);
        }
        for (prefix_len, direction, protocol, port, value) in &self.written {
            let key = (*prefix_len, PolicyKey::new(endpoint, *direction, peer, *protocol, *port));
            write_policy(state, touched, key, Some(*value));
        }
    }
}

/// A compiled state and what it was made of, updatable in place.
pub struct Compiler {
    scope: Scope,
    state: DesiredState,
    policies: BTreeMap<PolicyRef, Rc<Accepted>>,
    policy_numbers: Numbering<PolicyRef>,
    /// Namespaced policies by their namespace; cluster policies under "".
    subjects: HashMap<String, BTreeMap<PolicyRef, Rc<Accepted>>>,
    /// ipBlock CIDRs, with how many mentions each has.
    prefixes: BTreeMap<IpNet, usize>,
    by_len: Vec<HashSet<IpNet>>,
    identities: Numbering<IdentityKey>,
    /// How many pod addresses (and plain pod identities) use each identity.
    identity_users: HashMap<SharedKey, usize>,
    universe: Universe,
    /// Each namespace's labels, shared by its identities in the universe.
    namespace_labels: BTreeMap<Name, Arc<Labels>>,
    node_addresses: BTreeSet<IpAddr>,
    endpoint_numbers: Numbering<PodRef>,
    pods: HashMap<PodRef, CompiledPod>,
    /// The pods in scope, by namespace: what a policy or namespace change
    /// looks through.
    local: HashMap<Name, BTreeSet<PodRef>>,
    address_owners: HashMap<IpAddr, Owners>,
    classes: HashMap<ClassKey, Class>,
    touched: Touched,
    full_compiles: u64,
}

impl Compiler {
    /// Compile a whole snapshot, every pod's allowlist.
    pub fn new(snapshot: &Snapshot) -> Self {
        Self::scoped(snapshot, Scope::Cluster)
    }

    /// Compile a whole snapshot, the allowlists of the pods in `scope`.
    pub fn scoped(snapshot: &Snapshot, scope: Scope) -> Self {
        // Policies were validated as they entered the snapshot; the rejected
        // ones are reported, and their last accepted versions compiled.
        let rejected = snapshot.rejected.values().map(|r| r.error.clone()).collect();
        let mut state = DesiredState { rejected, ..Default::default() };
        let normalized = snapshot.policies.clone();
        let policy_numbers = Numbering::new(normalized.keys(), 1, 1 << 30, ref_hash);
        for (r, id) in policy_numbers.numbers() {
            state.policy_names.insert(*id, r.clone());
            state.selected_pods.insert(r.clone(), 0);
        }
        let mut prefixes = BTreeMap::new();
        for policy in normalized.values() {
            for net in ip_block_prefixes(policy) {
                *prefixes.entry(net).or_insert(0) += 1;
            }
        }
        let by_len = by_length(prefixes.keys());
        let mut namespace_labels = BTreeMap::new();
        for pod in snapshot.pods.values() {
            if !namespace_labels.contains_key(&pod.namespace) {
                namespace_labels.insert(pod.namespace.clone(), Arc::new(snapshot.namespace_labels(&pod.namespace)));
            }
        }
        let in_scope = snapshot.pods.iter().filter(|(_, pod)| scope.includes(pod)).map(|(r, _)| r);
        let endpoint_numbers = Numbering::new(in_scope, 1, 1 << 30, ref_hash);
        let mut compiler = Compiler {
            scope,
            state,
            policies: BTreeMap::new(),
            policy_numbers,
            subjects: HashMap::new(),
            prefixes,
            by_len,
            identities: Numbering::new([].iter(), identity::FIRST_ALLOCATED, IDENTITY_SPACE, identity_hash),
            identity_users: HashMap::new(),
            universe: Universe::default(),
            namespace_labels,
            node_addresses: snapshot.node_addresses.clone(),
            endpoint_numbers,
            pods: HashMap::new(),
            local: HashMap::new(),
            address_owners: HashMap::new(),
            classes: HashMap::new(),
            touched: Touched::default(),
            full_compiles: 1,
        };

        // Identities of pod addresses and prefixes, then the selectors over them.
        let mut planned = Vec::with_capacity(snapshot.pods.len());
        for (pod_ref, pod) in &snapshot.pods {
            let (plain, addresses) = compiler.identity_keys_of(pod);
            for key in identity_keys(&plain, &addresses) {
                *compiler.identity_users.entry(key.clone()).or_insert(0) += 1;
            }
            planned.push((pod_ref, pod, plain, addresses));
        }
        let mut keys: BTreeSet<&IdentityKey> = compiler.identity_users.keys().map(|k| &**k).collect();
        let cidr_keys: Vec<IdentityKey> = compiler.prefixes.keys().map(|p| IdentityKey::Cidr(*p)).collect();
        keys.extend(&cidr_keys);
        compiler.identities = Numbering::new(keys, identity::FIRST_ALLOCATED, IDENTITY_SPACE, identity_hash);
        for (key, id) in compiler.identities.numbers() {
            compiler.state.identities.insert(*id, key.clone());
            compiler.universe.add_identity(*id, key, &compiler.namespace_labels);
        }
        for (policy_ref, policy) in normalized {
            let number = compiler.policy_numbers.get(&policy_ref).expect("numbered");
            let accepted = Rc::new(Accepted::new(policy, number, &mut compiler.universe));
            compiler
                .subjects
                .entry(subject_namespace(&accepted))
                .or_default()
                .insert(policy_ref.clone(), accepted.clone());
            compiler.policies.insert(policy_ref, accepted);
        }

        // The ipcache: prefixes, pod addresses (a later pod wins an address
        // two claim), then the node's own addresses.
        for net in compiler.prefixes.keys() {
            compiler
                .state
                .ipcache
                .insert(prefix_key(net), compiler.identities.get(&IdentityKey::Cidr(*net)).expect("numbered"));
        }
        for (pod_ref, _, _, addresses) in &planned {
            for (address, key) in addresses {
                compiler
                    .state
                    .ipcache
                    .insert(full_address_key(*address), compiler.identities.get(key).expect("numbered"));
                compiler.address_owners.entry(*address).or_default().insert((*pod_ref).clone());
            }
        }
        for address in &snapshot.node_addresses {
            compiler.state.ipcache.insert(full_address_key(*address), identity::HOST);
        }

        // Endpoints and their entries, class by class. Cluster policies'
        // namespace selectors are matched once per namespace.
        let mut cluster_by_namespace: HashMap<&str, Vec<(&PolicyRef, &Rc<Accepted>)>> = HashMap::new();
        let cluster_policies = compiler.subjects.get("").cloned().unwrap_or_default();
        for (pod_ref, pod, plain, addresses) in planned {
            let Some(endpoint) = compiler.endpoint_numbers.get(pod_ref) else {
                compiler.place_pod(pod_ref, pod, (plain, addresses), None);
                continue;
            };
            let namespace_cluster = cluster_by_namespace.entry(pod.namespace.as_str()).or_insert_with(|| {
                let labels = &compiler.namespace_labels[&pod.namespace];
                cluster_policies
                    .iter()
                    .filter(|(_, p)| matches!(&p.subject_namespaces, NamespaceScope::Selected(s) if s.matches(labels)))
                    .collect()
            });
            let selected = compiler.selected_in(
                namespace_cluster.iter().copied().filter(|(_, p)| p.subject_pods.matches(&pod.labels)),
                &pod.namespace,
                &pod.labels,
            );
            let class = (selected, named_ports_of(pod));
            compiler.place_pod(pod_ref, pod, (plain, addresses), Some(Placement { endpoint, class }));
        }
        compiler
    }

    /// A pod takes its place: when in scope, its endpoint and its class's
    /// entries stamped on it; and what the compiler keeps of it.
    fn place_pod(&mut self, pod_ref: &PodRef, pod: &Pod, identities: PodIdentities, placement: Option<Placement>) {
        if let Some(Placement { endpoint, class }) = &placement {
            let endpoint_entry =
                Endpoint { id: *endpoint, addresses: pod.ips.clone(), node_name: pod.node_name.clone() };
            self.state.endpoints.insert(pod_ref.clone(), endpoint_entry);
            self.join_class(pod_ref, *endpoint, class);
            self.local.entry(pod.namespace.clone()).or_default().insert(pod_ref.clone());
        }
        let (plain_identity, addresses) = identities;
        let (addresses, placement) = (addresses.into_boxed_slice(), placement.map(Box::new));
        let compiled = CompiledPod { labels: pod.labels.clone(), plain_identity, addresses, placement };
        self.pods.insert(pod_ref.clone(), compiled);
    }

    /// The pods in scope of one namespace.
    fn local_in(&self, namespace: &str) -> Vec<PodRef> {
        self.local.get(namespace).into_iter().flatten().cloned().collect()
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn into_state(self) -> DesiredState {
        self.state
    }

    /// Keep, from now on, what each update changes in the maps, for
    /// `take_ops`. A user that diffs states itself (the agent) need not.
    pub fn tracking_changes(mut self) -> Self {
        self.touched.enabled = true;
        self
    }

    /// How many times this compiler compiled everything (its first compile included).
    pub fn full_compiles(&self) -> u64 {
        self.full_compiles
    }

    /// Bring the compiled state to `snapshot`, which differs from the one
    /// compiled last only in the objects named in `changed`.
    pub fn update<'a>(&mut self, snapshot: &Snapshot, changed: impl IntoIterator<Item = &'a Changed>) {
        for change in changed {
            let done = match change {
                Changed::Pod(pod) => self.update_pod(snapshot, pod),
                Changed::Policy(policy) => self.update_policy(snapshot, policy),
                Changed::Namespace(name) => {
                    self.update_namespace(snapshot, name);
                    true
                }
                Changed::NodeAddresses => {
                    self.update_node_addresses(&snapshot.node_addresses);
                    true
                }
            };
            if !done {
                self.rebuild(snapshot);
                return;
            }
        }
    }

    /// Compile everything again (a re-listed kind may have changed
    /// anything), keeping what the maps held so `take_ops` hands out only
    /// the difference.
    pub fn recompile(&mut self, snapshot: &Snapshot) {
        self.rebuild(snapshot);
    }

    /// The pod an address belongs to, any node's (a later pod wins an
    /// address two claim, as in the ipcache).
    pub fn pod_at(&self, address: IpAddr) -> Option<&PodRef> {
        self.address_owners.get(&address).and_then(|owners| owners.last())
    }

    /// The policies selecting a pod in scope (sorted); empty for one out of
    /// scope or selected by none.
    pub fn policies_selecting(&self, pod: &PodRef) -> &[PolicyRef] {
        self.pods.get(pod).and_then(|p| p.placement.as_deref()).map_or(&[], |placement| &placement.class.0)
    }

    /// An accepted policy, as compiled.
    pub fn policy(&self, policy: &PolicyRef) -> Option<&Policy> {
        self.policies.get(policy).map(|accepted| &***accepted)
    }

    /// The map operations, in `diff`'s safe order, that turn the state as it
    /// was at the last call (or at `tracking_changes`) into the state now.
    pub fn take_ops(&mut self) -> Vec<MapOp> {
        let enabled = self.touched.enabled;
        let touched = mem::replace(&mut self.touched, Touched { enabled, ..Default::default() });
        let mut plan = OpsPlan::default();
        for (key, before) in &touched.policy {
            plan.policy(*key, before.as_ref(), self.state.policy.get(key));
        }
        for (key, before) in &touched.ipcache {
            plan.ipcache(*key, *before, self.state.ipcache.get(key).copied());
        }
        plan.into_ops()
    }

    /// Compile everything again, remembering what the maps held before so
    /// `take_ops` still gives the difference.
    fn rebuild(&mut self, snapshot: &Snapshot) {
        let touched = mem::take(&mut self.touched);
        let before_policy = revert(mem::take(&mut self.state.policy), touched.policy);
        let before_ipcache = revert(mem::take(&mut self.state.ipcache), touched.ipcache);
        let full_compiles = self.full_compiles + 1;
        *self = Compiler::scoped(snapshot, self.scope.clone());
        self.full_compiles = full_compiles;
        if touched.enabled {
            self.touched = Touched {
                enabled: true,
                policy: changes_between(&before_policy, &self.state.policy),
                ipcache: changes_between(&before_ipcache, &self.state.ipcache),
            };
        }
    }

    /// A pod's plain identity and the identity of each of its addresses.
    fn identity_keys_of(&self, pod: &Pod) -> PodIdentities {
        let named_ports = named_ports_of(pod);
        let key = |cidr| {
            let key = IdentityKey::Pod {
                namespace: pod.namespace.clone(),
                labels: pod.labels.clone(),
                named_ports: named_ports.clone(),
                cidr,
            };
            match self.identity_users.get_key_value(&key) {
                Some((known, _)) => known.clone(),
                None => Rc::new(key),
            }
        };
        let addresses = pod.ips.iter().map(|address| (*address, key(longest_prefix(&self.by_len, *address)))).collect();
        (key(None), addresses)
    }

    fn class_key_of(&self, pod: &Pod) -> ClassKey {
        (self.selected_policies(&pod.namespace, &pod.labels), named_ports_of(pod))
    }

    /// The policies whose subject selects a pod, sorted.
    fn selected_policies(&self, namespace: &str, labels: &Labels) -> Vec<PolicyRef> {
        let namespace_labels = &self.namespace_labels[namespace];
        let cluster =
            self.subjects.get("").into_iter().flatten().filter(|(_, p)| p.selects(namespace, namespace_labels, labels));
        self.selected_in(cluster, namespace, labels)
    }

    /// `selected_policies` given the cluster policies that select the pod.
    fn selected_in<'a>(
        &'a self,
        cluster: impl Iterator<Item = (&'a PolicyRef, &'a Rc<Accepted>)>,
        namespace: &str,
        labels: &Labels,
    ) -> Vec<PolicyRef> {
        let namespaced =
            self.subjects.get(namespace).into_iter().flatten().filter(|(_, p)| p.subject_pods.matches(labels));
        let mut selected: Vec<PolicyRef> = cluster.chain(namespaced).map(|(r, _)| r.clone()).collect();
        selected.sort_unstable();
        selected
    }

    fn compute_class(&self, key: &ClassKey) -> Class {
        let chain = Chain::of(&key.0, &self.policies);
        let mut groups = EntryGroups::new();
        let any = [INGRESS, EGRESS].map(|direction| {
            let evaluator = Evaluator { universe: &self.universe, chain: &chain, direction, own_named_ports: &key.1 };
            let any = evaluator.any_peer();
            evaluator.entries(&any, &mut groups);
            any
        });
        // Inserted in key order, the map's nodes are left about half full;
        // built again from its sorted entries they are packed.
        let groups = groups.into_iter().collect();
        Class { chain, any, groups, members: BTreeMap::new() }
    }

    fn join_class(&mut self, pod_ref: &PodRef, endpoint: u32, key: &ClassKey) {
        if !self.classes.contains_key(key) {
            let class = self.compute_class(key);
            self.classes.insert(key.clone(), class);
        }
        let Self { classes, state, touched, .. } = self;
        let class = classes.get_mut(key).expect("inserted above");
        class.members.insert(pod_ref.clone(), endpoint);
        stamp(state, touched, endpoint, &class.groups, true);
        for policy in &key.0 {
            *state.selected_pods.get_mut(policy).expect("accepted policy") += 1;
        }
    }

    /// Remove a pod's entries and its membership of its class.
    fn leave_class(&mut self, pod_ref: &PodRef, endpoint: u32, key: &ClassKey) {
        let Self { classes, state, touched, .. } = self;
        let class = classes.get_mut(key).expect("a pod's class is cached");
        class.members.remove(pod_ref);
        stamp(state, touched, endpoint, &class.groups, false);
        if class.members.is_empty() {
            classes.remove(key);
        }
        for policy in &key.0 {
            if let Some(count) = state.selected_pods.get_mut(policy) {
                *count -= 1;
            }
        }
    }

    /// The ipcache entry of one pod address, as a fresh compile writes it.
    fn refresh_address(&mut self, address: IpAddr) {
        let key = full_address_key(address);
        let value = if self.node_addresses.contains(&address) {
            Some(identity::HOST)
        } else if let Some(owner) = self.address_owners.get(&address).and_then(|owners| owners.last()) {
            let pod = &self.pods[owner];
            pod.addresses.iter().find(|(a, _)| *a == address).and_then(|(_, k)| self.identities.get(k))
        } else {
            let exact = IpNet::new(address, if address.is_ipv4() { 32 } else { 128 }).expect("full length");
            self.prefixes.contains_key(&exact).then(|| self.identities.get(&IdentityKey::Cidr(exact))).flatten()
        };
        write_ipcache(&mut self.state, &mut self.touched, key, value);
    }

    fn update_node_addresses(&mut self, addresses: &BTreeSet<IpAddr>) {
        let changed: Vec<IpAddr> = self.node_addresses.symmetric_difference(addresses).copied().collect();
        self.node_addresses = addresses.clone();
        for address in changed {
            self.refresh_address(address);
        }
    }

    /// One pod created, changed or deleted. False: it needs a full compile.
    fn update_pod(&mut self, snapshot: &Snapshot, pod_ref: &PodRef) -> bool {
        let new = snapshot.pods.get(pod_ref);
        if let Some(pod) = new {
            if !self.namespace_labels.contains_key(&pod.namespace) {
                self.namespace_labels
                    .insert(pod.namespace.clone(), Arc::new(snapshot.namespace_labels(&pod.namespace)));
            }
        }
        let planned = new.map(|pod| self.identity_keys_of(pod));
        let old = self.pods.get(pod_ref);

        // Identities that lose their last user, and new ones.
        let mut delta: BTreeMap<&SharedKey, i64> = BTreeMap::new();
        for key in old.into_iter().flat_map(|p| p.identity_keys()) {
            *delta.entry(key).or_default() -= 1;
        }
        if let Some((plain, addresses)) = &planned {
            for key in identity_keys(plain, addresses) {
                *delta.entry(key).or_default() += 1;
            }
        }
        let mut gone = Vec::new();
        let mut born = Vec::new();
        for (key, change) in &delta {
            let users = self.identity_users.get(*key).copied().unwrap_or(0) as i64;
            if users > 0 && users + change == 0 {
                gone.push((*key).clone());
            } else if users == 0 && *change > 0 {
                born.push((*key).clone());
            }
        }
        if (!gone.is_empty() && !self.identities.can_remove())
            || !self.identities.can_add_all(born.iter().map(|k| &**k), identity_hash)
        {
            return false;
        }
        let was_local = old.is_some_and(|p| p.placement.is_some());
        let is_local = new.is_some_and(|pod| self.scope.includes(pod));
        let endpoint_born = !was_local && is_local;
        let endpoint_gone = was_local && !is_local;
        if (endpoint_born && !self.endpoint_numbers.can_add_all([pod_ref], ref_hash))
            || (endpoint_gone && !self.endpoint_numbers.can_remove())
        {
            return false;
        }
        let delta: Vec<(SharedKey, i64)> = delta.into_iter().map(|(k, d)| (k.clone(), d)).collect();

        // The pod leaves its class; identities change; it joins its new class.
        let old = self.pods.remove(pod_ref);
        if let Some(Placement { endpoint, class }) = old.as_ref().and_then(|o| o.placement.as_deref()) {
            self.leave_class(pod_ref, *endpoint, class);
            if let Some(local) = self.local.get_mut(&pod_ref.namespace) {
                local.remove(pod_ref);
            }
        }
        for (key, change) in delta {
            let users = self.identity_users.entry(key.clone()).or_insert(0);
            *users = (*users as i64 + change) as usize;
            if *users == 0 {
                self.identity_users.remove(&key);
            }
        }
        for key in gone {
            let id = self.identities.get(&key).expect("numbered");
            self.identities.remove(&key);
            self.state.identities.remove(&id);
            self.universe.remove_identity(id);
            self.drop_identity_entries(id);
        }
        for key in born {
            let id = self.identities.add(&key, identity_hash);
            self.universe.add_identity(id, &key, &self.namespace_labels);
            self.state.identities.insert(id, (*key).clone());
            self.add_identity_entries(id);
        }
        let mut addresses: BTreeSet<IpAddr> = BTreeSet::new();
        if let Some(old) = &old {
            for (address, _) in &old.addresses {
                addresses.insert(*address);
                if let Some(owners) = self.address_owners.get_mut(address) {
                    owners.remove(pod_ref);
                    if owners.is_empty() {
                        self.address_owners.remove(address);
                    }
                }
            }
        }
        if endpoint_gone {
            self.endpoint_numbers.remove(pod_ref);
            self.state.endpoints.remove(pod_ref);
        }
        if let (Some(pod), Some((plain, pod_addresses))) = (new, planned) {
            for (address, _) in &pod_addresses {
                addresses.insert(*address);
                self.address_owners.entry(*address).or_default().insert(pod_ref.clone());
            }
            let placement = is_local.then(|| {
                let endpoint = match old.as_ref().and_then(|o| o.placement.as_deref()) {
                    Some(placed) => placed.endpoint,
                    None => self.endpoint_numbers.add(pod_ref, ref_hash),
                };
                Placement { endpoint, class: self.class_key_of(pod) }
            });
            self.place_pod(pod_ref, pod, (plain, pod_addresses), placement);
        }
        for address in addresses {
            self.refresh_address(address);
        }
        true
    }

    /// A new identity: every cached class with a rule naming it gets its entries.
    fn add_identity_entries(&mut self, id: u32) {
        self.redo_identity_entries(id, None);
    }

    /// Compute an identity's entries again in the classes whose policies
    /// use one of the `changed` peers (every class for a new identity,
    /// `None`) and write what differs: a namespace relabel redoes its
    /// identities, and most classes' entries for them stay as they were.
    fn redo_identity_entries(&mut self, id: u32, changed: Option<&[PeerId]>) {
        let Self { classes, universe, state, touched, .. } = self;
        // Only the policies of the classes (those selecting pods in scope)
        // are asked, each once (by number): an agent's classes hold a few
        // dozen of the cluster's thousands of policies.
        let mut names: HashMap<u32, bool> = HashMap::new();
        let mut uses: HashMap<u32, bool> = HashMap::new();
        for (key, class) in classes.iter_mut() {
            if let Some(changed) = changed {
                let affected =
                    class.chain.all().any(|p| *uses.entry(p.number).or_insert_with(|| p.uses_any_peer(changed)));
                if !affected {
                    continue;
                }
            }
            let named =
                class.chain.all().any(|p| *names.entry(p.number).or_insert_with(|| p.names_identity(universe, id)));
            for direction in [INGRESS, EGRESS] {
                let entries = match named {
                    true => {
                        let evaluator = Evaluator { universe, chain: &class.chain, direction, own_named_ports: &key.1 };
                        match evaluator.signature(id).is_empty() {
                            true => Vec::new(),
                            false => evaluator.identity_entries(id, &class.any[direction as usize]),
                        }
                    }
                    false => Vec::new(),
                };
                let old = match changed {
                    Some(_) => class.groups.remove(&(direction, id)),
                    None => None,
                };
                let change = GroupChange::between(old.as_deref().unwrap_or(&[]), &entries);
                if !change.is_empty() {
                    for endpoint in class.members.values() {
                        change.write(state, touched, *endpoint, id);
                    }
                }
                if !entries.is_empty() {
                    class.groups.insert((direction, id), entries.into());
                }
            }
        }
    }

    /// An identity gone: its entries leave every class.
    fn drop_identity_entries(&mut self, id: u32) {
        let Self { classes, state, touched, .. } = self;
        for class in classes.values_mut() {
            for direction in [INGRESS, EGRESS] {
                if let Some(entries) = class.groups.remove(&(direction, id)) {
                    for endpoint in class.members.values() {
                        stamp_group(state, touched, *endpoint, id, &entries, false);
                    }
                }
            }
        }
    }

    /// One policy created, changed or deleted (or now invalid). False: it
    /// needs a full compile.
    fn update_policy(&mut self, snapshot: &Snapshot, policy_ref: &PolicyRef) -> bool {
        let new = snapshot.policies.get(policy_ref).cloned();
        let error = snapshot.rejected.get(policy_ref).map(|r| r.error.clone());
        let old = self.policies.get(policy_ref).cloned();
        if let (Some(old), Some(new)) = (&old, &new) {
            if old.policy == *new {
                return true; // metadata only: nothing to compile
            }
        }
        // A different set of ipBlock CIDRs gives pod addresses other identities.
        let mut mentions: BTreeMap<IpNet, i64> = BTreeMap::new();
        for net in old.iter().flat_map(|p| ip_block_prefixes(&p.policy)) {
            *mentions.entry(net).or_default() -= 1;
        }
        for net in new.iter().flat_map(ip_block_prefixes) {
            *mentions.entry(net).or_default() += 1;
        }
        for (net, change) in &mentions {
            let count = self.prefixes.get(net).copied().unwrap_or(0) as i64;
            if (count == 0) != (count + change == 0) {
                return false;
            }
        }
        if (old.is_none() && new.is_some() && !self.policy_numbers.can_add_all([policy_ref], ref_hash))
            || (old.is_some() && new.is_none() && !self.policy_numbers.can_remove())
        {
            return false;
        }

        self.state.rejected.retain(|e| &e.policy != policy_ref);
        if let Some(error) = error {
            self.state.rejected.push(error);
            self.state.rejected.sort_by(|a, b| a.policy.cmp(&b.policy));
        }
        for (net, change) in mentions {
            let count = self.prefixes.entry(net).or_insert(0);
            *count = (*count as i64 + change) as usize;
        }
        if let Some(old) = &old {
            if let Some(subjects) = self.subjects.get_mut(&subject_namespace(old)) {
                subjects.remove(policy_ref);
            }
        }
        match new {
            Some(policy) => {
                let number = self.policy_numbers.add(policy_ref, ref_hash);
                self.state.policy_names.insert(number, policy_ref.clone());
                let accepted = Rc::new(Accepted::new(policy, number, &mut self.universe));
                self.subjects
                    .entry(subject_namespace(&accepted))
                    .or_default()
                    .insert(policy_ref.clone(), accepted.clone());
                self.policies.insert(policy_ref.clone(), accepted);
            }
            None => {
                if let Some(number) = self.policy_numbers.get(policy_ref) {
                    self.policy_numbers.remove(policy_ref);
                    self.state.policy_names.remove(&number);
                }
                self.policies.remove(policy_ref);
            }
        }

        // Classes holding the policy are stale; their pods, and the pods the
        // new version selects, move to the classes they belong to now.
        let stale_keys: Vec<ClassKey> = self.classes.keys().filter(|k| k.0.contains(policy_ref)).cloned().collect();
        let stale: HashMap<ClassKey, Class> = stale_keys
            .into_iter()
            .map(|k| {
                let class = self.classes.remove(&k).expect("listed");
                (k, class)
            })
            .collect();
        let mut moving: BTreeSet<PodRef> = stale.values().flat_map(|c| c.members.keys().cloned()).collect();
        if let Some(policy) = self.policies.get(policy_ref) {
            for (namespace, pods) in &self.local {
                if matches!(&policy.subject_namespaces, NamespaceScope::Same(ns) if ns != namespace) {
                    continue;
                }
                for pod_ref in pods {
                    let pod = &self.pods[pod_ref];
                    if policy.selects(namespace, &self.namespace_labels[namespace], &pod.labels) {
                        moving.insert(pod_ref.clone());
                    }
                }
            }
        }
        self.state.selected_pods.remove(policy_ref);
        if self.policies.contains_key(policy_ref) {
            self.state.selected_pods.insert(policy_ref.clone(), 0);
        }
        for pod_ref in &moving {
            let pod = &self.pods[pod_ref];
            let mut key = pod.placement.as_deref().expect("moving pods are placed").class.clone();
            key.0.retain(|r| r != policy_ref);
            if let Some(policy) = self.policies.get(policy_ref) {
                let namespace = &pod_ref.namespace;
                if policy.selects(namespace, &self.namespace_labels[namespace], &pod.labels) {
                    key.0.push(policy_ref.clone());
                    key.0.sort_unstable();
                    *self.state.selected_pods.get_mut(policy_ref).expect("inserted above") += 1;
                }
            }
            self.move_to_class(pod_ref, key, &stale);
        }
        if let Some(old) = &old {
            old.release(&mut self.universe);
        }
        true
    }

    /// Move a pod in scope to the class `key` (computed when new), writing
    /// only the entries that differ. `stale` holds classes already taken out
    /// of the cache (those of a changed policy).
    fn move_to_class(&mut self, pod_ref: &PodRef, key: ClassKey, stale: &HashMap<ClassKey, Class>) {
        let placed = self.pods[pod_ref].placement.as_deref().expect("a pod in scope");
        let (endpoint, old_key) = (placed.endpoint, placed.class.clone());
        if old_key == key && !stale.contains_key(&old_key) {
            return;
        }
        if !self.classes.contains_key(&key) {
            let class = self.compute_class(&key);
            self.classes.insert(key.clone(), class);
        }
        let mut cached_old = if stale.contains_key(&old_key) { None } else { self.classes.remove(&old_key) };
        let old_class = cached_old.as_ref().or_else(|| stale.get(&old_key)).expect("a pod's class is cached or stale");
        let Self { classes, state, touched, .. } = self;
        let new_class = classes.get_mut(&key).expect("inserted above");
        restamp(state, touched, endpoint, &old_class.groups, &new_class.groups);
        new_class.members.insert(pod_ref.clone(), endpoint);
        if let Some(mut class) = cached_old.take() {
            class.members.remove(pod_ref);
            if !class.members.is_empty() {
                self.classes.insert(old_key, class);
            }
        }
        self.pods.get_mut(pod_ref).and_then(|p| p.placement.as_deref_mut()).expect("a pod in scope").class = key;
    }

    /// A namespace's labels changed. Identity numbers stay (they do not
    /// include namespace labels); what changes is which selectors match the
    /// namespace's identities, so their entries are redone, and which cluster
    /// policies select its pods in scope, which may change class.
    fn update_namespace(&mut self, snapshot: &Snapshot, name: &str) {
        let labels = Arc::new(snapshot.namespace_labels(name));
        match self.namespace_labels.get(name) {
            Some(known) if *known != labels => {}
            // Unchanged, or a namespace no pod is in: nothing holds its labels.
            _ => return,
        }
        self.namespace_labels.insert(name.into(), labels.clone());
        // An identity's entries follow from which selectors match it: those
        // of the namespace's identities that no selector matches
        // differently stay as they are.
        for (id, peers) in self.universe.relabel_namespace(name, &labels) {
            self.redo_identity_entries(id, Some(&peers));
        }
        for pod_ref in self.local_in(name) {
            let pod = &self.pods[&pod_ref];
            let old = pod.placement.as_deref().expect("a pod in scope").class.clone();
            let key = (self.selected_policies(name, &pod.labels), old.1.clone());
            for policy in old.0.iter().filter(|p| !key.0.contains(p)) {
                *self.state.selected_pods.get_mut(policy).expect("accepted policy") -= 1;
            }
            for policy in key.0.iter().filter(|p| !old.0.contains(p)) {
                *self.state.selected_pods.get_mut(policy).expect("accepted policy") += 1;
            }
            self.move_to_class(&pod_ref, key, &HashMap::new());
        }
    }
}

fn named_ports_of(pod: &Pod) -> NamedPorts {
    pod.ports.iter().filter_map(|p| p.name.clone().map(|n| ((n, p.protocol), p.port))).collect()
}

/// The namespace a policy's subject lives in; "" for cluster policies.
fn subject_namespace(policy: &Policy) -> String {
    match &policy.subject_namespaces {
        NamespaceScope::Same(ns) => ns.clone(),
        NamespaceScope::Selected(_) => String::new(),
    }
}
