//! The pure policy core: no async, no clock, no I/O, deterministic ordering.
//!
//! objects → [`rules::normalize`] (validation) → [`compile::compile`] (identities,
//! selector resolution, per-endpoint verdict functions, LPM entries) →
//! [`diff::diff`] (safe ordered map operations). [`lookup`] reads a compiled
//! state the way the datapath reads its maps.

pub mod compile;
pub mod diff;
pub mod identity;
pub mod lookup;
pub mod model;
pub mod rules;
pub mod selector;

pub use compile::{compile, DesiredState};
pub use diff::{apply, diff, MapOp};
pub use model::{ContainerPort, Namespace, Pod, PodRef, PolicyKind, PolicyObject, PolicyRef, Snapshot};
