//! Conntrack: find, refresh and store connections in the set-associative
//! table described at `datapath_common::CONNTRACK_WAYS`.
//!
//! Both arrays are array maps, whose lookups the verifier inlines, and a
//! store is a handful of plain writes: a new connection costs no helper call
//! and no kernel lock, where an LRU hash insert costs two spinlocks and a
//! free-list pop. Writers claim a way by compare-and-swapping its tag to
//! `CONNTRACK_TAG_BUSY`, so two CPUs never write one slot at once. Readers
//! take no lock but read the tag again after the slot, as a seqlock reader
//! reads its sequence: a reader racing the writer that displaces its
//! connection misses it, and judges the packet as a new connection, exactly
//! as after an LRU eviction; it never takes one connection's entry for
//! another's.

use core::{
    intrinsics::{
        atomic_cxchg,
        AtomicOrdering::{Acquire, Relaxed},
    },
    sync::atomic::{compiler_fence, Ordering},
};

use aya_ebpf::helpers::bpf_jiffies64;
use datapath_common::{
    capacity, ConnKey, ConntrackPlace, ConntrackTags, ConntrackValue, CONNTRACK_TAG_BUSY, CONNTRACK_TAG_FREE,
    CONNTRACK_WAYS,
};

use crate::maps::{hash_seed, CONNTRACK, CONNTRACK_TAGS};

/// A connection's set, looked up once for a lookup and the store after it.
pub struct Set {
    tags: *mut ConntrackTags,
    place: ConntrackPlace,
}

/// A connection `Set::find` found: its entry as read, and its way.
pub struct Found {
    way: usize,
    pub value: ConntrackValue,
}

/// Where a connection `Set::find` did not find would be stored: the set's
/// first free way, or none (`CONNTRACK_WAYS`).
pub struct Vacancy {
    free: usize,
}

/// What storing a new connection did.
pub enum Stored {
    /// In a free way.
    Free,
    /// In place of the set's least recently seen connection.
    Displaced,
    /// Not at all: another CPU was writing the way it would have taken.
    NotStored,
}

#[inline(always)]
fn now() -> u32 {
    // SAFETY: a helper without preconditions (inlined by the verifier).
    unsafe { bpf_jiffies64() as u32 }
}

/// Way-major: see `ConntrackSlot`.
#[inline(always)]
fn slot_index(place: &ConntrackPlace, way: usize) -> u32 {
    (way as u32 & (CONNTRACK_WAYS as u32 - 1)) * capacity::CONNTRACK_SETS + place.set
}

/// Store a tag after the slot it describes. The BPF target has no release
/// store before cpu v4; a plain store after a compiler fence is one where
/// stores are seen in program order (x86-64, the only architecture Bulkhead
/// is built and tested on). Elsewhere a reader could see the tag before the
/// key, and then only miss the connection: a stale key has another tag.
///
/// # Safety
/// `tag` points to a tag in map memory.
#[inline(always)]
unsafe fn publish(tag: *mut u64, value: u64) {
    compiler_fence(Ordering::Release);
    // SAFETY: the caller's.
    unsafe { tag.write_volatile(value) };
}

impl Set {
    /// The set `conn` belongs in. `None` only if the arrays are smaller than
    /// their capacity says, which the loader does not allow.
    #[inline(always)]
    pub fn of(conn: &ConnKey) -> Option<Set> {
        let place = conn.conntrack_place(hash_seed());
        let tags = CONNTRACK_TAGS.get_ptr_mut(place.set)?;
        Some(Set { tags, place })
    }

    /// The connection's slot and its entry as it was read, its last-seen
    /// time refreshed; else where a new connection would go.
    #[inline(always)]
    pub fn find(&self, conn: &ConnKey) -> Result<Found, Vacancy> {
        // SAFETY: an array value pointer stays valid for the program run.
        let tags = unsafe { &*self.tags };
        let mut free = CONNTRACK_WAYS;
        for way in 0..CONNTRACK_WAYS {
            let tag = tags.tags[way];
            if tag == CONNTRACK_TAG_FREE && free == CONNTRACK_WAYS {
                free = way;
            }
            if tag != self.place.tag {
                continue;
            }
            let Some(slot) = CONNTRACK.get_ptr_mut(slot_index(&self.place, way)) else {
                continue;
            };
            // The revision first: `rewrite` stores it last (see there).
            // SAFETY: as above.
            let revision = unsafe { core::ptr::addr_of!((*slot).value.revision).read_volatile() };
            compiler_fence(Ordering::Acquire);
            // Another connection's key is passed over at once: deciding
            // after the tag's second read would keep every word of both keys
            // alive across it, spilled to the stack.
            // SAFETY: as above.
            if unsafe { !(*slot).key.same(conn) } {
                continue;
            }
            // SAFETY: as above.
            let mut value = unsafe { (*slot).value };
            value.revision = revision;
            // The tag again, after the slot: if no writer claimed the way
            // meanwhile, what was read is one connection's whole entry.
            compiler_fence(Ordering::Acquire);
            // SAFETY: as above.
            let still = unsafe { core::ptr::addr_of!(tags.tags[way]).read_volatile() };
            if still != self.place.tag {
                continue;
            }
            let now = now();
            // SAFETY: as above.
            let last_seen = unsafe { &mut (*slot).last_seen };
            // Written only when it changes (every few milliseconds): a store
            // on every packet would bounce the line between CPUs.
            if *last_seen != now {
                *last_seen = now;
            }
            return Ok(Found { way, value });
        }
        if free < CONNTRACK_WAYS {
            // Start fetching the free slot's line now, while the policy
            // lookups run: storing into a line not yet in cache would hold
            // the next store's compare-and-swap until it arrives.
            if let Some(slot) = CONNTRACK.get_ptr(slot_index(&self.place, free)) {
                // SAFETY: as above.
                let _ = unsafe { core::ptr::addr_of!((*slot).last_seen).read_volatile() };
            }
        }
        Err(Vacancy { free })
    }

    /// Record a found connection's new verdict (after a policy recheck), in
    /// place and without a claim: a claim would make the connection's
    /// packets on other CPUs miss it meanwhile. The flags are stored before
    /// the revision, so a reader that sees the new revision sees the new
    /// flags too. Were the connection displaced in between (it was just seen,
    /// so it is the last its set would give up), the newcomer would at worst
    /// read as revoked until the next policy change: closed, never open.
    #[inline(always)]
    pub fn rewrite(&self, found: &Found, revision: u64, peer_identity: u32, flags: u8) {
        let Some(slot) = CONNTRACK.get_ptr_mut(slot_index(&self.place, found.way)) else {
            return;
        };
        // SAFETY: an array value pointer stays valid for the program run.
        let value = unsafe { &mut (*slot).value };
        value.peer_identity = peer_identity;
        value.flags = flags;
        compiler_fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { core::ptr::addr_of_mut!(value.revision).write_volatile(revision) };
    }

    /// Store a new connection: in the free way `find` saw, else in place of
    /// the way whose connection was seen least recently.
    #[inline(always)]
    pub fn store(&self, conn: &ConnKey, value: &ConntrackValue, vacancy: Vacancy) -> Stored {
        // SAFETY: an array value pointer stays valid for the program run.
        let tags = unsafe { &mut *self.tags };
        let now = now();
        let mut victim = vacancy.free & (CONNTRACK_WAYS - 1);
        // Another CPU may have taken the free way since `find` saw it.
        let displacing = vacancy.free >= CONNTRACK_WAYS || tags.tags[victim] != CONNTRACK_TAG_FREE;
        if displacing {
            // The least recently seen; of equals, the lowest way (ways fill
            // in order, so the one stored first).
            // Two plain values, not an `Option<u32>`: LLVM reads the
            // option's payload whole even while it is `None`, from a stack
            // slot it may have lent to a pointer meanwhile, and the verifier
            // refuses arithmetic on a pointer.
            let (mut any, mut oldest) = (false, 0u32);
            for way in 0..CONNTRACK_WAYS {
                if tags.tags[way] == CONNTRACK_TAG_BUSY {
                    continue;
                }
                let Some(slot) = CONNTRACK.get_ptr(slot_index(&self.place, way)) else {
                    return Stored::NotStored;
                };
                // SAFETY: as above.
                let age = now.wrapping_sub(unsafe { (*slot).last_seen });
                if !any || age > oldest {
                    (any, oldest) = (true, age);
                    victim = way;
                }
            }
            if !any {
                return Stored::NotStored;
            }
        }
        let victim = victim & (CONNTRACK_WAYS - 1);
        let seen = tags.tags[victim];
        if seen == CONNTRACK_TAG_BUSY {
            return Stored::NotStored;
        }
        let tag: *mut u64 = &mut tags.tags[victim];
        // SAFETY: an aligned u64 in map memory, which writers change only
        // atomically. (The BPF target's `AtomicU64` offers no
        // compare-and-swap; the kernel's BPF_CMPXCHG is what this lowers to.)
        let (_, claimed) = unsafe { atomic_cxchg::<u64, { Acquire }, { Relaxed }>(tag, seen, CONNTRACK_TAG_BUSY) };
        if !claimed {
            return Stored::NotStored;
        }
        let Some(slot) = CONNTRACK.get_ptr_mut(slot_index(&self.place, victim)) else {
            // SAFETY: as above.
            unsafe { publish(tag, seen) };
            return Stored::NotStored;
        };
        // SAFETY: as above; the BUSY tag keeps other writers out. Field by
        // field: a whole `ConntrackSlot` would be staged on the stack first.
        unsafe {
            (*slot).value = *value;
            (*slot).key = *conn;
            (*slot).last_seen = now;
            publish(tag, self.place.tag);
        }
        if displacing {
            Stored::Displaced
        } else {
            Stored::Free
        }
    }
}
