//! `BH_DROPS` and `BH_VERDICTS`: per-CPU counters of dropped packets (by
//! reason) and of blocked and audited connections (by policy and rule).

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

crate::user_pod!(VerdictKey);
