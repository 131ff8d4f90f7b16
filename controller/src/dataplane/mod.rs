//! The only code that touches the kernel's BPF objects: loading and pinning
//! the programs and maps, attaching to pod veths and cgroups, and writing the
//! compiled policy state into the maps.

mod error;
mod loader;
mod shared_array;
mod sweep;
pub mod sync;
mod table;

pub use error::{AttachError, DatapathError};
pub use loader::{Datapath, DropCount, VerdictCount, DEFAULT_PIN_DIR};
pub use sweep::{sweep, LiveTargets, SweepError, Swept};
