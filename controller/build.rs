//! Builds the eBPF programs in `datapath-ebpf/` for the BPF target and leaves
//! the object in OUT_DIR, where `dataplane::loader` embeds it.

use anyhow::Context as _;

/// The toolchain that compiles the eBPF crate must use the same LLVM major
/// version as bpf-linker (22): pinned, never a floating channel
/// (../shared/design/toolchain.md).
const EBPF_TOOLCHAIN: &str = "1.95.0";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .context("controller/ has a parent")?
        .join("datapath-ebpf");
    let root_dir = root_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed={root_dir}/common/src");
    // Stable rustc builds `core` for the BPF target only with bootstrap on;
    // aya-build then adds `-Z build-std=core`.
    // SAFETY-free: build scripts are single-threaded at this point.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    aya_build::build_ebpf(
        [aya_build::Package { name: "datapath-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
