//! The exact tables' layout, shared by `BH_IPCACHE_TAB` and `BH_POLICY_TAB`.

use crate::hash::placement_hash;

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
    /// A bit per tag value of the set's keys in the overflow hash
    /// (`TablePlace::overflow_bit`): a lookup that misses the ways asks the
    /// hash only when its own bit is set, where a count of overflowed keys
    /// sent every miss of an overflowed set to the hash. A bit left set
    /// costs a hash lookup, never a verdict; a key is in the hash before
    /// its bit is set.
    pub overflow_filter: [u32; OVERFLOW_FILTER_WORDS],
    pub _pad: [u32; 2],
}

/// Words of `TableHeader::overflow_filter`: 128 bits.
pub const OVERFLOW_FILTER_WORDS: usize = 4;

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

impl TablePlace {
    /// The key's bit in its set's `overflow_filter`: word and mask, from tag
    /// bits the set number does not use.
    #[inline(always)]
    pub const fn overflow_bit(&self) -> (usize, u32) {
        let bit = (self.tag >> 1) as usize & (OVERFLOW_FILTER_WORDS * 32 - 1);
        (bit / 32, 1 << (bit % 32))
    }
}

/// The overflow filter of a set whose overflowed keys have these places.
pub fn overflow_filter(places: impl IntoIterator<Item = TablePlace>) -> [u32; OVERFLOW_FILTER_WORDS] {
    let mut filter = [0; OVERFLOW_FILTER_WORDS];
    for place in places {
        let (word, mask) = place.overflow_bit();
        filter[word] |= mask;
    }
    filter
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

crate::user_pod!(TableHeader);
#[cfg(feature = "user")]
// SAFETY: repr(C) of a header and slots that are Pod themselves.
unsafe impl<S: aya::Pod> aya::Pod for TableSet<S> {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{capacity, ipv4_mapped, proto, Address, IpcacheSlot, PolicyExactKey, PolicySlot, EGRESS};
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
    fn overflow_filters_hold_their_keys_bits_and_few_others() {
        let places: std::vec::Vec<_> = (0..3u32)
            .map(|i| PolicySlot::place(&PolicyExactKey::new(9, 300 + i, proto::TCP, 80, EGRESS), 0x5eed, 1 << 17))
            .collect();
        let filter = overflow_filter(places.iter().copied());
        for place in &places {
            let (word, mask) = place.overflow_bit();
            assert_ne!(filter[word] & mask, 0);
        }
        let set_bits: u32 = filter.iter().map(|word| word.count_ones()).sum();
        assert!((1..=3).contains(&set_bits));
        // Other keys of a set with three overflowed keys hit the filter
        // about 3 times in 128: most misses skip the hash.
        let hits = (0..10_000u32)
            .map(|i| PolicySlot::place(&PolicyExactKey::new(10, 5000 + i, proto::UDP, 53, EGRESS), 0x5eed, 1 << 17))
            .filter(|place| {
                let (word, mask) = place.overflow_bit();
                filter[word] & mask != 0
            })
            .count();
        assert!(hits < 600, "{hits} of 10000 misses would search the hash");
    }
}
