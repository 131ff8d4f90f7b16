//! `BH_ENDPOINTS`, `BH_ENDPOINTS_IX`, `BH_CG_ENDPOINTS`: which endpoint a
//! packet (by ifindex) or a socket call (by cgroup) belongs to.

use crate::address::Address;

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
/// The agent is still compiling the endpoint's allowlist: its programs were
/// attached early (creating a TCX link waits for an RCU grace period, so at
/// start-up that overlaps the first compile) and pass everything, as if not
/// attached yet, until the endpoint's real entry replaces this one.
pub const ENDPOINT_FLAG_PENDING: u32 = 8;
/// The id a pending entry carries: outside the range endpoint ids are
/// numbered in, and not `NO_ENDPOINT`, so the array slot reads as held.
pub const PENDING_ENDPOINT: u32 = u32::MAX;
/// No policy restricts the endpoint's egress (or ingress): its only entry
/// that way is an any-peer, any-port `PolicyValue::UNRESTRICTED`, so every
/// lookup that way would answer that; the datapath answers it without one.
/// The agent derives these from the compiled entries
/// (`DesiredState::unrestricted_directions`).
pub const ENDPOINT_FLAG_OPEN_EGRESS: u32 = 16;
pub const ENDPOINT_FLAG_OPEN_INGRESS: u32 = 32;
/// Both directions' open flags.
pub const ENDPOINT_FLAGS_OPEN: u32 = ENDPOINT_FLAG_OPEN_EGRESS | ENDPOINT_FLAG_OPEN_INGRESS;
/// The flags the agent keeps per endpoint, as opposed to per entry.
pub const ENDPOINT_FLAGS_OF_POLICY: u32 = ENDPOINT_FLAG_FAIL_CLOSED | ENDPOINT_FLAGS_OPEN;

/// The flag saying no policy restricts `direction` (`EGRESS` or `INGRESS`).
#[inline(always)]
pub const fn open_flag(direction: u8) -> u32 {
    if direction == crate::EGRESS {
        ENDPOINT_FLAG_OPEN_EGRESS
    } else {
        ENDPOINT_FLAG_OPEN_INGRESS
    }
}

impl EndpointInfo {
    /// An endpoint carrying (up to) its first two addresses.
    pub fn new(endpoint_id: u32, flags: u32, addresses: &[[u8; 16]]) -> Self {
        let mut info =
            EndpointInfo { endpoint_id, flags: flags & ENDPOINT_FLAGS_OF_POLICY, addresses: [Address::UNSPECIFIED; 2] };
        for (slot, (address, flag)) in
            addresses.iter().zip([ENDPOINT_FLAG_ADDRESS_0, ENDPOINT_FLAG_ADDRESS_1]).enumerate()
        {
            info.addresses[slot] = Address::from_octets(*address);
            info.flags |= flag;
        }
        info
    }

    /// The entry of an interface whose programs pass everything for now.
    pub fn pending() -> Self {
        EndpointInfo {
            endpoint_id: PENDING_ENDPOINT,
            flags: ENDPOINT_FLAG_PENDING,
            addresses: [Address::UNSPECIFIED; 2],
        }
    }

    /// Whether this is a pending entry: programs attached, nothing judged yet.
    #[inline(always)]
    pub fn is_pending(&self) -> bool {
        self.flags & ENDPOINT_FLAG_PENDING != 0
    }

    /// Whether no policy restricts `direction` (see `ENDPOINT_FLAG_OPEN_EGRESS`).
    #[inline(always)]
    pub fn is_open(&self, direction: u8) -> bool {
        self.flags & open_flag(direction) != 0
    }

    /// Whether `address` is one of the addresses carried here.
    #[inline(always)]
    pub fn carries(&self, address: &Address) -> bool {
        (self.flags & ENDPOINT_FLAG_ADDRESS_0 != 0 && self.addresses[0] == *address)
            || (self.flags & ENDPOINT_FLAG_ADDRESS_1 != 0 && self.addresses[1] == *address)
    }
}

crate::user_pod!(EndpointInfo);
