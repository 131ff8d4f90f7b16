//! `BH_CONNTRACK` and `BH_CT_TAGS`: the connection table, and
//! `BH_FRAGMENTS`, where later fragments find their first one's ports.

use crate::{
    address::Address,
    capacity,
    hash::{pair, placement_hash, HASH_MULTIPLIER},
};

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

crate::user_pod!(ConnKey, ConntrackValue, FragmentKey, FragmentValue);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{ipv4_mapped, proto};
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
}

/// Ways of a `RefusalSet`.
pub const REFUSAL_WAYS: usize = 8;

/// `BH_REFUSED`: which connections were refused recently, so a
/// retransmission is dropped without being counted or reported again. A
/// connection is remembered as a fingerprint of its key and the policy
/// revision of its refusal (`refusal_fingerprint`): under a new revision it
/// is judged, and if refused, counted afresh. One set is one cache line,
/// read whole by a lookup; a new refusal takes the way its fingerprint
/// names, displacing whichever refusal was there (a flood displaces older
/// refusals, whose retransmissions are then counted again, as after an LRU
/// eviction; never an admitted connection, which lives in conntrack).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalSet {
    /// `REFUSAL_FREE` or a fingerprint.
    pub fingerprints: [u64; REFUSAL_WAYS],
}

/// A way no refusal holds.
pub const REFUSAL_FREE: u64 = 0;

impl ConntrackPlace {
    /// The fingerprint of a connection in this place refused under
    /// `revision`: never `REFUSAL_FREE`.
    #[inline(always)]
    pub fn refusal_fingerprint(&self, revision: u64) -> u64 {
        (self.tag ^ revision.wrapping_mul(HASH_MULTIPLIER)) | 1
    }

    /// The refusal set of this place, among `capacity::REFUSED_SETS`.
    #[inline(always)]
    pub fn refusal_set(&self) -> u32 {
        self.set & (capacity::REFUSED_SETS - 1)
    }
}
