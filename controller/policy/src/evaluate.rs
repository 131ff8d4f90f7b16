//! The verdict function of one class of pods in one direction, and the LPM
//! entries that make the datapath's lookup return exactly it.
//!
//! For each endpoint and direction the verdict is a function of (peer
//! identity, protocol, port). It is evaluated on the elementary port
//! intervals the rules induce, then written as LPM entries so that the
//! datapath's lookup — the peer's own entries first, then "any peer", the
//! most specific protocol/port prefix within each — returns exactly it.

use std::{
    collections::{BTreeMap, BTreeSet},
    rc::Rc,
};

use bulkhead_crds::Protocol;
use datapath_common::{identity, policy_prefix, verdict, PolicyValue, EGRESS, INGRESS, RULE_DEFAULT_DENY};
use foldhash::{HashMap, HashMapExt};

use crate::{
    identity::NamedPorts,
    model::PolicyRef,
    rules::{Action, Policy, PortMatch, Rule, Tier},
    state::{protocol_number, PORT_PROTOCOLS},
    universe::{PeerId, Universe},
};

/// One entry of a class, without its endpoint and peer:
/// (prefix length, direction, protocol, port, value).
pub type ClassEntry = (u32, u8, u8, u16, PolicyValue);
/// A class's entries grouped by direction and peer identity
/// (`identity::ANY` for "any peer"). Identities that match the same rules
/// share one list: a class names thousands of identities, in a few dozen
/// distinct ways.
pub type EntryGroups = BTreeMap<(u8, u32), Rc<[ClassEntry]>>;

/// A verdict and who decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    allow: bool,
    policy: u32,
    rule: u32,
    /// The Audit-mode rule that would have denied this allowed connection.
    audit: Option<(u32, u32)>,
}

impl Decision {
    fn value(&self) -> PolicyValue {
        let value = PolicyValue::new(if self.allow { verdict::ALLOW } else { verdict::DENY }, self.policy, self.rule);
        match self.audit {
            Some((policy, rule)) => value.with_audit(policy, rule),
            None => value,
        }
    }
}

/// Per port protocol, the merged port intervals and their decisions.
type PortFunction = Vec<(Protocol, Vec<(u16, u16, Decision)>)>;

/// The verdict function for peers no rule names: what "any peer" entries say.
#[derive(Clone, Debug)]
pub struct AnyPeer {
    other: Decision,
    ports: PortFunction,
}

/// A policy the compiler accepted: with its number and, per rule, the
/// interned peers the selector cache resolves.
pub struct Accepted {
    pub policy: Policy,
    pub number: u32,
    /// Indexed by direction, then rule.
    peers: [Vec<Vec<PeerId>>; 2],
}

impl Accepted {
    pub fn new(policy: Policy, number: u32, universe: &mut Universe) -> Self {
        let peers = [0, 1].map(|d: usize| {
            policy.rules[d]
                .iter()
                .map(|rule| rule.peers.iter().flatten().map(|peer| universe.use_peer(peer)).collect())
                .collect()
        });
        Accepted { policy, number, peers }
    }

    /// Give back the peers this policy used to the selector cache.
    pub fn release(&self, universe: &mut Universe) {
        for id in self.peers.iter().flatten().flatten() {
            universe.release_peer(*id);
        }
    }

    /// Whether any rule of this policy names an identity: by a peer that
    /// selects it, or, for "every peer" egress, by a named port it has.
    pub fn names_identity(&self, universe: &Universe, id: u32) -> bool {
        [INGRESS, EGRESS]
            .into_iter()
            .any(|d| self.rules(d).any(|(rule, peers)| rule_names(universe, d, rule, peers, id)))
    }

    /// Whether any rule of this policy uses one of these peers.
    pub fn uses_any_peer(&self, peers: &[PeerId]) -> bool {
        self.peers.iter().flatten().flatten().any(|peer| peers.contains(peer))
    }

    /// The rules of one direction, each with its peers.
    fn rules(&self, direction: u8) -> impl Iterator<Item = (&Rule, &[PeerId])> {
        self.policy.rules[direction as usize].iter().zip(self.peers[direction as usize].iter().map(Vec::as_slice))
    }
}

impl std::ops::Deref for Accepted {
    type Target = Policy;

    fn deref(&self) -> &Policy {
        &self.policy
    }
}

/// Whether a rule names an identity, which then needs entries of its own: a
/// peer of the rule selects it, or the rule is "every peer" egress to a
/// named port the identity has (the port exists only on the peers that name
/// it, and "any peer" resolves no name).
fn rule_names(universe: &Universe, direction: u8, rule: &Rule, peers: &[PeerId], id: u32) -> bool {
    match &rule.peers {
        Some(_) => peers.iter().any(|peer| universe.peer_contains(*peer, id)),
        None => {
            direction == EGRESS
                && rule.ports.iter().flatten().any(|port| {
                    matches!(port, PortMatch::Named { protocol, name } if universe.named_ports(id).is_some_and(|ports| ports.contains_key(&(name.clone(), *protocol))))
                })
        }
    }
}

/// The selected policies of one class of pods, in evaluation order. It
/// holds the policies it was made of, so a class keeps its chain for as
/// long as its policies stay (a changed policy makes new classes).
pub struct Chain {
    admin: Vec<Rc<Accepted>>,
    namespace: Vec<Rc<Accepted>>,
    baseline: Vec<Rc<Accepted>>,
}

impl Chain {
    /// The chain of the policies named by `selected` (all accepted).
    pub fn of(selected: &[PolicyRef], policies: &BTreeMap<PolicyRef, Rc<Accepted>>) -> Self {
        let mut chain = Chain { admin: vec![], namespace: vec![], baseline: vec![] };
        for policy in selected.iter().filter_map(|r| policies.get(r)) {
            let policy = policy.clone();
            match policy.tier {
                Tier::Admin => chain.admin.push(policy),
                Tier::Namespace => chain.namespace.push(policy),
                Tier::Baseline => chain.baseline.push(policy),
            }
        }
        // Both cluster kinds share a tier: by priority, then name, then kind
        // (a ClusterConnectionPolicy before a ClusterNetworkPolicy).
        let order = |a: &Rc<Accepted>, b: &Rc<Accepted>| {
            (a.priority, &a.id.name, a.id.kind).cmp(&(b.priority, &b.id.name, b.id.kind))
        };
        chain.admin.sort_by(order);
        chain.baseline.sort_by(order);
        chain.namespace.sort_by(|a, b| a.id.cmp(&b.id));
        chain
    }

    pub fn all(&self) -> impl Iterator<Item = &Accepted> + '_ {
        self.admin.iter().chain(&self.namespace).chain(&self.baseline).map(|p| &**p)
    }
}

/// Evaluates one class of pods in one direction.
pub struct Evaluator<'a> {
    pub universe: &'a Universe,
    pub chain: &'a Chain,
    pub direction: u8,
    pub own_named_ports: &'a NamedPorts,
}

/// A peer class: one identity, or `None` for every identity no rule names.
type Class = Option<u32>;

impl Evaluator<'_> {
    fn peer_matches(&self, rule: &Rule, peers: &[PeerId], class: Class) -> bool {
        match (&rule.peers, class) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(_), Some(id)) => peers.iter().any(|peer| self.universe.peer_contains(*peer, id)),
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
                    class.and_then(|id| self.universe.named_ports(id))
                };
                ports.and_then(|p| p.get(&(name.clone(), *protocol))).map(|n| (*protocol, *n, *n))
            }
        }
    }

    fn rule_matches(&self, rule: &Rule, peers: &[PeerId], class: Class, protocol: Option<Protocol>, port: u16) -> bool {
        if !self.peer_matches(rule, peers, class) {
            return false;
        }
        match (&rule.ports, protocol) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ports), Some(protocol)) => ports.iter().any(|p| {
                self.resolve(p, class)
                    .is_some_and(|(proto, start, end)| proto == protocol && start <= port && port <= end)
            }),
        }
    }

    /// One cluster tier: the first matching rule in priority order decides;
    /// `Pass` (or no match) leaves the tier undecided.
    fn cluster_tier(
        &self,
        tier: &[Rc<Accepted>],
        class: Class,
        protocol: Option<Protocol>,
        port: u16,
        with_audit: bool,
    ) -> Option<(bool, u32, u32)> {
        for policy in tier.iter().filter(|p| with_audit || !p.audit) {
            for (rule, peers) in policy.rules(self.direction) {
                if self.rule_matches(rule, peers, class, protocol, port) {
                    return match rule.action {
                        Action::Allow => Some((true, policy.number, rule.index)),
                        Action::Deny => Some((false, policy.number, rule.index)),
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
        let active = |p: &&Rc<Accepted>| with_audit || !p.audit;
        if let Some(decided) = self.cluster_tier(&self.chain.admin, class, protocol, port, with_audit) {
            return decided;
        }
        let mut isolating = self.chain.namespace.iter().filter(active).filter(|p| p.isolates[d]).peekable();
        if let Some(first) = isolating.peek().copied() {
            for policy in isolating {
                for (rule, peers) in policy.rules(self.direction) {
                    if self.rule_matches(rule, peers, class, protocol, port) {
                        return (true, policy.number, rule.index);
                    }
                }
            }
            return (false, first.number, RULE_DEFAULT_DENY);
        }
        if let Some(decided) = self.cluster_tier(&self.chain.baseline, class, protocol, port, with_audit) {
            return decided;
        }
        (true, 0, 0)
    }

    fn decide(&self, class: Class, protocol: Option<Protocol>, port: u16) -> Decision {
        let (allow, policy, rule) = self.evaluate(class, protocol, port, false);
        let mut decision = Decision { allow, policy, rule, audit: None };
        if allow && self.chain.all().any(|p| p.audit) {
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
        let mut cuts: BTreeSet<u32> = BTreeSet::from([0, 65536]);
        for policy in self.chain.all() {
            for (rule, peers) in policy.rules(self.direction) {
                if !self.peer_matches(rule, peers, class) {
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
    fn function(&self, class: Class) -> (Decision, PortFunction) {
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

    pub fn any_peer(&self) -> AnyPeer {
        let (other, ports) = self.function(None);
        AnyPeer { other, ports }
    }

    /// Whether any egress rule of the chain uses a named port (then identities
    /// that resolve names differently cannot share entries).
    fn any_named_egress(&self) -> bool {
        self.direction == EGRESS
            && self.chain.all().any(|p| {
                p.rules[EGRESS as usize]
                    .iter()
                    .any(|r| r.ports.iter().flatten().any(|p| matches!(p, PortMatch::Named { .. })))
            })
    }

    /// The rules (by position in the chain) that name one identity: when
    /// empty, the identity needs no entries of its own.
    pub fn signature(&self, id: u32) -> Vec<u32> {
        let mut positions = Vec::new();
        for (position, (rule, peers)) in self.chain.all().flat_map(|p| p.rules(self.direction)).enumerate() {
            if rule_names(self.universe, self.direction, rule, peers, id) {
                positions.push(position as u32);
            }
        }
        positions
    }

    /// Every identity some rule names, with its signature: (identity, rule
    /// position) pairs sorted by identity, then position. One flat sort, not
    /// a map of vectors: a class's rules can name most of the cluster's
    /// identities.
    fn signatures(&self) -> Vec<(u32, u32)> {
        let mut named = Vec::new();
        for (position, (rule, peers)) in self.chain.all().flat_map(|p| p.rules(self.direction)).enumerate() {
            let position = position as u32;
            match &rule.peers {
                Some(_) => {
                    for peer in peers {
                        named.extend(self.universe.peer_ids(*peer).map(|id| (id, position)));
                    }
                }
                None if self.direction == EGRESS => {
                    for id in self.universe.identities_with_named_ports() {
                        if rule_names(self.universe, self.direction, rule, peers, id) {
                            named.push((id, position));
                        }
                    }
                }
                None => {}
            }
        }
        named.sort_unstable();
        named.dedup();
        named
    }

    /// This direction's "any peer" entries.
    pub fn any_entries(&self, any: &AnyPeer, out: &mut Vec<ClassEntry>) {
        let d = self.direction;
        out.push((policy_prefix::ANY_PROTOCOL, d, 0, 0, any.other.value()));
        for (protocol, intervals) in &any.ports {
            for (start, end, decision) in intervals {
                if *decision != any.other {
                    for (bits, base) in port_prefixes(*start, *end) {
                        out.push((
                            policy_prefix::ANY_PORT + bits,
                            d,
                            protocol_number(*protocol),
                            base,
                            decision.value(),
                        ));
                    }
                }
            }
        }
    }

    /// This direction's entries for every peer: "any peer" and each
    /// identity some rule names.
    pub fn entries(&self, any: &AnyPeer, groups: &mut EntryGroups) {
        let mut any_entries = Vec::new();
        self.any_entries(any, &mut any_entries);
        groups.insert((self.direction, identity::ANY), any_entries.into());
        // Identities that match the same rules (and resolve named ports the
        // same way) share one verdict function.
        let any_named_egress = self.any_named_egress();
        // Identities share entries when the same rules name them and (when
        // egress rules use named ports) they resolve those names alike: per
        // signature, each set of named ports seen with it.
        type Shared<'u> = Vec<(Option<&'u NamedPorts>, Rc<[ClassEntry]>)>;
        let mut by_signature: HashMap<Vec<u32>, Shared> = HashMap::new();
        let mut signature = Vec::new();
        for named in self.signatures().chunk_by(|a, b| a.0 == b.0) {
            let id = named[0].0;
            signature.clear();
            signature.extend(named.iter().map(|(_, position)| *position));
            let ports = if any_named_egress { self.universe.named_ports(id) } else { None };
            let known =
                by_signature.get(signature.as_slice()).and_then(|shared| shared.iter().find(|(p, _)| *p == ports));
            let entries = match known {
                Some((_, entries)) => entries.clone(),
                None => {
                    let entries: Rc<[ClassEntry]> = self.identity_entries(id, any).into();
                    by_signature.entry(signature.clone()).or_default().push((ports, entries.clone()));
                    entries
                }
            };
            if !entries.is_empty() {
                groups.insert((self.direction, id), entries);
            }
        }
    }

    /// Entries for one identity: only where it differs from "any peer" when
    /// that is cheaper, else its whole function.
    pub fn identity_entries(&self, id: u32, any: &AnyPeer) -> Vec<ClassEntry> {
        let d = self.direction;
        let (other, ports) = self.function(Some(id));
        let mut full = vec![(policy_prefix::ANY_PROTOCOL, d, 0u8, 0u16, other.value())];
        for (protocol, intervals) in &ports {
            for (start, end, decision) in intervals {
                if *decision != other {
                    push_prefixes(&mut full, d, *protocol, *start, *end, decision.value());
                }
            }
        }
        if other != any.other {
            return full;
        }
        let mut diff = Vec::new();
        for ((protocol, intervals), (_, any_intervals)) in ports.iter().zip(&any.ports) {
            // Walk both interval lists together over the port space.
            let points: BTreeSet<u32> =
                intervals.iter().chain(any_intervals).flat_map(|(s, e, _)| [*s as u32, *e as u32 + 1]).collect();
            let points: Vec<u32> = points.into_iter().collect();
            let at = |list: &[(u16, u16, Decision)], port: u16| {
                list.iter().find(|(s, e, _)| *s <= port && port <= *e).map(|x| x.2)
            };
            let mut run: Option<(u16, u16, Decision)> = None;
            for w in points.windows(2) {
                let (start, end) = (w[0] as u16, (w[1] - 1) as u16);
                let differs = at(intervals, start).filter(|mine| Some(*mine) != at(any_intervals, start));
                if let Some(mine) = differs {
                    match &mut run {
                        Some(r) if r.2 == mine && r.1 as u32 + 1 == start as u32 => r.1 = end,
                        _ => {
                            if let Some((s, e, dd)) = run.take() {
                                push_prefixes(&mut diff, d, *protocol, s, e, dd.value());
                            }
                            run = Some((start, end, mine));
                        }
                    }
                } else if let Some((s, e, dd)) = run.take() {
                    push_prefixes(&mut diff, d, *protocol, s, e, dd.value());
                }
            }
            if let Some((s, e, dd)) = run.take() {
                push_prefixes(&mut diff, d, *protocol, s, e, dd.value());
            }
        }
        if diff.len() <= full.len() {
            diff
        } else {
            full
        }
    }
}

fn push_prefixes(out: &mut Vec<ClassEntry>, d: u8, protocol: Protocol, start: u16, end: u16, value: PolicyValue) {
    for (bits, base) in port_prefixes(start, end) {
        out.push((policy_prefix::ANY_PORT + bits, d, protocol_number(protocol), base, value));
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
