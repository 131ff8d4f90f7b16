//! Addresses as the datapath keeps them: IPv6, or IPv4 mapped into IPv6.

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
// `eq` compares exactly the words the derived `Hash` hashes, without branches.
#[allow(clippy::derived_hash_with_manual_eq)]
pub struct Address {
    pub(crate) words: [u32; 4],
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

crate::user_pod!(Address);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
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
}
