//! The agent's side of the exact tables (`datapath_common::TABLE_WAYS`): the
//! array map is mapped into the agent's memory and written in place, under
//! a seqlock per set, with the keys of full sets in an overflow hash.
//!
//! The agent is the tables' only writer (the programs only read them), so a
//! write needs no lock of its own: `&mut self` is the lock.

use std::{
    collections::HashSet,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{fence, AtomicU32, Ordering},
};

use aya::{
    maps::{HashMap, MapData},
    Pod,
};
use datapath_common::{TablePlace, TableSet, TableSlot, TABLE_WAYS};

use super::error::DatapathError;

/// `BPF_F_MMAPABLE`: the array can be mapped into userspace.
const BPF_F_MMAPABLE: u32 = 1 << 10;

pub struct ExactTable<S: TableSlot> {
    name: &'static str,
    sets: NonNull<TableSet<S>>,
    set_count: u32,
    mapping_len: usize,
    seed: u64,
    overflow: HashMap<MapData, S::Key, S::Value>,
    /// The overflow hash's keys (as `TableSlot::words`): whether a key is
    /// there is asked at every write to a set that overflowed, and a
    /// lookup in the map is a system call.
    overflow_keys: HashSet<[u64; 2]>,
    /// Kept open: programs loaded later (the bench fixture) refer to the
    /// map by this descriptor.
    _map: MapData,
}

// SAFETY: the mapping is owned by the table and written only through
// `&mut self`; nothing in it is tied to the thread that made it.
unsafe impl<S: TableSlot> Send for ExactTable<S> {}

/// Where a key is now.
enum Location {
    Way(usize),
    Overflow,
    Nowhere,
}

impl<S> ExactTable<S>
where
    S: TableSlot + Pod,
    S::Key: Pod,
    S::Value: Pod,
{
    /// Map the table `map` (the array named `name`, `set_count` sets) into
    /// memory. A map pinned by an older build with another layout is
    /// refused by name rather than misread.
    pub fn open(
        name: &'static str,
        map: MapData,
        set_count: u32,
        seed: u64,
        overflow: HashMap<MapData, S::Key, S::Value>,
    ) -> Result<Self, DatapathError> {
        let info = map.info().map_err(|source| DatapathError::Map { name, source })?;
        let set_size = size_of::<TableSet<S>>();
        if info.map_flags() & BPF_F_MMAPABLE == 0
            || info.value_size() as usize != set_size
            || info.max_entries() != set_count
        {
            return Err(DatapathError::Layout {
                name,
                found: format!(
                    "flags {:#x}, {} sets of {} bytes",
                    info.map_flags(),
                    info.max_entries(),
                    info.value_size()
                ),
                wanted: format!("mmapable, {set_count} sets of {set_size} bytes"),
            });
        }
        let mapping_len = set_size * set_count as usize;
        // SAFETY: a shared read-write mapping of the whole array, which the
        // kernel allows for BPF_F_MMAPABLE arrays; the pointer is checked.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(DatapathError::Mmap { name, source: std::io::Error::last_os_error() });
        }
        let sets = NonNull::new(address.cast::<TableSet<S>>()).expect("mmap returned a non-null address");
        let overflow_keys = overflow.keys().filter_map(Result::ok).map(|key| S::words(&key)).collect();
        Ok(ExactTable { name, sets, set_count, mapping_len, seed, overflow, overflow_keys, _map: map })
    }

    fn place(&self, key: &S::Key) -> TablePlace {
        S::place(key, self.seed, self.set_count)
    }

    fn set(&self, index: u32) -> &TableSet<S> {
        assert!(index < self.set_count);
        // SAFETY: within the mapping; the programs never write it, and this
        // process writes it only through `&mut self`.
        unsafe { &*self.sets.as_ptr().add(index as usize) }
    }

    fn locate(&self, key: &S::Key, place: &TablePlace) -> Location {
        let set = self.set(place.set);
        let way = (0..TABLE_WAYS).find(|&way| set.header.tags[way] == place.tag && set.slots[way].key() == key);
        match way {
            Some(way) => Location::Way(way),
            None if set.header.overflowed > 0 && self.overflow_keys.contains(&S::words(key)) => Location::Overflow,
            None => Location::Nowhere,
        }
    }

    /// Change set `index` under its seqlock: the programs retry a lookup
    /// that overlapped the change, so they see the set before or after it,
    /// never in between.
    fn write_set(&mut self, index: u32, change: impl FnOnce(&mut TableSet<S>)) {
        assert!(index < self.set_count);
        // SAFETY: within the mapping; see `set`.
        let set = unsafe { &mut *self.sets.as_ptr().add(index as usize) };
        // SAFETY: an aligned u32 in the mapping, written by no one else.
        let sequence = unsafe { AtomicU32::from_ptr(&mut set.header.sequence) };
        let before = sequence.load(Ordering::Relaxed);
        sequence.store(before.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        change(set);
        // SAFETY: as above.
        let sequence = unsafe { AtomicU32::from_ptr(&mut set.header.sequence) };
        sequence.store(before.wrapping_add(2), Ordering::Release);
    }

    pub fn insert(&mut self, key: S::Key, value: S::Value) -> Result<(), DatapathError> {
        let place = self.place(&key);
        match self.locate(&key, &place) {
            Location::Way(way) => self.write_set(place.set, |set| set.slots[way] = S::new(key, value)),
            Location::Overflow => self.insert_overflow(&key, value)?,
            Location::Nowhere => match self.set(place.set).header.tags.iter().position(|&tag| tag == 0) {
                Some(way) => self.write_set(place.set, |set| {
                    set.slots[way] = S::new(key, value);
                    set.header.tags[way] = place.tag;
                }),
                None => {
                    // In the hash before the set says so: a lookup in
                    // between misses the key, as before the insert.
                    self.insert_overflow(&key, value)?;
                    self.write_set(place.set, |set| set.header.overflowed += 1);
                }
            },
        }
        Ok(())
    }

    fn insert_overflow(&mut self, key: &S::Key, value: S::Value) -> Result<(), DatapathError> {
        self.overflow.insert(key, value, 0).map_err(|source| DatapathError::MapFull { name: self.name, source })?;
        self.overflow_keys.insert(S::words(key));
        Ok(())
    }

    pub fn remove(&mut self, key: &S::Key) -> Result<(), DatapathError> {
        let place = self.place(key);
        match self.locate(key, &place) {
            Location::Way(way) => self.write_set(place.set, |set| set.header.tags[way] = 0),
            Location::Overflow => {
                self.overflow.remove(key).map_err(|source| DatapathError::Map { name: self.name, source })?;
                self.overflow_keys.remove(&S::words(key));
                self.write_set(place.set, |set| set.header.overflowed -= 1);
            }
            Location::Nowhere => {}
        }
        Ok(())
    }

    /// Every entry, in the table and in the overflow hash.
    pub fn entries(&self) -> Vec<(S::Key, S::Value)> {
        let mut out = Vec::new();
        for index in 0..self.set_count {
            let set = self.set(index);
            for way in 0..TABLE_WAYS {
                if set.header.tags[way] != 0 {
                    out.push((*set.slots[way].key(), *set.slots[way].value()));
                }
            }
        }
        out.extend(self.overflow.iter().filter_map(Result::ok));
        out
    }

    /// Entries in the overflow hash: keys whose set was full when they came.
    pub fn overflowed(&self) -> usize {
        (0..self.set_count).map(|index| self.set(index).header.overflowed as usize).sum()
    }
}

impl<S: TableSlot> Drop for ExactTable<S> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.sets.as_ptr().cast(), self.mapping_len) };
    }
}
