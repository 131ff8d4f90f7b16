//! Builds the eBPF programs in `datapath-ebpf/` for the BPF target and leaves
//! the object in OUT_DIR, where `dataplane::loader` embeds it.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _};

/// The toolchain that compiles the eBPF crate: rust-toolchain.toml's, whose
/// LLVM must be bpf-linker's (22). Never a floating channel.
const TOOLCHAIN: &str = "1.95.0";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = Path::new(&manifest_dir).parent().context("controller/ has a parent")?.join("datapath-ebpf");
    let root_dir = root_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed={root_dir}/common/src");
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| TOOLCHAIN.to_string());
    check_prerequisites(&toolchain)?;
    // Stable rustc builds `core` for the BPF target only with bootstrap on;
    // aya-build then adds `-Z build-std=core`.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    aya_build::build_ebpf(
        [aya_build::Package { name: "datapath-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// What the eBPF build needs and a fresh machine lacks, said in one line
/// with the command that installs it, before aya-build fails deep inside.
fn check_prerequisites(toolchain: &str) -> anyhow::Result<()> {
    const SETUP: &str = "run `cargo xtask setup` (it installs what is missing, idempotently)";
    if Command::new("bpf-linker").arg("--version").output().map_or(true, |o| !o.status.success()) {
        bail!("bpf-linker is not installed: {SETUP}");
    }
    let sysroot = Command::new("rustc")
        .args([&format!("+{toolchain}"), "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let Some(sysroot) = sysroot else {
        bail!("the Rust toolchain {toolchain} is not installed: {SETUP}");
    };
    if !Path::new(&sysroot).join("lib/rustlib/src/rust/library/Cargo.lock").exists() {
        bail!("the rust-src component of toolchain {toolchain} is not installed: {SETUP}");
    }
    Ok(())
}
