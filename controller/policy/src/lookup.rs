//! Verdicts read from a compiled state exactly as the datapath reads its
//! maps: ipcache longest prefix for the peer's identity, then the policy entries
//! with the peer's identity and, on a miss, with "any peer"; the most
//! specific protocol/port prefix wins; no entry denies.

use std::net::IpAddr;

use datapath_common::{identity, policy_prefix, verdict, PolicyKey, PolicyValue, EGRESS, INGRESS, IPV4_MAPPED_PREFIX};

use crate::model::PodRef;
use crate::state::{address_key, DesiredState};

/// The identity the datapath would give an address.
pub fn peer_identity(state: &DesiredState, address: IpAddr) -> u32 {
    let key = address_key(address);
    let (min, max) = if address.is_ipv4() { (IPV4_MAPPED_PREFIX, IPV4_MAPPED_PREFIX + 32) } else { (0, 128) };
    for len in (min..=max).rev() {
        let masked = mask(key, len);
        if let Some(id) = state.ipcache.get(&(len, masked)) {
            return *id;
        }
    }
    identity::WORLD
}

fn mask(mut bytes: [u8; 16], len: u32) -> [u8; 16] {
    for (i, byte) in bytes.iter_mut().enumerate() {
        let bit = i as u32 * 8;
        if bit >= len {
            *byte = 0;
        } else if bit + 8 > len {
            *byte &= 0xffu8 << (8 - (len - bit));
        }
    }
    bytes
}

fn lpm(state: &DesiredState, endpoint: u32, direction: u8, peer: u32, protocol: u8, port: u16) -> Option<PolicyValue> {
    for bits in (0..=16u32).rev() {
        let masked = if bits == 0 { 0 } else { port & (0xffffu16 << (16 - bits)) };
        let key = PolicyKey::new(endpoint, direction, peer, protocol, masked);
        if let Some(value) = state.policy.get(&(policy_prefix::ANY_PORT + bits, key)) {
            return Some(*value);
        }
    }
    state.policy.get(&(policy_prefix::ANY_PROTOCOL, PolicyKey::new(endpoint, direction, peer, 0, 0))).copied()
}

/// The policy entry the datapath would find for one hop.
pub fn lookup_policy(
    state: &DesiredState,
    endpoint: u32,
    direction: u8,
    peer: u32,
    protocol: u8,
    port: u16,
) -> PolicyValue {
    lpm(state, endpoint, direction, peer, protocol, port)
        .or_else(|| lpm(state, endpoint, direction, identity::ANY, protocol, port))
        .unwrap_or(PolicyValue::NO_ENTRY)
}

/// One hop's verdict: which endpoint, which way, and what the datapath decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub pod: PodRef,
    pub direction: u8,
    pub peer_identity: u32,
    pub value: PolicyValue,
}

impl Hop {
    pub fn allowed(&self) -> bool {
        self.peer_identity == identity::HOST || self.value.verdict == verdict::ALLOW
    }
}

/// A connection's verdict: the source pod's egress hop and the destination
/// pod's ingress hop (absent for an outside address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionVerdict {
    pub egress: Option<Hop>,
    pub ingress: Option<Hop>,
}

impl ConnectionVerdict {
    pub fn allowed(&self) -> bool {
        self.egress.as_ref().is_none_or(Hop::allowed) && self.ingress.as_ref().is_none_or(Hop::allowed)
    }

    /// The hop that refused, if any.
    pub fn denied_by(&self) -> Option<&Hop> {
        self.egress.iter().chain(self.ingress.iter()).find(|h| !h.allowed())
    }
}

/// Judge a connection from `src` to `dst`: each an address, and the pod
/// owning it when it is one.
pub fn connection(
    state: &DesiredState,
    src: (Option<&PodRef>, IpAddr),
    dst: (Option<&PodRef>, IpAddr),
    protocol: u8,
    port: u16,
) -> ConnectionVerdict {
    let hop = |pod: &PodRef, direction: u8, peer_address: IpAddr| {
        let endpoint = state.endpoints.get(pod)?;
        let peer = peer_identity(state, peer_address);
        Some(Hop {
            pod: pod.clone(),
            direction,
            peer_identity: peer,
            value: lookup_policy(state, endpoint.id, direction, peer, protocol, port),
        })
    };
    ConnectionVerdict {
        egress: src.0.and_then(|pod| hop(pod, EGRESS, dst.1)),
        ingress: dst.0.and_then(|pod| hop(pod, INGRESS, src.1)),
    }
}
