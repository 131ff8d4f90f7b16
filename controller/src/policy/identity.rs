//! Identities: pods with the same namespace, labels and named ports share
//! one; every CIDR an ipBlock mentions (cidr and except) gets one; the node is
//! HOST and every other address WORLD.
//!
//! A pod address that falls inside a mentioned CIDR gets an identity of its
//! own (the pod's labels plus that CIDR), so ipBlock peers match pod
//! addresses too, as the Kubernetes e2e suite expects, while pod selectors
//! still match the pod.
//!
//! Numbers are derived from a hash of the identity's key, probing in key
//! order on a collision: the same snapshot always gives the same numbers, and
//! a change elsewhere in the cluster does not renumber an identity.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use bulkhead_crds::Protocol;
use ipnet::IpNet;

use super::selector::Labels;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKey {
    Pod {
        namespace: String,
        labels: Labels,
        /// (name, protocol) → port: egress rules with named ports resolve against it.
        named_ports: BTreeMap<(String, Protocol), u16>,
        /// The longest ipBlock CIDR containing this address, if any.
        cidr: Option<IpNet>,
    },
    Cidr(IpNet),
}

impl IdentityKey {
    pub fn describe(&self) -> String {
        match self {
            IdentityKey::Pod { namespace, labels, cidr, .. } => {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                match cidr {
                    Some(c) => format!("pods of {namespace} with {{{}}} in {c}", labels.join(",")),
                    None => format!("pods of {namespace} with {{{}}}", labels.join(",")),
                }
            }
            IdentityKey::Cidr(net) => format!("addresses in {net}"),
        }
    }
}

/// FNV-1a, 64 bits: stable across runs and platforms (unlike `DefaultHasher`).
pub fn stable_hash(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in text.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x100000001b3);
    }
    hash
}

/// Give each key (iterated in order) a number in `[base, base + space)`
/// from its hash, probing upward on a collision.
pub fn allocate<'a, K: Ord + Clone + 'a>(
    keys: impl IntoIterator<Item = &'a K>,
    base: u32,
    space: u32,
    hash: impl Fn(&K) -> u64,
) -> BTreeMap<K, u32> {
    let mut used = HashSet::new();
    let mut out = BTreeMap::new();
    for key in keys {
        let mut slot = (hash(key) % space as u64) as u32;
        while !used.insert(slot) {
            slot = (slot + 1) % space;
        }
        out.insert(key.clone(), base + slot);
    }
    out
}

pub fn identity_hash(key: &IdentityKey) -> u64 {
    stable_hash(&format!("{key:?}"))
}

/// The longest prefix of `prefixes` containing `address`.
pub fn longest_prefix(prefixes: &BTreeSet<IpNet>, by_len: &[HashSet<IpNet>], address: std::net::IpAddr) -> Option<IpNet> {
    let _ = prefixes;
    let max = if address.is_ipv4() { 32 } else { 128 };
    for len in (0..=max).rev() {
        let set = &by_len[len as usize];
        if set.is_empty() {
            continue;
        }
        let net = IpNet::new(address, len).expect("length within family").trunc();
        if set.contains(&net) {
            return Some(net);
        }
    }
    None
}
