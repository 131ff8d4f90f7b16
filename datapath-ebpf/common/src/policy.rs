//! `BH_POLICY` (LPM trie), `BH_POLICY_TAB` and its overflow `BH_POLICY_EX`:
//! each endpoint's verdict per direction, peer identity, protocol and port.

use crate::{
    capacity,
    hash::{pair, placement_hash},
    table::TableSlot,
};

/// The slot of `map_names::POLICY_PREFIXED` that counts the trie entries of
/// one endpoint, direction and peer identity (every trie entry names all
/// three: its prefix is at least `policy_prefix::ANY_PROTOCOL`). Slots are
/// shared by hash: a count that is not zero says "walk the trie", which is
/// never wrong, only slower; zero says no entry there, which the agent keeps
/// true by counting an entry before writing it and after removing it.
#[inline(always)]
pub fn prefixed_slot(endpoint: u32, direction: u8, identity: u32) -> u32 {
    placement_hash([pair(endpoint, identity), u64::from(direction)], 0) as u32 & (capacity::POLICY_PREFIXED - 1)
}

/// Length in bits of the parts of a policy key, in key order.
pub mod policy_prefix {
    /// endpoint (32) + direction (8) + identity (32): any protocol, any port.
    pub const ANY_PROTOCOL: u32 = 72;
    /// + protocol (8): any port of that protocol.
    pub const ANY_PORT: u32 = 80;
    /// + port (16).
    pub const FULL: u32 = 96;
}

/// Policy verdicts stored in `PolicyValue::verdict`.
pub mod verdict {
    pub const DENY: u8 = 0;
    pub const ALLOW: u8 = 1;
}

/// Key data of the per-endpoint policy LPM trie. Field order is the order of
/// specificity: endpoint, direction, peer identity, protocol, port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    endpoint: [u8; 4],
    direction: u8,
    identity: [u8; 4],
    protocol: u8,
    port: [u8; 2],
}

impl PolicyKey {
    pub const fn new(endpoint: u32, direction: u8, identity: u32, protocol: u8, port: u16) -> Self {
        Self {
            endpoint: endpoint.to_be_bytes(),
            direction,
            identity: identity.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
        }
    }
    pub const fn endpoint(&self) -> u32 {
        u32::from_be_bytes(self.endpoint)
    }
    pub const fn direction(&self) -> u8 {
        self.direction
    }
    pub const fn identity(&self) -> u32 {
        u32::from_be_bytes(self.identity)
    }
    pub const fn protocol(&self) -> u8 {
        self.protocol
    }
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Key of the exact policy hash: a full-length entry (one peer identity or
/// `identity::ANY`, one protocol, one port), which is the most specific match
/// there can be for its peer, so a hit here is what the trie would answer.
/// Plain integers in host byte order: no prefix is ever taken of this key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyExactKey {
    pub endpoint: u32,
    pub identity: u32,
    pub port: u16,
    pub protocol: u8,
    pub direction: u8,
}

impl PolicyExactKey {
    /// Built as three 32-bit words, the way `words` reads it: a 32-bit read
    /// of fields stored separately (port, protocol, direction) would wait
    /// for those stores to reach the cache instead of taking them from the
    /// store buffer, on every packet that looks a policy entry up.
    #[inline(always)]
    pub fn new(endpoint: u32, identity: u32, protocol: u8, port: u16, direction: u8) -> Self {
        let rest = u32::from_ne_bytes({
            let [port_0, port_1] = port.to_ne_bytes();
            [port_0, port_1, protocol, direction]
        });
        // SAFETY: repr(C) of three u32-sized parts, any bit pattern valid.
        unsafe { core::mem::transmute::<[u32; 3], PolicyExactKey>([endpoint, identity, rest]) }
    }

    #[inline(always)]
    pub fn words(&self) -> [u32; 3] {
        // SAFETY: as in `new`.
        unsafe { core::mem::transmute::<PolicyExactKey, [u32; 3]>(*self) }
    }
}

impl From<PolicyKey> for PolicyExactKey {
    fn from(key: PolicyKey) -> Self {
        PolicyExactKey {
            endpoint: key.endpoint(),
            identity: key.identity(),
            port: key.port(),
            protocol: key.protocol(),
            direction: key.direction(),
        }
    }
}

impl From<PolicyExactKey> for PolicyKey {
    fn from(key: PolicyExactKey) -> Self {
        PolicyKey::new(key.endpoint, key.direction, key.identity, key.protocol, key.port)
    }
}

/// Value of the policy trie and the exact policy hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyValue {
    /// `verdict::ALLOW` or `verdict::DENY`.
    pub verdict: u8,
    /// 1 when an Audit-mode rule would have denied what this entry allows.
    pub audit: u8,
    pub _pad: [u8; 2],
    /// Policy and rule that decided the verdict (`policy_id` 0: no policy,
    /// the default of an isolated or unisolated pod).
    pub policy_id: u32,
    pub rule: u32,
    /// The Audit-mode policy and rule that would have denied.
    pub audit_policy_id: u32,
    pub audit_rule: u32,
}

/// Rule index meaning "no rule matched; denied because the pod is isolated".
pub const RULE_DEFAULT_DENY: u32 = u32::MAX;

impl PolicyValue {
    /// What a lookup that finds no entry answers: deny, decided by no policy.
    pub const NO_ENTRY: PolicyValue = PolicyValue::new(verdict::DENY, 0, RULE_DEFAULT_DENY);

    /// What every lookup of a direction no policy restricts answers: allow,
    /// decided by no policy (`ENDPOINT_FLAG_OPEN_EGRESS`).
    pub const UNRESTRICTED: PolicyValue = PolicyValue::new(verdict::ALLOW, 0, 0);

    /// A verdict and the policy and rule that decided it.
    pub const fn new(verdict: u8, policy_id: u32, rule: u32) -> Self {
        PolicyValue { verdict, audit: 0, _pad: [0; 2], policy_id, rule, audit_policy_id: 0, audit_rule: 0 }
    }

    /// The same verdict, with the Audit-mode rule that would have denied it.
    pub const fn with_audit(self, audit_policy_id: u32, audit_rule: u32) -> Self {
        PolicyValue { audit: 1, audit_policy_id, audit_rule, ..self }
    }
}

/// An exact policy entry: one peer (or any peer), one protocol, one port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicySlot {
    pub key: PolicyExactKey,
    pub value: PolicyValue,
}

impl TableSlot for PolicySlot {
    type Key = PolicyExactKey;
    type Value = PolicyValue;
    #[inline(always)]
    fn new(key: PolicyExactKey, value: PolicyValue) -> Self {
        PolicySlot { key, value }
    }
    #[inline(always)]
    fn key(&self) -> &PolicyExactKey {
        &self.key
    }
    #[inline(always)]
    fn value(&self) -> &PolicyValue {
        &self.value
    }
    #[inline(always)]
    fn words(key: &PolicyExactKey) -> [u64; 2] {
        let [endpoint, identity, rest] = key.words();
        [pair(endpoint, identity), u64::from(rest)]
    }
}

crate::user_pod!(PolicyKey, PolicyExactKey, PolicyValue, PolicySlot);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{proto, EGRESS};
    #[test]
    fn exact_policy_keys_round_trip() {
        let key = PolicyKey::new(7, EGRESS, 300, proto::UDP, 53);
        assert_eq!(PolicyKey::from(PolicyExactKey::from(key)), key);
        let built = PolicyExactKey::new(7, 300, proto::UDP, 53, EGRESS);
        assert_eq!(
            built,
            PolicyExactKey { endpoint: 7, identity: 300, port: 53, protocol: proto::UDP, direction: EGRESS }
        );
        assert_eq!(built.words()[..2], [7, 300]);
    }

    #[test]
    fn policy_key_orders_fields_for_prefix_matching() {
        let key = PolicyKey::new(0x01020304, EGRESS, 0x0a0b0c0d, proto::TCP, 8080);
        // SAFETY: PolicyKey is repr(C) of 12 bytes with alignment 1.
        let bytes: [u8; 12] = unsafe { core::mem::transmute(key) };
        assert_eq!(bytes, [1, 2, 3, 4, EGRESS, 0x0a, 0x0b, 0x0c, 0x0d, proto::TCP, 0x1f, 0x90]);
        assert_eq!(key.port(), 8080);
        assert_eq!(key.identity(), 0x0a0b0c0d);
    }
}
