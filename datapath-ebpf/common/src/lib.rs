//! The ABI between Bulkhead's eBPF programs and userspace.
//!
//! Every map the datapath uses is named here, with its capacity and the exact
//! byte layout of its keys and values. Multi-byte fields that take part in a
//! longest-prefix match are stored as big-endian byte arrays, because the
//! kernel's LPM trie compares keys bit by bit from the first byte; the
//! constructors and getters are the only place that converts. This file is
//! the index (every map's name and capacity); each map family's layouts are
//! a module of their own.
//!
//! Types are `#[repr(C)]` with explicit padding and no `bool`, so that every
//! byte of a key is defined (hash maps compare all bytes).
#![no_std]

mod address;
mod config;
mod conntrack;
mod counters;
mod endpoint;
mod events;
mod hash;
mod ipcache;
mod policy;
mod table;

pub use address::*;
pub use config::*;
pub use conntrack::*;
pub use counters::*;
pub use endpoint::*;
pub use events::*;
pub use ipcache::*;
pub use policy::*;
pub use table::*;

/// `unsafe impl aya::Pod` for map types, in userspace builds only.
macro_rules! user_pod {
    ($($type:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: every map type is `#[repr(C)]`, `Copy`, made only of
            // integers and byte arrays, with every padding byte an explicit
            // field: any bit pattern is valid and no byte is uninitialised.
            unsafe impl aya::Pod for $type {}
        )*
    };
}
pub(crate) use user_pod;

pub mod map_names {
    pub const IPCACHE: &str = "BH_IPCACHE";
    /// Full-length ipcache entries (pod and node addresses) whose set in
    /// `IPCACHE_TABLE` was full: the table's overflow.
    pub const IPCACHE_EXACT: &str = "BH_IPCACHE_EX";
    pub const ENDPOINTS: &str = "BH_ENDPOINTS";
    /// The same endpoints indexed by ifindex, for interfaces numbered below
    /// `capacity::ENDPOINTS_BY_IFINDEX`: an array lookup the verifier inlines
    /// (no call, no hashing) on every packet. `ENDPOINTS` stays the record.
    pub const ENDPOINTS_BY_IFINDEX: &str = "BH_ENDPOINTS_IX";
    pub const CGROUP_ENDPOINTS: &str = "BH_CG_ENDPOINTS";
    pub const LOCAL_ADDRS: &str = "BH_LOCAL_ADDRS";
    pub const POLICY: &str = "BH_POLICY";
    /// Which (endpoint, direction, peer) have entries in `POLICY`: counts
    /// by `prefixed_slot`, so a lookup walks the trie only where it can
    /// find something.
    pub const POLICY_PREFIXED: &str = "BH_PREFIXED";
    /// Full-length policy entries (one peer or any peer, one protocol, one
    /// port) whose set in `POLICY_TABLE` was full: the table's overflow.
    pub const POLICY_EXACT: &str = "BH_POLICY_EX";
    /// The exact tables (`TableSet`): full-length entries, found without a
    /// trie walk or a hash lookup.
    pub const IPCACHE_TABLE: &str = "BH_IPCACHE_TAB";
    pub const POLICY_TABLE: &str = "BH_POLICY_TAB";
    /// Conntrack slots: `CONNTRACK_WAYS` planes of one slot per set (see
    /// `ConntrackSlot`).
    pub const CONNTRACK: &str = "BH_CONNTRACK";
    /// One `ConntrackTags` per conntrack set: what a lookup reads first.
    pub const CONNTRACK_TAGS: &str = "BH_CT_TAGS";
    pub const FRAGMENTS: &str = "BH_FRAGMENTS";
    /// Connections refused recently (`RefusalSet`): a retransmission of a
    /// refused connection is dropped without being counted or reported again.
    pub const REFUSED: &str = "BH_REFUSED";
    /// Per-CPU drop counters by `DropKey::slot`.
    pub const DROPS: &str = "BH_DROP_COUNTS";
    /// Connection-verdict counters, `VERDICT_SLOTS_PER_CPU` for each CPU, by
    /// `VerdictKey::slot` (`VerdictSlot`): found without a helper call, and
    /// read and freed by the agent in place. Keys whose slot another key
    /// holds are counted in `VERDICTS`.
    pub const VERDICT_SLOTS: &str = "BH_VERDICT_SLOTS";
    pub const VERDICTS: &str = "BH_VERDICTS";
    pub const EVENTS: &str = "BH_EVENTS";
    pub const EVENT_BUDGET: &str = "BH_EVENT_BUDGET";
    pub const CONFIG: &str = "BH_CONFIG";
}

pub mod program_names {
    /// TC on the host side of a pod's veth, host ingress: packets the pod sends.
    pub const FROM_POD: &str = "bulkhead_from_pod";
    /// TC on the host side of a pod's veth, host egress: packets to the pod.
    pub const TO_POD: &str = "bulkhead_to_pod";
    pub const CONNECT4: &str = "bulkhead_connect4";
    pub const CONNECT6: &str = "bulkhead_connect6";
    pub const SENDMSG4: &str = "bulkhead_sendmsg4";
    pub const SENDMSG6: &str = "bulkhead_sendmsg6";
    /// Benchmarks only: `FROM_POD` on a packet whose source port moves on by
    /// one each run, so BPF_PROG_TEST_RUN's repeats are all new connections.
    pub const BENCH_NEW_FLOW: &str = "bulkhead_bench_new_flow";
}

pub mod capacity {
    pub const IPCACHE: u32 = 1 << 20;
    pub const IPCACHE_EXACT: u32 = 1 << 20;
    pub const ENDPOINTS: u32 = 1 << 14;
    pub const ENDPOINTS_BY_IFINDEX: u32 = 1 << 16;
    pub const LOCAL_ADDRS: u32 = 1 << 15;
    pub const POLICY: u32 = 1 << 21;
    pub const POLICY_EXACT: u32 = 1 << 21;
    /// Slots of `map_names::POLICY_PREFIXED` (256 KiB).
    pub const POLICY_PREFIXED: u32 = 1 << 16;
    /// Sets of the exact tables (`TABLE_WAYS` entries each): 256k
    /// addresses in 10 MiB and 1M policy entries in 40 MiB.
    pub const IPCACHE_TABLE_SETS: u32 = 1 << 15;
    pub const POLICY_TABLE_SETS: u32 = 1 << 17;
    /// Connections: `CONNTRACK_SETS` sets of `CONNTRACK_WAYS`.
    pub const CONNTRACK: u32 = CONNTRACK_SETS * super::CONNTRACK_WAYS as u32;
    pub const CONNTRACK_SETS: u32 = 1 << 15;
    pub const FRAGMENTS: u32 = 1 << 13;
    /// Refused connections: `REFUSED_SETS` sets of `REFUSAL_WAYS` (64k, 512 KiB).
    pub const REFUSED_SETS: u32 = 1 << 13;
    pub const DROPS: u32 = 2 * super::DROP_REASONS;
    /// 1.5 MiB.
    pub const VERDICT_SLOTS: u32 = super::VERDICT_SLOTS_PER_CPU * super::VERDICT_SLOT_CPUS;
    pub const VERDICTS: u32 = 1 << 16;
    pub const EVENTS_BYTES: u32 = 1 << 20;
    pub const CONFIG: u32 = super::CONFIG_SLOTS;
}

/// Traffic direction from the pod's point of view.
pub const INGRESS: u8 = 0;
pub const EGRESS: u8 = 1;

/// Reserved identities. Allocated identities start at `FIRST_ALLOCATED_IDENTITY`.
pub mod identity {
    /// In a policy key: any peer.
    pub const ANY: u32 = 0;
    /// The node itself: always allowed (kubelet probes).
    pub const HOST: u32 = 1;
    /// Any address the ipcache does not know.
    pub const WORLD: u32 = 2;
    pub const FIRST_ALLOCATED: u32 = 256;
}

/// IP protocol numbers the datapath understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyValue>(), 20);
        assert_eq!(size_of::<ConnKey>(), 44);
        assert_eq!(size_of::<PolicyExactKey>(), 12);
        assert_eq!(size_of::<Address>(), 16);
        assert_eq!(size_of::<ConntrackValue>(), 16);
        assert_eq!(size_of::<ConntrackSlot>(), 64);
        assert_eq!(size_of::<ConntrackTags>(), 64);
        assert_eq!(size_of::<RefusalSet>(), 64);
        assert_eq!(size_of::<TableHeader>(), 64);
        assert_eq!(size_of::<IpcacheSlot>(), 32);
        assert_eq!(size_of::<PolicySlot>(), 32);
        assert_eq!(size_of::<TableSet<PolicySlot>>(), 64 + 32 * TABLE_WAYS);
        assert_eq!(size_of::<FragmentKey>(), 40);
        assert_eq!(size_of::<VerdictKey>(), 16);
        assert_eq!(size_of::<VerdictSlot>(), 24);
        assert_eq!(size_of::<Event>(), 8 + 32 + 16 + 8);
    }
}
