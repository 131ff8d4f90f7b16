//! Policy objects validated and normalized into one rule model shared by
//! every kind: ClusterConnectionPolicy (Admin and Baseline tiers),
//! ConnectionPolicy and NetworkPolicy (the namespace tier).

use std::{fmt, net::IpAddr};

use bulkhead_crds::{self as crd, Protocol};
use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::{
    model::{PolicyObject, PolicyRef},
    selector::{Labels, Selector},
};
use datapath_common::{EGRESS, INGRESS};

mod cluster_network;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Namespace,
    Baseline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    Pass,
}

/// Which namespaces a selector looks in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// The policy's own namespace (a namespaced peer with only `podSelector`).
    Same(String),
    /// Namespaces whose labels match; the empty selector is every namespace.
    Selected(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Pods { namespaces: NamespaceScope, pods: Selector },
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// Inclusive range; a single port is `start == end`.
    Range { protocol: Protocol, start: u16, end: u16 },
    /// A named container port of the destination pod.
    Named { protocol: Protocol, name: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Position in its direction's rule list: the rule id verdicts report.
    pub index: u32,
    pub action: Action,
    /// `None`: every peer.
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port of every protocol.
    pub ports: Option<Vec<PortMatch>>,
}

/// One policy, validated, in the shape evaluation needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub id: PolicyRef,
    /// `metadata.generation` of the version this was made from.
    pub generation: Option<i64>,
    pub tier: Tier,
    /// Order within the tier (cluster policies); 0 for the namespace tier.
    pub priority: i32,
    pub audit: bool,
    pub subject_namespaces: NamespaceScope,
    pub subject_pods: Selector,
    /// Indexed by direction (`INGRESS`, `EGRESS`): whether the policy isolates
    /// the selected pods that way (namespace tier only).
    pub isolates: [bool; 2],
    /// Indexed by direction.
    pub rules: [Vec<Rule>; 2],
    /// What was accepted but changed on the way in (host bits masked off).
    pub warnings: Vec<ValidationWarning>,
}

impl Policy {
    /// Whether the policy's subject selects a pod of `namespace` (whose
    /// labels are `namespace_labels`) with `pod_labels`.
    pub fn selects(&self, namespace: &str, namespace_labels: &Labels, pod_labels: &Labels) -> bool {
        self.selects_namespace(namespace, namespace_labels) && self.subject_pods.matches(pod_labels)
    }

    /// Whether the policy's subject takes in pods of `namespace` at all.
    pub fn selects_namespace(&self, namespace: &str, namespace_labels: &Labels) -> bool {
        match &self.subject_namespaces {
            NamespaceScope::Same(ns) => ns == namespace,
            NamespaceScope::Selected(selector) => selector.matches(namespace_labels),
        }
    }
}

/// Why a policy was not accepted: the `Accepted=False` condition reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    InvalidSelector,
    InvalidCIDR,
    InvalidPort,
    InvalidProtocol,
    InvalidPeer,
    InvalidPriority,
    InvalidObject,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {field}: {message}")]
pub struct ValidationError {
    pub policy: PolicyRef,
    /// JSON path of the offending field, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    pub reason: Reason,
    pub message: String,
}

/// Something accepted as Kubernetes implementations accept it, but worth
/// telling the operator (a Warning Event, `bulkhead validate`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationWarning {
    /// The Warning Event's reason, e.g. `HostBitsMasked`.
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

struct Ctx<'a> {
    policy: &'a PolicyRef,
    generation: Option<i64>,
    warnings: std::cell::RefCell<Vec<ValidationWarning>>,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: Reason, message: impl Into<String>) -> ValidationError {
        ValidationError { policy: self.policy.clone(), field: field.into(), reason, message: message.into() }
    }

    fn selector(&self, field: &str, selector: &LabelSelector) -> Result<Selector, ValidationError> {
        Selector::parse(selector).map_err(|(sub, why)| self.err(format!("{field}.{sub}"), Reason::InvalidSelector, why))
    }

    fn cidr(&self, field: &str, text: &str) -> Result<IpNet, ValidationError> {
        let net: IpNet = text.parse().map_err(|_| {
            self.err(field, Reason::InvalidCIDR, format!("{text:?} is not a CIDR (address/prefix-length)"))
        })?;
        // The API server accepts host bits, and Kubernetes implementations
        // mask them off: so does Bulkhead, and says so.
        if net.trunc() != net {
            self.warnings.borrow_mut().push(ValidationWarning {
                reason: "HostBitsMasked",
                field: field.to_string(),
                message: format!("{text:?} has host bits set: enforced as {}", net.trunc()),
            });
        }
        Ok(net.trunc())
    }

    fn ip_block(&self, field: &str, cidr: &str, except: &[String]) -> Result<Peer, ValidationError> {
        let cidr = self.cidr(&format!("{field}.cidr"), cidr)?;
        let mut holes = Vec::new();
        for (index, text) in except.iter().enumerate() {
            let hole_field = format!("{field}.except[{index}]");
            let hole = self.cidr(&hole_field, text)?;
            if !same_family(&cidr, &hole) || !cidr.contains(&hole) || hole == cidr {
                return Err(self.err(
                    hole_field,
                    Reason::InvalidCIDR,
                    format!("{hole} is not strictly inside cidr {cidr}"),
                ));
            }
            holes.push(hole);
        }
        holes.sort();
        holes.dedup();
        Ok(Peer::IpBlock { cidr, except: holes })
    }

    fn port(
        &self,
        field: &str,
        protocol: Protocol,
        port: Option<&IntOrString>,
        end_port: Option<i32>,
    ) -> Result<PortMatch, ValidationError> {
        let number = |value: i32, name: &str| self.port_number(&format!("{field}.{name}"), value);
        match port {
            None => {
                if end_port.is_some() {
                    return Err(self.err(
                        format!("{field}.endPort"),
                        Reason::InvalidPort,
                        "endPort needs a numeric port",
                    ));
                }
                Ok(PortMatch::Range { protocol, start: 0, end: u16::MAX })
            }
            Some(IntOrString::Int(value)) => {
                let start = number(*value, "port")?;
                let end = match end_port {
                    None => start,
                    Some(end) => {
                        let end = number(end, "endPort")?;
                        if end < start {
                            return Err(self.err(
                                format!("{field}.endPort"),
                                Reason::InvalidPort,
                                format!("endPort {end} is below port {start}"),
                            ));
                        }
                        end
                    }
                };
                Ok(PortMatch::Range { protocol, start, end })
            }
            Some(IntOrString::String(name)) => {
                if let Ok(value) = name.parse::<i32>() {
                    return self.port(field, protocol, Some(&IntOrString::Int(value)), end_port);
                }
                if end_port.is_some() {
                    return Err(self.err(
                        format!("{field}.endPort"),
                        Reason::InvalidPort,
                        format!("endPort cannot be used with the named port {name:?}"),
                    ));
                }
                self.port_name(&format!("{field}.port"), name)?;
                Ok(PortMatch::Named { protocol, name: name.clone() })
            }
        }
    }

    fn port_number(&self, field: &str, value: i32) -> Result<u16, ValidationError> {
        u16::try_from(value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.err(field, Reason::InvalidPort, format!("{value} is not a port number (1-65535)")))
    }

    fn port_name(&self, field: &str, name: &str) -> Result<(), ValidationError> {
        if is_port_name(name) {
            return Ok(());
        }
        Err(self.err(
            field,
            Reason::InvalidPort,
            format!("{name:?} is not a port name (up to 15 lowercase letters, digits and '-', with a letter)"),
        ))
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!((a, b), (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_)))
}

/// An IANA service name, as Kubernetes validates container port names.
fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Validate and normalize one policy object.
pub fn normalize(object: &PolicyObject) -> Result<Policy, ValidationError> {
    let id = object.policy_ref();
    let ctx = Ctx { policy: &id, generation: object.generation(), warnings: Default::default() };
    let mut policy = match object {
        PolicyObject::Connection(policy) => connection_policy(&ctx, &policy.spec),
        PolicyObject::Network(policy) => network_policy(&ctx, policy.spec.as_ref()),
        PolicyObject::Cluster(policy) => cluster_policy(&ctx, &policy.spec),
        PolicyObject::ClusterNetwork(policy) => cluster_network::cluster_network_policy(&ctx, &policy.spec),
    }?;
    policy.warnings = ctx.warnings.into_inner();
    Ok(policy)
}

fn rule_ports(
    ctx: &Ctx,
    field: &str,
    ports: Option<&Vec<crd::PortSpec>>,
) -> Result<Option<Vec<PortMatch>>, ValidationError> {
    match ports {
        None => Ok(None),
        Some(list) if list.is_empty() => Ok(None),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, p)| ctx.port(&format!("{field}[{i}]"), p.protocol, p.port.as_ref(), p.end_port))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

fn crd_peers(
    ctx: &Ctx,
    field: &str,
    peers: Option<&Vec<crd::Peer>>,
    cluster: bool,
) -> Result<Option<Vec<Peer>>, ValidationError> {
    let Some(list) = peers.filter(|l| !l.is_empty()) else { return Ok(None) };
    list.iter()
        .enumerate()
        .map(|(i, peer)| {
            peer_of(
                ctx,
                &format!("{field}[{i}]"),
                peer.pod_selector.as_ref(),
                peer.namespace_selector.as_ref(),
                peer.ip_block.as_ref().map(|b| (b.cidr.as_str(), b.except.clone().unwrap_or_default())),
                cluster,
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn peer_of(
    ctx: &Ctx,
    field: &str,
    pod_selector: Option<&LabelSelector>,
    namespace_selector: Option<&LabelSelector>,
    ip_block: Option<(&str, Vec<String>)>,
    cluster: bool,
) -> Result<Peer, ValidationError> {
    match (pod_selector, namespace_selector, ip_block) {
        (None, None, Some((cidr, except))) => ctx.ip_block(&format!("{field}.ipBlock"), cidr, &except),
        (_, _, Some(_)) => {
            Err(ctx.err(field, Reason::InvalidPeer, "ipBlock cannot be combined with podSelector or namespaceSelector"))
        }
        (None, None, None) => {
            Err(ctx.err(field, Reason::InvalidPeer, "a peer needs podSelector, namespaceSelector or ipBlock"))
        }
        (pods, namespaces, None) => {
            let pods = match pods {
                Some(s) => ctx.selector(&format!("{field}.podSelector"), s)?,
                None => Selector::everything(),
            };
            let namespaces = match namespaces {
                Some(s) => NamespaceScope::Selected(ctx.selector(&format!("{field}.namespaceSelector"), s)?),
                // A cluster policy's podSelector alone looks in every namespace.
                None if cluster => NamespaceScope::Selected(Selector::everything()),
                None => NamespaceScope::Same(ctx.policy.namespace.clone()),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

/// NetworkPolicy defaulting of `policyTypes`: Ingress always, Egress when egress rules are given.
fn isolation(types: Option<&[crd::PolicyType]>, has_egress_rules: bool) -> [bool; 2] {
    let mut isolates = [false; 2];
    match types {
        Some(types) if !types.is_empty() => {
            for t in types {
                match t {
                    crd::PolicyType::Ingress => isolates[INGRESS as usize] = true,
                    crd::PolicyType::Egress => isolates[EGRESS as usize] = true,
                }
            }
        }
        _ => {
            isolates[INGRESS as usize] = true;
            isolates[EGRESS as usize] = has_egress_rules;
        }
    }
    isolates
}

/// One rule of any kind, before validation.
struct RuleSpec<'a> {
    action: Action,
    peers: Option<&'a Vec<crd::Peer>>,
    ports: Option<&'a Vec<crd::PortSpec>>,
}

/// Validate the rules of one direction; `peers_field` is `from` or `to`.
fn direction_rules<'a>(
    ctx: &Ctx,
    direction: &str,
    peers_field: &str,
    specs: impl Iterator<Item = RuleSpec<'a>>,
    cluster: bool,
) -> Result<Vec<Rule>, ValidationError> {
    specs
        .enumerate()
        .map(|(i, spec)| {
            let field = format!("spec.{direction}[{i}]");
            Ok(Rule {
                index: i as u32,
                action: spec.action,
                peers: crd_peers(ctx, &format!("{field}.{peers_field}"), spec.peers, cluster)?,
                ports: rule_ports(ctx, &format!("{field}.ports"), spec.ports)?,
            })
        })
        .collect()
}

fn connection_policy(ctx: &Ctx, spec: &crd::ConnectionPolicySpec) -> Result<Policy, ValidationError> {
    let subject_pods = ctx.selector("spec.podSelector", &spec.pod_selector)?;
    let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let isolates = isolation(spec.policy_types.as_deref(), has_egress);
    let ingress = spec.ingress.iter().flatten().map(|r| RuleSpec {
        action: Action::Allow,
        peers: r.from.as_ref(),
        ports: r.ports.as_ref(),
    });
    let egress = spec.egress.iter().flatten().map(|r| RuleSpec {
        action: Action::Allow,
        peers: r.to.as_ref(),
        ports: r.ports.as_ref(),
    });
    Ok(Policy {
        id: ctx.policy.clone(),
        generation: ctx.generation,
        warnings: Vec::new(),
        tier: Tier::Namespace,
        priority: 0,
        audit: spec.mode == crd::Mode::Audit,
        subject_namespaces: NamespaceScope::Same(ctx.policy.namespace.clone()),
        subject_pods,
        isolates,
        rules: [
            direction_rules(ctx, "ingress", "from", ingress, false)?,
            direction_rules(ctx, "egress", "to", egress, false)?,
        ],
    })
}

/// A rule's peers and ports in the CRDs' shape.
type RuleParts = (Option<Vec<crd::Peer>>, Option<Vec<crd::PortSpec>>);

/// A NetworkPolicy rule in the CRDs' shape (the same fields, with the
/// protocol validated), so both kinds share one validation.
fn network_rule(
    ctx: &Ctx,
    field: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<RuleParts, ValidationError> {
    let peers = peers.map(|list| {
        list.iter()
            .map(|p| crd::Peer {
                pod_selector: p.pod_selector.clone(),
                namespace_selector: p.namespace_selector.clone(),
                ip_block: p.ip_block.as_ref().map(|b| crd::IpBlock { cidr: b.cidr.clone(), except: b.except.clone() }),
            })
            .collect()
    });
    let ports = match ports {
        None => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| {
                    let protocol = match p.protocol.as_deref() {
                        None | Some("TCP") => Protocol::TCP,
                        Some("UDP") => Protocol::UDP,
                        Some("SCTP") => Protocol::SCTP,
                        Some(other) => {
                            return Err(ctx.err(
                                format!("{field}.ports[{i}].protocol"),
                                Reason::InvalidProtocol,
                                format!("unknown protocol {other:?}: TCP, UDP or SCTP"),
                            ))
                        }
                    };
                    Ok(crd::PortSpec { protocol, port: p.port.clone(), end_port: p.end_port })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok((peers, ports))
}

fn allow_rule((peers, ports): &RuleParts) -> RuleSpec<'_> {
    RuleSpec { action: Action::Allow, peers: peers.as_ref(), ports: ports.as_ref() }
}

fn network_policy(
    ctx: &Ctx,
    spec: Option<&k8s_openapi::api::networking::v1::NetworkPolicySpec>,
) -> Result<Policy, ValidationError> {
    let default_spec = Default::default();
    let spec = spec.unwrap_or(&default_spec);
    let subject_pods = match &spec.pod_selector {
        Some(s) => ctx.selector("spec.podSelector", s)?,
        None => Selector::everything(),
    };
    let types: Option<Vec<crd::PolicyType>> = match &spec.policy_types {
        None => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "Ingress" => Ok(crd::PolicyType::Ingress),
                    "Egress" => Ok(crd::PolicyType::Egress),
                    other => Err(ctx.err(
                        format!("spec.policyTypes[{i}]"),
                        Reason::InvalidObject,
                        format!("unknown policy type {other:?}: Ingress or Egress"),
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let isolates = isolation(types.as_deref(), has_egress);
    let ingress: Vec<_> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| network_rule(ctx, &format!("spec.ingress[{i}]"), r.from.as_ref(), r.ports.as_ref()))
        .collect::<Result<_, _>>()?;
    let egress: Vec<_> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| network_rule(ctx, &format!("spec.egress[{i}]"), r.to.as_ref(), r.ports.as_ref()))
        .collect::<Result<_, _>>()?;
    Ok(Policy {
        id: ctx.policy.clone(),
        generation: ctx.generation,
        warnings: Vec::new(),
        tier: Tier::Namespace,
        priority: 0,
        audit: false,
        subject_namespaces: NamespaceScope::Same(ctx.policy.namespace.clone()),
        subject_pods,
        isolates,
        rules: [
            direction_rules(ctx, "ingress", "from", ingress.iter().map(allow_rule), false)?,
            direction_rules(ctx, "egress", "to", egress.iter().map(allow_rule), false)?,
        ],
    })
}

fn cluster_policy(ctx: &Ctx, spec: &crd::ClusterConnectionPolicySpec) -> Result<Policy, ValidationError> {
    if !(0..=1000).contains(&spec.priority) {
        return Err(ctx.err("spec.priority", Reason::InvalidPriority, format!("{} is outside 0..1000", spec.priority)));
    }
    let subject = spec.subject.clone().unwrap_or_default();
    let subject_namespaces = match &subject.namespace_selector {
        Some(s) => NamespaceScope::Selected(ctx.selector("spec.subject.namespaceSelector", s)?),
        None => NamespaceScope::Selected(Selector::everything()),
    };
    let subject_pods = match &subject.pod_selector {
        Some(s) => ctx.selector("spec.subject.podSelector", s)?,
        None => Selector::everything(),
    };
    let action = |a: crd::Action| match a {
        crd::Action::Allow => Action::Allow,
        crd::Action::Deny => Action::Deny,
        crd::Action::Pass => Action::Pass,
    };
    let ingress = spec.ingress.iter().flatten().map(|r| RuleSpec {
        action: action(r.action),
        peers: r.from.as_ref(),
        ports: r.ports.as_ref(),
    });
    let egress = spec.egress.iter().flatten().map(|r| RuleSpec {
        action: action(r.action),
        peers: r.to.as_ref(),
        ports: r.ports.as_ref(),
    });
    Ok(Policy {
        id: ctx.policy.clone(),
        generation: ctx.generation,
        warnings: Vec::new(),
        tier: match spec.tier {
            crd::Tier::Admin => Tier::Admin,
            crd::Tier::Baseline => Tier::Baseline,
        },
        priority: spec.priority,
        audit: spec.mode == crd::Mode::Audit,
        subject_namespaces,
        subject_pods,
        isolates: [false; 2],
        rules: [
            direction_rules(ctx, "ingress", "from", ingress, true)?,
            direction_rules(ctx, "egress", "to", egress, true)?,
        ],
    })
}

/// Whether an address is in an ipBlock: inside `cidr` and outside every `except`.
pub fn ip_block_contains(cidr: &IpNet, except: &[IpNet], address: IpAddr) -> bool {
    cidr.contains(&address) && !except.iter().any(|e| e.contains(&address))
}
