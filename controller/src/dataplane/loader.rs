//! Loading, pinning, attaching and map I/O.
//!
//! Maps are pinned by name under the pin directory and programs' links under
//! `links/`; a restarted agent loads the object again, which reuses every
//! pinned map as it is, and finds existing links by their pin path, so the
//! datapath keeps enforcing while no agent runs.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSockAddr, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
    },
    Ebpf, EbpfLoader,
};
use datapath_common::{
    capacity, map_names, policy_prefix, prefixed_slot, program_names, Address, DropKey, EndpointInfo, Event,
    IpcacheSlot, IpcacheValue, PolicyExactKey, PolicyKey, PolicySlot, PolicyValue, TableSlot, VerdictKey, VerdictSlot,
    CONFIG_EVENTS_PER_SECOND, CONFIG_FLOW_EVENTS, CONFIG_HASH_SEED, CONFIG_POLICY_REVISION, ENDPOINT_FLAGS_OPEN,
    ENDPOINT_FLAG_FAIL_CLOSED, NO_ENDPOINT, VERDICT_SLOTS_PER_CPU, VERDICT_SLOT_CPUS,
};

use super::{
    error::{AttachError, DatapathError},
    shared_array::SharedArray,
    table::ExactTable,
};

/// The eBPF object built by build.rs.
static DATAPATH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-datapath"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bulkhead";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Dropped packets per (direction, reason), summed over CPUs.
pub type DropCount = BTreeMap<DropKey, u64>;
/// Blocked and audited connections per (endpoint, policy, rule, direction, kind).
pub type VerdictCount = BTreeMap<VerdictKey, u64>;

/// BPF_PROG_TEST_RUN runs a TC program on loopback unless told otherwise.
const LOOPBACK_IFINDEX: u32 = 1;
/// `offsetof(struct __sk_buff, ifindex)`.
const SKB_IFINDEX_OFFSET: usize = 40;

/// Maps an older datapath pinned that this one no longer uses: removed at
/// load, so an upgrade does not leave their memory behind. `BH_DENIED` was
/// the LRU hash of refused flows, now `map_names::REFUSED`; `BH_EV_BUDGET`
/// the event budget before it kept its clock tick; `BH_DROPS` the drop
/// counters when they were a hash by endpoint.
const RETIRED_MAPS: &[&str] = &["BH_DENIED", "BH_EV_BUDGET", "BH_DROPS"];

/// Prefix length of an ipcache entry for one address (/128, or /32 IPv4-mapped).
const FULL_ADDRESS: u32 = 128;

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    ipcache: LpmTrie<MapData, [u8; 16], IpcacheValue>,
    ipcache_exact: ExactTable<IpcacheSlot>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    endpoints_by_ifindex: Array<MapData, EndpointInfo>,
    cgroup_endpoints: HashMap<MapData, u64, EndpointInfo>,
    local_addrs: HashMap<MapData, [u8; 16], u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    /// Trie entries per `prefixed_slot`: counted before an entry is written
    /// and after it is removed, so the programs never skip a trie that
    /// holds something for them.
    policy_prefixed: Array<MapData, u32>,
    /// The trie's keys (prefix length, key): a lookup in the trie answers
    /// the longest match, not whether this very entry is there.
    trie_keys: HashSet<(u32, PolicyKey)>,
    policy_exact: ExactTable<PolicySlot>,
    drops: PerCpuArray<MapData, u64>,
    verdict_slots: SharedArray<VerdictSlot>,
    verdicts: PerCpuHashMap<MapData, VerdictKey, u64>,
    config: Array<MapData, u64>,
    events: Option<RingBuf<MapData>>,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError> {
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// Mount bpffs at /sys/fs/bpf when nothing BPF is mounted there yet.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let mounted = nix_statfs_magic(root).map(|magic| magic == BPF_FS_MAGIC).unwrap_or(false);
    if mounted {
        return Ok(());
    }
    fs::create_dir_all(root)
        .map_err(|source| DatapathError::MountBpffs { path: root.display().to_string(), source })?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .map_err(|source| DatapathError::MountBpffs { path: root.display().to_string(), source })?;
    if !status.success() {
        return Err(DatapathError::MountBpffs {
            path: root.display().to_string(),
            source: std::io::Error::other(format!("mount exited with {status}")),
        });
    }
    Ok(())
}

fn nix_statfs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: c_path is NUL-terminated and buf is a properly sized statfs.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the buffer.
    let f_type = unsafe { buf.assume_init() }.f_type;
    // `f_type` is an i64 with glibc and an unsigned long with musl.
    #[allow(clippy::unnecessary_cast)]
    Ok(f_type as i64)
}

impl Datapath {
    /// Load the programs, reusing maps already pinned under `pin_dir`.
    pub fn load(pin_dir: impl AsRef<Path>) -> Result<Self, DatapathError> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        ensure_bpffs(&pin_dir)?;
        for dir in [pin_dir.clone(), pin_dir.join("links")] {
            fs::create_dir_all(&dir)
                .map_err(|source| DatapathError::PinDir { path: dir.display().to_string(), source })?;
        }
        for retired in RETIRED_MAPS {
            let pin = pin_dir.join(retired);
            if let Err(source) = fs::remove_file(&pin) {
                if source.kind() != std::io::ErrorKind::NotFound {
                    return Err(DatapathError::PinDir { path: pin.display().to_string(), source });
                }
            }
        }
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pin_dir).load(DATAPATH_OBJECT)?;
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingMap(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            program.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        for name in [program_names::CONNECT4, program_names::CONNECT6, program_names::SENDMSG4, program_names::SENDMSG6]
        {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingMap(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            program.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        let ipcache = take(&mut ebpf, map_names::IPCACHE)?;
        let endpoints = take(&mut ebpf, map_names::ENDPOINTS)?;
        let endpoints_by_ifindex = take(&mut ebpf, map_names::ENDPOINTS_BY_IFINDEX)?;
        let cgroup_endpoints = take(&mut ebpf, map_names::CGROUP_ENDPOINTS)?;
        let local_addrs = take(&mut ebpf, map_names::LOCAL_ADDRS)?;
        let policy = take(&mut ebpf, map_names::POLICY)?;
        let policy_prefixed = take(&mut ebpf, map_names::POLICY_PREFIXED)?;
        let drops = take(&mut ebpf, map_names::DROPS)?;
        let verdict_slots = shared_array(&mut ebpf, map_names::VERDICT_SLOTS, capacity::VERDICT_SLOTS)?;
        let verdicts = take(&mut ebpf, map_names::VERDICTS)?;
        let mut config = take(&mut ebpf, map_names::CONFIG)?;
        let events = Some(take(&mut ebpf, map_names::EVENTS)?);
        let seed = seed_placement(&mut config)?;
        let ipcache_exact = exact_table(
            &mut ebpf,
            map_names::IPCACHE_TABLE,
            capacity::IPCACHE_TABLE_SETS,
            seed,
            map_names::IPCACHE_EXACT,
        )?;
        let policy_exact = exact_table(
            &mut ebpf,
            map_names::POLICY_TABLE,
            capacity::POLICY_TABLE_SETS,
            seed,
            map_names::POLICY_EXACT,
        )?;
        let mut datapath = Self {
            ebpf,
            pin_dir,
            ipcache,
            ipcache_exact,
            endpoints,
            endpoints_by_ifindex,
            cgroup_endpoints,
            local_addrs,
            policy,
            policy_prefixed,
            trie_keys: HashSet::new(),
            policy_exact,
            drops,
            verdict_slots,
            verdicts,
            config,
            events,
        };
        datapath.trie_keys =
            datapath.policy.keys().filter_map(Result::ok).map(|key| (key.prefix_len(), key.data())).collect();
        datapath.count_prefixed()?;
        Ok(datapath)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn link_pin(&self, target: &str, program: &str) -> PathBuf {
        link_pin_in(&self.pin_dir, target, program)
    }

    /// The pins of an interface's two TC links under `pin_dir` that exist
    /// (none, one of a half-done attach, or both), without loading anything.
    pub fn interface_link_pins(pin_dir: impl AsRef<Path>, interface: &str) -> Vec<PathBuf> {
        [program_names::FROM_POD, program_names::TO_POD]
            .iter()
            .map(|name| link_pin_in(pin_dir.as_ref(), interface, name))
            .filter(|pin| pin.exists())
            .collect()
    }

    /// Every pinned link: (its target as pins name it, its program, the pin).
    pub fn link_pins(&self) -> Vec<(String, String, PathBuf)> {
        let entries = fs::read_dir(self.pin_dir.join("links")).into_iter().flatten().flatten();
        entries
            .filter_map(|entry| {
                let file = entry.file_name().to_string_lossy().into_owned();
                // Program names have no '-'; targets (cgroup paths with uids) may.
                let (target, program) = file.rsplit_once('-')?;
                Some((target.to_string(), program.to_string(), entry.path()))
            })
            .collect()
    }

    /// Remove a pinned link: the kernel detaches its program.
    pub fn unpin_link(&mut self, pin: &Path) -> Result<(), AttachError> {
        unpin_link(pin)
    }

    /// Attach both TC programs to the host side of a pod's veth. A link
    /// already pinned for it (a previous agent's) is kept as it is.
    pub fn attach_interface(&mut self, interface: &str) -> Result<(), AttachError> {
        for (name, attach_type) in
            [(program_names::FROM_POD, TcAttachType::Ingress), (program_names::TO_POD, TcAttachType::Egress)]
        {
            let pin = self.link_pin(interface, name);
            if pin.exists() {
                continue;
            }
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .expect("loaded in Datapath::load")
                .try_into()
                .expect("loaded as SchedClassifier");
            let link_id = program
                .attach(interface, attach_type)
                .map_err(|source| AttachError::Interface { interface: interface.to_string(), source })?;
            let link = program.take_link(link_id).map_err(|source| AttachError::Attach {
                program: name,
                target: interface.to_string(),
                source,
            })?;
            pin_link(FdLink::try_from(link), &pin)?;
        }
        Ok(())
    }

    /// Whether either TC program's link is pinned for this interface.
    pub fn interface_links_pinned(&self, interface: &str) -> bool {
        !Self::interface_link_pins(&self.pin_dir, interface).is_empty()
    }

    /// Detach from an interface by removing the pinned links.
    pub fn detach_interface(&mut self, interface: &str) -> Result<(), AttachError> {
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            unpin_link(&self.link_pin(interface, name))?;
        }
        Ok(())
    }

    /// Attach the socket hooks to a pod's cgroup (a cgroup v2 directory).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), AttachError> {
        let target = cgroup.display().to_string();
        let dir = fs::File::open(cgroup).map_err(|source| AttachError::Cgroup { path: target.clone(), source })?;
        for name in [program_names::CONNECT4, program_names::CONNECT6, program_names::SENDMSG4, program_names::SENDMSG6]
        {
            let pin = self.link_pin(&target, name);
            if pin.exists() {
                continue;
            }
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .expect("loaded in Datapath::load")
                .try_into()
                .expect("loaded as CgroupSockAddr");
            // Through bpf_link_create, which takes no attach flags: cgroup
            // links always coexist with other programs on the cgroup.
            let link_id = program
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| AttachError::Attach { program: name, target: target.clone(), source })?;
            let link = program.take_link(link_id).map_err(|source| AttachError::Attach {
                program: name,
                target: target.clone(),
                source,
            })?;
            pin_link(FdLink::try_from(link), &pin)?;
        }
        Ok(())
    }

    pub fn detach_cgroup(&mut self, cgroup: &Path) -> Result<(), AttachError> {
        let target = cgroup.display().to_string();
        for name in [program_names::CONNECT4, program_names::CONNECT6, program_names::SENDMSG4, program_names::SENDMSG6]
        {
            unpin_link(&self.link_pin(&target, name))?;
        }
        Ok(())
    }

    /// The hash is the record (adoption reads it); small ifindexes are also
    /// written to the array the programs read first.
    pub fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DatapathError> {
        self.endpoints.insert(ifindex, info, 0).map_err(|source| full_or(map_names::ENDPOINTS, source))?;
        if ifindex < capacity::ENDPOINTS_BY_IFINDEX {
            self.endpoints_by_ifindex
                .set(ifindex, info, 0)
                .map_err(|source| DatapathError::Map { name: map_names::ENDPOINTS_BY_IFINDEX, source })?;
        }
        Ok(())
    }

    /// The entry behind an interface, as the hash (the record) holds it.
    pub fn endpoint(&self, ifindex: u32) -> Option<EndpointInfo> {
        self.endpoints.get(&ifindex, 0).ok()
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        if ifindex < capacity::ENDPOINTS_BY_IFINDEX {
            let vacant = EndpointInfo::new(NO_ENDPOINT, 0, &[]);
            self.endpoints_by_ifindex
                .set(ifindex, vacant, 0)
                .map_err(|source| DatapathError::Map { name: map_names::ENDPOINTS_BY_IFINDEX, source })?;
        }
        ignore_missing(map_names::ENDPOINTS, self.endpoints.remove(&ifindex))
    }

    pub fn set_cgroup_endpoint(&mut self, cgroup_id: u64, info: EndpointInfo) -> Result<(), DatapathError> {
        self.cgroup_endpoints.insert(cgroup_id, info, 0).map_err(|source| full_or(map_names::CGROUP_ENDPOINTS, source))
    }

    pub fn remove_cgroup_endpoint(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        ignore_missing(map_names::CGROUP_ENDPOINTS, self.cgroup_endpoints.remove(&cgroup_id))
    }

    /// Mark every interface and cgroup of an endpoint fail-closed: its policy
    /// could not be programmed completely.
    pub fn fail_closed(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        self.set_endpoint_flags(endpoint_id, ENDPOINT_FLAG_FAIL_CLOSED)
    }

    /// Endpoints a previous agent left failed closed.
    pub fn failed_closed_endpoints(&self) -> std::collections::BTreeSet<u32> {
        let interfaces = self.endpoints.iter().filter_map(Result::ok).map(|(_, info)| info);
        let cgroups = self.cgroup_endpoints.iter().filter_map(Result::ok).map(|(_, info)| info);
        interfaces
            .chain(cgroups)
            .filter(|info| info.flags & ENDPOINT_FLAG_FAIL_CLOSED != 0)
            .map(|info| info.endpoint_id)
            .collect()
    }

    /// Enforce an endpoint's allowlist again once all of it is in the maps.
    pub fn reopen(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        self.set_endpoint_flags(endpoint_id, 0)
    }

    /// Set the fail-closed flag of an endpoint's entries, keeping the rest.
    fn set_endpoint_flags(&mut self, endpoint_id: u32, flags: u32) -> Result<(), DatapathError> {
        self.rewrite_endpoint_flags(|info| {
            (info.endpoint_id == endpoint_id).then_some((info.flags & !ENDPOINT_FLAG_FAIL_CLOSED) | flags)
        })
    }

    /// Set the flags saying which directions no policy restricts
    /// (`ENDPOINT_FLAG_OPEN_*`) on every endpoint's entries: `open` of its id.
    pub fn set_open_directions(&mut self, open: impl Fn(u32) -> u32) -> Result<(), DatapathError> {
        self.rewrite_endpoint_flags(|info| {
            (!info.is_pending())
                .then(|| (info.flags & !ENDPOINT_FLAGS_OPEN) | (open(info.endpoint_id) & ENDPOINT_FLAGS_OPEN))
        })
    }

    /// Rewrite the interface and cgroup entries whose flags `new_flags`
    /// changes (`None`: leave the entry be).
    fn rewrite_endpoint_flags(
        &mut self,
        new_flags: impl Fn(&EndpointInfo) -> Option<u32>,
    ) -> Result<(), DatapathError> {
        let changed = |info: &EndpointInfo| new_flags(info).filter(|flags| *flags != info.flags);
        let interfaces: Vec<(u32, EndpointInfo)> = self
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(ifindex, info)| Some((ifindex, EndpointInfo { flags: changed(&info)?, ..info })))
            .collect();
        for (ifindex, info) in interfaces {
            self.set_endpoint(ifindex, info)?;
        }
        let cgroups: Vec<(u64, EndpointInfo)> = self
            .cgroup_endpoints
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(cgroup, info)| Some((cgroup, EndpointInfo { flags: changed(&info)?, ..info })))
            .collect();
        for (cgroup, info) in cgroups {
            self.set_cgroup_endpoint(cgroup, info)?;
        }
        Ok(())
    }

    pub fn set_local_address(&mut self, address: [u8; 16], endpoint_id: u32) -> Result<(), DatapathError> {
        self.local_addrs.insert(address, endpoint_id, 0).map_err(|source| full_or(map_names::LOCAL_ADDRS, source))
    }

    pub fn remove_local_address(&mut self, address: [u8; 16]) -> Result<(), DatapathError> {
        ignore_missing(map_names::LOCAL_ADDRS, self.local_addrs.remove(&address))
    }

    /// Full-length entries go to the exact table the datapath looks in
    /// first, shorter prefixes to the trie.
    pub fn set_ipcache(&mut self, prefix_len: u32, address: [u8; 16], identity: u32) -> Result<(), DatapathError> {
        let value = IpcacheValue { identity, _pad: 0 };
        if prefix_len == FULL_ADDRESS {
            return self.ipcache_exact.insert(Address::from_octets(address), value);
        }
        self.ipcache
            .insert(&Key::new(prefix_len, address), value, 0)
            .map_err(|source| full_or(map_names::IPCACHE, source))
    }

    pub fn remove_ipcache(&mut self, prefix_len: u32, address: [u8; 16]) -> Result<(), DatapathError> {
        if prefix_len == FULL_ADDRESS {
            return self.ipcache_exact.remove(&Address::from_octets(address));
        }
        ignore_missing(map_names::IPCACHE, self.ipcache.remove(&Key::new(prefix_len, address)))
    }

    /// Full-length entries go to the exact table the datapath looks in first
    /// (and only there), shorter prefixes to the trie.
    pub fn set_policy(&mut self, prefix_len: u32, key: PolicyKey, value: PolicyValue) -> Result<(), DatapathError> {
        if prefix_len == policy_prefix::FULL {
            return self.policy_exact.insert(PolicyExactKey::from(key), value);
        }
        let trie_key = Key::new(prefix_len, key);
        let new = !self.trie_keys.contains(&(prefix_len, key));
        if new {
            self.add_prefixed(&key, 1)?;
        }
        match self.policy.insert(&trie_key, value, 0) {
            Ok(()) => {
                self.trie_keys.insert((prefix_len, key));
                Ok(())
            }
            Err(source) => {
                if new {
                    self.add_prefixed(&key, -1)?;
                }
                Err(full_or(map_names::POLICY, source))
            }
        }
    }

    pub fn remove_policy(&mut self, prefix_len: u32, key: PolicyKey) -> Result<(), DatapathError> {
        if prefix_len == policy_prefix::FULL {
            return self.policy_exact.remove(&PolicyExactKey::from(key));
        }
        ignore_missing(map_names::POLICY, self.policy.remove(&Key::new(prefix_len, key)))?;
        if self.trie_keys.remove(&(prefix_len, key)) {
            self.add_prefixed(&key, -1)?;
        }
        Ok(())
    }

    /// Move the count of trie entries in `key`'s slot by `by`.
    fn add_prefixed(&mut self, key: &PolicyKey, by: i64) -> Result<(), DatapathError> {
        let slot = prefixed_slot(key.endpoint(), key.direction(), key.identity());
        let name = map_names::POLICY_PREFIXED;
        let count = self.policy_prefixed.get(&slot, 0).map_err(|source| DatapathError::Map { name, source })?;
        let count = u32::try_from((i64::from(count) + by).max(0)).unwrap_or(u32::MAX);
        self.policy_prefixed.set(slot, count, 0).map_err(|source| DatapathError::Map { name, source })
    }

    /// Count the trie's entries into their slots, at every load: a datapath
    /// older than the counts left a trie without them, and an agent that
    /// died between counting and writing left a count short. Only slots
    /// with entries are written; a count left too high elsewhere costs a
    /// trie walk, never a verdict.
    fn count_prefixed(&mut self) -> Result<(), DatapathError> {
        let mut counts = vec![0u32; capacity::POLICY_PREFIXED as usize];
        for (_, key) in &self.trie_keys {
            counts[prefixed_slot(key.endpoint(), key.direction(), key.identity()) as usize] += 1;
        }
        let name = map_names::POLICY_PREFIXED;
        for (slot, count) in counts.into_iter().enumerate().filter(|(_, count)| *count != 0) {
            self.policy_prefixed.set(slot as u32, count, 0).map_err(|source| DatapathError::Map { name, source })?;
        }
        Ok(())
    }

    /// The interfaces (by ifindex) the endpoints map holds an entry for.
    pub fn endpoint_ifindexes(&self) -> Vec<u32> {
        self.endpoints.keys().filter_map(Result::ok).collect()
    }

    /// The cgroups (by id) the cgroup endpoints map holds an entry for.
    pub fn cgroup_endpoint_ids(&self) -> Vec<u64> {
        self.cgroup_endpoints.keys().filter_map(Result::ok).collect()
    }

    /// The addresses the local addresses map holds.
    pub fn local_addresses(&self) -> Vec<[u8; 16]> {
        self.local_addrs.keys().filter_map(Result::ok).collect()
    }

    /// Every ipcache entry now in the map (for adoption).
    pub fn ipcache_entries(&self) -> Vec<(u32, [u8; 16], u32)> {
        let exact = self
            .ipcache_exact
            .entries()
            .into_iter()
            .map(|(address, value)| (FULL_ADDRESS, address.octets(), value.identity));
        self.ipcache
            .iter()
            .filter_map(Result::ok)
            .map(|(key, value)| (key.prefix_len(), key.data(), value.identity))
            .chain(exact)
            .collect()
    }

    /// Every policy entry now in the map (for adoption and tests).
    pub fn policy_entries(&self) -> Vec<(u32, PolicyKey, PolicyValue)> {
        let exact = self
            .policy_exact
            .entries()
            .into_iter()
            .map(|(key, value)| (policy_prefix::FULL, PolicyKey::from(key), value));
        self.policy
            .iter()
            .filter_map(Result::ok)
            .map(|(key, value)| (key.prefix_len(), key.data(), value))
            .chain(exact)
            .collect()
    }

    /// Entries in the exact tables' overflow hashes (ipcache, policy): keys
    /// that came when their set was full, and cost a hash lookup.
    pub fn exact_overflow(&self) -> (usize, usize) {
        (self.ipcache_exact.overflowed(), self.policy_exact.overflowed())
    }

    pub fn policy_revision(&self) -> u64 {
        self.config.get(&CONFIG_POLICY_REVISION, 0).unwrap_or(0)
    }

    /// Tell the datapath policy changed: every existing connection is judged
    /// again on its next packet.
    pub fn bump_policy_revision(&mut self) -> Result<u64, DatapathError> {
        let next = self.policy_revision() + 1;
        self.config
            .set(CONFIG_POLICY_REVISION, next, 0)
            .map_err(|source| DatapathError::Map { name: map_names::CONFIG, source })?;
        Ok(next)
    }

    pub fn set_events_per_second(&mut self, limit: u64) -> Result<(), DatapathError> {
        self.config
            .set(CONFIG_EVENTS_PER_SECOND, limit, 0)
            .map_err(|source| DatapathError::Map { name: map_names::CONFIG, source })
    }

    /// Send an event for every new allowed egress flow (the egress baseline's input).
    pub fn set_flow_events(&mut self, enabled: bool) -> Result<(), DatapathError> {
        self.config
            .set(CONFIG_FLOW_EVENTS, u64::from(enabled), 0)
            .map_err(|source| DatapathError::Map { name: map_names::CONFIG, source })
    }

    pub fn drops(&self) -> DropCount {
        let mut out = DropCount::new();
        for slot in 0..capacity::DROPS {
            let Ok(values) = self.drops.get(&slot, 0) else { continue };
            let count = values.iter().sum::<u64>();
            if count != 0 {
                out.insert(DropKey::of_slot(slot), count);
            }
        }
        out
    }

    /// Every verdict counter, its slots' counts and the hash's added up.
    pub fn verdicts(&self) -> VerdictCount {
        let mut out = VerdictCount::new();
        for (_, slot) in self.held_verdict_slots() {
            *out.entry(slot.key).or_default() += slot.count;
        }
        for (key, values) in self.verdicts.iter().filter_map(Result::ok) {
            *out.entry(key).or_default() += values.iter().sum::<u64>();
        }
        out
    }

    /// The verdict slots that hold a key, with their index, of every CPU
    /// this machine can have.
    fn held_verdict_slots(&self) -> Vec<(u32, VerdictSlot)> {
        let cpus = aya::util::nr_cpus().map_or(VERDICT_SLOT_CPUS, |cpus| (cpus as u32).min(VERDICT_SLOT_CPUS));
        (0..cpus * VERDICT_SLOTS_PER_CPU)
            .filter_map(|index| {
                let element = self.verdict_slots.element(index);
                // SAFETY: aligned fields of an element of the mapping, read
                // while a program may take or count in it: the endpoint
                // first, which a program taking the slot writes last
                // (`VerdictSlot`), then a copy of the rest.
                let (endpoint, mut slot) = unsafe {
                    let endpoint = AtomicU32::from_ptr(std::ptr::addr_of_mut!((*element).key.endpoint));
                    let endpoint = endpoint.load(Ordering::Acquire);
                    (endpoint, element.read_volatile())
                };
                slot.key.endpoint = endpoint;
                (!slot.is_free()).then_some((index, slot))
            })
            .collect()
    }

    /// Free the verdict slots whose keys name endpoints gone (`live` says
    /// which are not), so new keys find them; answers the counts freed,
    /// which leave the counters' totals.
    pub fn free_verdict_slots(&mut self, live: impl Fn(u32) -> bool) -> VerdictCount {
        let mut freed = VerdictCount::new();
        for (index, slot) in self.held_verdict_slots() {
            if live(slot.key.endpoint) {
                continue;
            }
            let element = self.verdict_slots.element(index);
            // SAFETY: aligned fields of an element of the mapping. A
            // program takes a slot only once its endpoint is free, so the
            // count goes to 0 first: one taking the slot next starts from
            // there. A gone pod's key is counted no more.
            unsafe {
                let count = AtomicU64::from_ptr(std::ptr::addr_of_mut!((*element).count));
                *freed.entry(slot.key).or_default() += count.swap(0, Ordering::AcqRel);
                let endpoint = AtomicU32::from_ptr(std::ptr::addr_of_mut!((*element).key.endpoint));
                endpoint.store(NO_ENDPOINT, Ordering::Release);
            }
        }
        freed
    }

    /// Drain the event ring buffer.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(ring) = self.events.as_mut() {
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<Event>() {
                    // SAFETY: the kernel side writes exactly one `Event` per
                    // record; read_unaligned copes with any alignment.
                    out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
                }
            }
        }
        out
    }

    /// Take the ring buffer out to poll it from an async task.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Load the benchmark fixture `program_names::BENCH_NEW_FLOW` (never attached).
    pub fn load_bench_fixture(&mut self) -> Result<(), DatapathError> {
        let name = program_names::BENCH_NEW_FLOW;
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingMap(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        program.load().map_err(|source| DatapathError::Program { name, source })
    }

    /// Run a TC program once on a crafted packet (BPF_PROG_TEST_RUN): the
    /// program sees loopback (ifindex 1) as its interface.
    pub fn test_run(
        &self,
        program: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, Duration), DatapathError> {
        self.test_run_on(program, packet, LOOPBACK_IFINDEX, repeat)
    }

    /// `test_run` with the packet arriving on interface `ifindex`, which must exist.
    pub fn test_run_on(
        &self,
        program: &'static str,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(i32, Duration), DatapathError> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or(DatapathError::MissingMap(program))?
            .try_into()
            .map_err(|source| DatapathError::Program { name: program, source })?;
        let mut out = vec![0u8; packet.len() + 256];
        // The context is a `struct __sk_buff` cut short after `ifindex`, the
        // one field set: the kernel takes a shorter context and zeroes the rest.
        let mut context = [0u8; SKB_IFINDEX_OFFSET + 4];
        context[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        if ifindex != LOOPBACK_IFINDEX {
            opts.ctx_in = Some(&context);
        }
        opts.repeat = repeat.max(1);
        let result = program.test_run(opts).map_err(|source| DatapathError::Program { name: "test_run", source })?;
        Ok((result.return_value as i32, result.duration))
    }

    /// Remove every pin this datapath owns: links (detaching the programs) and maps.
    pub fn unpin_all(pin_dir: impl AsRef<Path>) -> std::io::Result<()> {
        let pin_dir = pin_dir.as_ref();
        if !pin_dir.exists() {
            return Ok(());
        }
        fs::remove_dir_all(pin_dir)
    }
}

/// Give freshly created maps a random placement seed (conntrack's and the
/// exact tables'). Pinned maps keep theirs: a new seed would strand every
/// entry stored under the old one.
fn seed_placement(config: &mut Array<MapData, u64>) -> Result<u64, DatapathError> {
    let seed = config.get(&CONFIG_HASH_SEED, 0).unwrap_or(0);
    if seed != 0 {
        return Ok(seed);
    }
    let mut seed = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut seed))
        .map_err(DatapathError::Seed)?;
    // Zero means "not seeded yet".
    let seed = u64::from_ne_bytes(seed) | 1;
    config.set(CONFIG_HASH_SEED, seed, 0).map_err(|source| DatapathError::Map { name: map_names::CONFIG, source })?;
    Ok(seed)
}

/// The array map `name`, mapped into memory.
fn shared_array<T>(ebpf: &mut Ebpf, name: &'static str, len: u32) -> Result<SharedArray<T>, DatapathError> {
    let aya::maps::Map::Array(map) = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))? else {
        return Err(DatapathError::Layout { name, found: "another map type".into(), wanted: "an array".into() });
    };
    SharedArray::open(name, map, len)
}

/// An exact table and its overflow hash, mapped for writing.
fn exact_table<S>(
    ebpf: &mut Ebpf,
    name: &'static str,
    sets: u32,
    seed: u64,
    overflow: &'static str,
) -> Result<ExactTable<S>, DatapathError>
where
    S: TableSlot + aya::Pod,
    S::Key: aya::Pod,
    S::Value: aya::Pod,
{
    let sets = shared_array(ebpf, name, sets)?;
    ExactTable::open(name, sets, seed, take(ebpf, overflow)?)
}

/// How a link's pin names its target (an interface, or a cgroup's path):
/// bpffs refuses names with a dot (reserved for its own files).
/// Where the link of `program` on `target` (an interface, a cgroup path) is pinned.
fn link_pin_in(pin_dir: &Path, target: &str, program: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{}-{program}", link_pin_target(target)))
}

pub fn link_pin_target(target: &str) -> String {
    target.trim_start_matches('/').replace(['/', '.'], "_")
}

/// Pin an attached link, so it outlives this process.
fn pin_link<E: std::fmt::Debug>(link: Result<FdLink, E>, pin: &Path) -> Result<(), AttachError> {
    let failed =
        |e: &dyn std::fmt::Debug| AttachError::Pin { path: pin.display().to_string(), reason: format!("{e:?}") };
    let link = link.map_err(|e| failed(&e))?;
    link.pin(pin).map_err(|e| failed(&e))?;
    Ok(())
}

fn unpin_link(pin: &Path) -> Result<(), AttachError> {
    if !pin.exists() {
        return Ok(());
    }
    let link = PinnedLink::from_pin(pin)
        .map_err(|e| AttachError::Pin { path: pin.display().to_string(), reason: format!("{e:?}") })?;
    // Dropping the unpinned link closes its last fd: the kernel detaches it.
    drop(link.unpin().map_err(|e| AttachError::Pin { path: pin.display().to_string(), reason: format!("{e:?}") })?);
    Ok(())
}

/// E2BIG/ENOMEM/ENOSPC on insert: the map is full.
fn full_or(name: &'static str, source: MapError) -> DatapathError {
    let full = matches!(&source, MapError::SyscallError(e) if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)));
    if full {
        DatapathError::MapFull { name, source }
    } else {
        DatapathError::Map { name, source }
    }
}

fn ignore_missing(name: &'static str, result: Result<(), MapError>) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DatapathError::Map { name, source }),
    }
}
