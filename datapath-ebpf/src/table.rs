//! Lookups in the exact tables described at `datapath_common::TABLE_WAYS`:
//! the exact ipcache and exact policy entries, in array maps the agent
//! writes through a shared mapping.
//!
//! An array lookup is inlined by the verifier, so a key found here costs no
//! helper call; a hash lookup costs a call into the kernel and a jhash of
//! the key, and on CPUs with return-stack mitigations every call and return
//! is dear. The overflow hash is searched only when the key's set says keys
//! with its tag's filter bit are there.

use core::sync::atomic::{compiler_fence, Ordering};

use aya_ebpf::maps::{Array, HashMap};
use datapath_common::{TableSet, TableSlot, OVERFLOW_FILTER_WORDS, TABLE_WAYS};

use crate::maps::hash_seed;

/// The agent kept writing the key's set through every try: the caller
/// fails closed.
pub struct Busy;

/// How often a lookup tries again while the agent writes the set. A write
/// is a few stores; running into three in a row means the writer was
/// preempted in the middle of one.
const TRIES: usize = 3;

/// The value of `key` in the table `sets` (`sets_count` sets), else in its
/// overflow hash `overflow`; `None` when in neither.
#[inline(always)]
pub fn lookup<S: TableSlot>(
    sets: &Array<TableSet<S>>,
    sets_count: u32,
    overflow: &HashMap<S::Key, S::Value>,
    key: &S::Key,
) -> Result<Option<S::Value>, Busy> {
    // Conntrack's seed too: written once when the maps are created. Read
    // here, not passed in: a seed kept live through the caller's lookups
    // took the programs' call chain past the verifier's 512-byte stack.
    let seed = hash_seed();
    let place = S::place(key, seed, sets_count);
    // Never `None`: the set number is below the array's size.
    let Some(set) = sets.get_ptr(place.set) else {
        return Err(Busy);
    };
    for _ in 0..TRIES {
        // SAFETY: an array value pointer stays valid for the program run;
        // only the agent writes the set, and reads are checked against the
        // sequence below.
        let before = unsafe { core::ptr::addr_of!((*set).header.sequence).read_volatile() };
        if before & 1 != 0 {
            continue;
        }
        compiler_fence(Ordering::SeqCst);
        let mut found = None;
        // SAFETY: as above.
        let header = unsafe { &(*set).header };
        for way in 0..TABLE_WAYS {
            if header.tags[way] != place.tag {
                continue;
            }
            // SAFETY: as above.
            let slot = unsafe { &(*set).slots[way] };
            if slot.key() == key {
                found = Some(*slot.value());
                break;
            }
        }
        let (word, mask) = place.overflow_bit();
        let overflowed = header.overflow_filter[word & (OVERFLOW_FILTER_WORDS - 1)] & mask;
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as above.
        let after = unsafe { core::ptr::addr_of!((*set).header.sequence).read_volatile() };
        if after != before {
            continue;
        }
        if found.is_some() || overflowed == 0 {
            return Ok(found);
        }
        // SAFETY: a hash value pointer stays valid for the program run; the
        // agent replaces overflow values whole.
        return Ok(overflow.get_ptr(key).map(|value| unsafe { *value }));
    }
    Err(Busy)
}
