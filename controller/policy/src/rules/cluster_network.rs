//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) into the one
//! rule model: the same tiers, priorities and first-match rules as a
//! ClusterConnectionPolicy, with the upstream shapes checked here (exactly
//! one field where the reference says so, since the schema carries no CEL).

use bulkhead_crds::{policy_networking as cnp, Protocol};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{
    Action, Ctx, NamespaceScope, Peer, Policy, PortMatch, Reason, Rule, Tier, ValidationError, ValidationWarning,
};
use crate::selector::Selector;

pub(super) fn cluster_network_policy(
    ctx: &Ctx,
    spec: &cnp::ClusterNetworkPolicySpec,
) -> Result<Policy, ValidationError> {
    if !(0..=1000).contains(&spec.priority) {
        return Err(ctx.err("spec.priority", Reason::InvalidPriority, format!("{} is outside 0..1000", spec.priority)));
    }
    let (subject_namespaces, subject_pods) =
        pods_peer(ctx, "spec.subject", spec.subject.namespaces.as_ref(), spec.subject.pods.as_ref())?;
    let ingress = spec.ingress.iter().flatten().enumerate().map(|(i, rule)| {
        let field = format!("spec.ingress[{i}]");
        let peers = non_empty(ctx, &format!("{field}.from"), &rule.from)?
            .iter()
            .enumerate()
            .map(|(p, peer)| {
                let (namespaces, pods) =
                    pods_peer(ctx, &format!("{field}.from[{p}]"), peer.namespaces.as_ref(), peer.pods.as_ref())?;
                Ok(Peer::Pods { namespaces, pods })
            })
            .collect::<Result<Vec<_>, ValidationError>>()?;
        rule_of(ctx, &field, i, rule.action, Some(peers), rule.protocols.as_ref())
    });
    let ingress = ingress.collect::<Result<Vec<_>, _>>()?;
    let egress = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, rule)| {
            let field = format!("spec.egress[{i}]");
            let peers = egress_peers(ctx, &field, rule)?;
            rule_of(ctx, &field, i, rule.action, peers, rule.protocols.as_ref())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Policy {
        id: ctx.policy.clone(),
        generation: ctx.generation,
        warnings: Vec::new(),
        tier: match spec.tier {
            cnp::Tier::Admin => Tier::Admin,
            cnp::Tier::Baseline => Tier::Baseline,
        },
        priority: spec.priority,
        audit: false,
        subject_namespaces,
        subject_pods,
        isolates: [false; 2],
        rules: [ingress, egress],
    })
}

fn non_empty<'a, T>(ctx: &Ctx, field: &str, list: &'a [T]) -> Result<&'a [T], ValidationError> {
    if list.is_empty() {
        return Err(ctx.err(field, Reason::InvalidPeer, "needs at least one peer"));
    }
    Ok(list)
}

/// A subject or peer of pods: `namespaces` (every pod there) or `pods`
/// (these pods there), exactly one.
fn pods_peer(
    ctx: &Ctx,
    field: &str,
    namespaces: Option<&LabelSelector>,
    pods: Option<&cnp::NamespacedPod>,
) -> Result<(NamespaceScope, Selector), ValidationError> {
    match (namespaces, pods) {
        (Some(namespaces), None) => Ok((
            NamespaceScope::Selected(ctx.selector(&format!("{field}.namespaces"), namespaces)?),
            Selector::everything(),
        )),
        (None, Some(pods)) => Ok((
            NamespaceScope::Selected(
                ctx.selector(&format!("{field}.pods.namespaceSelector"), &pods.namespace_selector)?,
            ),
            ctx.selector(&format!("{field}.pods.podSelector"), &pods.pod_selector)?,
        )),
        _ => Err(ctx.err(field, Reason::InvalidPeer, "exactly one of namespaces and pods")),
    }
}

/// An egress rule's destinations. Peers Bulkhead does not support (the
/// experimental `nodes` and `domainNames`) never widen what is allowed: an
/// Accept or Pass rule matches nothing through them, a Deny rule matches
/// every destination (the reference leaves this to implementations).
fn egress_peers(ctx: &Ctx, field: &str, rule: &cnp::EgressRule) -> Result<Option<Vec<Peer>>, ValidationError> {
    let mut peers = Vec::new();
    for (p, peer) in non_empty(ctx, &format!("{field}.to"), &rule.to)?.iter().enumerate() {
        let field = format!("{field}.to[{p}]");
        let set = [
            peer.namespaces.is_some(),
            peer.pods.is_some(),
            peer.networks.is_some(),
            peer.nodes.is_some(),
            peer.domain_names.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err(ctx.err(
                field,
                Reason::InvalidPeer,
                "exactly one of namespaces, pods, networks, nodes and domainNames",
            ));
        }
        if let Some(networks) = &peer.networks {
            if networks.is_empty() {
                return Err(ctx.err(format!("{field}.networks"), Reason::InvalidCIDR, "needs at least one CIDR"));
            }
            for (n, cidr) in networks.iter().enumerate() {
                peers.push(Peer::IpBlock {
                    cidr: ctx.cidr(&format!("{field}.networks[{n}]"), cidr)?,
                    except: Vec::new(),
                });
            }
        } else if peer.nodes.is_some() || peer.domain_names.is_some() {
            let which = if peer.nodes.is_some() { "nodes" } else { "domainNames" };
            // A Pass matching more would skip the tier's later Deny rules.
            let deny_everything = rule.action == cnp::RuleAction::Deny;
            ctx.warnings.borrow_mut().push(ValidationWarning {
                reason: "UnsupportedPeer",
                field: format!("{field}.{which}"),
                message: if deny_everything {
                    format!("{which} peers are not supported: this Deny rule matches every destination")
                } else {
                    format!("{which} peers are not supported: this {:?} rule matches nothing through it", rule.action)
                },
            });
            if deny_everything {
                return Ok(None);
            }
        } else {
            let (namespaces, pods) = pods_peer(ctx, &field, peer.namespaces.as_ref(), peer.pods.as_ref())?;
            peers.push(Peer::Pods { namespaces, pods });
        }
    }
    Ok(Some(peers))
}

fn rule_of(
    ctx: &Ctx,
    field: &str,
    index: usize,
    action: cnp::RuleAction,
    peers: Option<Vec<Peer>>,
    protocols: Option<&Vec<cnp::ProtocolMatch>>,
) -> Result<Rule, ValidationError> {
    let ports = match protocols {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(ctx.err(format!("{field}.protocols"), Reason::InvalidProtocol, "left out, or at least one"))
        }
        Some(list) => {
            let mut ports = Vec::new();
            for (p, protocol) in list.iter().enumerate() {
                ports.extend(protocol_ports(ctx, &format!("{field}.protocols[{p}]"), protocol)?);
            }
            Some(ports)
        }
    };
    let action = match action {
        cnp::RuleAction::Accept => Action::Allow,
        cnp::RuleAction::Deny => Action::Deny,
        cnp::RuleAction::Pass => Action::Pass,
    };
    Ok(Rule { index: index as u32, action, peers, ports })
}

fn protocol_ports(ctx: &Ctx, field: &str, protocol: &cnp::ProtocolMatch) -> Result<Vec<PortMatch>, ValidationError> {
    match (&protocol.tcp, &protocol.udp, &protocol.sctp, &protocol.destination_named_port) {
        (Some(port), None, None, None) => Ok(vec![port_of(ctx, &format!("{field}.tcp"), Protocol::TCP, port)?]),
        (None, Some(port), None, None) => Ok(vec![port_of(ctx, &format!("{field}.udp"), Protocol::UDP, port)?]),
        (None, None, Some(port), None) => Ok(vec![port_of(ctx, &format!("{field}.sctp"), Protocol::SCTP, port)?]),
        (None, None, None, Some(name)) => {
            ctx.port_name(&format!("{field}.destinationNamedPort"), name)?;
            // A container port's name is unique in its pod, whatever its protocol.
            Ok([Protocol::TCP, Protocol::UDP, Protocol::SCTP]
                .into_iter()
                .map(|protocol| PortMatch::Named { protocol, name: name.clone() })
                .collect())
        }
        _ => Err(ctx.err(field, Reason::InvalidProtocol, "exactly one of tcp, udp, sctp and destinationNamedPort")),
    }
}

fn port_of(ctx: &Ctx, field: &str, protocol: Protocol, port: &cnp::ProtocolPort) -> Result<PortMatch, ValidationError> {
    let number = |value: i32, name: &str| ctx.port_number(&format!("{field}.destinationPort.{name}"), value);
    let Some(port) = &port.destination_port else {
        return Ok(PortMatch::Range { protocol, start: 0, end: u16::MAX });
    };
    match (port.number, &port.range) {
        (Some(value), None) => {
            let port = number(value, "number")?;
            Ok(PortMatch::Range { protocol, start: port, end: port })
        }
        (None, Some(range)) => {
            let (start, end) = (number(range.start, "range.start")?, number(range.end, "range.end")?);
            if start >= end {
                return Err(ctx.err(
                    format!("{field}.destinationPort.range"),
                    Reason::InvalidPort,
                    format!("start {start} must be below end {end}"),
                ));
            }
            Ok(PortMatch::Range { protocol, start, end })
        }
        _ => Err(ctx.err(format!("{field}.destinationPort"), Reason::InvalidPort, "exactly one of number and range")),
    }
}
