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

use std::{collections::BTreeMap, sync::Arc};

use bulkhead_crds::Protocol;
use foldhash::{HashSet, HashSetExt};
use ipnet::IpNet;

use crate::{selector::Labels, shared::Name};

/// A pod's named container ports: (name, protocol) → port.
pub type NamedPorts = BTreeMap<(String, Protocol), u16>;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKey {
    Pod {
        namespace: Name,
        labels: Arc<Labels>,
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
    let mut hash = Fnv::default();
    hash.feed(text);
    hash.0
}

/// `stable_hash` of a value's `Debug` text, fed as it is formatted rather
/// than built into a string first: the numbering of every identity, pod
/// and policy hashes this way, so the numbers stay what they always were.
pub fn stable_debug_hash(value: &impl std::fmt::Debug) -> u64 {
    use std::fmt::Write;
    let mut hash = Fnv::default();
    write!(hash, "{value:?}").expect("hashing never fails");
    hash.0
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf29ce484222325)
    }
}

impl Fnv {
    fn feed(&mut self, text: &str) {
        for byte in text.bytes() {
            self.0 ^= byte as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

impl std::fmt::Write for Fnv {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.feed(text);
        Ok(())
    }
}

/// Numbers for a set of keys, each in `[base, base + space)` from its hash,
/// probing upward on a collision, keys taken in order. Kept as a set so a
/// key can be added or removed without renumbering the rest — allowed only
/// while no key sits away from its hash's slot, so the numbers are always
/// exactly those a fresh numbering of the same keys would give.
pub struct Numbering<K> {
    base: u32,
    space: u32,
    numbers: BTreeMap<K, u32>,
    taken: HashSet<u32>,
    /// Keys moved off their hash's slot by a collision.
    displaced: usize,
}

impl<K: Ord + Clone> Numbering<K> {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a K>, base: u32, space: u32, hash: impl Fn(&K) -> u64) -> Self
    where
        K: 'a,
    {
        let mut numbering = Numbering { base, space, numbers: BTreeMap::new(), taken: HashSet::new(), displaced: 0 };
        for key in keys {
            let home = numbering.home(key, &hash);
            let mut slot = home;
            while !numbering.taken.insert(slot) {
                slot = (slot + 1) % space;
            }
            if slot != home {
                numbering.displaced += 1;
            }
            numbering.numbers.insert(key.clone(), base + slot);
        }
        numbering
    }

    fn home(&self, key: &K, hash: &impl Fn(&K) -> u64) -> u32 {
        (hash(key) % self.space as u64) as u32
    }

    pub fn get(&self, key: &K) -> Option<u32> {
        self.numbers.get(key).copied()
    }

    pub fn numbers(&self) -> &BTreeMap<K, u32> {
        &self.numbers
    }

    /// Whether all of `keys` can be added without renumbering: each slot is
    /// free and no two of them share one.
    pub fn can_add_all<'a>(&self, keys: impl IntoIterator<Item = &'a K>, hash: impl Fn(&K) -> u64) -> bool
    where
        K: 'a,
    {
        let mut claimed = HashSet::new();
        keys.into_iter().filter(|k| !self.numbers.contains_key(*k)).all(|k| {
            let slot = self.home(k, &hash);
            !self.taken.contains(&slot) && claimed.insert(slot)
        })
    }

    /// Whether keys can be removed without renumbering the rest.
    pub fn can_remove(&self) -> bool {
        self.displaced == 0
    }

    /// Add a key `can_add` allowed; its number.
    pub fn add(&mut self, key: &K, hash: impl Fn(&K) -> u64) -> u32 {
        if let Some(number) = self.numbers.get(key) {
            return *number;
        }
        let slot = self.home(key, &hash);
        assert!(self.taken.insert(slot), "Numbering::add without can_add");
        self.numbers.insert(key.clone(), self.base + slot);
        self.base + slot
    }

    /// Remove a key (when `can_remove`).
    pub fn remove(&mut self, key: &K) {
        assert!(self.can_remove(), "Numbering::remove with displaced keys");
        if let Some(number) = self.numbers.remove(key) {
            self.taken.remove(&(number - self.base));
        }
    }
}

pub fn identity_hash(key: &IdentityKey) -> u64 {
    stable_debug_hash(key)
}

/// The longest prefix of `prefixes` containing `address`.
pub fn longest_prefix(by_len: &[HashSet<IpNet>], address: std::net::IpAddr) -> Option<IpNet> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_1a_of_known_text() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(stable_hash(""), 0xcbf29ce484222325);
        assert_eq!(stable_hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(stable_hash("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn a_debug_hash_is_the_hash_of_the_debug_text() {
        let labels: Labels = [("app".to_string(), "web".to_string()), ("tier".to_string(), "front".to_string())].into();
        let keys = [
            IdentityKey::Pod {
                namespace: "shop".into(),
                labels: Arc::new(labels),
                named_ports: [(("http".to_string(), Protocol::TCP), 8080)].into(),
                cidr: Some("10.0.0.0/8".parse().unwrap()),
            },
            IdentityKey::Cidr("192.0.2.0/24".parse().unwrap()),
        ];
        for key in &keys {
            assert_eq!(stable_debug_hash(key), stable_hash(&format!("{key:?}")), "{key:?}");
            assert_eq!(identity_hash(key), stable_hash(&format!("{key:?}")));
        }
    }
}
