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

/// The steps above, in the order they run (step 3 is two: writes, then
/// deletes). `policy_change` and `ipcache_change` are the one place that
/// says which step a change belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    DenyWrites,
    AllowDeletes,
    IpcacheWrites,
    IpcacheDeletes,
    AllowWrites,
    DenyDeletes,
}

const PHASES: [Phase; 6] = [
    Phase::DenyWrites,
    Phase::AllowDeletes,
    Phase::IpcacheWrites,
    Phase::IpcacheDeletes,
    Phase::AllowWrites,
    Phase::DenyDeletes,
];

fn policy_change(key: PolicyEntryKey, old: Option<&PolicyValue>, new: Option<&PolicyValue>) -> Option<(Phase, MapOp)> {
    let allows = |value: &PolicyValue| value.verdict == verdict::ALLOW;
    match (old, new) {
        (old, Some(value)) if old != Some(value) => {
            let phase = if allows(value) { Phase::AllowWrites } else { Phase::DenyWrites };
            Some((phase, MapOp::PolicyUpsert(key, *value)))
        }
        (Some(value), None) => {
            let phase = if allows(value) { Phase::AllowDeletes } else { Phase::DenyDeletes };
            Some((phase, MapOp::PolicyDelete(key)))
        }
        _ => None,
    }
}

fn ipcache_change(key: IpcacheKey, old: Option<u32>, new: Option<u32>) -> Option<(Phase, MapOp)> {
    match (old, new) {
        (old, Some(id)) if old != Some(id) => Some((Phase::IpcacheWrites, MapOp::IpcacheUpsert(key, id))),
        (Some(_), None) => Some((Phase::IpcacheDeletes, MapOp::IpcacheDelete(key))),
        _ => None,
    }
}

pub fn diff(old: &DesiredState, new: &DesiredState) -> Vec<MapOp> {
    diff_ops(old, new).collect()
}

/// `diff` one operation at a time, phase after phase, each phase a pass
/// over one map (writes walk the new state, deletes the old): a whole
/// state's worth of operations (an agent's first sync writes hundreds of
/// thousands of entries) never held at once.
pub fn diff_ops<'a>(old: &'a DesiredState, new: &'a DesiredState) -> impl Iterator<Item = MapOp> + 'a {
    PHASES.into_iter().flat_map(move |phase| {
        let changes: Box<dyn Iterator<Item = Option<(Phase, MapOp)>>> = match phase {
            Phase::DenyWrites | Phase::AllowWrites => {
                Box::new(new.policy.iter().map(|(key, value)| policy_change(*key, old.policy.get(key), Some(value))))
            }
            Phase::AllowDeletes | Phase::DenyDeletes => {
                Box::new(old.policy.iter().map(|(key, value)| policy_change(*key, Some(value), new.policy.get(key))))
            }
            Phase::IpcacheWrites => Box::new(
                new.ipcache.iter().map(|(key, id)| ipcache_change(*key, old.ipcache.get(key).copied(), Some(*id))),
            ),
            Phase::IpcacheDeletes => Box::new(
                old.ipcache.iter().map(|(key, id)| ipcache_change(*key, Some(*id), new.ipcache.get(key).copied())),
            ),
        };
        changes.flatten().filter(move |(found, _)| *found == phase).map(|(_, op)| op)
    })
}

/// Map changes sorted into the phases above as they are found.
#[derive(Default)]
pub struct OpsPlan {
    phases: [Vec<MapOp>; PHASES.len()],
}

impl OpsPlan {
    pub fn policy(&mut self, key: PolicyEntryKey, old: Option<&PolicyValue>, new: Option<&PolicyValue>) {
        self.push(policy_change(key, old, new));
    }

    pub fn ipcache(&mut self, key: IpcacheKey, old: Option<u32>, new: Option<u32>) {
        self.push(ipcache_change(key, old, new));
    }

    fn push(&mut self, change: Option<(Phase, MapOp)>) {
        if let Some((phase, op)) = change {
            self.phases[phase as usize].push(op);
        }
    }

    pub fn into_ops(self) -> Vec<MapOp> {
        // Built on the allow writes, the largest phase by far when a whole
        // state is written (a first sync: hundreds of thousands of entries):
        // the earlier phases go in front, in its spare capacity when there is
        // some, rather than all of it copied into a new vector beside it.
        let mut phases = self.phases;
        let mut ops = std::mem::take(&mut phases[Phase::AllowWrites as usize]);
        let (earlier, later) = phases.split_at_mut(Phase::AllowWrites as usize);
        ops.reserve(phases_len(earlier) + phases_len(later));
        ops.splice(0..0, earlier.iter_mut().flat_map(std::mem::take));
        ops.extend(later.iter_mut().flat_map(std::mem::take));
        ops
    }
}

fn phases_len(phases: &[Vec<MapOp>]) -> usize {
    phases.iter().map(Vec::len).sum()
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
