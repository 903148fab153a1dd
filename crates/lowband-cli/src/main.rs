//! `lowband`: the command-line entry point. Library crates return typed errors; this binary turns
//! them into one-line messages and exit codes (`failure.rs`: 1 a run failed, 2 usage, 3 refused
//! input).

mod alloc_count;
mod bench;
mod cluster;
mod compare;
mod coordinator_bench;
mod dashboard;
mod engine_cmds;
mod equal_time;
mod failure;
mod files;
mod help;
mod inspect;
mod nodes;
mod plan;
mod plot_runs;
mod plots;
mod report;
mod robustness;
mod settings;
mod shape;
mod site_bench;
mod staleness;
mod summary_table;
mod train;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: alloc_count::CountingAllocator = alloc_count::CountingAllocator;

#[derive(Parser, Debug)]
#[command(
    name = "lowband",
    version,
    about = "Train one language model across sites joined by slow links, and measure what it costs."
)]
struct Cli {
    /// Worker threads for the engine (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run strategies side by side on one budget against DDP (the default when no command is given).
    Compare(compare::CompareArgs),
    /// Like compare, with this process as the coordinator and every site a separate `lowband
    /// site` process, on loopback QUIC (ed25519 keys, TLS, signed packets).
    Cluster(ClusterArgs),
    /// Train one model with one strategy (same settings as compare) and save its checkpoint.
    Train(train::TrainArgs),
    /// Write a freshly initialized checkpoint.
    Init(engine_cmds::InitArgs),
    /// Mean next-byte loss of a checkpoint over a file, in non-overlapping context windows.
    Eval(engine_cmds::EvalArgs),
    /// Generate text from a checkpoint.
    Sample(engine_cmds::SampleArgs),
    /// Export a checkpoint to another format.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Import a checkpoint from another format.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Benchmarks (results go into docs/results.md with their command).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the coordinator of a cluster (a cluster file lists the strategy, the run and the keys).
    Coordinator(nodes::CoordinatorArgs),
    /// Run one site of a cluster, joining its coordinator.
    Site(nodes::SiteArgs),
    /// Put an emulated WAN link (bandwidth, latency, jitter, loss) in front of a node: a UDP
    /// relay that clients send to instead of the node.
    Shape(shape::ShapeArgs),
    /// Make a node key (ed25519) and print its public key: the line a cluster config lists.
    Keygen(KeygenArgs),
    /// When is training across sites cheaper than in one place? Plans (time, utilization,
    /// bytes, dollars, quality priced in) and break-even thresholds; `--from-run` uses a measured
    /// compare run.
    Plan(plan::PlanArgs),
    /// Look inside lowband's files.
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Loss charts (against tokens and against inter-site bytes) of several run directories
    /// together: strategies run as separate commands, judged on one chart.
    Plot(plot_runs::PlotArgs),
    /// Serve a finished run's live view again (its page, /api/state, /metrics) from its
    /// events.jsonl.
    View(dashboard::ViewArgs),
}

#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// Strategies, as compare takes them (round, streaming and scheduled strategies, async-diloco and
    /// [quorum=N], run over QUIC; ddp runs in memory as the reference).
    #[arg(long, value_parser = compare::parse_strategy_list)]
    strategies: Option<compare::StrategyList>,
    #[command(flatten)]
    run: compare::RunArgs,
    #[command(flatten)]
    network: nodes::NetworkArgs,
    /// Run the sites as tasks of this process instead of separate processes.
    #[arg(long)]
    in_process: bool,
    /// Start a site process that dies during the run again, with its saved state (it rejoins
    /// with the current parameters). Without it the run goes on without that site.
    #[arg(long, conflicts_with = "in_process")]
    restart_sites: bool,
    /// Serve the run's live view (page, /api/state, /metrics) on PORT (loopback) or HOST:PORT.
    #[arg(long, value_parser = dashboard::parse_listen)]
    dashboard: Option<std::net::SocketAddr>,
}

#[derive(clap::Args, Debug)]
struct KeygenArgs {
    /// Where to write the key (mode 0600).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Replace an existing key file (its node loses its identity).
    #[arg(long)]
    force: bool,
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    if args.out.exists() && !args.force {
        anyhow::bail!(
            "{} exists: a node's key is its identity; pass --force to replace it",
            args.out.display()
        );
    }
    let identity = lowband_net::Identity::generate()?;
    identity.save(&args.out)?;
    println!("public {}", identity.public_key());
    Ok(())
}

#[derive(Subcommand, Debug)]
enum InspectCommand {
    /// A packet (an envelope, as `compare` writes to runs/NAME/packets/, or a bare codec payload):
    /// header fields, codec and parameters, size against the formula, and value statistics.
    Packet(inspect::PacketArgs),
}

#[derive(Subcommand, Debug)]
enum ExportCommand {
    /// Hugging Face GPT-2 layout (config.json + model.safetensors), loadable by `transformers`.
    Hf(engine_cmds::ExportArgs),
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// From a Hugging Face GPT-2 directory (f32).
    Hf(engine_cmds::ImportArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time training steps of the engine: ms/step, tokens/s, GFLOP/s, peak fraction, peak RSS.
    Engine(bench::EngineBenchArgs),
    /// Every attack x every aggregator against the honest run (the table in docs/results.md).
    Robustness(robustness::RobustnessArgs),
    /// The coordinator's time, memory and bytes per round as the number of sites grows.
    Coordinator(coordinator_bench::CoordinatorBenchArgs),
    /// A site's own time per round (encode, decode, loopback transfer, copies) for a flat buffer.
    Site(site_bench::SiteBenchArgs),
}

fn main() {
    let matches = help::with_defaults(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Messages of the library crates (`tracing`): info and above on stderr; `RUST_LOG` filters
    // (e.g. `RUST_LOG=lowband_runtime=debug`, or `warn` for less).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    if let Err(error) = run(cli) {
        eprintln!("error: {}", one_line(&error));
        std::process::exit(failure::exit_code(&error));
    }
}

/// An error and its causes on one line, each cause once: many of our errors already quote their
/// cause (`PATH: OS ERROR`), and printing the chain again doubled it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// `--threads` above this many per core is refused (10,000 threads on 2 cores never started
/// training).
const THREADS_PER_CORE_MAX: usize = 4;

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(threads) = cli.threads {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        anyhow::ensure!(
            (1..=THREADS_PER_CORE_MAX * cores).contains(&threads),
            "--threads: {threads} is outside 1 ..= {} ({THREADS_PER_CORE_MAX} per core on this machine's {cores}); more threads than that only slow training down",
            THREADS_PER_CORE_MAX * cores
        );
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()?;
    }
    match cli.command {
        None => match Cli::parse_from(["lowband", "compare"]).command {
            Some(Command::Compare(defaults)) => compare::run_compare(&defaults),
            _ => unreachable!("`lowband compare` parses to the compare command"),
        },
        Some(Command::Compare(args)) => compare::run_compare(&args),
        Some(Command::Cluster(args)) => compare::run_with_driver(
            &compare::CompareArgs {
                strategies: args.strategies,
                run: args.run,
                resume: false,
                stop_after_rounds: None,
                dashboard: args.dashboard,
            },
            if args.in_process {
                compare::Driver::Loopback
            } else {
                compare::Driver::Processes {
                    restart_sites: args.restart_sites,
                }
            },
            &args.network,
        )
        .map(|_| ()),
        Some(Command::View(args)) => dashboard::view(&args),
        Some(Command::Train(args)) => train::run(&args),
        Some(Command::Init(args)) => engine_cmds::init(&args),
        Some(Command::Eval(args)) => engine_cmds::eval(&args),
        Some(Command::Sample(args)) => engine_cmds::sample(&args),
        Some(Command::Export(ExportCommand::Hf(args))) => engine_cmds::export_hf(&args),
        Some(Command::Import(ImportCommand::Hf(args))) => engine_cmds::import_hf(&args),
        Some(Command::Bench(BenchCommand::Engine(args))) => bench::run(&args),
        Some(Command::Bench(BenchCommand::Robustness(args))) => robustness::run_grid(&args),
        Some(Command::Bench(BenchCommand::Coordinator(args))) => coordinator_bench::run(&args),
        Some(Command::Bench(BenchCommand::Site(args))) => site_bench::run(&args),
        Some(Command::Inspect(InspectCommand::Packet(args))) => inspect::packet(&args),
        Some(Command::Keygen(args)) => keygen(&args),
        Some(Command::Plan(args)) => plan::run(&args),
        Some(Command::Plot(args)) => plot_runs::run(&args),
        Some(Command::Shape(args)) => shape::run(&args),
        Some(Command::Coordinator(args)) => nodes::coordinator(&args),
        Some(Command::Site(args)) => nodes::site(&args),
    }
}
