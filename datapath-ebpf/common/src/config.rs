//! `BH_CONFIG`: the slots of the array the agent tunes the programs with.

/// Slots of the `CONFIG` array.
pub const CONFIG_POLICY_REVISION: u32 = 0;
/// Events per second each CPU may send to userspace; the rest are counted.
pub const CONFIG_EVENTS_PER_SECOND: u32 = 1;
/// Non-zero: every new allowed egress flow sends an `EVENT_NEW_FLOW` event
/// (within the same budget), from which the agent learns each workload's
/// egress baseline.
pub const CONFIG_FLOW_EVENTS: u32 = 2;
/// The seed of conntrack's and the exact tables' placement hashes: random,
/// written once when the maps are created (a new seed would strand every
/// stored entry), so nobody outside can aim connections or addresses at one
/// set.
pub const CONFIG_HASH_SEED: u32 = 3;
pub const CONFIG_SLOTS: u32 = 4;
