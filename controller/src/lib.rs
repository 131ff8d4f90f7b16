//! Bulkhead, the product: what ships in the image.
//!
//! - [`agent`]: `bulkhead agent`, one per node: follows a [`source`], compiles
//!   with `bulkhead-policy`, keeps the [`dataplane`] (the only code touching
//!   the kernel's BPF objects) in step.
//! - [`controller`]: `bulkhead controller`, one writer of policy status.
//! - [`cli`]: the offline commands (`check`, `explain`, `compile`).
//! - [`report`]: what agents tell the controller through the API server.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod dataplane;
pub mod report;
pub mod source;
