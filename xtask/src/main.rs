//! Project tasks: `cargo xtask setup | test | crds | bench <what>`.

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
    /// Set up, then run the whole test suite.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Write the CRD manifests to manifests/crds/.
    Crds,
    /// The product end to end on this machine: a small shop, its policies, a default-deny rollout.
    Demo,
    /// Scenario directories with real traffic through the agent (needs root).
    Probe {
        #[arg(required = true)]
        dirs: Vec<String>,
    },
    /// Run a benchmark: `datapath`, `compile` or `convergence`.
    Bench { what: String },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::run()?;
            // Default members only: the eBPF crate is built by the controller's
            // build.rs for the BPF target, never for the host.
            cargo(&["build", "--all-targets"])?;
            let mut test = vec!["test"];
            test.extend(args.iter().map(String::as_str));
            cargo(&test)
        }
        Task::Crds => {
            let dir = workspace_root().join("manifests/crds");
            for (file, yaml) in bulkhead_crds::manifests() {
                let path = dir.join(file);
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Task::Demo => {
            setup::run()?;
            cargo(&["run", "--release", "-p", "bulkhead", "--", "demo"])
        }
        Task::Probe { dirs } => {
            setup::run()?;
            let mut args = vec!["run", "--release", "-p", "bulkhead", "--", "probe"];
            args.extend(dirs.iter().map(String::as_str));
            cargo(&args)
        }
        Task::Bench { what } => {
            setup::run()?;
            match what.as_str() {
                "datapath" | "compile" | "convergence" => {
                    cargo(&["run", "--release", "-p", "bulkhead", "--", "bench", &what])
                }
                other => bail!("unknown benchmark {other:?}: datapath, compile or convergence"),
            }
        }
    }
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ is in the workspace").to_path_buf()
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}
