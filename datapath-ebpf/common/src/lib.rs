//! The ABI between Bulkhead's eBPF programs and userspace.
//!
//! Every map the datapath uses is named here, with its capacity and the exact
//! byte layout of its keys and values. Multi-byte fields that take part in a
//! longest-prefix match are stored as big-endian byte arrays, because the
//! kernel's LPM trie compares keys bit by bit from the first byte; the
//! constructors and getters below are the only place that converts.
//!
//! Types are `#[repr(C)]` with explicit padding and no `bool`, so that every
//! byte of a key is defined (hash maps compare all bytes).
#![no_std]

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
    pub const DENIED_FLOWS: &str = "BH_DENIED";
    pub const DROPS: &str = "BH_DROPS";
    pub const VERDICTS: &str = "BH_VERDICTS";
    pub const EVENTS: &str = "BH_EVENTS";
    pub const EVENT_BUDGET: &str = "BH_EV_BUDGET";
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
    /// Sets of the exact tables (`TABLE_WAYS` entries each): 256k
    /// addresses in 10 MiB and 1M policy entries in 40 MiB.
    pub const IPCACHE_TABLE_SETS: u32 = 1 << 15;
    pub const POLICY_TABLE_SETS: u32 = 1 << 17;
    /// Connections: `CONNTRACK_SETS` sets of `CONNTRACK_WAYS`.
    pub const CONNTRACK: u32 = CONNTRACK_SETS * super::CONNTRACK_WAYS as u32;
    pub const CONNTRACK_SETS: u32 = 1 << 15;
    pub const FRAGMENTS: u32 = 1 << 13;
    pub const DENIED_FLOWS: u32 = 1 << 16;
    pub const DROPS: u32 = 1 << 14;
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

/// Length in bits of the parts of a policy key, in key order.
pub mod policy_prefix {
    /// endpoint (32) + direction (8) + identity (32): any protocol, any port.
    pub const ANY_PROTOCOL: u32 = 72;
    /// + protocol (8): any port of that protocol.
    pub const ANY_PORT: u32 = 80;
    /// + port (16).
    pub const FULL: u32 = 96;
}

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

/// Policy verdicts stored in `PolicyValue::verdict`.
pub mod verdict {
    pub const DENY: u8 = 0;
    pub const ALLOW: u8 = 1;
}

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

/// An IPv4 address is stored IPv4-mapped (::ffff:a.b.c.d) so one trie serves
/// both families and an IPv6 prefix can never cover an IPv4 address.
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// An address as the datapath keeps it in keys and values: IPv6, or IPv4
/// mapped into IPv6 (`ipv4_mapped`), as four 32-bit words whose bytes in
/// memory are the address's bytes in network order. Its layout is that of
/// `[u8; 16]`, so userspace may key the same maps by byte arrays.
///
/// Words, not bytes, because LLVM's BPF backend cannot assume the CPU loads
/// unaligned words: a byte array is copied one byte at a time, and compared
/// through a `bcmp` call that a BPF program cannot make.
#[repr(C)]
#[derive(Clone, Copy, Default, Hash)]
pub struct Address {
    words: [u32; 4],
}

/// The third word of every IPv4-mapped address: bytes 00 00 ff ff.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Address {
    pub const UNSPECIFIED: Address = Address { words: [0; 4] };

    pub const fn from_octets(octets: [u8; 16]) -> Self {
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            words[i] = u32::from_ne_bytes([octets[4 * i], octets[4 * i + 1], octets[4 * i + 2], octets[4 * i + 3]]);
            i += 1;
        }
        Address { words }
    }

    /// Words as they lie in memory (a packet's address fields, a socket's `user_ip6`).
    pub const fn from_words(words: [u32; 4]) -> Self {
        Address { words }
    }

    /// An IPv4 address given as its four bytes in memory order, as read from
    /// a packet or a socket's `user_ip4`.
    pub const fn ipv4_mapped_word(word: u32) -> Self {
        Address { words: [0, 0, V4_MAPPED_WORD, word] }
    }

    pub const fn octets(&self) -> [u8; 16] {
        let mut octets = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let bytes = self.words[i].to_ne_bytes();
            octets[4 * i] = bytes[0];
            octets[4 * i + 1] = bytes[1];
            octets[4 * i + 2] = bytes[2];
            octets[4 * i + 3] = bytes[3];
            i += 1;
        }
        octets
    }

    /// 127.0.0.0/8 (mapped) or ::1.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        let [a, b, c, d] = self.words;
        let v4_loopback = a == 0 && b == 0 && c == V4_MAPPED_WORD && d.to_ne_bytes()[0] == 127;
        v4_loopback || (a == 0 && b == 0 && c == 0 && d == u32::from_ne_bytes([0, 0, 0, 1]))
    }
}

impl PartialEq for Address {
    /// Word by word, without branches or a `bcmp` call.
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        let [a, b, c, d] = self.words;
        let [e, f, g, h] = other.words;
        (a ^ e) | (b ^ f) | (c ^ g) | (d ^ h) == 0
    }
}
impl Eq for Address {}

impl PartialOrd for Address {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Address {
    /// Network byte order, as addresses sort.
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.octets().cmp(&other.octets())
    }
}

impl core::fmt::Debug for Address {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Address({:02x?})", self.octets())
    }
}
/// Prefix length of an IPv4 prefix once mapped.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

/// Value of the ipcache LPM trie (key: `LpmKey<[u8; 16]>` over the address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheValue {
    pub identity: u32,
    pub _pad: u32,
}

/// Value of the endpoint maps (keys: ifindex `u32`, cgroup id `u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointInfo {
    pub endpoint_id: u32,
    /// `ENDPOINT_FLAG_*`.
    pub flags: u32,
    /// The pod's own addresses (IPv4-mapped), so the anti-spoofing check of
    /// a pod's packets needs no map lookup; which slots hold one is in
    /// `flags`. A pod with more addresses is checked against `LOCAL_ADDRS`.
    pub addresses: [Address; 2],
}
/// Endpoint ids start at 1: an `ENDPOINTS_BY_IFINDEX` slot holding this id
/// holds no endpoint.
pub const NO_ENDPOINT: u32 = 0;

/// The endpoint's policy could not be fully programmed: drop everything but
/// node traffic rather than enforce a partial allowlist.
pub const ENDPOINT_FLAG_FAIL_CLOSED: u32 = 1;
pub const ENDPOINT_FLAG_ADDRESS_0: u32 = 2;
pub const ENDPOINT_FLAG_ADDRESS_1: u32 = 4;

impl EndpointInfo {
    /// An endpoint carrying (up to) its first two addresses.
    pub fn new(endpoint_id: u32, flags: u32, addresses: &[[u8; 16]]) -> Self {
        let mut info = EndpointInfo {
            endpoint_id,
            flags: flags & ENDPOINT_FLAG_FAIL_CLOSED,
            addresses: [Address::UNSPECIFIED; 2],
        };
        for (slot, (address, flag)) in
            addresses.iter().zip([ENDPOINT_FLAG_ADDRESS_0, ENDPOINT_FLAG_ADDRESS_1]).enumerate()
        {
            info.addresses[slot] = Address::from_octets(*address);
            info.flags |= flag;
        }
        info
    }

    /// Whether `address` is one of the addresses carried here.
    #[inline(always)]
    pub fn carries(&self, address: &Address) -> bool {
        (self.flags & ENDPOINT_FLAG_ADDRESS_0 != 0 && self.addresses[0] == *address)
            || (self.flags & ENDPOINT_FLAG_ADDRESS_1 != 0 && self.addresses[1] == *address)
    }
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

/// A connection as one endpoint sees it, the endpoint's own side first: a
/// packet either way has the same key, so one lookup finds its connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local: Address,
    pub remote: Address,
    pub endpoint: u32,
    /// Ports in host byte order; ICMP echo uses its identifier for both.
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    /// Padding as two fields, not `[u8; 3]`: LLVM zeroes a 3-byte array
    /// with a `memset` call, a bpf-to-bpf call on every packet.
    pub _pad: u8,
    pub _pad2: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConntrackValue {
    /// Policy revision the connection was last admitted under.
    pub revision: u64,
    pub peer_identity: u32,
    /// `CONNTRACK_FLAG_*`.
    pub flags: u8,
    /// Direction of the connection's first packet (`INGRESS` or `EGRESS`):
    /// the direction policy admits it in.
    pub origin: u8,
    pub _pad: [u8; 2],
}
/// Conntrack is a set-associative table in two arrays, which the verifier
/// inlines (no helper call, no kernel locks): a connection's set is fixed by
/// a hash of its key; `ConntrackTags` says which of the set's ways may hold
/// it, and the way's `ConntrackSlot` holds the key and the entry. A new
/// connection takes a free way or displaces the set's least recently seen
/// connection, as an LRU would.
pub const CONNTRACK_WAYS: usize = 8;

/// A tag no connection has: the way is being written.
pub const CONNTRACK_TAG_BUSY: u64 = 2;
/// A free way's tag. Tags of connections are odd.
pub const CONNTRACK_TAG_FREE: u64 = 0;

/// One conntrack set's tags, one cache line: a lookup miss reads nothing
/// else. 64-bit words because the BPF target has 64-bit atomics only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackTags {
    pub tags: [u64; CONNTRACK_WAYS],
}

/// One conntrack way: 64 bytes, one cache line. Slots are stored way by
/// way: way `w` of set `s` is slot `w * CONNTRACK_SETS + s`. A new
/// connection takes its set's first free way, so until conntrack fills up
/// connections sit in the first plane, and those in neighbouring sets (a
/// client's consecutive ports, see `conntrack_place`) in neighbouring lines
/// of one page. Stored set by set, each new connection of such a run
/// touched a line 512 bytes past the last and a new page every eighth; on
/// this project's VMs that made some datapaths store new connections at
/// twice the cost of others loaded beside them (BENCHMARKS.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackSlot {
    pub value: ConntrackValue,
    pub key: ConnKey,
    /// `bpf_jiffies64()` (low 32 bits) of the connection's last packet.
    pub last_seen: u32,
}

/// Where a connection lives in conntrack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackPlace {
    pub set: u32,
    /// Odd, so never `CONNTRACK_TAG_FREE` or `CONNTRACK_TAG_BUSY`.
    pub tag: u64,
}

const HASH_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
/// Odd constants, one per word a placement hashes.
const WORD_MULTIPLIERS: [u64; 5] =
    [0xc2b2_ae3d_27d4_eb4f, 0x1656_67b1_9e37_79f9, 0x85eb_ca77_c2b2_ae63, 0x27d4_eb2f_1656_67c5, 0xff51_afd7_ed55_8ccd];

/// A seeded hash of `N` words for placing keys in sets. Each word, mixed
/// with the seed, is multiplied by its own constant and the products are
/// summed: independent multiplies the CPU runs side by side, where a chain
/// of them (one word after another) would cost their latencies end to end
/// on every packet. Two keys that differ in one word always differ in the
/// sum (the constants are odd, so each product is a bijection of its word);
/// the last steps carry the high bits down and the low bits up.
#[inline(always)]
fn placement_hash<const N: usize>(words: [u64; N], seed: u64) -> u64 {
    let mut sum = seed;
    let mut i = 0;
    while i < N {
        sum = sum.wrapping_add((words[i] ^ seed).wrapping_mul(WORD_MULTIPLIERS[i % WORD_MULTIPLIERS.len()]));
        i += 1;
    }
    sum ^= sum >> 32;
    sum = sum.wrapping_mul(HASH_MULTIPLIER);
    sum ^ (sum >> 29)
}

/// Two 32-bit words as one 64-bit word for `placement_hash`.
#[inline(always)]
const fn pair(high: u32, low: u32) -> u64 {
    ((high as u64) << 32) | low as u64
}

/// `ConnKey` as the 32-bit words `ConnKey::same` compares.
const CONN_KEY_WORDS: usize = core::mem::size_of::<ConnKey>() / 4;
const _: () = assert!(core::mem::size_of::<ConnKey>() == CONN_KEY_WORDS * 4);

impl ConnKey {
    /// Whether two keys name the same connection: their words xor-ed and
    /// or-ed together, one branch at the end. The derived `==` branches once
    /// per field, and with the BPF target's few registers LLVM copies the
    /// stored key to the stack first and reloads both pointers between
    /// branches, on every conntrack hit.
    #[inline(always)]
    pub fn same(&self, other: &ConnKey) -> bool {
        // SAFETY: repr(C) with u32 alignment and no implicit padding (the
        // padding bytes are fields, always written): every byte is an
        // initialised part of some word.
        let (ours, theirs) = unsafe {
            (
                &*(self as *const ConnKey).cast::<[u32; CONN_KEY_WORDS]>(),
                &*(other as *const ConnKey).cast::<[u32; CONN_KEY_WORDS]>(),
            )
        };
        let mut differ = 0;
        for word in 0..CONN_KEY_WORDS {
            differ |= ours[word] ^ theirs[word];
        }
        differ == 0
    }

    /// The connection's set and tag. The set is a seeded hash of everything
    /// but the ports, plus the ports' sum: connections a client opens one
    /// after another to one server (Linux hands out ephemeral ports in
    /// sequence per destination) land in neighbouring sets, whose tags share
    /// cache lines, instead of a cold line each. The tag hashes the ports too.
    #[inline(always)]
    pub fn conntrack_place(&self, seed: u64) -> ConntrackPlace {
        let [l0, l1, l2, l3] = self.local.words;
        let [r0, r1, r2, r3] = self.remote.words;
        let hash = placement_hash(
            [pair(l0, l1), pair(l2, l3), pair(r0, r1), pair(r2, r3), pair(self.endpoint, u32::from(self.protocol))],
            seed,
        );
        let ports = (u32::from(self.local_port) << 16) | u32::from(self.remote_port);
        let port_sum = u32::from(self.local_port) + u32::from(self.remote_port);
        let set = (hash as u32).wrapping_add(port_sum) & (capacity::CONNTRACK_SETS - 1);
        let tag = ((hash >> 32) ^ (u64::from(ports) << 32)).wrapping_mul(HASH_MULTIPLIER) | 1;
        ConntrackPlace { set, tag }
    }
}

/// The exact ipcache and exact policy entries are set-associative tables in
/// array maps, like conntrack, so the programs find them without a helper
/// call; the agent writes them through a shared mapping of the array
/// (`BPF_F_MMAPABLE`). A key's set is fixed by a seeded hash of it; a set
/// holds `TABLE_WAYS` entries, and a key whose set is full goes to the
/// table's overflow hash (the `*_EXACT` maps), which the programs search only
/// when the set says it has keys there.
pub const TABLE_WAYS: usize = 8;

/// The first cache line of a table set: all a lookup miss reads.
///
/// The agent is the only writer. It makes `sequence` odd before it changes
/// the set and even again after, as a seqlock writer does; a program reads
/// `sequence` before and after it searches the set and tries again when it
/// was odd or changed, so it never takes half of one entry for another.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableHeader {
    pub sequence: u32,
    /// Keys of this set that are in the overflow hash.
    pub overflowed: u32,
    /// The ways' tags: 0 for a free way, else odd (`TablePlace::tag`).
    pub tags: [u32; TABLE_WAYS],
    pub _pad: [u32; 6],
}

/// One set of a table: a header line and `TABLE_WAYS` slots of 32 bytes.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct TableSet<S> {
    pub header: TableHeader,
    pub slots: [S; TABLE_WAYS],
}

/// Where a key lives in a table of `sets` sets (a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TablePlace {
    pub set: u32,
    pub tag: u32,
}

/// An entry of a table: key and value, 32 bytes.
pub trait TableSlot: Copy {
    type Key: Copy + PartialEq;
    type Value: Copy;
    fn new(key: Self::Key, value: Self::Value) -> Self;
    fn key(&self) -> &Self::Key;
    fn value(&self) -> &Self::Value;
    /// The key as two words, everything a placement hashes.
    fn words(key: &Self::Key) -> [u64; 2];

    #[inline(always)]
    fn place(key: &Self::Key, seed: u64, sets: u32) -> TablePlace {
        let hash = placement_hash(Self::words(key), seed);
        TablePlace { set: (hash >> 11) as u32 & (sets - 1), tag: (hash >> 32) as u32 | 1 }
    }
}

/// An exact ipcache entry: one address (/128, or /32 IPv4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheSlot {
    pub address: Address,
    pub value: IpcacheValue,
    pub _pad: u64,
}

impl TableSlot for IpcacheSlot {
    type Key = Address;
    type Value = IpcacheValue;
    #[inline(always)]
    fn new(address: Address, value: IpcacheValue) -> Self {
        IpcacheSlot { address, value, _pad: 0 }
    }
    #[inline(always)]
    fn key(&self) -> &Address {
        &self.address
    }
    #[inline(always)]
    fn value(&self) -> &IpcacheValue {
        &self.value
    }
    #[inline(always)]
    fn words(address: &Address) -> [u64; 2] {
        let [w0, w1, w2, w3] = address.words;
        [pair(w0, w1), pair(w2, w3)]
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

/// Re-checked under a newer policy revision and no longer allowed: every
/// packet of the connection, both ways, is dropped until policy allows it again.
pub const CONNTRACK_FLAG_REVOKED: u8 = 1;

/// Key of the fragment map: where a non-first IPv4/IPv6 fragment finds the
/// ports its first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentKey {
    pub saddr: Address,
    pub daddr: Address,
    pub id: u32,
    pub protocol: u8,
    pub _pad: u8,
    pub _pad2: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentValue {
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
}

/// Key of the per-CPU drop counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub endpoint: u32,
    pub direction: u8,
    pub reason: u8,
    pub _pad: [u8; 2],
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
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY (all impls): these types are `#[repr(C)]`, `Copy`, made only of
    // integers and byte arrays, with every padding byte an explicit field, so
    // any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for PolicyExactKey {}
    unsafe impl aya::Pod for Address {}
    unsafe impl aya::Pod for ConntrackValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentValue {}
    unsafe impl aya::Pod for DropKey {}
    unsafe impl aya::Pod for VerdictKey {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for TableHeader {}
    unsafe impl aya::Pod for IpcacheSlot {}
    unsafe impl aya::Pod for PolicySlot {}
    unsafe impl<S: aya::Pod> aya::Pod for TableSet<S> {}
}

#[cfg(test)]
mod tests {
    extern crate std;
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
        assert_eq!(size_of::<TableHeader>(), 64);
        assert_eq!(size_of::<IpcacheSlot>(), 32);
        assert_eq!(size_of::<PolicySlot>(), 32);
        assert_eq!(size_of::<TableSet<PolicySlot>>(), 64 + 32 * TABLE_WAYS);
        assert_eq!(size_of::<FragmentKey>(), 40);
        assert_eq!(size_of::<DropKey>(), 8);
        assert_eq!(size_of::<VerdictKey>(), 16);
        assert_eq!(size_of::<Event>(), 8 + 32 + 16 + 8);
    }

    #[test]
    fn addresses_keep_their_bytes_in_memory_order() {
        let octets = ipv4_mapped([10, 1, 2, 3]);
        let address = Address::from_octets(octets);
        assert_eq!(address.octets(), octets);
        // SAFETY: Address is repr(C) of 16 bytes.
        let bytes: [u8; 16] = unsafe { core::mem::transmute(address) };
        assert_eq!(bytes, octets);
        assert_eq!(Address::ipv4_mapped_word(u32::from_ne_bytes([10, 1, 2, 3])), address);
        assert_ne!(Address::ipv4_mapped_word(u32::from_ne_bytes([10, 1, 2, 4])), address);
        assert!(Address::from_octets(ipv4_mapped([127, 0, 0, 1])).is_loopback());
        assert!(Address::from_octets(core::net::Ipv6Addr::LOCALHOST.octets()).is_loopback());
        assert!(!address.is_loopback());
        assert!(Address::from_octets(ipv4_mapped([10, 0, 0, 9])) < Address::from_octets(ipv4_mapped([10, 0, 1, 0])));
    }

    fn connection(local_port: u16, remote_port: u16) -> ConnKey {
        ConnKey {
            local: Address::from_octets(ipv4_mapped([10, 244, 1, 10])),
            remote: Address::from_octets(ipv4_mapped([10, 244, 2, 20])),
            endpoint: 7,
            local_port,
            remote_port,
            protocol: proto::TCP,
            _pad: 0,
            _pad2: 0,
        }
    }

    #[test]
    fn connections_are_the_same_exactly_when_equal() {
        let base = connection(40000, 443);
        assert!(base.same(&base));
        let mut changes: std::vec::Vec<fn(&mut ConnKey)> = std::vec![
            |k| k.local.words[3] ^= 1,
            |k| k.local.words[0] ^= 1 << 31,
            |k| k.remote.words[2] ^= 1,
            |k| k.remote.words[3] ^= 1 << 16,
            |k| k.endpoint += 1,
            |k| k.local_port += 1,
            |k| k.remote_port ^= 0x8000,
            |k| k.protocol = proto::UDP,
        ];
        // Both ports changed so that their sum (what conntrack's placement
        // adds to the set) stays the same.
        changes.push(|k| {
            k.local_port += 1;
            k.remote_port -= 1;
        });
        for change in changes {
            let mut other = base;
            change(&mut other);
            assert_ne!(base, other);
            assert!(!base.same(&other) && !other.same(&base), "{other:?} taken for {base:?}");
        }
    }

    #[test]
    fn conntrack_places_are_in_range_with_odd_tags() {
        for seed in [1, 0x1234_5678_9abc_def1] {
            for port in (0..=u16::MAX).step_by(97) {
                let place = connection(port, 443).conntrack_place(seed);
                assert!(place.set < capacity::CONNTRACK_SETS);
                assert_eq!(place.tag & 1, 1, "tags are odd: never free or busy");
            }
        }
    }

    #[test]
    fn consecutive_source_ports_take_neighbouring_sets_and_sums_share_one() {
        let seed = 0x0ddc_0ffe_e15e_a5ed;
        let first = connection(40000, 443).conntrack_place(seed);
        for step in 1..100u16 {
            let next = connection(40000 + step, 443).conntrack_place(seed);
            assert_eq!(next.set, (first.set + u32::from(step)) % capacity::CONNTRACK_SETS);
        }
        // The same port sum: the same set, told apart by the tag.
        let swapped = connection(40001, 442).conntrack_place(seed);
        assert_eq!(swapped.set, first.set);
        assert_ne!(swapped.tag, first.tag);
    }

    #[test]
    fn conntrack_sets_spread_evenly_and_follow_the_seed() {
        // Connections to 65536 different peers: no set holds many.
        let mut per_set = std::vec![0u32; capacity::CONNTRACK_SETS as usize];
        let peers = 1u32 << 16;
        for peer in 0..peers {
            let mut key = connection(40000, 443);
            key.remote = Address::from_octets(ipv4_mapped((0x0af4_0000 | peer).to_be_bytes()));
            per_set[key.conntrack_place(99).set as usize] += 1;
        }
        let fullest = per_set.iter().max().copied().unwrap_or(0);
        // 65536 connections in 32768 sets: 2 on average; a uniform hash puts
        // at most about 10 in one.
        assert!(fullest <= CONNTRACK_WAYS as u32 + 4, "fullest set holds {fullest}");
        let key = connection(40000, 443);
        assert_ne!(key.conntrack_place(1), key.conntrack_place(2));
    }

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
    fn table_places_are_in_range_with_odd_tags_and_follow_the_seed() {
        let sets = capacity::POLICY_TABLE_SETS;
        let mut per_set = std::vec![0u32; sets as usize];
        // 4 entries per set on average: a policy's peers on a few ports.
        let entries = sets * 4;
        for i in 0..entries {
            let key = PolicyExactKey::new(1 + i % 64, 256 + i / 64 / 4, proto::TCP, 8000 + (i / 64 % 4) as u16, EGRESS);
            let place = PolicySlot::place(&key, 0x5eed, sets);
            assert!(place.set < sets);
            assert_eq!(place.tag & 1, 1, "tags are odd: never a free way's 0");
            per_set[place.set as usize] += 1;
        }
        // At half the ways' count on average, a uniform hash fills hardly
        // any set past its 8 ways.
        let overflowing: u32 = per_set.iter().map(|&n| n.saturating_sub(TABLE_WAYS as u32)).sum();
        assert!(overflowing * 100 < entries, "{overflowing} of {entries} entries overflow");
        let address = Address::from_octets(ipv4_mapped([10, 0, 0, 1]));
        let places: std::vec::Vec<_> =
            (1..=8).map(|seed| IpcacheSlot::place(&address, seed, capacity::IPCACHE_TABLE_SETS)).collect();
        assert!(places.windows(2).any(|pair| pair[0] != pair[1]), "the seed moves keys");
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
