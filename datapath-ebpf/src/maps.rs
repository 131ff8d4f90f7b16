//! Every map the programs share with userspace. All are pinned by name under
//! the loader's pin path, so a restarted agent adopts them as they are.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use datapath_common::{
    capacity, ConntrackValue, DropKey, EndpointInfo, EventBudget, FlowKey, FragmentKey,
    FragmentValue, IpcacheValue, PolicyKey, PolicyValue, VerdictKey,
};

#[map(name = "BH_IPCACHE")]
pub static IPCACHE: LpmTrie<[u8; 16], IpcacheValue> = LpmTrie::pinned(capacity::IPCACHE, 0);

/// Addresses with a full-length (/128, IPv4-mapped /32) ipcache entry. Such
/// an entry is the most specific match there can be, so a hit here is what
/// the trie would answer; the trie holds only shorter prefixes.
#[map(name = "BH_IPCACHE_EX")]
pub static IPCACHE_EXACT: HashMap<[u8; 16], IpcacheValue> = HashMap::pinned(capacity::IPCACHE_EXACT, 0);

#[map(name = "BH_ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map(name = "BH_CG_ENDPOINTS")]
pub static CGROUP_ENDPOINTS: HashMap<u64, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Address → endpoint id of the local pod that owns it (anti-spoofing).
#[map(name = "BH_LOCAL_ADDRS")]
pub static LOCAL_ADDRS: HashMap<[u8; 16], u32> = HashMap::pinned(capacity::LOCAL_ADDRS, 0);

#[map(name = "BH_POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

#[map(name = "BH_CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, ConntrackValue> =
    LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map(name = "BH_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Flows refused recently, so retransmissions are dropped without being
/// counted or reported again. Value: the policy revision of the refusal.
#[map(name = "BH_DENIED")]
pub static DENIED_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::pinned(capacity::DENIED_FLOWS, 0);

#[map(name = "BH_DROPS")]
pub static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::pinned(capacity::DROPS, 0);

#[map(name = "BH_VERDICTS")]
pub static VERDICTS: PerCpuHashMap<VerdictKey, u64> = PerCpuHashMap::pinned(capacity::VERDICTS, 0);

#[map(name = "BH_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

#[map(name = "BH_EV_BUDGET")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

#[map(name = "BH_CONFIG")]
pub static CONFIG: Array<u64> = Array::pinned(capacity::CONFIG, 0);

/// Working memory of one program run (not pinned: nothing in it outlives a packet).
#[map(name = "BH_SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::verdict::Scratch> = PerCpuArray::with_max_entries(1, 0);
