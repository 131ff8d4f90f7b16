//! Refused connections remembered (`datapath_common::RefusalSet`), so a
//! refusal is counted and reported once, not at every retransmission.
//!
//! A fingerprint in one cache line per set, where an LRU hash cost two
//! spinlocks and a free-list pop per refusal, and its evictions under a
//! flood of refusals far more: the refusal path was seven times the cost of
//! an admitted connection's (BENCHMARKS.md). Writers take no claim: two CPUs
//! refusing into one way at once leave one of the fingerprints, and the
//! other connection's retransmission is counted again, never an admitted
//! connection refused.

use datapath_common::{ConnKey, REFUSAL_FREE, REFUSAL_WAYS};

use crate::maps::{hash_seed, REFUSED};

/// Whether `conn` is refused for the first time under policy `revision`;
/// either way it is remembered as refused under it. A call of its own, not
/// one that calls `report`: the verifier sums the frames of a chain of calls.
#[inline(never)]
pub fn first_refusal(conn: &ConnKey, revision: u64) -> bool {
    let place = conn.conntrack_place(hash_seed());
    let fingerprint = place.refusal_fingerprint(revision);
    // Never `None`: the set number is below the array's size.
    let Some(set) = REFUSED.get_ptr_mut(place.refusal_set()) else {
        return true;
    };
    // SAFETY: an array value pointer stays valid for the program run.
    let set = unsafe { &mut *set };
    let mut free = REFUSAL_WAYS;
    for way in 0..REFUSAL_WAYS {
        let held = set.fingerprints[way];
        if held == fingerprint {
            return false;
        }
        if held == REFUSAL_FREE && free == REFUSAL_WAYS {
            free = way;
        }
    }
    // A full set gives up the way the fingerprint's top bits name: as good
    // as a random one, and free of any state to keep.
    let way = if free < REFUSAL_WAYS { free } else { (fingerprint >> 61) as usize };
    set.fingerprints[way & (REFUSAL_WAYS - 1)] = fingerprint;
    true
}
