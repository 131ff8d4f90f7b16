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

use crate::state::{DesiredState, IpcacheKey, PolicyEntryKey};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PolicyUpsert(PolicyEntryKey, PolicyValue),
    PolicyDelete(PolicyEntryKey),
    IpcacheUpsert(IpcacheKey, u32),
    IpcacheDelete(IpcacheKey),
}

pub fn diff(old: &DesiredState, new: &DesiredState) -> Vec<MapOp> {
    diff_ops(old, new).collect()
}

/// `diff` one operation at a time, phase after phase, each phase a pass
/// over the maps: a whole state's worth of operations (an agent's first
/// sync writes hundreds of thousands of entries) never held at once.
pub fn diff_ops<'a>(old: &'a DesiredState, new: &'a DesiredState) -> impl Iterator<Item = MapOp> + 'a {
    let allows = |value: &PolicyValue| value.verdict == verdict::ALLOW;
    let writes = move |allow: bool| {
        new.policy
            .iter()
            .filter(move |(key, value)| allows(value) == allow && old.policy.get(*key) != Some(*value))
            .map(|(key, value)| MapOp::PolicyUpsert(*key, *value))
    };
    let deletes = move |allow: bool| {
        old.policy
            .iter()
            .filter(move |(key, value)| allows(value) == allow && !new.policy.contains_key(*key))
            .map(|(key, _)| MapOp::PolicyDelete(*key))
    };
    let ipcache_writes = new
        .ipcache
        .iter()
        .filter(|(key, id)| old.ipcache.get(*key) != Some(*id))
        .map(|(key, id)| MapOp::IpcacheUpsert(*key, *id));
    let ipcache_deletes =
        old.ipcache.keys().filter(|key| !new.ipcache.contains_key(*key)).map(|key| MapOp::IpcacheDelete(*key));
    writes(false)
        .chain(deletes(true))
        .chain(ipcache_writes)
        .chain(ipcache_deletes)
        .chain(writes(true))
        .chain(deletes(false))
}

/// Map changes sorted into the phases above as they are found.
#[derive(Default)]
pub struct OpsPlan {
    deny_writes: Vec<MapOp>,
    allow_deletes: Vec<MapOp>,
    ipcache_writes: Vec<MapOp>,
    ipcache_deletes: Vec<MapOp>,
    allow_writes: Vec<MapOp>,
    deny_deletes: Vec<MapOp>,
}

impl OpsPlan {
    pub fn policy(&mut self, key: PolicyEntryKey, old: Option<&PolicyValue>, new: Option<&PolicyValue>) {
        match (old, new) {
            (old, Some(value)) if old != Some(value) => {
                let phase =
                    if value.verdict == verdict::ALLOW { &mut self.allow_writes } else { &mut self.deny_writes };
                phase.push(MapOp::PolicyUpsert(key, *value));
            }
            (Some(value), None) => {
                let phase =
                    if value.verdict == verdict::ALLOW { &mut self.allow_deletes } else { &mut self.deny_deletes };
                phase.push(MapOp::PolicyDelete(key));
            }
            _ => {}
        }
    }

    pub fn ipcache(&mut self, key: IpcacheKey, old: Option<u32>, new: Option<u32>) {
        match (old, new) {
            (old, Some(id)) if old != Some(id) => self.ipcache_writes.push(MapOp::IpcacheUpsert(key, id)),
            (Some(_), None) => self.ipcache_deletes.push(MapOp::IpcacheDelete(key)),
            _ => {}
        }
    }

    pub fn into_ops(self) -> Vec<MapOp> {
        // Built on the allow writes, the largest phase by far when a whole
        // state is written (a first sync: hundreds of thousands of entries):
        // the earlier phases go in front, in its spare capacity when there is
        // some, rather than all of it copied into a new vector beside it.
        let mut ops = self.allow_writes;
        let earlier = self.deny_writes.len() + self.allow_deletes.len();
        let earlier = earlier + self.ipcache_writes.len() + self.ipcache_deletes.len();
        ops.reserve(earlier + self.deny_deletes.len());
        ops.splice(
            0..0,
            self.deny_writes
                .into_iter()
                .chain(self.allow_deletes)
                .chain(self.ipcache_writes)
                .chain(self.ipcache_deletes),
        );
        ops.extend(self.deny_deletes);
        ops
    }
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

#[cfg(test)]
mod tests {
    use datapath_common::{verdict, PolicyKey, PolicyValue};

    use super::{diff_ops, MapOp, OpsPlan};
    use crate::DesiredState;

    #[test]
    fn operations_come_in_the_order_that_never_opens_a_connection() {
        let key = |port: u16| (32, PolicyKey::new(1, 0, 2, 6, port));
        let (allow, deny) = (PolicyValue::new(verdict::ALLOW, 1, 0), PolicyValue::new(verdict::DENY, 1, 0));
        let mut plan = OpsPlan::default();
        // Found in an order unlike the one they must be written in, several
        // of the largest phase (allow writes) so its vector has spare room.
        for port in 100..110 {
            plan.policy(key(port), None, Some(&allow));
        }
        plan.policy(key(1), Some(&deny), None);
        plan.ipcache((32, [9; 16]), Some(3), None);
        plan.ipcache((32, [8; 16]), None, Some(3));
        plan.policy(key(2), Some(&allow), None);
        plan.policy(key(3), Some(&allow), Some(&deny));
        let ops = plan.into_ops();
        let mut expected = vec![
            MapOp::PolicyUpsert(key(3), deny),
            MapOp::PolicyDelete(key(2)),
            MapOp::IpcacheUpsert((32, [8; 16]), 3),
            MapOp::IpcacheDelete((32, [9; 16])),
        ];
        expected.extend((100..110).map(|port| MapOp::PolicyUpsert(key(port), allow)));
        expected.push(MapOp::PolicyDelete(key(1)));
        assert_eq!(ops, expected);
    }

    #[test]
    fn a_streamed_difference_is_the_plan_of_the_same_changes() {
        let key = |endpoint: u32, port: u16| (32, PolicyKey::new(endpoint, 0, 2, 6, port));
        let value = |n: u32| PolicyValue::new(if n.is_multiple_of(3) { verdict::DENY } else { verdict::ALLOW }, n, 0);
        let (mut old, mut new) = (DesiredState::default(), DesiredState::default());
        // Kept, changed (verdicts flipping both ways), added and removed, in both maps.
        for n in 0..60u32 {
            let (endpoint, port) = (n % 4, n as u16);
            if !n.is_multiple_of(5) {
                old.policy.insert(key(endpoint, port), value(n));
                old.ipcache.insert((32, [n as u8; 16]), n);
            }
            if !n.is_multiple_of(7) {
                new.policy.insert(key(endpoint, port), value(if n.is_multiple_of(2) { n } else { n + 1 }));
                new.ipcache.insert((32, [n as u8; 16]), n % 11);
            }
        }
        let mut plan = OpsPlan::default();
        for key in old.policy.keys().chain(new.policy.keys()).collect::<std::collections::BTreeSet<_>>() {
            plan.policy(*key, old.policy.get(key), new.policy.get(key));
        }
        for key in old.ipcache.keys().chain(new.ipcache.keys()).collect::<std::collections::BTreeSet<_>>() {
            plan.ipcache(*key, old.ipcache.get(key).copied(), new.ipcache.get(key).copied());
        }
        let planned = plan.into_ops();
        assert!(planned.len() > 40, "every kind of change is there: {planned:?}");
        assert_eq!(diff_ops(&old, &new).collect::<Vec<_>>(), planned);
    }
}
