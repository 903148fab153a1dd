//! `lowband`: the command-line entry point. Library crates return typed errors; this binary turns
//! them into one-line messages and exit code 2.

mod alloc_count;
mod bench;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: alloc_count::CountingAllocator = alloc_count::CountingAllocator;

#[derive(Parser, Debug)]
#[command(name = "lowband", version, about = "Train one language model across sites joined by slow links, and measure what it costs.")]
struct Cli {
    /// Worker threads for the engine (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmarks (results go into docs/results.md with their command).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time training steps of the engine: ms/step, tokens/s, GFLOP/s, peak fraction, peak RSS.
    Engine(bench::EngineBenchArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli) {
        eprintln!("error: {error:#}");
        std::process::exit(2);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(threads) = cli.threads {
        anyhow::ensure!(threads > 0, "--threads: must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    match cli.command {
        Some(Command::Bench(BenchCommand::Engine(args))) => bench::run(&args),
        None => Ok(()),
    }
}
