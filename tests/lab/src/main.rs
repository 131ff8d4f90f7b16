//! `bulkhead-lab`: the demo, the scenario probe runner and the benchmarks,
//! run through `cargo xtask demo | probe | bench`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bulkhead-lab", about = "Bulkhead's demo, probe runner and benchmarks (root)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A small shop enforced end to end on this machine.
    Demo,
    /// Scenario directories with real traffic through the agent.
    Probe { dirs: Vec<PathBuf> },
    /// A benchmark; see BENCHMARKS.md.
    Bench { what: String },
    /// The controller's status engine on a folder (what `bench scale` measures).
    StatusEngine { folder: PathBuf },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Demo => bulkhead_lab::demo::run().map(|()| true),
        Command::Probe { dirs } => bulkhead_lab::probe::run(&dirs),
        Command::Bench { what } => bulkhead_lab::bench::run(&what).map(|()| true),
        Command::StatusEngine { folder } => {
            // The controller's engine, as the product binary runs it.
            bulkhead::limit_malloc_arenas();
            bulkhead_lab::scale::status_engine(&folder).map(|()| true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
