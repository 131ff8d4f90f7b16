//! Bulkhead's policy core, pure: no async runtime, no API client, no kernel,
//! no clock, no file I/O, deterministic ordering. Its Cargo.toml is the
//! proof: nothing here can reach tokio, kube's client or aya.
//!
//! YAML text → [`manifest`] (objects) → [`snapshot::Snapshot::apply`] (the one
//! place a policy is validated, by [`rules`]) → [`compile::compile`] or,
//! change by change, [`compile::Compiler`] (identities, the selector cache in
//! [`universe`], per-class verdict functions in [`evaluate`]) →
//! [`state::DesiredState`] (the datapath's entries) → [`diff::diff`] (safe
//! ordered map operations). [`lookup`] reads a state the way the datapath
//! reads its maps.

#![forbid(unsafe_code)]

pub mod audit;
pub mod baseline;
pub mod compile;
pub mod coverage;
pub mod diff;
pub mod evaluate;
pub mod identity;
pub mod lookup;
pub mod manifest;
pub mod model;
pub mod rules;
pub mod selection;
pub mod selector;
pub mod shared;
pub mod snapshot;
pub mod state;
pub mod universe;

pub use compile::{compile, Changed, Compiler};
pub use diff::{apply, diff, diff_ops, MapOp};
pub use model::{ContainerPort, Namespace, Pod, PodRef, PolicyKind, PolicyObject, PolicyRef};
pub use shared::Name;
pub use snapshot::{Admission, Change, Object, ObjectKey, ObjectKind, Snapshot};
pub use state::DesiredState;
