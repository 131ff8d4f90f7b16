//! The pure policy core: no async, no clock, no I/O, deterministic ordering.
//!
//! objects → [`rules::normalize`] (validation) → [`compile::compile`] or, change
//! by change, [`compile::Compiler`] (identities, the selector cache in
//! [`universe`], per-class verdict functions in [`evaluate`], LPM entries) →
//! [`diff::diff`] (safe ordered map operations). [`lookup`] reads a compiled
//! state the way the datapath reads its maps.

pub mod compile;
pub mod diff;
pub mod evaluate;
pub mod identity;
pub mod lookup;
pub mod model;
pub mod rules;
pub mod selector;
pub mod universe;

pub use compile::{compile, Changed, Compiler, DesiredState};
pub use diff::{apply, diff, MapOp};
pub use model::{ContainerPort, Namespace, Pod, PodRef, PolicyKind, PolicyObject, PolicyRef, Snapshot};
