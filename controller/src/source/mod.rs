//! Where objects come from. Every source produces the same `Snapshot`
//! changes; everything after the watch is shared.

pub mod manifest;
