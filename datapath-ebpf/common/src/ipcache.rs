//! `BH_IPCACHE` (LPM trie over addresses), `BH_IPCACHE_TAB` and its
//! overflow `BH_IPCACHE_EX`: the identity of a peer address.

use crate::{address::Address, hash::pair, table::TableSlot};

/// Value of the ipcache LPM trie (key: `LpmKey<[u8; 16]>` over the address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheValue {
    pub identity: u32,
    pub _pad: u32,
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

crate::user_pod!(IpcacheValue, IpcacheSlot);
