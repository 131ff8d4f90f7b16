//! `cargo xtask setup`: everything a fresh machine of this kind lacks to
//! build and test Bulkhead, installed idempotently (each step is skipped when
//! what it installs is already there). See ../shared/design/toolchain.md.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version bpf-linker is built against; the rustc compiling
/// the eBPF crate must use the same one.
const LLVM_MAJOR: &str = "22";

/// Debian packages and a file each one provides, to tell whether it is there.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/lib/libLLVM.so"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "/usr/sbin/ip"),
    ("iputils-ping", "/usr/bin/ping"),
    ("socat", "/usr/bin/socat"),
    ("netcat-openbsd", "/usr/bin/nc.openbsd"),
    ("iperf3", "/usr/bin/iperf3"),
    ("iptables", "/usr/sbin/iptables"),
];

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    check_llvm_match()?;
    Ok(())
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> =
        APT_PACKAGES.iter().filter(|(_, file)| !Path::new(file).exists()).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rust_src() -> Result<()> {
    let installed = output("rustup", &["component", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src (the eBPF build compiles core with -Z build-std)");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn bpf_linker() -> Result<()> {
    if let Some(version) = output("bpf-linker", &["--version"]) {
        if version.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about a minute)");
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features"])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .arg("--locked")
            // Without it the build script finds Debian's LLVM 14 llvm-config.
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")),
    )
}

fn check_llvm_match() -> Result<()> {
    let verbose = output("rustc", &["-vV"]).context("rustc -vV")?;
    let llvm = verbose.lines().find_map(|l| l.strip_prefix("LLVM version: ")).unwrap_or("unknown");
    if !llvm.starts_with(&format!("{LLVM_MAJOR}.")) {
        bail!("rustc uses LLVM {llvm}, bpf-linker LLVM {LLVM_MAJOR}: the eBPF link would fail with \"Invalid record\"; use a toolchain on LLVM {LLVM_MAJOR} (stable 1.95.0)");
    }
    Ok(())
}
