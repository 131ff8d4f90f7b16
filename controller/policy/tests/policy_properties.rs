//! Properties of the compiler, on random snapshots:
//! - the verdict read from the compiled state (the datapath's lookups) equals
//!   a small reference evaluator written directly from api.md, and where a
//!   direction is flagged open the flag answers as the lookups would;
//! - applying `diff(a, b)` to `compile(a)` gives exactly `compile(b)`, and no
//!   intermediate state allows what neither `a` nor `b` allows.

// The reference evaluator spells api.md out sentence by sentence over the
// objects as written, in their own shapes, rather than factor them.
#![allow(clippy::too_many_arguments, clippy::type_complexity)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use bulkhead_crds as crd;
use bulkhead_policy::{
    self as policy,
    lookup::{self, ConnectionVerdict},
    state::protocol_number,
    ContainerPort, Namespace, Pod, PodRef, PolicyObject, PolicyRef, Snapshot,
};
use datapath_common::{open_flag, PolicyValue};
use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1 as net,
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Reference evaluator: api.md, sentence by sentence, over the raw objects.

fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// One end of a connection: an address, and its pod if it is one.
#[derive(Clone, Copy)]
struct End<'a> {
    address: IpAddr,
    pod: Option<&'a Pod>,
}

/// A random cluster: the snapshot the compiler reads, and the policy
/// objects as written, which the reference evaluator reads instead.
#[derive(Clone, Debug, Default)]
struct Cluster {
    snapshot: Snapshot,
    policies: BTreeMap<PolicyRef, PolicyObject>,
}

impl Cluster {
    fn add_policy(&mut self, object: PolicyObject) {
        self.snapshot.admit(&object);
        self.policies.insert(object.policy_ref(), object);
    }

    fn remove_policy(&mut self, key: &PolicyRef) {
        self.snapshot.policies.remove(key);
        self.policies.remove(key);
    }
}

struct Reference<'a> {
    snapshot: &'a Snapshot,
    policies: &'a BTreeMap<PolicyRef, PolicyObject>,
}

impl<'a> Reference<'a> {
    fn of(cluster: &'a Cluster) -> Self {
        Reference { snapshot: &cluster.snapshot, policies: &cluster.policies }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Allow,
    Deny,
    Pass,
}

impl Reference<'_> {
    fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.snapshot.namespace_labels(name)
    }

    /// "A peer with only podSelector selects pods in the policy's namespace
    /// [in a cluster policy: in every namespace]; with only namespaceSelector
    /// every pod of the selected namespaces; with both, pods matching both.
    /// ipBlock matches addresses by CIDR minus except."
    fn peer_matches(&self, peer: &crd::Peer, policy_namespace: Option<&str>, other: End) -> bool {
        if let Some(block) = &peer.ip_block {
            let cidr: IpNet = block.cidr.parse().unwrap();
            let except: Vec<IpNet> = block.except.iter().flatten().map(|e| e.parse().unwrap()).collect();
            return cidr.contains(&other.address) && !except.iter().any(|e| e.contains(&other.address));
        }
        let Some(pod) = other.pod else { return false };
        let namespace_ok = match (&peer.namespace_selector, policy_namespace) {
            (Some(ns), _) => selector_matches(ns, &self.namespace_labels(&pod.namespace)),
            (None, Some(own)) => pod.namespace == own,
            (None, None) => true,
        };
        let pod_ok = peer.pod_selector.as_ref().is_none_or(|s| selector_matches(s, &pod.labels));
        namespace_ok && pod_ok
    }

    /// "protocol is TCP, UDP or SCTP (default TCP). endPort makes an
    /// inclusive range. A named port resolves per destination pod from its
    /// container ports; a pod without that name matches nothing."
    fn port_matches(&self, spec: &crd::PortSpec, destination: End, protocol: crd::Protocol, port: u16) -> bool {
        if spec.protocol != protocol {
            return false;
        }
        match &spec.port {
            None => true,
            Some(IntOrString::Int(p)) => {
                let end = spec.end_port.unwrap_or(*p);
                (*p..=end).contains(&(port as i32))
            }
            Some(IntOrString::String(name)) => destination.pod.is_some_and(|pod| {
                pod.ports.iter().any(|c| c.name.as_deref() == Some(name) && c.protocol == protocol && c.port == port)
            }),
        }
    }

    /// "Within a rule, peers are OR-ed and ports are OR-ed; a missing or
    /// empty ports means all ports; a missing from/to means all peers."
    fn rule_matches(
        &self,
        peers: Option<&Vec<crd::Peer>>,
        ports: Option<&Vec<crd::PortSpec>>,
        policy_namespace: Option<&str>,
        other: End,
        destination: End,
        protocol: Option<crd::Protocol>,
        port: u16,
    ) -> bool {
        let peers_ok = match peers {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list.iter().any(|p| self.peer_matches(p, policy_namespace, other)),
        };
        let ports_ok = match ports {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => {
                protocol.is_some_and(|proto| list.iter().any(|s| self.port_matches(s, destination, proto, port)))
            }
        };
        peers_ok && ports_ok
    }

    fn cluster_outcome(
        &self,
        policy: &crd::ClusterConnectionPolicy,
        ingress: bool,
        other: End,
        destination: End,
        protocol: Option<crd::Protocol>,
        port: u16,
    ) -> Option<(Outcome, usize)> {
        let action = |a: crd::Action| match a {
            crd::Action::Allow => Outcome::Allow,
            crd::Action::Deny => Outcome::Deny,
            crd::Action::Pass => Outcome::Pass,
        };
        if ingress {
            for (i, rule) in policy.spec.ingress.iter().flatten().enumerate() {
                if self.rule_matches(rule.from.as_ref(), rule.ports.as_ref(), None, other, destination, protocol, port)
                {
                    return Some((action(rule.action), i));
                }
            }
        } else {
            for (i, rule) in policy.spec.egress.iter().flatten().enumerate() {
                if self.rule_matches(rule.to.as_ref(), rule.ports.as_ref(), None, other, destination, protocol, port) {
                    return Some((action(rule.action), i));
                }
            }
        }
        None
    }

    fn subject_selects(&self, policy: &crd::ClusterConnectionPolicy, pod: &Pod) -> bool {
        let subject = policy.spec.subject.clone().unwrap_or_default();
        subject.namespace_selector.as_ref().is_none_or(|s| selector_matches(s, &self.namespace_labels(&pod.namespace)))
            && subject.pod_selector.as_ref().is_none_or(|s| selector_matches(s, &pod.labels))
    }

    /// The evaluation steps of api.md for one direction of one pod.
    /// `with_audit`: also apply Audit-mode policies (for the audit verdict).
    fn direction_allows(
        &self,
        pod: &Pod,
        ingress: bool,
        other: End,
        protocol: Option<crd::Protocol>,
        port: u16,
        with_audit: bool,
    ) -> bool {
        let me = End { address: IpAddr::V4(Ipv4Addr::UNSPECIFIED), pod: Some(pod) };
        let destination = if ingress { me } else { other };
        let enforced = |mode: crd::Mode| with_audit || mode == crd::Mode::Enforce;
        let mut cluster: Vec<&crd::ClusterConnectionPolicy> = self
            .policies
            .values()
            .filter_map(|p| match p {
                PolicyObject::Cluster(c) if enforced(c.spec.mode) && self.subject_selects(c, pod) => Some(c),
                _ => None,
            })
            .collect();
        cluster.sort_by(|a, b| {
            (a.spec.priority, a.metadata.name.clone()).cmp(&(b.spec.priority, b.metadata.name.clone()))
        });
        // 1. Admin tier.
        'admin: for policy in cluster.iter().filter(|c| c.spec.tier == crd::Tier::Admin) {
            match self.cluster_outcome(policy, ingress, other, destination, protocol, port) {
                Some((Outcome::Allow, _)) => return true,
                Some((Outcome::Deny, _)) => return false,
                Some((Outcome::Pass, _)) => break 'admin,
                None => {}
            }
        }
        // 2. ConnectionPolicies (and NetworkPolicies) that isolate the pod.
        let mut isolated = false;
        let mut allowed = false;
        for policy in self.policies.values() {
            let (namespace, selector, types, rules): (
                String,
                LabelSelector,
                Vec<bool>,
                Vec<(Option<Vec<crd::Peer>>, Option<Vec<crd::PortSpec>>)>,
            ) = match policy {
                PolicyObject::Connection(c) if enforced(c.spec.mode) => {
                    let has_egress = c.spec.egress.as_ref().is_some_and(|e| !e.is_empty());
                    let (i, e) = match &c.spec.policy_types {
                        Some(t) if !t.is_empty() => {
                            (t.contains(&crd::PolicyType::Ingress), t.contains(&crd::PolicyType::Egress))
                        }
                        _ => (true, has_egress),
                    };
                    let rules = if ingress {
                        c.spec.ingress.iter().flatten().map(|r| (r.from.clone(), r.ports.clone())).collect()
                    } else {
                        c.spec.egress.iter().flatten().map(|r| (r.to.clone(), r.ports.clone())).collect()
                    };
                    (c.metadata.namespace.clone().unwrap(), c.spec.pod_selector.clone(), vec![i, e], rules)
                }
                PolicyObject::Network(n) => {
                    let spec = n.spec.clone().unwrap();
                    let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
                    let (i, e) = match &spec.policy_types {
                        Some(t) if !t.is_empty() => (t.iter().any(|x| x == "Ingress"), t.iter().any(|x| x == "Egress")),
                        _ => (true, has_egress),
                    };
                    let to_crd_peers = |peers: &Option<Vec<net::NetworkPolicyPeer>>| {
                        peers.as_ref().map(|list| {
                            list.iter()
                                .map(|p| crd::Peer {
                                    pod_selector: p.pod_selector.clone(),
                                    namespace_selector: p.namespace_selector.clone(),
                                    ip_block: p
                                        .ip_block
                                        .as_ref()
                                        .map(|b| crd::IpBlock { cidr: b.cidr.clone(), except: b.except.clone() }),
                                })
                                .collect()
                        })
                    };
                    let to_crd_ports = |ports: &Option<Vec<net::NetworkPolicyPort>>| {
                        ports.as_ref().map(|list| {
                            list.iter()
                                .map(|p| crd::PortSpec {
                                    protocol: match p.protocol.as_deref() {
                                        Some("UDP") => crd::Protocol::UDP,
                                        Some("SCTP") => crd::Protocol::SCTP,
                                        _ => crd::Protocol::TCP,
                                    },
                                    port: p.port.clone(),
                                    end_port: p.end_port,
                                })
                                .collect()
                        })
                    };
                    let rules = if ingress {
                        spec.ingress.iter().flatten().map(|r| (to_crd_peers(&r.from), to_crd_ports(&r.ports))).collect()
                    } else {
                        spec.egress.iter().flatten().map(|r| (to_crd_peers(&r.to), to_crd_ports(&r.ports))).collect()
                    };
                    (
                        n.metadata.namespace.clone().unwrap(),
                        spec.pod_selector.clone().unwrap_or_default(),
                        vec![i, e],
                        rules,
                    )
                }
                _ => continue,
            };
            if namespace != pod.namespace
                || !selector_matches(&selector, &pod.labels)
                || !types[if ingress { 0 } else { 1 }]
            {
                continue;
            }
            isolated = true;
            allowed |= rules.iter().any(|(peers, ports)| {
                self.rule_matches(peers.as_ref(), ports.as_ref(), Some(&namespace), other, destination, protocol, port)
            });
        }
        if isolated {
            return allowed;
        }
        // 3. Baseline tier.
        for policy in cluster.iter().filter(|c| c.spec.tier == crd::Tier::Baseline) {
            match self.cluster_outcome(policy, ingress, other, destination, protocol, port) {
                Some((Outcome::Allow, _)) => return true,
                Some((Outcome::Deny, _)) => return false,
                Some((Outcome::Pass, _)) => return true,
                None => {}
            }
        }
        // 4. Otherwise allowed.
        true
    }
}

// ---------------------------------------------------------------------------
// Random snapshots.

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const APPS: [&str; 3] = ["web", "db", "api"];
const PORTS: [u16; 4] = [80, 81, 443, 5432];

fn label_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        prop::sample::select(APPS.to_vec()).prop_map(|a| LabelSelector {
            match_labels: Some([("app".to_string(), a.to_string())].into()),
            match_expressions: None
        }),
        (
            prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
            prop::sample::select(APPS.to_vec()),
            any::<bool>()
        )
            .prop_map(|(op, a, on_tier)| {
                let key = if on_tier { "tier" } else { "app" };
                let values = match op {
                    "In" | "NotIn" => Some(vec![a.to_string(), "front".to_string()]),
                    _ => None,
                };
                LabelSelector {
                    match_labels: None,
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: key.into(),
                        operator: op.into(),
                        values,
                    }]),
                }
            }),
    ]
}

fn namespace_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        prop::sample::select(NAMESPACES.to_vec()).prop_map(|n| LabelSelector {
            match_labels: Some([("kubernetes.io/metadata.name".to_string(), n.to_string())].into()),
            match_expressions: None
        }),
        Just(LabelSelector {
            match_labels: Some([("env".to_string(), "prod".to_string())].into()),
            match_expressions: None
        }),
    ]
}

fn ip_block() -> impl Strategy<Value = crd::IpBlock> {
    prop_oneof![
        Just(crd::IpBlock { cidr: "10.244.0.0/16".into(), except: Some(vec!["10.244.1.12/30".into()]) }),
        Just(crd::IpBlock { cidr: "10.244.1.0/28".into(), except: None }),
        Just(crd::IpBlock { cidr: "203.0.113.0/24".into(), except: Some(vec!["203.0.113.128/25".into()]) }),
        Just(crd::IpBlock { cidr: "0.0.0.0/0".into(), except: Some(vec!["10.0.0.0/8".into()]) }),
        Just(crd::IpBlock { cidr: "fd00:10:244::/48".into(), except: Some(vec!["fd00:10:244:0:0:0:1:c/127".into()]) }),
        Just(crd::IpBlock { cidr: "::/0".into(), except: None }),
    ]
}

fn peer() -> impl Strategy<Value = crd::Peer> {
    prop_oneof![
        label_selector().prop_map(|s| crd::Peer { pod_selector: Some(s), ..Default::default() }),
        namespace_selector().prop_map(|s| crd::Peer { namespace_selector: Some(s), ..Default::default() }),
        (label_selector(), namespace_selector()).prop_map(|(p, n)| crd::Peer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ..Default::default()
        }),
        ip_block().prop_map(|b| crd::Peer { ip_block: Some(b), ..Default::default() }),
    ]
}

fn port_spec() -> impl Strategy<Value = crd::PortSpec> {
    let protocol = prop::sample::select(vec![crd::Protocol::TCP, crd::Protocol::UDP, crd::Protocol::SCTP]);
    prop_oneof![
        (protocol.clone(), prop::sample::select(PORTS.to_vec())).prop_map(|(protocol, p)| crd::PortSpec {
            protocol,
            port: Some(IntOrString::Int(p as i32)),
            end_port: None
        }),
        (protocol.clone(), 79u16..90, 0u16..400).prop_map(|(protocol, p, span)| crd::PortSpec {
            protocol,
            port: Some(IntOrString::Int(p as i32)),
            end_port: Some((p + span) as i32)
        }),
        (protocol.clone(), prop::sample::select(vec!["http", "metrics", "missing"])).prop_map(|(protocol, n)| {
            crd::PortSpec { protocol, port: Some(IntOrString::String(n.into())), end_port: None }
        }),
        protocol.prop_map(|protocol| crd::PortSpec { protocol, port: None, end_port: None }),
    ]
}

fn peers() -> impl Strategy<Value = Option<Vec<crd::Peer>>> {
    prop_oneof![1 => Just(None), 3 => prop::collection::vec(peer(), 1..3).prop_map(Some)]
}

fn ports() -> impl Strategy<Value = Option<Vec<crd::PortSpec>>> {
    prop_oneof![1 => Just(None), 2 => prop::collection::vec(port_spec(), 1..3).prop_map(Some)]
}

fn mode() -> impl Strategy<Value = crd::Mode> {
    prop_oneof![4 => Just(crd::Mode::Enforce), 1 => Just(crd::Mode::Audit)]
}

fn connection_policy(index: usize) -> impl Strategy<Value = PolicyObject> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        label_selector(),
        prop::option::of(prop::sample::subsequence(vec![crd::PolicyType::Ingress, crd::PolicyType::Egress], 0..=2)),
        mode(),
        prop::collection::vec((peers(), ports()), 0..3),
        prop::option::of(prop::collection::vec((peers(), ports()), 0..3)),
        any::<bool>(),
    )
        .prop_map(move |(ns, selector, types, mode, ingress, egress, as_network_policy)| {
            let meta = ObjectMeta { name: Some(format!("p{index}")), namespace: Some(ns.into()), ..Default::default() };
            if as_network_policy {
                let np_peers = |p: Option<Vec<crd::Peer>>| {
                    p.map(|l| {
                        l.into_iter()
                            .map(|p| net::NetworkPolicyPeer {
                                pod_selector: p.pod_selector,
                                namespace_selector: p.namespace_selector,
                                ip_block: p.ip_block.map(|b| net::IPBlock { cidr: b.cidr, except: b.except }),
                            })
                            .collect()
                    })
                };
                let np_ports = |p: Option<Vec<crd::PortSpec>>| {
                    p.map(|l| {
                        l.into_iter()
                            .map(|s| net::NetworkPolicyPort {
                                protocol: Some(format!("{:?}", s.protocol)),
                                port: s.port,
                                end_port: s.end_port,
                            })
                            .collect()
                    })
                };
                return PolicyObject::Network(net::NetworkPolicy {
                    metadata: meta,
                    spec: Some(net::NetworkPolicySpec {
                        pod_selector: Some(selector),
                        policy_types: types.map(|t| t.iter().map(|x| format!("{x:?}")).collect()),
                        ingress: Some(
                            ingress
                                .into_iter()
                                .map(|(f, p)| net::NetworkPolicyIngressRule { from: np_peers(f), ports: np_ports(p) })
                                .collect(),
                        ),
                        egress: egress.map(|e| {
                            e.into_iter()
                                .map(|(t, p)| net::NetworkPolicyEgressRule { to: np_peers(t), ports: np_ports(p) })
                                .collect()
                        }),
                    }),
                });
            }
            PolicyObject::Connection(crd::ConnectionPolicy {
                metadata: meta,
                spec: crd::ConnectionPolicySpec {
                    pod_selector: selector,
                    policy_types: types,
                    mode,
                    ingress: Some(ingress.into_iter().map(|(from, ports)| crd::IngressRule { from, ports }).collect()),
                    egress: egress.map(|e| e.into_iter().map(|(to, ports)| crd::EgressRule { to, ports }).collect()),
                },
                status: None,
            })
        })
}

fn action() -> impl Strategy<Value = crd::Action> {
    prop::sample::select(vec![crd::Action::Allow, crd::Action::Deny, crd::Action::Pass])
}

fn cluster_policy(index: usize) -> impl Strategy<Value = PolicyObject> {
    (
        prop_oneof![Just(crd::Tier::Admin), Just(crd::Tier::Baseline)],
        prop::sample::select(vec![1, 5, 5, 10]),
        prop::option::of((prop::option::of(namespace_selector()), prop::option::of(label_selector()))),
        mode(),
        prop::collection::vec((action(), peers(), ports()), 0..3),
        prop::collection::vec((action(), peers(), ports()), 0..3),
    )
        .prop_map(move |(tier, priority, subject, mode, ingress, egress)| {
            PolicyObject::Cluster(crd::ClusterConnectionPolicy {
                metadata: ObjectMeta { name: Some(format!("c{index}")), ..Default::default() },
                spec: crd::ClusterConnectionPolicySpec {
                    tier,
                    priority,
                    subject: subject.map(|(n, p)| crd::Subject { namespace_selector: n, pod_selector: p }),
                    mode,
                    ingress: Some(
                        ingress
                            .into_iter()
                            .map(|(action, from, ports)| crd::ClusterIngressRule { action, from, ports })
                            .collect(),
                    ),
                    egress: Some(
                        egress
                            .into_iter()
                            .map(|(action, to, ports)| crd::ClusterEgressRule { action, to, ports })
                            .collect(),
                    ),
                },
                status: None,
            })
        })
}

fn pod(index: usize) -> impl Strategy<Value = Pod> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        prop::sample::select(APPS.to_vec()),
        prop::option::of(prop::sample::select(vec!["front", "back"])),
        any::<bool>(),
        prop::sample::select(vec![80u16, 81, 8080]),
        prop::sample::select(vec![None, Some("n1"), Some("n2")]),
    )
        .prop_map(move |(ns, app, tier, dual, http_port, node)| {
            let mut labels: BTreeMap<String, String> = [("app".to_string(), app.to_string())].into();
            if let Some(t) = tier {
                labels.insert("tier".into(), t.into());
            }
            let mut ips = vec![IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10 + index as u8))];
            if dual {
                ips.push(IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 1, 10 + index as u16)));
            }
            let mut ports =
                vec![ContainerPort { name: Some("http".into()), port: http_port, protocol: crd::Protocol::TCP }];
            if app == "db" {
                ports.push(ContainerPort { name: Some("metrics".into()), port: 81, protocol: crd::Protocol::UDP });
            }
            let node_name = node.map(bulkhead_policy::Name::from);
            Pod {
                namespace: ns.into(),
                name: format!("pod{index}").into(),
                labels: labels.into(),
                ips,
                ports: ports.into(),
                node_name,
                uid: None,
            }
        })
}

fn cluster() -> impl Strategy<Value = Cluster> {
    (
        prop::collection::vec(pod(0), 2..7).prop_flat_map(|pods| {
            let n = pods.len();
            (0..n).map(pod).collect::<Vec<_>>()
        }),
        prop::collection::vec(0..2usize, 0..5),
        any::<bool>(),
    )
        .prop_flat_map(|(pods, kinds, prod_y)| {
            let policies: Vec<BoxedStrategy<PolicyObject>> = kinds
                .iter()
                .enumerate()
                .map(|(i, k)| if *k == 0 { connection_policy(i).boxed() } else { cluster_policy(i).boxed() })
                .collect();
            (Just(pods), policies, Just(prod_y))
        })
        .prop_map(|(pods, policies, prod_y)| {
            let mut cluster = Cluster::default();
            for ns in NAMESPACES {
                let mut labels = BTreeMap::new();
                if ns == "y" && prod_y {
                    labels.insert("env".to_string(), "prod".to_string());
                }
                cluster.snapshot.add_namespace(Namespace::new(ns, labels));
            }
            for p in pods {
                cluster.snapshot.add_pod(p);
            }
            for p in policies {
                cluster.add_policy(p);
            }
            cluster
        })
}

#[derive(Clone, Debug)]
struct ProbeSpec {
    from: usize,
    to: Result<usize, IpAddr>,
    protocol: crd::Protocol,
    port: u16,
    ipv6: bool,
}

fn probes() -> impl Strategy<Value = Vec<ProbeSpec>> {
    let target = prop_oneof![
        4 => (0usize..7).prop_map(Ok),
        1 => prop::sample::select(vec![
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 200)),
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        ]).prop_map(Err),
    ];
    prop::collection::vec(
        (
            0usize..7,
            target,
            prop::sample::select(vec![crd::Protocol::TCP, crd::Protocol::UDP, crd::Protocol::SCTP]),
            prop::sample::select(vec![80u16, 81, 85, 443, 5432, 8080]),
            any::<bool>(),
        )
            .prop_map(|(from, to, protocol, port, ipv6)| ProbeSpec { from, to, protocol, port, ipv6 }),
        24,
    )
}

/// The two ends of a probe, or None when the pods lack the family.
fn ends<'a>(snapshot: &'a Snapshot, probe: &ProbeSpec) -> Option<(End<'a>, End<'a>)> {
    let pods: Vec<&Pod> = snapshot.pods.values().collect();
    let src = pods.get(probe.from % pods.len())?;
    let dst = match probe.to {
        Ok(i) => {
            let pod = pods.get(i % pods.len())?;
            End { address: *pod.ips.iter().find(|a| a.is_ipv6() == probe.ipv6)?, pod: Some(pod) }
        }
        Err(address) => End { address, pod: None },
    };
    let src = End { address: *src.ips.iter().find(|a| a.is_ipv6() == dst.address.is_ipv6())?, pod: Some(src) };
    Some((src, dst))
}

fn compiled_verdict(
    state: &policy::DesiredState,
    src: End,
    dst: End,
    protocol: crd::Protocol,
    port: u16,
) -> ConnectionVerdict {
    let src_ref = src.pod.map(Pod::pod_ref);
    let dst_ref: Option<PodRef> = dst.pod.map(Pod::pod_ref);
    lookup::connection(
        state,
        (src_ref.as_ref(), src.address),
        (dst_ref.as_ref(), dst.address),
        protocol_number(protocol),
        port,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn compiled_verdicts_match_the_reference(cluster in cluster(), probes in probes()) {
        let snapshot = &cluster.snapshot;
        let state = policy::compile(snapshot);
        prop_assert!(state.rejected.is_empty(), "generated policies are valid: {:?}", state.rejected);
        let reference = Reference::of(&cluster);
        for probe in &probes {
            let Some((src, dst)) = ends(snapshot, probe) else { continue };
            if let (Some(a), Some(b)) = (src.pod, dst.pod) {
                if a.pod_ref() == b.pod_ref() { continue; }
            }
            let verdict = compiled_verdict(&state, src, dst, probe.protocol, probe.port);
            let egress = src.pod.map(|p| reference.direction_allows(p, false, dst, Some(probe.protocol), probe.port, false));
            let ingress = dst.pod.map(|p| reference.direction_allows(p, true, src, Some(probe.protocol), probe.port, false));
            // Where a direction is flagged open, the datapath answers without
            // a lookup what every lookup would have answered.
            for hop in verdict.egress.iter().chain(verdict.ingress.iter()) {
                let endpoint = state.endpoints[&hop.pod].id;
                if state.unrestricted_directions(endpoint) & open_flag(hop.direction) != 0 {
                    prop_assert_eq!(hop.value, PolicyValue::UNRESTRICTED, "open {:?} of {:?}", hop.direction, probe);
                }
            }
            prop_assert_eq!(verdict.egress.as_ref().map(|h| h.allowed()), egress, "egress of {:?}", probe);
            prop_assert_eq!(verdict.ingress.as_ref().map(|h| h.allowed()), ingress, "ingress of {:?}", probe);
            // Audit: reported exactly where the verdict allows and Audit
            // policies, enforced, would deny.
            if let (Some(hop), Some(true)) = (&verdict.egress, egress) {
                let would = reference.direction_allows(src.pod.unwrap(), false, dst, Some(probe.protocol), probe.port, true);
                prop_assert_eq!(hop.value.audit != 0, !would, "egress audit of {:?}", probe);
            }
            if let (Some(hop), Some(true)) = (&verdict.ingress, ingress) {
                let would = reference.direction_allows(dst.pod.unwrap(), true, src, Some(probe.protocol), probe.port, true);
                prop_assert_eq!(hop.value.audit != 0, !would, "ingress audit of {:?}", probe);
            }
        }
        // Protocols without ports (ICMP) follow the all-ports rules.
        for probe in probes.iter().take(4) {
            let Some((src, dst)) = ends(snapshot, probe) else { continue };
            let (Some(s), Some(d)) = (src.pod, dst.pod) else { continue };
            if s.pod_ref() == d.pod_ref() { continue; }
            let icmp = if src.address.is_ipv6() { 58 } else { 1 };
            let verdict = lookup::connection(&state, (Some(&s.pod_ref()), src.address), (Some(&d.pod_ref()), dst.address), icmp, 0);
            let expected = reference.direction_allows(s, false, dst, None, 0, false) && reference.direction_allows(d, true, src, None, 0, false);
            prop_assert_eq!(verdict.allowed(), expected, "ICMP {:?}", probe);
        }
    }

    #[test]
    fn diff_turns_one_state_into_the_other_safely(a in cluster(), b_policies in cluster(), probes in probes()) {
        let a = a.snapshot;
        // Same pods, other policies (and the same pods with b's labels).
        let mut b = a.clone();
        b.policies = b_policies.snapshot.policies.clone();
        for (pod, other) in b.pods.values_mut().zip(b_policies.snapshot.pods.values()) {
            pod.labels = other.labels.clone();
        }
        let old = policy::compile(&a);
        let new = policy::compile(&b);
        let ops = policy::diff(&old, &new);
        let mut state = old.clone();
        let mut intermediate = Vec::new();
        for op in &ops {
            policy::diff::apply_one(&mut state, op);
            intermediate.push(state.clone());
        }
        prop_assert_eq!(&state.policy, &new.policy);
        prop_assert_eq!(&state.ipcache, &new.ipcache);
        // No intermediate state lets a hop (one lookup of the datapath)
        // allow what neither end state allows.
        for mid in intermediate.iter().step_by(1 + intermediate.len() / 16) {
            for probe in &probes {
                let Some((src, dst)) = ends(&a, probe) else { continue };
                if let (Some(x), Some(y)) = (src.pod, dst.pod) { if x.pod_ref() == y.pod_ref() { continue; } }
                let hops = |s: &policy::DesiredState| {
                    let v = compiled_verdict(s, src, dst, probe.protocol, probe.port);
                    (v.egress.map(|h| h.allowed()), v.ingress.map(|h| h.allowed()))
                };
                let (mid_e, mid_i) = hops(mid);
                let (old_e, old_i) = hops(&old);
                let (new_e, new_i) = hops(&new);
                if mid_e == Some(true) {
                    prop_assert!(old_e == Some(true) || new_e == Some(true), "intermediate egress allows {:?}", probe);
                }
                if mid_i == Some(true) {
                    prop_assert!(old_i == Some(true) || new_i == Some(true), "intermediate ingress allows {:?}", probe);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Incremental compile: change by change, the same state a fresh compile gives.

#[derive(Clone, Debug)]
enum Step {
    /// Pod i takes the labels and ports of the other snapshot's pod i.
    Relabel(usize),
    /// A new pod (named `extra<k>`) with the address of pod k: addresses are reused.
    AddReusing(usize),
    DeletePod(usize),
    /// The other snapshot's policy j is applied (same name and namespace: a change).
    ApplyPolicy(usize),
    DeletePolicy(usize),
    ToggleProdY,
    /// Pod i moves to the other node (into or out of a node's scope).
    Reschedule(usize),
    /// Pod i's first address becomes (or stops being) a node address.
    ToggleNodeAddress(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..8usize).prop_map(Step::Relabel),
        1 => (0..8usize).prop_map(Step::AddReusing),
        1 => (0..8usize).prop_map(Step::DeletePod),
        3 => (0..6usize).prop_map(Step::ApplyPolicy),
        1 => (0..6usize).prop_map(Step::DeletePolicy),
        1 => Just(Step::ToggleProdY),
        1 => (0..8usize).prop_map(Step::Reschedule),
        1 => (0..8usize).prop_map(Step::ToggleNodeAddress),
    ]
}

/// Apply a step to `cluster`; what changed, for the compiler.
fn take_step(cluster: &mut Cluster, other: &Cluster, step: &Step) -> Option<policy::Changed> {
    let (snapshot, other_objects, other) = (&mut cluster.snapshot, &other.policies, &other.snapshot);
    let nth_pod = |s: &Snapshot, i: usize| s.pods.keys().nth(i % s.pods.len().max(1)).cloned();
    match step {
        Step::Relabel(i) => {
            let pod_ref = nth_pod(snapshot, *i)?;
            let source = other.pods.values().nth(i % other.pods.len())?;
            let pod = snapshot.pods.get_mut(&pod_ref)?;
            pod.labels = source.labels.clone();
            pod.ports = source.ports.clone();
            Some(policy::Changed::Pod(pod_ref))
        }
        Step::AddReusing(k) => {
            let source = snapshot.pods.values().nth(k % snapshot.pods.len().max(1))?.clone();
            let model = other.pods.values().nth(k % other.pods.len())?;
            let pod = Pod {
                name: format!("extra{k}").into(),
                labels: model.labels.clone(),
                namespace: model.namespace.clone(),
                ..source
            };
            let pod_ref = pod.pod_ref();
            snapshot.add_pod(pod);
            Some(policy::Changed::Pod(pod_ref))
        }
        Step::DeletePod(i) => {
            let pod_ref = nth_pod(snapshot, *i)?;
            snapshot.pods.remove(&pod_ref);
            Some(policy::Changed::Pod(pod_ref))
        }
        Step::ApplyPolicy(j) => {
            let object = other_objects.values().nth(*j)?.clone();
            let policy_ref = object.policy_ref();
            cluster.add_policy(object);
            Some(policy::Changed::Policy(policy_ref))
        }
        Step::DeletePolicy(j) => {
            let policy_ref = snapshot.policies.keys().nth(*j)?.clone();
            cluster.remove_policy(&policy_ref);
            Some(policy::Changed::Policy(policy_ref))
        }
        Step::Reschedule(i) => {
            let pod_ref = nth_pod(snapshot, *i)?;
            let pod = snapshot.pods.get_mut(&pod_ref)?;
            pod.node_name = Some(if pod.node_name.as_deref() == Some("n1") { "n2" } else { "n1" }.into());
            Some(policy::Changed::Pod(pod_ref))
        }
        Step::ToggleProdY => {
            let mut labels = snapshot.namespace_labels("y");
            labels.remove("kubernetes.io/metadata.name");
            if labels.remove("env").is_none() {
                labels.insert("env".into(), "prod".into());
            }
            snapshot.add_namespace(Namespace::new("y", labels));
            Some(policy::Changed::Namespace("y".into()))
        }
        Step::ToggleNodeAddress(i) => {
            let address = *snapshot.pods.values().nth(i % snapshot.pods.len().max(1))?.ips.first()?;
            if !snapshot.node_addresses.remove(&address) {
                snapshot.node_addresses.insert(address);
            }
            Some(policy::Changed::NodeAddresses)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn incremental_updates_equal_a_fresh_compile(a in cluster(), other in cluster(), steps in prop::collection::vec(step(), 1..8), batch in 1..3usize, node_scope in any::<bool>()) {
        // Cluster scope (every pod's entries) or one node's, as an agent compiles.
        let scope = if node_scope {
            policy::compile::Scope::Node { name: "n1".into(), unscheduled_are_local: false }
        } else {
            policy::compile::Scope::Cluster
        };
        let mut compiler = policy::Compiler::scoped(&a.snapshot, scope.clone()).tracking_changes();
        let mut programmed = policy::Compiler::scoped(&a.snapshot, scope.clone()).into_state();
        let mut cluster = a.clone();
        let mut selection = policy::selection::Selection::new(&a.snapshot);
        for chunk in steps.chunks(batch) {
            let changed: Vec<policy::Changed> = chunk.iter().filter_map(|s| take_step(&mut cluster, &other, s)).collect();
            compiler.update(&cluster.snapshot, &changed);
            // Which pods each policy selects, kept the same way.
            selection.update(&cluster.snapshot, &changed);
            let fresh_selection = policy::selection::Selection::new(&cluster.snapshot);
            for policy_ref in cluster.snapshot.policies.keys() {
                let mine: std::collections::BTreeSet<_> = selection.pods_of(policy_ref).collect();
                let theirs: std::collections::BTreeSet<_> = fresh_selection.pods_of(policy_ref).collect();
                prop_assert_eq!(mine, theirs, "selection of {} after {:?}", policy_ref, chunk);
            }
            for node in ["n1", "n2"] {
                let mine: std::collections::BTreeSet<_> = selection.policies_on(node).collect();
                let theirs: std::collections::BTreeSet<_> = fresh_selection.policies_on(node).collect();
                prop_assert_eq!(mine, theirs, "policies on {} after {:?}", node, chunk);
            }
            let fresh = policy::Compiler::scoped(&cluster.snapshot, scope.clone()).into_state();
            prop_assert_eq!(compiler.state(), &fresh, "after {:?}", chunk);
            // The operations it hands out bring the maps there too.
            policy::apply(&mut programmed, &compiler.take_ops());
            prop_assert_eq!(&programmed.policy, &fresh.policy);
            prop_assert_eq!(&programmed.ipcache, &fresh.ipcache);
        }
    }

}
