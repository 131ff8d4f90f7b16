//! The agent's side of the exact tables (`datapath_common::TABLE_WAYS`): the
//! array map is mapped into the agent's memory and written in place, under
//! a seqlock per set, with the keys of full sets in an overflow hash.
//!
//! The agent is the tables' only writer (the programs only read them), so a
//! write needs no lock of its own: `&mut self` is the lock.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    sync::atomic::{fence, AtomicU32, Ordering},
};

use aya::{
    maps::{HashMap, MapData},
    Pod,
};
use datapath_common::{overflow_filter, TablePlace, TableSet, TableSlot, OVERFLOW_FILTER_WORDS, TABLE_WAYS};

use super::{error::DatapathError, shared_array::SharedArray};

pub struct ExactTable<S: TableSlot> {
    name: &'static str,
    sets: SharedArray<TableSet<S>>,
    seed: u64,
    overflow: HashMap<MapData, S::Key, S::Value>,
    /// The overflow hash's keys (as `TableSlot::words`): whether a key is
    /// there is asked at every write to a set that overflowed, and a
    /// lookup in the map is a system call.
    overflow_keys: HashSet<[u64; 2]>,
    /// The places of the overflow hash's keys, by set: what a set's
    /// overflow filter is made from again when one of them leaves.
    overflow_places: StdHashMap<u32, Vec<TablePlace>>,
}

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
    /// The table of `sets` (the array named `name`) and its overflow hash.
    pub fn open(
        name: &'static str,
        sets: SharedArray<TableSet<S>>,
        seed: u64,
        overflow: HashMap<MapData, S::Key, S::Value>,
    ) -> Result<Self, DatapathError> {
        let keys: Vec<S::Key> = overflow.keys().filter_map(Result::ok).collect();
        let overflow_keys = keys.iter().map(S::words).collect();
        let mut table = ExactTable { name, sets, seed, overflow, overflow_keys, overflow_places: StdHashMap::new() };
        for key in &keys {
            let place = table.place(key);
            table.overflow_places.entry(place.set).or_default().push(place);
        }
        // The filters again from the hash: a table pinned by a build
        // without them, or an agent stopped between a key's insert and its
        // bit, left bits missing, and a missing bit hides a key.
        let sets: Vec<u32> = table.overflow_places.keys().copied().collect();
        for index in sets {
            let filter = table.filter_of(index);
            table.write_set(index, |set| set.header.overflow_filter = filter);
        }
        Ok(table)
    }

    /// Set `index`'s overflow filter, made from the places of its keys in the hash.
    fn filter_of(&self, index: u32) -> [u32; OVERFLOW_FILTER_WORDS] {
        overflow_filter(self.overflow_places.get(&index).into_iter().flatten().copied())
    }

    fn place(&self, key: &S::Key) -> TablePlace {
        S::place(key, self.seed, self.sets.len())
    }

    fn set(&self, index: u32) -> &TableSet<S> {
        // SAFETY: the programs never write the table, and this process
        // writes it only through `&mut self`.
        unsafe { &*self.sets.element(index) }
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
        // SAFETY: see `set`; `&mut self` keeps every other reference out.
        let set = unsafe { &mut *self.sets.element(index) };
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
                    self.overflow_places.entry(place.set).or_default().push(place);
                    let (word, mask) = place.overflow_bit();
                    self.write_set(place.set, |set| {
                        set.header.overflowed += 1;
                        set.header.overflow_filter[word] |= mask;
                    });
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
                if let Some(places) = self.overflow_places.get_mut(&place.set) {
                    if let Some(at) = places.iter().position(|held| *held == place) {
                        places.swap_remove(at);
                    }
                    if places.is_empty() {
                        self.overflow_places.remove(&place.set);
                    }
                }
                let filter = self.filter_of(place.set);
                self.write_set(place.set, |set| {
                    set.header.overflowed -= 1;
                    set.header.overflow_filter = filter;
                });
            }
            Location::Nowhere => {}
        }
        Ok(())
    }

    /// Every entry, in the table and in the overflow hash.
    pub fn entries(&self) -> Vec<(S::Key, S::Value)> {
        let mut out = Vec::new();
        for index in 0..self.sets.len() {
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
        (0..self.sets.len()).map(|index| self.set(index).header.overflowed as usize).sum()
    }
}
