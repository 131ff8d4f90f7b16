//! Project tasks: `cargo xtask setup | test | manifests | image | demo | e2e | probe | bench <what>`.

mod image;
mod manifests;
mod setup;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Bulkhead project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Set up, then run the whole suite: formatting, purity, build, clippy,
    /// the manifests' checks, the image, every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Write manifests/crds/ and manifests/install.yaml.
    #[command(alias = "crds")]
    Manifests,
    /// Build the OCI image into target/image/bulkhead-<version>.oci.tar.
    Image,
    /// The product end to end on this machine: a small shop, its policies, a default-deny rollout.
    Demo,
    /// The image on a real node (kubelet, containerd, kube-proxy, a control plane), installed by
    /// manifests/install.yaml, once with a routed CNI and once with a bridge (needs root).
    E2e,
    /// Scenario directories with real traffic through the agent (needs root).
    Probe {
        #[arg(required = true)]
        dirs: Vec<String>,
    },
    /// Run a benchmark: `datapath` (`datapath:test_run` without iperf3), `compile`,
    /// `connections`, `convergence`, `flood` or `scale` (`scale:10000,api` for chosen folder sizes and the 10k API-server run).
    Bench { what: String },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::run()?;
            cargo(&["fmt", "--all", "--check"])?;
            check_policy_purity()?;
            // Default members only: the eBPF crate is built by the controller's
            // build.rs for the BPF target, never for the host.
            cargo(&["build", "--all-targets"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            setup::checkov(&workspace_root().join("manifests"))?;
            image::build()?;
            let mut test = vec!["test"];
            test.extend(args.iter().map(String::as_str));
            cargo(&test)
        }
        Task::Manifests => manifests::write(),
        Task::Image => {
            setup::run()?;
            image::build().map(|_| ())
        }
        Task::Demo => lab(&[], &["demo"]),
        Task::E2e => {
            setup::run()?;
            image::build()?;
            cargo(&["test", "-p", "bulkhead-lab", "--test", "e2e", "--", "--nocapture"])
        }
        Task::Probe { dirs } => {
            let mut args = vec!["probe"];
            args.extend(dirs.iter().map(String::as_str));
            lab(&[], &args)
        }
        Task::Bench { what } => match what.as_str() {
            "datapath" | "datapath:test_run" | "compile" | "connections" | "convergence" | "flood" | "scale" => {
                lab(&SHIPPED, &["bench", &what])
            }
            other if other.starts_with("scale:") => lab(&SHIPPED, &["bench", &what]),
            other => bail!("unknown benchmark {other:?}: datapath[:test_run], compile, connections, convergence, flood or scale[:sizes]"),
        },
    }
}

/// Crates the pure policy core must never reach, directly or through another
/// crate: an async runtime, an API client, the kernel.
const IMPURE: &[&str] = &["tokio", "kube-client", "kube-runtime", "hyper", "aya", "rtnetlink", "notify"];

/// The policy crate's Cargo.toml is its purity; this checks the resolved
/// tree as well, so no dependency brings an impure crate in by the back door.
fn check_policy_purity() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", "bulkhead-policy", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(workspace_root())
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!("cargo tree -p bulkhead-policy: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let found: Vec<&str> =
        tree.lines().filter_map(|l| l.split_whitespace().next()).filter(|name| IMPURE.contains(name)).collect();
    if !found.is_empty() {
        bail!("bulkhead-policy must stay pure, yet its dependencies reach {found:?}");
    }
    println!("bulkhead-policy: {} crates, none of {IMPURE:?}", tree.lines().count());
    Ok(())
}

/// Set up, then run the lab (`bulkhead-lab`) with the product binary it
/// drives built beside it; `build` adds to both cargo commands.
fn lab(build: &[&str], args: &[&str]) -> Result<()> {
    setup::run()?;
    cargo(&[&["build", "--release", "-p", "bulkhead", "-p", "bulkhead-lab"][..], build].concat())?;
    cargo(&[&["run", "--release", "-p", "bulkhead-lab"][..], build, &["--"], args].concat())
}

/// Benchmarks run what the image ships: the agent, and the lab that links
/// the policy compiler, built for its static musl target. (Built for glibc,
/// the compiler measured 1.5x slower here, two thirds of its time in
/// `memcmp` under the maps' searches of pods' names: most likely misses on
/// names glibc's allocator scattered, which musl's size classes keep close.)
const SHIPPED: [&str; 2] = ["--target", image::TARGET];

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ is in the workspace").to_path_buf()
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo).args(args).current_dir(workspace_root()))
}

/// Run a command to success, or say which failed and how.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
