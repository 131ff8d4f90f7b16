//! `BH_DROPS`, `BH_VERDICT_SLOTS` and `BH_VERDICTS`: per-CPU counters of
//! dropped packets (by reason) and of blocked and audited connections (by
//! pod, policy and rule).

use crate::{hash::placement_hash, NO_ENDPOINT};

/// Why a packet was dropped (or, for the `*_SEEN` ones, counted).
pub mod reason {
    pub const POLICY_DENIED: u8 = 1;
    pub const SPOOFED_SOURCE: u8 = 2;
    pub const MALFORMED: u8 = 3;
    pub const UNKNOWN_FRAGMENT: u8 = 4;
    pub const NO_ENDPOINT: u8 = 5;
    pub const POLICY_REVOKED: u8 = 6;
    pub const ENDPOINT_FAIL_CLOSED: u8 = 7;
    pub const UNSUPPORTED_L3: u8 = 8;
    /// The agent was writing the exact-table set a new connection needed,
    /// through every retry: the packet is dropped rather than judged on a
    /// guess (the sender retransmits).
    pub const TABLE_BUSY: u8 = 9;
    /// Not drops: events the rate limit kept from userspace.
    pub const EVENT_RATE_LIMITED: u8 = 32;
    /// Not drops: a new connection displaced the least recently seen one of
    /// its full conntrack set, or was not stored (another CPU was writing
    /// the way it would have taken).
    pub const CONNTRACK_FULL: u8 = 33;

    pub const fn name(reason: u8) -> &'static str {
        match reason {
            POLICY_DENIED => "policy_denied",
            SPOOFED_SOURCE => "spoofed_source",
            MALFORMED => "malformed",
            UNKNOWN_FRAGMENT => "unknown_fragment",
            NO_ENDPOINT => "no_endpoint",
            POLICY_REVOKED => "policy_revoked",
            ENDPOINT_FAIL_CLOSED => "endpoint_fail_closed",
            UNSUPPORTED_L3 => "unsupported_l3",
            TABLE_BUSY => "table_busy",
            EVENT_RATE_LIMITED => "event_rate_limited",
            CONNTRACK_FULL => "conntrack_full",
            _ => "unknown",
        }
    }
}

/// Drop reasons each direction has a counter for (`reason` values are below).
pub const DROP_REASONS: u32 = 64;

/// Which drop counter: one per direction and reason, the labels of
/// `bulkhead_dropped_packets_total`. Not per endpoint: the counters are a
/// per-CPU array the verifier indexes inline, where a hash keyed by
/// endpoint cost a hash lookup on every dropped packet of a flood. The
/// pod a refusal concerns is in the verdict counters and the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub direction: u8,
    pub reason: u8,
}

impl DropKey {
    /// Its index in `map_names::DROPS`, among `capacity::DROPS`.
    #[inline(always)]
    pub const fn slot(self) -> u32 {
        (self.direction as u32 & 1) * DROP_REASONS + (self.reason as u32 & (DROP_REASONS - 1))
    }

    pub const fn of_slot(slot: u32) -> Self {
        DropKey { direction: (slot / DROP_REASONS) as u8, reason: (slot % DROP_REASONS) as u8 }
    }
}

/// Key of the per-CPU connection-verdict counters (blocked and audited flows).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerdictKey {
    pub endpoint: u32,
    pub policy_id: u32,
    pub rule: u32,
    pub direction: u8,
    /// `EVENT_DENY` or `EVENT_AUDIT`.
    pub kind: u8,
    pub _pad: [u8; 2],
}

impl VerdictKey {
    /// The key as two words: what a slot compares and a placement hashes.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        // SAFETY: repr(C) of 16 bytes without implicit padding; any bit
        // pattern is a valid pair of words.
        unsafe { core::mem::transmute::<VerdictKey, [u64; 2]>(*self) }
    }

    /// Its slot among CPU `cpu`'s in `map_names::VERDICT_SLOTS`, for CPUs
    /// below `VERDICT_SLOT_CPUS`. Unseeded: keys that collide only share a
    /// slot, and the one that comes second is counted in the hash, as every
    /// key was before the slots.
    #[inline(always)]
    pub fn slot(&self, cpu: u32) -> u32 {
        let [first, second] = self.words();
        let within = (placement_hash([first, second], 0) >> 17) as u32 & (VERDICT_SLOTS_PER_CPU - 1);
        cpu * VERDICT_SLOTS_PER_CPU + within
    }
}

/// Verdict slots of each CPU: a node's verdict keys (pod, policy, rule,
/// direction) are hundreds.
pub const VERDICT_SLOTS_PER_CPU: u32 = 256;
/// CPUs with verdict slots; refusals on CPUs past them are counted in the hash.
pub const VERDICT_SLOT_CPUS: u32 = 256;

/// One connection-verdict counter of `map_names::VERDICT_SLOTS`: the key it
/// counts for (a key of `NO_ENDPOINT`, which no verdict names, when free)
/// and that key's count on the slot's CPU.
///
/// A program takes a free slot of its CPU for its key and counts there from
/// then on; a key whose slot another key holds is counted in the hash
/// (`map_names::VERDICTS`). Userspace adds both up, so a count is exact
/// wherever it lands; the slot only saves the hash lookup, a helper call
/// and a jhash, on every refusal. The key's endpoint is what says a slot is
/// held: a program taking a slot writes it last, the agent reads it first
/// and, to free the slot of a pod gone, sets the count to 0 and then the
/// endpoint to `NO_ENDPOINT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictSlot {
    pub key: VerdictKey,
    pub count: u64,
}

impl VerdictSlot {
    pub const fn is_free(&self) -> bool {
        self.key.endpoint == NO_ENDPOINT
    }
}

/// Keep the key's endpoint field the first word's low half, as `is_free`
/// and the words' comparison assume.
const _: () = assert!(core::mem::offset_of!(VerdictKey, endpoint) == 0);

crate::user_pod!(VerdictKey, VerdictSlot);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{EGRESS, EVENT_DENY};

    #[test]
    fn verdict_slots_spread_keys_and_stay_within_their_cpu() {
        let mut used = std::collections::BTreeSet::new();
        for endpoint in 1..=32 {
            for rule in 0..2 {
                let key =
                    VerdictKey { endpoint, policy_id: 7, rule, direction: EGRESS, kind: EVENT_DENY, _pad: [0; 2] };
                let slot = key.slot(3);
                assert!((3 * VERDICT_SLOTS_PER_CPU..4 * VERDICT_SLOTS_PER_CPU).contains(&slot));
                assert_eq!(key.slot(0), slot - 3 * VERDICT_SLOTS_PER_CPU, "the same place on every CPU");
                used.insert(slot);
            }
        }
        // 64 keys into 256 slots: a uniform hash leaves most alone.
        assert!(used.len() > 48, "{} slots for 64 keys", used.len());
        let key = VerdictKey { endpoint: 3, policy_id: 1, rule: 2, direction: EGRESS, kind: EVENT_DENY, _pad: [0; 2] };
        let [first, _] = key.words();
        assert_eq!(first as u32, 3, "the endpoint is the first word's low half");
        assert!(VerdictSlot { key: VerdictKey { endpoint: NO_ENDPOINT, ..key }, count: 0 }.is_free());
        assert!(!VerdictSlot { key, count: 0 }.is_free());
    }
}
