//! Writes the compiler's map operations into the kernel's maps, in the safe
//! order they come in, bumps the policy revision so live connections are
//! judged again, and fails an endpoint closed when its entries cannot all be
//! written.
//!
//! One road from compiler to kernel: the operations the compiler hands out
//! (`Compiler::take_ops`) are what is written. The only whole-state
//! difference is taken once, when an agent adopts a datapath pinned by its
//! predecessor: between what the pins hold and what it compiled first.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use bulkhead_policy::{
    state::{address_key, PolicyEntryKey},
    DesiredState, MapOp,
};
use datapath_common::{EndpointInfo, PolicyValue};

use super::{AttachError, Datapath, DatapathError};

/// What one application did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Map writes and deletions made.
    pub operations: usize,
    /// Endpoints failed closed because a map was full, with the error.
    pub failed_closed: Vec<(u32, String)>,
    /// Endpoints failed closed before whose allowlist is now complete.
    pub reopened: Vec<u32>,
}

pub struct Programmer {
    datapath: Datapath,
    /// What the pinned maps held when adopted, until the first application.
    adopted: Option<DesiredState>,
    /// Operations not applied yet because a write failed: first next time.
    pending: Vec<MapOp>,
    /// Policy entries that did not fit (a full map), retried at every
    /// application; their endpoints are failed closed meanwhile.
    unwritten: BTreeMap<PolicyEntryKey, PolicyValue>,
    failed_closed: BTreeSet<u32>,
    /// Per endpoint, the directions no policy restricts
    /// (`ENDPOINT_FLAG_OPEN_*`; endpoints without any left out).
    open_directions: BTreeMap<u32, u32>,
    /// Endpoints whose entries were written since their open directions
    /// were last refreshed: kept across an application that fails midway,
    /// so a direction a written entry restricts never stays flagged open.
    unrefreshed: BTreeSet<u32>,
    /// A rewrite of the flags failed midway: the next one rewrites them all.
    open_flags_stale: bool,
    /// Map writes and deletions since the start.
    writes: u64,
}

impl Programmer {
    /// Take over a datapath, reading what its (possibly pinned, adopted)
    /// maps already hold so the first application writes only differences.
    pub fn adopt(datapath: Datapath) -> Self {
        let mut adopted = DesiredState::default();
        for (prefix_len, key, value) in datapath.policy_entries() {
            adopted.policy.insert((prefix_len, key), value);
        }
        for (prefix_len, address, identity) in datapath.ipcache_entries() {
            adopted.ipcache.insert((prefix_len, address), identity);
        }
        let failed_closed = datapath.failed_closed_endpoints();
        Self {
            datapath,
            adopted: Some(adopted),
            pending: Vec::new(),
            unwritten: BTreeMap::new(),
            failed_closed,
            open_directions: BTreeMap::new(),
            unrefreshed: BTreeSet::new(),
            open_flags_stale: false,
            writes: 0,
        }
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    pub fn failed_closed(&self) -> &BTreeSet<u32> {
        &self.failed_closed
    }

    /// Map writes and deletions made since the start.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Policy entries the maps lack because they did not fit.
    pub fn unwritten(&self) -> usize {
        self.unwritten.len()
    }

    /// Bring the maps to `desired`: the compiler's `ops` since the last
    /// application, or, the first time, the difference between what the
    /// adopted pins hold and `desired`.
    pub fn apply(&mut self, desired: &DesiredState, ops: Vec<MapOp>) -> Result<SyncReport, DatapathError> {
        let adopted = self.adopted.take();
        let ops: Box<dyn Iterator<Item = MapOp>> = match &adopted {
            // Streamed: the first sync's operations are the whole state.
            Some(adopted) => Box::new(bulkhead_policy::diff_ops(adopted, desired)),
            None => Box::new(ops.into_iter()),
        };
        let mut ops = std::mem::take(&mut self.pending).into_iter().chain(ops);
        let mut report = SyncReport::default();
        // Endpoints whose entries change, for their open directions. The
        // first time, every one: the adopted entries may carry a previous
        // agent's flags.
        if let Some(adopted) = &adopted {
            self.unrefreshed.extend(desired.endpoints.values().map(|endpoint| endpoint.id));
            self.unrefreshed.extend(adopted.endpoint_ids());
        }
        while let Some(op) = ops.next() {
            if let MapOp::PolicyUpsert(key, _) | MapOp::PolicyDelete(key) = &op {
                // A newer operation on an entry that did not fit supersedes it.
                self.unwritten.remove(key);
                self.unrefreshed.insert(key.1.endpoint());
            }
            match self.write(&op) {
                Ok(()) => report.operations += 1,
                Err(error @ DatapathError::MapFull { .. }) => {
                    // A partial allowlist is never enforced: the endpoint
                    // whose entry did not fit drops everything but node traffic.
                    let MapOp::PolicyUpsert(key, value) = op else {
                        self.pending = ops.collect();
                        return Err(error);
                    };
                    self.unwritten.insert(key, value);
                    let endpoint = key.1.endpoint();
                    if self.failed_closed.insert(endpoint) {
                        self.datapath.fail_closed(endpoint)?;
                        report.failed_closed.push((endpoint, error.to_string()));
                    }
                }
                Err(error) => {
                    self.pending = std::iter::once(op).chain(ops).collect();
                    return Err(error);
                }
            }
        }
        // What did not fit before may fit now (entries went away).
        let retries: Vec<(PolicyEntryKey, PolicyValue)> = self.unwritten.iter().map(|(k, v)| (*k, *v)).collect();
        for (key, value) in retries {
            if self.write(&MapOp::PolicyUpsert(key, value)).is_ok() {
                self.unwritten.remove(&key);
                report.operations += 1;
            }
        }
        let incomplete: BTreeSet<u32> = self.unwritten.keys().map(|(_, key)| key.endpoint()).collect();
        let complete: Vec<u32> = self.failed_closed.difference(&incomplete).copied().collect();
        for endpoint in complete {
            self.datapath.reopen(endpoint)?;
            self.failed_closed.remove(&endpoint);
            report.reopened.push(endpoint);
        }
        self.refresh_open_directions(desired, adopted.is_some())?;
        if report.operations > 0 {
            self.datapath.bump_policy_revision()?;
        }
        Ok(report)
    }

    /// Recompute the open directions of the endpoints whose entries were
    /// written, from `desired`, and rewrite the entries of those that
    /// changed (all, when `all`).
    fn refresh_open_directions(&mut self, desired: &DesiredState, all: bool) -> Result<(), DatapathError> {
        let mut changed = all || self.open_flags_stale;
        for endpoint in std::mem::take(&mut self.unrefreshed) {
            let open = desired.unrestricted_directions(endpoint);
            let before = if open == 0 {
                self.open_directions.remove(&endpoint)
            } else {
                self.open_directions.insert(endpoint, open)
            };
            changed |= before.unwrap_or(0) != open;
        }
        if changed {
            self.open_flags_stale = true;
            let open_directions = &self.open_directions;
            self.datapath.set_open_directions(|endpoint| open_directions.get(&endpoint).copied().unwrap_or(0))?;
            self.open_flags_stale = false;
        }
        Ok(())
    }

    fn write(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let result = match op {
            MapOp::PolicyUpsert((prefix_len, key), value) => self.datapath.set_policy(*prefix_len, *key, *value),
            MapOp::PolicyDelete((prefix_len, key)) => self.datapath.remove_policy(*prefix_len, *key),
            MapOp::IpcacheUpsert((prefix_len, address), identity) => {
                self.datapath.set_ipcache(*prefix_len, *address, *identity)
            }
            MapOp::IpcacheDelete((prefix_len, address)) => self.datapath.remove_ipcache(*prefix_len, *address),
        };
        if result.is_ok() {
            self.writes += 1;
        }
        result
    }

    /// Enforce on a local pod: its addresses (anti-spoofing), its host-side
    /// veth, and its cgroup when known. Policy entries must be written first.
    pub fn attach_endpoint(
        &mut self,
        endpoint_id: u32,
        interface: &str,
        ifindex: u32,
        addresses: &[IpAddr],
        cgroup: Option<&Path>,
    ) -> Result<(), EndpointError> {
        // An endpoint whose allowlist did not fit starts closed, not open.
        let failed_closed =
            if self.failed_closed.contains(&endpoint_id) { datapath_common::ENDPOINT_FLAG_FAIL_CLOSED } else { 0 };
        let flags = failed_closed | self.open_directions.get(&endpoint_id).copied().unwrap_or(0);
        let keys: Vec<[u8; 16]> = addresses.iter().map(|a| address_key(*a)).collect();
        let info = EndpointInfo::new(endpoint_id, flags, &keys);
        for address in addresses {
            self.datapath.set_local_address(address_key(*address), endpoint_id)?;
        }
        self.datapath.set_endpoint(ifindex, info)?;
        self.datapath.attach_interface(interface)?;
        if let Some(cgroup) = cgroup {
            self.datapath.set_cgroup_endpoint(cgroup_id(cgroup)?, info)?;
            self.datapath.attach_cgroup(cgroup)?;
        }
        Ok(())
    }

    /// Attach both TC programs to a pod's interface before its endpoint is
    /// compiled, behind a pending entry: they pass everything until
    /// `attach_endpoint` writes the real one. Returns false, touching
    /// nothing, when links are pinned for it already (a previous agent's,
    /// enforcing).
    pub fn attach_pending(&mut self, interface: &str, ifindex: u32) -> Result<bool, EndpointError> {
        if self.datapath.interface_links_pinned(interface) {
            return Ok(false);
        }
        self.datapath.set_endpoint(ifindex, EndpointInfo::pending())?;
        if let Err(error) = self.datapath.attach_interface(interface) {
            // Half attached: undo, so no program ever finds the entry gone.
            let _ = self.datapath.detach_interface(interface);
            self.datapath.remove_endpoint(ifindex)?;
            return Err(error.into());
        }
        Ok(true)
    }

    /// Undo `attach_pending` for an interface whose entry is still the
    /// pending one; one that `attach_endpoint` has written since is left
    /// enforcing. Returns whether anything was undone.
    pub fn detach_pending(&mut self, interface: &str, ifindex: u32) -> Result<bool, EndpointError> {
        if !self.datapath.endpoint(ifindex).is_some_and(|info| info.is_pending()) {
            return Ok(false);
        }
        self.datapath.detach_interface(interface)?;
        self.datapath.remove_endpoint(ifindex)?;
        Ok(true)
    }

    pub fn detach_endpoint(
        &mut self,
        interface: &str,
        ifindex: u32,
        addresses: &[IpAddr],
        cgroup: Option<&Path>,
    ) -> Result<(), EndpointError> {
        self.datapath.detach_interface(interface)?;
        self.datapath.remove_endpoint(ifindex)?;
        for address in addresses {
            self.datapath.remove_local_address(address_key(*address))?;
        }
        if let Some(cgroup) = cgroup {
            self.datapath.detach_cgroup(cgroup)?;
            if let Ok(id) = cgroup_id(cgroup) {
                self.datapath.remove_cgroup_endpoint(id)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("cgroup {0}: {1}")]
    Cgroup(String, std::io::Error),
}

/// A cgroup v2 directory's id is its inode number.
pub fn cgroup_id(path: &Path) -> Result<u64, EndpointError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.ino()).map_err(|e| EndpointError::Cgroup(path.display().to_string(), e))
}
