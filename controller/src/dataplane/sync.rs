//! Keeps the kernel's maps equal to the compiled desired state: applies
//! `diff` operations in their safe order, bumps the policy revision so live
//! connections are judged again, and fails an endpoint closed when its
//! entries cannot all be written.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use datapath_common::EndpointInfo;

use super::{AttachError, Datapath, DatapathError};
use bulkhead_policy::{self as policy, state::address_key, DesiredState, MapOp};

/// What one sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub operations: usize,
    /// Endpoints failed closed because a map was full, with the error.
    pub failed_closed: Vec<(u32, String)>,
    /// Endpoints failed closed before whose allowlist is now complete.
    pub reopened: Vec<u32>,
}

pub struct Programmer {
    datapath: Datapath,
    /// The policy and ipcache maps as last written.
    programmed: DesiredState,
    failed_closed: BTreeSet<u32>,
}

impl Programmer {
    /// Take over a datapath, reading what its (possibly pinned, adopted)
    /// maps already hold so the first sync writes only differences.
    pub fn adopt(datapath: Datapath) -> Self {
        let mut programmed = DesiredState::default();
        for (prefix_len, key, value) in datapath.policy_entries() {
            programmed.policy.insert((prefix_len, key), value);
        }
        for (prefix_len, address, identity) in datapath.ipcache_entries() {
            programmed.ipcache.insert((prefix_len, address), identity);
        }
        let failed_closed = datapath.failed_closed_endpoints();
        Self { datapath, programmed, failed_closed }
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

    pub fn programmed(&self) -> &DesiredState {
        &self.programmed
    }

    /// Bring the maps to `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncReport, DatapathError> {
        let ops = policy::diff(&self.programmed, desired);
        let mut report = SyncReport { operations: ops.len(), ..Default::default() };
        let mut still_incomplete = BTreeSet::new();
        for op in &ops {
            let result = match op {
                MapOp::PolicyUpsert((prefix_len, key), value) => self.datapath.set_policy(*prefix_len, *key, *value),
                MapOp::PolicyDelete((prefix_len, key)) => self.datapath.remove_policy(*prefix_len, *key),
                MapOp::IpcacheUpsert((prefix_len, address), identity) => {
                    self.datapath.set_ipcache(*prefix_len, *address, *identity)
                }
                MapOp::IpcacheDelete((prefix_len, address)) => self.datapath.remove_ipcache(*prefix_len, *address),
            };
            match result {
                Ok(()) => policy::diff::apply_one(&mut self.programmed, op),
                Err(error @ DatapathError::MapFull { .. }) => {
                    // A partial allowlist is never enforced: the endpoint
                    // whose entry did not fit drops everything but node traffic.
                    if let MapOp::PolicyUpsert((_, key), _) = op {
                        let endpoint = key.endpoint();
                        still_incomplete.insert(endpoint);
                        if self.failed_closed.insert(endpoint) {
                            self.datapath.fail_closed(endpoint)?;
                        }
                        report.failed_closed.push((endpoint, error.to_string()));
                    } else {
                        return Err(error);
                    }
                }
                Err(error) => return Err(error),
            }
        }
        // An endpoint whose entries all went in this time is whole again
        // (the entries that did not fit before were retried by this diff).
        let complete: Vec<u32> = self.failed_closed.difference(&still_incomplete).copied().collect();
        for endpoint in complete {
            self.datapath.reopen(endpoint)?;
            self.failed_closed.remove(&endpoint);
            report.reopened.push(endpoint);
        }
        if !ops.is_empty() {
            self.datapath.bump_policy_revision()?;
        }
        Ok(report)
    }

    /// Enforce on a local pod: its addresses (anti-spoofing), its host-side
    /// veth, and its cgroup when known. Policy entries must be synced first.
    pub fn attach_endpoint(
        &mut self,
        endpoint_id: u32,
        interface: &str,
        ifindex: u32,
        addresses: &[IpAddr],
        cgroup: Option<&Path>,
    ) -> Result<(), EndpointError> {
        // An endpoint whose allowlist did not fit starts closed, not open.
        let flags =
            if self.failed_closed.contains(&endpoint_id) { datapath_common::ENDPOINT_FLAG_FAIL_CLOSED } else { 0 };
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
