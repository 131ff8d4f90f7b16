//! What compiling produces: the state the datapath's maps should hold, in
//! the datapath's key format (`datapath-common`), with the names behind its
//! numbers. `compile` writes it, `diff` compares two of them, `lookup` reads
//! one as the datapath would.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use bulkhead_crds::Protocol;
use datapath_common::{
    identity, ipv4_mapped, open_flag, policy_prefix, proto, PolicyKey, PolicyValue, EGRESS, INGRESS, IPV4_MAPPED_PREFIX,
};
use ipnet::IpNet;

use crate::{
    identity::IdentityKey,
    model::{PodRef, PolicyRef},
    rules::ValidationError,
    shared::Name,
};

/// An ipcache key: prefix length over the 16-byte (IPv4-mapped) address.
pub type IpcacheKey = (u32, [u8; 16]);
/// A policy trie key: prefix length and key data.
pub type PolicyEntryKey = (u32, PolicyKey);

/// The protocols with ports, in the order verdict functions list them.
pub const PORT_PROTOCOLS: [Protocol; 3] = [Protocol::TCP, Protocol::UDP, Protocol::SCTP];

pub fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::TCP => proto::TCP,
        Protocol::UDP => proto::UDP,
        Protocol::SCTP => proto::SCTP,
    }
}

/// An address as the datapath keys it: IPv6, or IPv4 mapped into IPv6.
pub fn address_key(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The ipcache key of one whole address (/32 IPv4-mapped, or /128).
pub fn full_address_key(address: IpAddr) -> IpcacheKey {
    let length = if address.is_ipv4() { IPV4_MAPPED_PREFIX + 32 } else { 128 };
    (length, address_key(address))
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
    pub node_name: Option<Name>,
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

    /// Every policy entry of one endpoint: one range per prefix length, as
    /// the map is ordered by prefix length first.
    pub fn entries_of(&self, endpoint: u32) -> impl Iterator<Item = (&PolicyEntryKey, &PolicyValue)> {
        let lengths = std::iter::once(policy_prefix::ANY_PROTOCOL).chain(policy_prefix::ANY_PORT..=policy_prefix::FULL);
        lengths.flat_map(move |length| {
            let first = (length, PolicyKey::new(endpoint, 0, 0, 0, 0));
            self.policy.range(first..).take_while(move |((l, key), _)| *l == length && key.endpoint() == endpoint)
        })
    }

    /// Every endpoint some policy entry belongs to.
    pub fn endpoint_ids(&self) -> BTreeSet<u32> {
        self.policy.keys().map(|(_, key)| key.endpoint()).collect()
    }

    /// The directions no policy restricts for `endpoint`, as
    /// `ENDPOINT_FLAG_OPEN_*` flags: those whose only entry is the any-peer,
    /// any-protocol `PolicyValue::UNRESTRICTED`, so that every lookup that
    /// way answers it. The datapath then answers it without a lookup.
    pub fn unrestricted_directions(&self, endpoint: u32) -> u32 {
        // Per direction (`INGRESS` 0, `EGRESS` 1): entries seen, and whether
        // all of them were the unrestricted one.
        let mut seen = [0usize; 2];
        let mut unrestricted = [true; 2];
        for ((length, key), value) in self.entries_of(endpoint) {
            let Some(direction) = [INGRESS, EGRESS].iter().position(|d| *d == key.direction()) else {
                continue;
            };
            seen[direction] += 1;
            unrestricted[direction] &= *length == policy_prefix::ANY_PROTOCOL
                && key.identity() == identity::ANY
                && *value == PolicyValue::UNRESTRICTED;
            // An isolated pod's entries can number 100k: stop once neither
            // direction can be open.
            if (0..2).all(|at| seen[at] > 1 || !unrestricted[at]) {
                return 0;
            }
        }
        [INGRESS, EGRESS]
            .iter()
            .enumerate()
            .filter(|(at, _)| seen[*at] == 1 && unrestricted[*at])
            .fold(0, |flags, (_, direction)| flags | open_flag(*direction))
    }
}
