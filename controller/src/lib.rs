//! Bulkhead: label-based connection policies compiled into per-pod eBPF
//! allowlists.
//!
//! - [`policy`]: the pure core — selectors, identities, compile, diff. No I/O.
//! - [`dataplane`]: the only code touching the kernel (aya).

pub mod agent;
pub mod dataplane;
pub mod packet;
pub mod policy;
pub mod scenario;
pub mod source;
pub mod status;
pub mod testbed;
