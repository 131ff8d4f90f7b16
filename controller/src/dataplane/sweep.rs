//! What pods deleted while no agent ran leave in the datapath: links pinned
//! for veths that are gone and for cgroups of pods that are (a cgroup link
//! also keeps its cgroup alive, and a veth name reused by a new pod would
//! find the old, detached link and never get programs of its own), endpoint
//! entries for those interfaces and cgroups, and local-address entries of no
//! local pod. A running agent detaches a pod as it leaves; the sweep catches
//! what happened while none ran, and never touches what a pod of this node
//! still has, so it cannot open one.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use datapath_common::program_names;

use super::{loader::link_pin_target, AttachError, Datapath, DatapathError};

/// Kernel objects that exist now, which pins and entries may refer to.
#[derive(Debug, Default)]
pub struct LiveTargets {
    /// The interfaces of the agent's network namespace: name → ifindex.
    pub interfaces: BTreeMap<String, u32>,
    /// The cgroups of this node's pods: path → id (inode); `None` when the
    /// agent has no cgroup root, so cgroup links are left alone.
    pub cgroups: Option<BTreeMap<PathBuf, u64>>,
    /// The addresses of this node's pods.
    pub local_addresses: BTreeSet<[u8; 16]>,
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// The pins of the links removed, by file name.
    pub links: Vec<String>,
    pub endpoints: usize,
    pub cgroup_endpoints: usize,
    pub local_addresses: usize,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        self == &Swept::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
}

const INTERFACE_PROGRAMS: [&str; 2] = [program_names::FROM_POD, program_names::TO_POD];
const CGROUP_PROGRAMS: [&str; 4] =
    [program_names::CONNECT4, program_names::CONNECT6, program_names::SENDMSG4, program_names::SENDMSG6];

/// Remove the pins and entries of interfaces that no longer exist and of
/// cgroups and addresses no local pod has.
pub fn sweep(datapath: &mut Datapath, live: &LiveTargets) -> Result<Swept, SweepError> {
    let mut swept = Swept::default();
    let interfaces: BTreeSet<String> = live.interfaces.keys().map(|name| link_pin_target(name)).collect();
    let cgroups: Option<BTreeSet<String>> =
        live.cgroups.as_ref().map(|c| c.keys().map(|path| link_pin_target(&path.display().to_string())).collect());
    for (target, program, pin) in datapath.link_pins() {
        let gone = if INTERFACE_PROGRAMS.contains(&program.as_str()) {
            !interfaces.contains(&target)
        } else if CGROUP_PROGRAMS.contains(&program.as_str()) {
            cgroups.as_ref().is_some_and(|live| !live.contains(&target))
        } else {
            false
        };
        if gone {
            datapath.unpin_link(&pin)?;
            swept.links.push(format!("{target}-{program}"));
        }
    }
    let ifindexes: BTreeSet<u32> = live.interfaces.values().copied().collect();
    for ifindex in datapath.endpoint_ifindexes() {
        if !ifindexes.contains(&ifindex) {
            datapath.remove_endpoint(ifindex)?;
            swept.endpoints += 1;
        }
    }
    if let Some(cgroups) = &live.cgroups {
        let ids: BTreeSet<u64> = cgroups.values().copied().collect();
        for id in datapath.cgroup_endpoint_ids() {
            if !ids.contains(&id) {
                datapath.remove_cgroup_endpoint(id)?;
                swept.cgroup_endpoints += 1;
            }
        }
    }
    for address in datapath.local_addresses() {
        if !live.local_addresses.contains(&address) {
            datapath.remove_local_address(address)?;
            swept.local_addresses += 1;
        }
    }
    Ok(swept)
}
