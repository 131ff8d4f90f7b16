//! Every map the programs share with userspace. All are pinned by name under
//! the loader's pin path, so a restarted agent adopts them as they are.

use aya_ebpf::bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC};
use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use datapath_common::{
    capacity, Address, ConntrackSlot, ConntrackTags, EndpointInfo, EventBudget, FragmentKey, FragmentValue,
    IpcacheSlot, IpcacheValue, PolicyExactKey, PolicyKey, PolicySlot, PolicyValue, RefusalSet, TableSet, VerdictKey,
    VerdictSlot, CONFIG_HASH_SEED,
};

#[map(name = "BH_IPCACHE")]
pub static IPCACHE: LpmTrie<Address, IpcacheValue> = LpmTrie::pinned(capacity::IPCACHE, 0);

/// Addresses with a full-length (/128, IPv4-mapped /32) ipcache entry. Such
/// an entry is the most specific match there can be, so a hit here is what
/// the trie would answer; the trie holds only shorter prefixes. The table is
/// searched first (`crate::table`); the hash holds the addresses whose set
/// was full, and is not preallocated: a node pays only for what it holds.
#[map(name = "BH_IPCACHE_TAB")]
pub static IPCACHE_TABLE: Array<TableSet<IpcacheSlot>> = Array::pinned(capacity::IPCACHE_TABLE_SETS, BPF_F_MMAPABLE);

#[map(name = "BH_IPCACHE_EX")]
pub static IPCACHE_EXACT: HashMap<Address, IpcacheValue> = HashMap::pinned(capacity::IPCACHE_EXACT, BPF_F_NO_PREALLOC);

#[map(name = "BH_ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// `ENDPOINTS` again, by ifindex for small ones: see `map_names::ENDPOINTS_BY_IFINDEX`.
#[map(name = "BH_ENDPOINTS_IX")]
pub static ENDPOINTS_BY_IFINDEX: Array<EndpointInfo> = Array::pinned(capacity::ENDPOINTS_BY_IFINDEX, 0);

#[map(name = "BH_CG_ENDPOINTS")]
pub static CGROUP_ENDPOINTS: HashMap<u64, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Address → endpoint id of the local pod that owns it (anti-spoofing).
#[map(name = "BH_LOCAL_ADDRS")]
pub static LOCAL_ADDRS: HashMap<Address, u32> = HashMap::pinned(capacity::LOCAL_ADDRS, 0);

/// Policy entries with a port range, any port or any protocol. Full-length
/// entries are in `POLICY_EXACT` only.
#[map(name = "BH_POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

/// Trie entries per (endpoint, direction, peer), by `prefixed_slot`.
#[map(name = "BH_PREFIXED")]
pub static POLICY_PREFIXED: Array<u32> = Array::pinned(capacity::POLICY_PREFIXED, 0);

/// Full-length policy entries: one peer (or any peer), protocol and port;
/// in the table, or in the hash when their set was full (as for the ipcache).
#[map(name = "BH_POLICY_TAB")]
pub static POLICY_TABLE: Array<TableSet<PolicySlot>> = Array::pinned(capacity::POLICY_TABLE_SETS, BPF_F_MMAPABLE);

#[map(name = "BH_POLICY_EX")]
pub static POLICY_EXACT: HashMap<PolicyExactKey, PolicyValue> =
    HashMap::pinned(capacity::POLICY_EXACT, BPF_F_NO_PREALLOC);

/// Conntrack slots, set by set (`crate::conntrack`).
#[map(name = "BH_CONNTRACK")]
pub static CONNTRACK: Array<ConntrackSlot> = Array::pinned(capacity::CONNTRACK, 0);

/// Conntrack tags, one entry per set (`crate::conntrack`).
#[map(name = "BH_CT_TAGS")]
pub static CONNTRACK_TAGS: Array<ConntrackTags> = Array::pinned(capacity::CONNTRACK_SETS, 0);

#[map(name = "BH_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Connections refused recently (`crate::refusals`).
#[map(name = "BH_REFUSED")]
pub static REFUSED: Array<RefusalSet> = Array::pinned(capacity::REFUSED_SETS, 0);

#[map(name = "BH_DROP_COUNTS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(capacity::DROPS, 0);

/// Verdict counters the programs find without a helper call (`VerdictSlot`),
/// each CPU's own.
#[map(name = "BH_VERDICT_SLOTS")]
pub static VERDICT_SLOTS: Array<VerdictSlot> = Array::pinned(capacity::VERDICT_SLOTS, BPF_F_MMAPABLE);

/// Verdict counters of keys whose slot another key holds.
#[map(name = "BH_VERDICTS")]
pub static VERDICTS: PerCpuHashMap<VerdictKey, u64> = PerCpuHashMap::pinned(capacity::VERDICTS, 0);

#[map(name = "BH_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

#[map(name = "BH_EVENT_BUDGET")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

#[map(name = "BH_CONFIG")]
pub static CONFIG: Array<u64> = Array::pinned(capacity::CONFIG, 0);

/// The seed of the placement hashes (conntrack's, the refusals' and the
/// exact tables'), written once when the maps are created.
#[inline(always)]
pub fn hash_seed() -> u64 {
    CONFIG.get(CONFIG_HASH_SEED).copied().unwrap_or(0)
}

/// Working memory of one program run, and a sampling count (not pinned:
/// nothing in it matters to a later datapath).
#[map(name = "BH_SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::parse::Scratch> = PerCpuArray::with_max_entries(1, 0);
