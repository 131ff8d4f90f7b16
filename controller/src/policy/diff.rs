//! `diff(old, new)`: the map operations that turn one compiled state into
//! the other, ordered so that no intermediate state allows a connection that
//! neither the old nor the new state allows:
//!
//! 1. write entries whose new verdict is deny;
//! 2. delete entries that allowed and are gone;
//! 3. update the ipcache (every policy state seen from here on allows only
//!    what both old and new allow, so either identity of an address is safe);
//! 4. write entries whose new verdict is allow;
//! 5. delete entries that denied and are gone.
//!
//! Why it holds: until step 4 every allow entry present is an old entry the
//! new state keeps as allow, and every new deny is already in place, so the
//! most specific entry for any key allows only if old and new both do.
//! From step 4 on, every new deny and every surviving allow is in place, so
//! an allow found is new's.

use datapath_common::{verdict, PolicyValue};

use super::compile::{DesiredState, IpcacheKey, PolicyEntryKey};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PolicyUpsert(PolicyEntryKey, PolicyValue),
    PolicyDelete(PolicyEntryKey),
    IpcacheUpsert(IpcacheKey, u32),
    IpcacheDelete(IpcacheKey),
}

pub fn diff(old: &DesiredState, new: &DesiredState) -> Vec<MapOp> {
    let mut deny_writes = Vec::new();
    let mut allow_deletes = Vec::new();
    let mut allow_writes = Vec::new();
    let mut deny_deletes = Vec::new();
    for (key, value) in &new.policy {
        if old.policy.get(key) == Some(value) {
            continue;
        }
        if value.verdict == verdict::ALLOW {
            allow_writes.push(MapOp::PolicyUpsert(*key, *value));
        } else {
            deny_writes.push(MapOp::PolicyUpsert(*key, *value));
        }
    }
    for (key, value) in &old.policy {
        if new.policy.contains_key(key) {
            continue;
        }
        if value.verdict == verdict::ALLOW {
            allow_deletes.push(MapOp::PolicyDelete(*key));
        } else {
            deny_deletes.push(MapOp::PolicyDelete(*key));
        }
    }
    let mut ipcache = Vec::new();
    for (key, id) in &new.ipcache {
        if old.ipcache.get(key) != Some(id) {
            ipcache.push(MapOp::IpcacheUpsert(*key, *id));
        }
    }
    for key in old.ipcache.keys() {
        if !new.ipcache.contains_key(key) {
            ipcache.push(MapOp::IpcacheDelete(*key));
        }
    }
    let mut ops = deny_writes;
    ops.extend(allow_deletes);
    ops.extend(ipcache);
    ops.extend(allow_writes);
    ops.extend(deny_deletes);
    ops
}

/// Apply operations to a state's maps (what the agent does to the kernel's).
pub fn apply(state: &mut DesiredState, ops: &[MapOp]) {
    for op in ops {
        apply_one(state, op);
    }
}

pub fn apply_one(state: &mut DesiredState, op: &MapOp) {
    match op {
        MapOp::PolicyUpsert(key, value) => {
            state.policy.insert(*key, *value);
        }
        MapOp::PolicyDelete(key) => {
            state.policy.remove(key);
        }
        MapOp::IpcacheUpsert(key, id) => {
            state.ipcache.insert(*key, *id);
        }
        MapOp::IpcacheDelete(key) => {
            state.ipcache.remove(key);
        }
    }
}
