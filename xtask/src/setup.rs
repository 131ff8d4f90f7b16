//! `cargo xtask setup`: everything a fresh machine of this kind lacks to
//! build, test and package Bulkhead, installed idempotently (each step is
//! skipped when what it installs is already there). See
//! ../shared/design/toolchain.md.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::run as run_cmd;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version bpf-linker is built against; the rustc compiling
/// the eBPF crate must use the same one.
const LLVM_MAJOR: &str = "22";
/// checkov, the manifests' linter, pinned: its checks change from release to release.
const CHECKOV_VERSION: &str = "3.3.30";

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
    // bench connections: iptables as its users match many peers.
    ("ipset", "/usr/sbin/ipset"),
    ("curl", "/usr/bin/curl"),
    // The image: a static binary (musl), assembled as OCI without a daemon.
    ("musl-tools", "/usr/bin/musl-gcc"),
    ("umoci", "/usr/bin/umoci"),
    // promtool, for the shipped alerts' unit tests.
    ("prometheus", "/usr/bin/promtool"),
];

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_src()?;
    rust_target(crate::image::TARGET)?;
    bpf_linker()?;
    check_llvm_match()?;
    Ok(())
}

/// Where setup keeps what it builds: `$BULKHEAD_CACHE`, else ~/.cache/bulkhead.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("BULKHEAD_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/bulkhead"),
    }
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
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

fn rust_target(target: &str) -> Result<()> {
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    eprintln!("setup: adding the {target} target (the image's static binary)");
    run_cmd(Command::new("rustup").args(["target", "add", target]))
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

/// checkov over a folder of manifests, from a virtualenv in the cache
/// (made once); fails when any check fails. Skips are annotated in the
/// manifests themselves, each with its reason.
pub fn checkov(folder: &Path) -> Result<()> {
    let venv = cache_dir().join(format!("checkov-{CHECKOV_VERSION}"));
    let checkov = venv.join("bin/checkov");
    let complete = venv.join(".complete");
    if !complete.exists() {
        eprintln!("setup: installing checkov {CHECKOV_VERSION} into {}", venv.display());
        let _ = std::fs::remove_dir_all(&venv);
        run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run_cmd(Command::new(venv.join("bin/pip")).args(["install", "-q", &format!("checkov=={CHECKOV_VERSION}")]))?;
        std::fs::write(&complete, CHECKOV_VERSION)?;
    }
    let out = Command::new(&checkov)
        .args(["--framework", "kubernetes", "--compact", "--quiet", "--skip-download", "-d"])
        .arg(folder)
        .output()
        .with_context(|| format!("running {}", checkov.display()))?;
    let report = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("checkov found failures in {}:\n{report}{}", folder.display(), String::from_utf8_lossy(&out.stderr));
    }
    println!("checkov: no failures in {}", folder.display());
    Ok(())
}
