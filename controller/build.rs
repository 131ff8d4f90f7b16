//! Builds the eBPF programs in `datapath-ebpf/` for the BPF target and leaves
//! the object in OUT_DIR, where `dataplane::loader` embeds it.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir =
        std::path::Path::new(&manifest_dir).parent().context("controller/ has a parent")?.join("datapath-ebpf");
    let root_dir = root_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed={root_dir}/common/src");
    // Stable rustc builds `core` for the BPF target only with bootstrap on;
    // aya-build then adds `-Z build-std=core`.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    // The eBPF crate is compiled by the toolchain building this crate, pinned
    // by rust-toolchain.toml: its LLVM must be bpf-linker's (22), which
    // `cargo xtask setup` checks. Never a floating channel.
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".to_string());
    aya_build::build_ebpf(
        [aya_build::Package { name: "datapath-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
