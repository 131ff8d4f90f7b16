//! Bulkhead's lab: everything that proves the product and ships nowhere.
//!
//! - [`testbed`]: pods as network namespaces behind a node namespace, crafted
//!   packets, a real kube-apiserver with etcd; each removed by name on drop.
//! - [`probe`]: scenario directories with real traffic through the agent.
//! - [`demo`]: a small shop enforced end to end (`cargo xtask demo`).
//! - [`bench`]: the benchmarks (`cargo xtask bench`); [`connections`] the
//!   connection rate between two pods, [`flood`] other pods' latency under
//!   a flood of refusals, [`scale`] the one at cluster scale.

pub mod bench;
pub mod connections;
pub mod demo;
pub mod flood;
pub mod probe;
pub mod scale;
pub mod testbed;
