//! Where objects come from. Every source — the Kubernetes API server or a
//! folder of YAML files — turns what it sees into the same watch-shaped
//! `Change`s (`bulkhead_policy::snapshot`); everything after the watch is shared.

use std::time::Instant;

use bulkhead_policy::Change;

pub mod dir;
pub mod kubernetes;

/// Changes a source saw together.
#[derive(Clone, Debug)]
pub struct Update {
    pub changes: Vec<Change>,
    /// When the source noticed the first of them: the start of the
    /// convergence time.
    pub observed: Instant,
    /// The source's version of the world after these changes (the content
    /// digest of a folder, the resourceVersion of an object the API server
    /// sent), reported once it is in the datapath.
    pub revision: Option<String>,
}
