//! The seeded placement hash that conntrack and the exact tables share.

pub(crate) const HASH_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
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
pub(crate) fn placement_hash<const N: usize>(words: [u64; N], seed: u64) -> u64 {
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
pub(crate) const fn pair(high: u32, low: u32) -> u64 {
    ((high as u64) << 32) | low as u64
}
