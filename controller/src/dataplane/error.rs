//! What can go wrong with the kernel's BPF objects.

use aya::maps::MapError;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs { path: String, source: std::io::Error },
    #[error("creating pin directory {path}: {source}")]
    PinDir { path: String, source: std::io::Error },
    #[error("reading the placement hash seed from /dev/urandom: {0}")]
    Seed(std::io::Error),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name} is full ({source}): the endpoints concerned fail closed")]
    MapFull { name: &'static str, source: MapError },
    #[error("map {name} is pinned as {found}, this build wants {wanted}: remove the old datapath first (`bulkhead datapath remove`)")]
    Layout { name: &'static str, found: String, wanted: String },
    #[error("mapping map {name} into memory: {source}")]
    Mmap { name: &'static str, source: std::io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {interface}: {source}")]
    Interface { interface: String, source: aya::programs::ProgramError },
    #[error("cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error("attaching {program} to {target}: {source}")]
    Attach { program: &'static str, target: String, source: aya::programs::ProgramError },
    #[error("pinning link {path}: {reason}")]
    Pin { path: String, reason: String },
}
