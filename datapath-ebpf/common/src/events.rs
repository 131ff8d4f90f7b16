//! `BH_EVENTS` (ring buffer) and `BH_EVENT_BUDGET`: deny, audit and new-flow
//! events to the agent, within a per-CPU budget.

use crate::address::Address;

pub const EVENT_DENY: u8 = 1;
pub const EVENT_AUDIT: u8 = 2;
/// A new allowed egress flow (only when `CONFIG_FLOW_EVENTS` is set; not counted as a verdict).
pub const EVENT_NEW_FLOW: u8 = 3;

/// Which hook produced an event.
pub const SOURCE_TC: u8 = 0;
pub const SOURCE_CGROUP: u8 = 1;

/// A deny or audit verdict, sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    pub timestamp_ns: u64,
    pub saddr: Address,
    pub daddr: Address,
    pub endpoint: u32,
    pub peer_identity: u32,
    pub policy_id: u32,
    pub rule: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub direction: u8,
    /// `EVENT_DENY` or `EVENT_AUDIT`.
    pub kind: u8,
    /// `SOURCE_TC` or `SOURCE_CGROUP`.
    pub source: u8,
}

/// Per-CPU token bucket for events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub sent: u64,
    /// The clock tick (jiffies) at which the spent budget's window was last
    /// looked at.
    pub spent_tick: u64,
}

crate::user_pod!(Event, EventBudget);
