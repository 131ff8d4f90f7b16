//! `compile(snapshot) → DesiredState`: the ipcache, the endpoints and every
//! per-endpoint policy entry, in the datapath's key format.
//!
//! For each endpoint and direction the verdict is a function of (peer
//! identity, protocol, port). It is evaluated on the elementary port
//! intervals the rules induce, then written as LPM entries so that the
//! datapath's lookup — the peer's own entries first, then "any peer", the
//! most specific protocol/port prefix within each — returns exactly it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    rc::Rc,
};

use bulkhead_crds::Protocol;
use datapath_common::{identity, ipv4_mapped, policy_prefix, proto, verdict, PolicyKey, PolicyValue, EGRESS, INGRESS, IPV4_MAPPED_PREFIX, RULE_DEFAULT_DENY};
use ipnet::IpNet;

use super::{
    identity::{allocate, identity_hash, longest_prefix, stable_hash, IdentityKey},
    model::{PodRef, PolicyRef, Snapshot},
    rules::{normalize, Action, NamespaceScope, Peer, Policy, PortMatch, Tier, ValidationError},
    selector::Labels,
};

/// An ipcache key: prefix length over the 16-byte (IPv4-mapped) address.
pub type IpcacheKey = (u32, [u8; 16]);
/// A policy trie key: prefix length and key data.
pub type PolicyEntryKey = (u32, PolicyKey);

pub const PORT_PROTOCOLS: [Protocol; 3] = [Protocol::TCP, Protocol::UDP, Protocol::SCTP];

pub fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::TCP => proto::TCP,
        Protocol::UDP => proto::UDP,
        Protocol::SCTP => proto::SCTP,
    }
}

pub fn address_key(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn prefix_key(net: &IpNet) -> IpcacheKey {
    match net {
        IpNet::V4(v4) => (IPV4_MAPPED_PREFIX + v4.prefix_len() as u32, ipv4_mapped(v4.network().octets())),
        IpNet::V6(v6) => (v6.prefix_len() as u32, v6.network().octets()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub id: u32,
    pub addresses: Vec<IpAddr>,
    pub node_name: Option<String>,
}

/// Everything the datapath should hold, plus the names behind the numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub ipcache: BTreeMap<IpcacheKey, u32>,
    pub endpoints: BTreeMap<PodRef, Endpoint>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    pub identities: BTreeMap<u32, IdentityKey>,
    pub policy_names: BTreeMap<u32, PolicyRef>,
    /// Policies left out of the compile, with why.
    pub rejected: Vec<ValidationError>,
    /// Accepted policies and how many pods each selects.
    pub selected_pods: BTreeMap<PolicyRef, usize>,
}

impl DesiredState {
    pub fn endpoint_by_id(&self, id: u32) -> Option<&PodRef> {
        self.endpoints.iter().find(|(_, e)| e.id == id).map(|(p, _)| p)
    }
}

/// A verdict and who decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Decision {
    allow: bool,
    policy: u32,
    rule: u32,
    /// The Audit-mode rule that would have denied this allowed connection.
    audit: Option<(u32, u32)>,
}

impl Decision {
    fn value(&self) -> PolicyValue {
        let (audit, audit_policy_id, audit_rule) = match self.audit {
            Some((p, r)) => (1, p, r),
            None => (0, 0, 0),
        };
        PolicyValue {
            verdict: if self.allow { verdict::ALLOW } else { verdict::DENY },
            audit,
            _pad: [0; 2],
            policy_id: self.policy,
            rule: self.rule,
            audit_policy_id,
            audit_rule,
        }
    }
}

/// The selected policies of one class of pods, in evaluation order.
struct Chain<'a> {
    admin: Vec<&'a Policy>,
    namespace: Vec<&'a Policy>,
    baseline: Vec<&'a Policy>,
}

/// Per-compile lookup tables.
struct Tables<'a> {
    policies: Vec<Policy>,
    /// identity → (namespace labels, pod labels) for pod identities.
    identity_labels: HashMap<u32, (&'a str, Labels, &'a Labels)>,
    identity_cidr: HashMap<u32, Option<IpNet>>,
    named_ports: HashMap<u32, BTreeMap<(String, Protocol), u16>>,
    identities_by_namespace: HashMap<String, Vec<u32>>,
    peer_cache: std::cell::RefCell<HashMap<Peer, Rc<HashSet<u32>>>>,
    /// Per rule (by address): the union of its peers' identities, resolved once.
    rule_sets: std::cell::RefCell<HashMap<usize, Rc<HashSet<u32>>>>,
}

impl Tables<'_> {
    /// Identities a rule's peers select (the rule must have peers).
    fn rule_identities(&self, rule: &super::rules::Rule) -> Rc<HashSet<u32>> {
        let key = rule as *const super::rules::Rule as usize;
        if let Some(hit) = self.rule_sets.borrow().get(&key) {
            return hit.clone();
        }
        let mut union = HashSet::new();
        for peer in rule.peers.iter().flatten() {
            union.extend(self.peer_identities(peer).iter().copied());
        }
        let union = Rc::new(union);
        self.rule_sets.borrow_mut().insert(key, union.clone());
        union
    }

    fn peer_identities(&self, peer: &Peer) -> Rc<HashSet<u32>> {
        if let Some(hit) = self.peer_cache.borrow().get(peer) {
            return hit.clone();
        }
        let mut out = HashSet::new();
        match peer {
            Peer::Pods { namespaces, pods } => {
                let mut candidates: Vec<u32> = Vec::new();
                match namespaces {
                    NamespaceScope::Same(ns) => candidates.extend(self.identities_by_namespace.get(ns).into_iter().flatten()),
                    NamespaceScope::Selected(selector) => {
                        for ids in self.identities_by_namespace.values() {
                            if let Some(first) = ids.first() {
                                if selector.matches(&self.identity_labels[first].1) {
                                    candidates.extend(ids);
                                }
                            }
                        }
                    }
                }
                for id in candidates {
                    if pods.matches(self.identity_labels[&id].2) {
                        out.insert(id);
                    }
                }
            }
            Peer::IpBlock { cidr, except } => {
                for (id, prefix) in &self.identity_cidr {
                    if let Some(prefix) = prefix {
                        if cidr.contains(prefix) && !except.iter().any(|e| e.contains(prefix)) {
                            out.insert(*id);
                        }
                    }
                }
            }
        }
        let out = Rc::new(out);
        self.peer_cache.borrow_mut().insert(peer.clone(), out.clone());
        out
    }
}

fn pod_identity_key(namespace: &str, labels: &Labels, named_ports: &BTreeMap<(String, Protocol), u16>, cidr: Option<IpNet>) -> IdentityKey {
    IdentityKey::Pod { namespace: namespace.to_string(), labels: labels.clone(), named_ports: named_ports.clone(), cidr }
}

/// Whether a policy's subject selects a pod.
fn selects(policy: &Policy, namespace: &str, namespace_labels: &Labels, pod_labels: &Labels) -> bool {
    let namespace_ok = match &policy.subject_namespaces {
        NamespaceScope::Same(ns) => ns == namespace,
        NamespaceScope::Selected(selector) => selector.matches(namespace_labels),
    };
    namespace_ok && policy.subject_pods.matches(pod_labels)
}

pub fn compile(snapshot: &Snapshot) -> DesiredState {
    let mut state = DesiredState::default();

    // Policies: validate; invalid ones are left out and reported.
    let mut policies = Vec::new();
    for object in snapshot.policies.values() {
        match normalize(object) {
            Ok(policy) => policies.push(policy),
            Err(error) => state.rejected.push(error),
        }
    }
    let refs: Vec<PolicyRef> = policies.iter().map(|p| p.id.clone()).collect();
    let policy_numbers = allocate(refs.iter(), 1, 1 << 30, |r| stable_hash(&format!("{r:?}")));
    for (r, id) in &policy_numbers {
        state.policy_names.insert(*id, r.clone());
    }

    // Every CIDR an ipBlock mentions.
    let mut prefixes = BTreeSet::new();
    for policy in &policies {
        for rule in policy.rules.iter().flatten() {
            for peer in rule.peers.iter().flatten() {
                if let Peer::IpBlock { cidr, except } = peer {
                    prefixes.insert(*cidr);
                    prefixes.extend(except.iter().copied());
                }
            }
        }
    }
    let mut by_len: Vec<HashSet<IpNet>> = vec![HashSet::new(); 129];
    for p in &prefixes {
        by_len[p.prefix_len() as usize].insert(*p);
    }

    // Identities of pod addresses and prefixes.
    let mut pod_named_ports: HashMap<&PodRef, BTreeMap<(String, Protocol), u16>> = HashMap::new();
    let mut address_identity: Vec<(IpAddr, IdentityKey)> = Vec::new();
    let mut keys = BTreeSet::new();
    for (pod_ref, pod) in &snapshot.pods {
        let named: BTreeMap<(String, Protocol), u16> =
            pod.ports.iter().filter_map(|p| p.name.clone().map(|n| ((n, p.protocol), p.port))).collect();
        // The plain identity always exists, so selectors see the pod even
        // when all its addresses fall inside ipBlocks.
        keys.insert(pod_identity_key(&pod.namespace, &pod.labels, &named, None));
        for address in &pod.ips {
            let cidr = longest_prefix(&prefixes, &by_len, *address);
            let key = pod_identity_key(&pod.namespace, &pod.labels, &named, cidr);
            keys.insert(key.clone());
            address_identity.push((*address, key));
        }
        pod_named_ports.insert(pod_ref, named);
    }
    for p in &prefixes {
        keys.insert(IdentityKey::Cidr(*p));
    }
    let identity_ids = allocate(keys.iter(), identity::FIRST_ALLOCATED, (1 << 31) - identity::FIRST_ALLOCATED, identity_hash);

    let mut namespace_labels: HashMap<&str, Labels> = HashMap::new();
    for pod in snapshot.pods.values() {
        namespace_labels.entry(pod.namespace.as_str()).or_insert_with(|| snapshot.namespace_labels(&pod.namespace));
    }
    let mut tables = Tables {
        policies: Vec::new(),
        identity_labels: HashMap::new(),
        identity_cidr: HashMap::new(),
        named_ports: HashMap::new(),
        identities_by_namespace: HashMap::new(),
        peer_cache: Default::default(),
        rule_sets: Default::default(),
    };
    for (key, id) in &identity_ids {
        state.identities.insert(*id, key.clone());
        match key {
            IdentityKey::Pod { namespace, labels, named_ports, cidr } => {
                let ns_labels = namespace_labels.get(namespace.as_str()).cloned().unwrap_or_default();
                tables.identity_labels.insert(*id, (namespace.as_str(), ns_labels, labels));
                tables.identity_cidr.insert(*id, *cidr);
                tables.named_ports.insert(*id, named_ports.clone());
                tables.identities_by_namespace.entry(namespace.clone()).or_default().push(*id);
            }
            IdentityKey::Cidr(net) => {
                tables.identity_cidr.insert(*id, Some(*net));
            }
        }
    }
    for ids in tables.identities_by_namespace.values_mut() {
        ids.sort_unstable();
    }

    // The ipcache.
    for net in &prefixes {
        state.ipcache.insert(prefix_key(net), identity_ids[&IdentityKey::Cidr(*net)]);
    }
    for (address, key) in &address_identity {
        let full = if address.is_ipv4() { IPV4_MAPPED_PREFIX + 32 } else { 128 };
        state.ipcache.insert((full, address_key(*address)), identity_ids[key]);
    }
    for address in &snapshot.node_addresses {
        let full = if address.is_ipv4() { IPV4_MAPPED_PREFIX + 32 } else { 128 };
        state.ipcache.insert((full, address_key(*address)), identity::HOST);
    }

    // Endpoints.
    let endpoint_ids = allocate(snapshot.pods.keys(), 1, 1 << 30, |r| stable_hash(&format!("{r:?}")));
    for (pod_ref, pod) in &snapshot.pods {
        state.endpoints.insert(pod_ref.clone(), Endpoint { id: endpoint_ids[pod_ref], addresses: pod.ips.clone(), node_name: pod.node_name.clone() });
    }

    // Policy entries, computed once per class of pods that share namespace,
    // labels and named ports, then stamped per endpoint.
    tables.policies = policies;
    let policies = &tables.policies;
    let policy_ids: HashMap<&PolicyRef, u32> = policies.iter().map(|p| (&p.id, policy_numbers[&p.id])).collect();
    for policy in policies {
        state.selected_pods.insert(policy.id.clone(), 0);
    }
    // Pods with the same selected policies (and, for ingress named ports,
    // the same container ports) share their entries.
    let mut class_entries: HashMap<(Vec<usize>, BTreeMap<(String, Protocol), u16>), Rc<Vec<(u32, u8, u32, u8, u16, PolicyValue)>>> = HashMap::new();
    let mut cluster_policies = Vec::new();
    let mut namespace_policies: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, policy) in policies.iter().enumerate() {
        match &policy.subject_namespaces {
            NamespaceScope::Same(ns) => namespace_policies.entry(ns.as_str()).or_default().push(index),
            NamespaceScope::Selected(_) => cluster_policies.push(index),
        }
    }
    for (pod_ref, pod) in &snapshot.pods {
        let ns_labels = &namespace_labels[pod.namespace.as_str()];
        let named = &pod_named_ports[pod_ref];
        let mut selected: Vec<usize> = cluster_policies
            .iter()
            .chain(namespace_policies.get(pod.namespace.as_str()).into_iter().flatten())
            .copied()
            .filter(|i| selects(&policies[*i], &pod.namespace, ns_labels, &pod.labels))
            .collect();
        selected.sort_unstable();
        let mut chain = Chain { admin: vec![], namespace: vec![], baseline: vec![] };
        for index in &selected {
            let policy = &policies[*index];
            *state.selected_pods.get_mut(&policy.id).expect("inserted above") += 1;
            match policy.tier {
                Tier::Admin => chain.admin.push(policy),
                Tier::Namespace => chain.namespace.push(policy),
                Tier::Baseline => chain.baseline.push(policy),
            }
        }
        let class = (selected, named.clone());
        let entries = match class_entries.get(&class) {
            Some(entries) => entries.clone(),
            None => {
                chain.admin.sort_by(|a, b| (a.priority, &a.id.name).cmp(&(b.priority, &b.id.name)));
                chain.baseline.sort_by(|a, b| (a.priority, &a.id.name).cmp(&(b.priority, &b.id.name)));
                chain.namespace.sort_by(|a, b| a.id.cmp(&b.id));
                let mut entries = Vec::new();
                for direction in [INGRESS, EGRESS] {
                    let evaluator = Evaluator { tables: &tables, policy_ids: &policy_ids, chain: &chain, direction, own_named_ports: named };
                    evaluator.entries(&mut entries);
                }
                let entries = Rc::new(entries);
                class_entries.insert(class, entries.clone());
                entries
            }
        };
        let endpoint = endpoint_ids[pod_ref];
        for (prefix_len, direction, peer, protocol, port, value) in entries.iter() {
            state.policy.insert((*prefix_len, PolicyKey::new(endpoint, *direction, *peer, *protocol, *port)), *value);
        }
    }
    state
}

/// Evaluates one class of pods in one direction.
struct Evaluator<'a> {
    tables: &'a Tables<'a>,
    policy_ids: &'a HashMap<&'a PolicyRef, u32>,
    chain: &'a Chain<'a>,
    direction: u8,
    own_named_ports: &'a BTreeMap<(String, Protocol), u16>,
}

/// A peer class: one identity, or `None` for every identity no rule names.
type Class = Option<u32>;

impl Evaluator<'_> {
    fn all_policies(&self) -> impl Iterator<Item = &Policy> {
        self.chain.admin.iter().chain(&self.chain.namespace).chain(&self.chain.baseline).copied()
    }

    fn peer_matches(&self, rule: &super::rules::Rule, class: Class) -> bool {
        match (&rule.peers, class) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(_), Some(id)) => self.tables.rule_identities(rule).contains(&id),
        }
    }

    /// The port number a port match stands for against this peer class, by protocol.
    fn resolve(&self, port: &PortMatch, class: Class) -> Option<(Protocol, u16, u16)> {
        match port {
            PortMatch::Range { protocol, start, end } => Some((*protocol, *start, *end)),
            PortMatch::Named { protocol, name } => {
                let ports = if self.direction == INGRESS {
                    Some(self.own_named_ports)
                } else {
                    class.and_then(|id| self.tables.named_ports.get(&id))
                };
                ports.and_then(|p| p.get(&(name.clone(), *protocol))).map(|n| (*protocol, *n, *n))
            }
        }
    }

    fn rule_matches(&self, rule: &super::rules::Rule, class: Class, protocol: Option<Protocol>, port: u16) -> bool {
        if !self.peer_matches(rule, class) {
            return false;
        }
        match (&rule.ports, protocol) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ports), Some(protocol)) => ports.iter().any(|p| {
                self.resolve(p, class).is_some_and(|(proto, start, end)| proto == protocol && start <= port && port <= end)
            }),
        }
    }

    /// One cluster tier: the first matching rule in priority order decides;
    /// `Pass` (or no match) leaves the tier undecided.
    fn cluster_tier(&self, tier: &[&Policy], class: Class, protocol: Option<Protocol>, port: u16, with_audit: bool) -> Option<(bool, u32, u32)> {
        let d = self.direction as usize;
        for policy in tier.iter().filter(|p| with_audit || !p.audit) {
            for rule in &policy.rules[d] {
                if self.rule_matches(rule, class, protocol, port) {
                    return match rule.action {
                        Action::Allow => Some((true, self.policy_ids[&policy.id], rule.index)),
                        Action::Deny => Some((false, self.policy_ids[&policy.id], rule.index)),
                        Action::Pass => None,
                    };
                }
            }
        }
        None
    }

    /// Evaluation per api.md; `with_audit` also applies Audit-mode policies.
    fn evaluate(&self, class: Class, protocol: Option<Protocol>, port: u16, with_audit: bool) -> (bool, u32, u32) {
        let d = self.direction as usize;
        let active = |p: &&&Policy| with_audit || !p.audit;
        if let Some(decided) = self.cluster_tier(&self.chain.admin, class, protocol, port, with_audit) {
            return decided;
        }
        let mut isolating = self.chain.namespace.iter().filter(active).filter(|p| p.isolates[d]).copied().peekable();
        if let Some(first) = isolating.peek().copied() {
            for policy in isolating {
                for rule in &policy.rules[d] {
                    if self.rule_matches(rule, class, protocol, port) {
                        return (true, self.policy_ids[&policy.id], rule.index);
                    }
                }
            }
            return (false, self.policy_ids[&first.id], RULE_DEFAULT_DENY);
        }
        if let Some(decided) = self.cluster_tier(&self.chain.baseline, class, protocol, port, with_audit) {
            return decided;
        }
        (true, 0, 0)
    }

    fn decide(&self, class: Class, protocol: Option<Protocol>, port: u16) -> Decision {
        let (allow, policy, rule) = self.evaluate(class, protocol, port, false);
        let mut decision = Decision { allow, policy, rule, audit: None };
        if allow && self.all_policies().any(|p| p.audit) {
            let (would_allow, audit_policy, audit_rule) = self.evaluate(class, protocol, port, true);
            if !would_allow {
                decision.audit = Some((audit_policy, audit_rule));
            }
        }
        decision
    }

    /// Elementary port intervals for a protocol: boundaries of every port
    /// match that can apply to this class.
    fn intervals(&self, class: Class, protocol: Protocol) -> Vec<(u16, u16)> {
        let d = self.direction as usize;
        let mut cuts: BTreeSet<u32> = BTreeSet::from([0, 65536]);
        for policy in self.all_policies() {
            for rule in &policy.rules[d] {
                if !self.peer_matches(rule, class) {
                    continue;
                }
                for port in rule.ports.iter().flatten() {
                    if let Some((proto, start, end)) = self.resolve(port, class) {
                        if proto == protocol {
                            cuts.insert(start as u32);
                            cuts.insert(end as u32 + 1);
                        }
                    }
                }
            }
        }
        let cuts: Vec<u32> = cuts.into_iter().collect();
        cuts.windows(2).map(|w| (w[0] as u16, (w[1] - 1) as u16)).collect()
    }

    /// The verdict function of one class: the verdict for protocols without
    /// ports, and per port protocol the merged intervals with their verdicts.
    fn function(&self, class: Class) -> (Decision, Vec<(Protocol, Vec<(u16, u16, Decision)>)>) {
        let other = self.decide(class, None, 0);
        let mut per_protocol = Vec::new();
        for protocol in PORT_PROTOCOLS {
            let mut merged: Vec<(u16, u16, Decision)> = Vec::new();
            for (start, end) in self.intervals(class, protocol) {
                let decision = self.decide(class, Some(protocol), start);
                match merged.last_mut() {
                    Some(last) if last.2 == decision && last.1 as u32 + 1 == start as u32 => last.1 = end,
                    _ => merged.push((start, end, decision)),
                }
            }
            per_protocol.push((protocol, merged));
        }
        (other, per_protocol)
    }

    /// Append this direction's entries: (prefix length, direction, peer, protocol, port, value).
    fn entries(&self, out: &mut Vec<(u32, u8, u32, u8, u16, PolicyValue)>) {
        let d = self.direction;
        // Identity → the rules (by position in the chain) whose peers name it.
        let mut signatures: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut any_named_egress = false;
        let mut position = 0u32;
        for policy in self.all_policies() {
            for rule in &policy.rules[d as usize] {
                if rule.peers.is_some() {
                    for id in self.tables.rule_identities(rule).iter() {
                        signatures.entry(*id).or_default().push(position);
                    }
                } else if d == EGRESS {
                    // "Every peer" with a named port: the port exists only on
                    // the peers that name it, so those need entries of their
                    // own ("any peer" resolves no name).
                    for port in rule.ports.iter().flatten() {
                        if let PortMatch::Named { protocol, name } = port {
                            for (id, ports) in &self.tables.named_ports {
                                if ports.contains_key(&(name.clone(), *protocol)) {
                                    signatures.entry(*id).or_default().push(position);
                                }
                            }
                        }
                    }
                }
                any_named_egress |= d == EGRESS && rule.ports.iter().flatten().any(|p| matches!(p, PortMatch::Named { .. }));
                position += 1;
            }
        }
        let (any_other, any_ports) = self.function(None);
        out.push((policy_prefix::ANY_PROTOCOL, d, identity::ANY, 0, 0, any_other.value()));
        for (protocol, intervals) in &any_ports {
            for (start, end, decision) in intervals {
                if *decision != any_other {
                    push_range(out, d, identity::ANY, *protocol, *start, *end, decision.value());
                }
            }
        }

        // Identities that match the same rules (and resolve named ports the
        // same way) share one verdict function.
        let mut by_signature: HashMap<(Vec<u32>, Option<BTreeMap<(String, Protocol), u16>>), Rc<Vec<(u32, u8, u16, PolicyValue)>>> = HashMap::new();
        for (id, signature) in signatures {
            let named = if any_named_egress { self.tables.named_ports.get(&id).cloned() } else { None };
            let key = (signature, named);
            let entries = match by_signature.get(&key) {
                Some(e) => e.clone(),
                None => {
                    let e = Rc::new(self.identity_entries(Some(id), &any_other, &any_ports));
                    by_signature.insert(key, e.clone());
                    e
                }
            };
            for (prefix_len, protocol, port, value) in entries.iter() {
                out.push((*prefix_len, d, id, *protocol, *port, *value));
            }
        }
    }

    /// Entries for one identity: only where it differs from "any peer" when
    /// that is cheaper, else its whole function.
    fn identity_entries(&self, class: Class, any_other: &Decision, any_ports: &[(Protocol, Vec<(u16, u16, Decision)>)]) -> Vec<(u32, u8, u16, PolicyValue)> {
        let (other, ports) = self.function(class);
        let mut full = vec![(policy_prefix::ANY_PROTOCOL, 0u8, 0u16, other.value())];
        for (protocol, intervals) in &ports {
            for (start, end, decision) in intervals {
                if *decision != other {
                    push_prefixes(&mut full, *protocol, *start, *end, decision.value());
                }
            }
        }
        if other != *any_other {
            return full;
        }
        let mut diff = Vec::new();
        for ((protocol, intervals), (_, any_intervals)) in ports.iter().zip(any_ports) {
            // Walk both interval lists together over the port space.
            let points: BTreeSet<u32> = intervals.iter().chain(any_intervals).flat_map(|(s, e, _)| [*s as u32, *e as u32 + 1]).collect();
            let points: Vec<u32> = points.into_iter().collect();
            let at = |list: &[(u16, u16, Decision)], port: u16| list.iter().find(|(s, e, _)| *s <= port && port <= *e).map(|x| x.2);
            let mut run: Option<(u16, u16, Decision)> = None;
            for w in points.windows(2) {
                let (start, end) = (w[0] as u16, (w[1] - 1) as u16);
                let mine = at(intervals, start);
                if mine.is_some() && mine != at(any_intervals, start) {
                    let mine = mine.expect("checked");
                    match &mut run {
                        Some(r) if r.2 == mine && r.1 as u32 + 1 == start as u32 => r.1 = end,
                        _ => {
                            if let Some((s, e, dd)) = run.take() {
                                push_prefixes(&mut diff, *protocol, s, e, dd.value());
                            }
                            run = Some((start, end, mine));
                        }
                    }
                } else if let Some((s, e, dd)) = run.take() {
                    push_prefixes(&mut diff, *protocol, s, e, dd.value());
                }
            }
            if let Some((s, e, dd)) = run.take() {
                push_prefixes(&mut diff, *protocol, s, e, dd.value());
            }
        }
        if diff.len() <= full.len() {
            diff
        } else {
            full
        }
    }
}

fn push_range(out: &mut Vec<(u32, u8, u32, u8, u16, PolicyValue)>, d: u8, peer: u32, protocol: Protocol, start: u16, end: u16, value: PolicyValue) {
    for (bits, base) in port_prefixes(start, end) {
        out.push((policy_prefix::ANY_PORT + bits, d, peer, protocol_number(protocol), base, value));
    }
}

fn push_prefixes(out: &mut Vec<(u32, u8, u16, PolicyValue)>, protocol: Protocol, start: u16, end: u16, value: PolicyValue) {
    for (bits, base) in port_prefixes(start, end) {
        out.push((policy_prefix::ANY_PORT + bits, protocol_number(protocol), base, value));
    }
}

/// Cover the inclusive range `start..=end` with the fewest port prefixes:
/// (prefix bits, base port). At most 30 for any range; the whole space is one.
pub fn port_prefixes(start: u16, end: u16) -> Vec<(u32, u16)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (start as u32, end as u32);
    while lo <= hi {
        let mut size = if lo == 0 { 1 << 16 } else { 1u32 << lo.trailing_zeros() };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((16 - size.trailing_zeros(), lo as u16));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_prefixes_cover_exactly() {
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 80), vec![(16, 80)]);
        assert_eq!(port_prefixes(8000, 8007), vec![(13, 8000)]);
        for (start, end) in [(1u16, 65535u16), (9000, 9100), (1, 1), (1, 65534), (32767, 32768)] {
            let prefixes = port_prefixes(start, end);
            assert!(prefixes.len() <= 30, "{start}-{end}: {}", prefixes.len());
            let mut covered = 0u32;
            for (bits, base) in &prefixes {
                let size = 1u32 << (16 - bits);
                assert_eq!(*base as u32 % size, 0, "aligned");
                covered += size;
            }
            assert_eq!(covered, end as u32 - start as u32 + 1);
        }
        assert_eq!(port_prefixes(1, 65534).len(), 30);
    }
}
