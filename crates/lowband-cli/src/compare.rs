//! `lowband compare`: several strategies on one budget (same corpus, model, seed and tokens),
//! side by side with DDP; the default command.

use std::path::PathBuf;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowband_data::Split;
use lowband_runtime::{run, Persistence, RunConfig, RunError, RunResult, Strategy};

use crate::cluster::{run_site_processes, SiteLaunch};
use crate::nodes::NetworkArgs;
use crate::report::{self, Comparison};
use crate::settings::RunFile;
use crate::train::load_corpus;

/// The settings every run command shares (`compare`, `cluster`, `train`): a run file and the
/// flags that override it. Defaults are `RunConfig::default()`'s (shown by `--help`).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// Run file (TOML: every RunConfig field, `strategies`; the format is in `lowband coordinator
    /// --help`); the flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Number of sites (K).
    #[arg(long)]
    pub sites: Option<usize>,
    /// Model preset (tiny, small, ref).
    #[arg(long)]
    pub preset: Option<String>,
    /// Total training tokens per strategy (sets the steps: tokens / (sites x site_batch x context)).
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Inner steps per site (instead of --tokens).
    #[arg(long, conflicts_with = "tokens")]
    pub steps: Option<u64>,
    /// Inner steps per round (H) for strategies without @H.
    #[arg(long)]
    pub inner_steps: Option<u64>,
    /// Sequences per site per inner step.
    #[arg(long)]
    pub site_batch: Option<usize>,
    /// Seed of the run (the model's initialization, the data sampling, random codecs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Text file or directory (default: the generated synthetic language).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Size of the generated corpus when no corpus is given.
    #[arg(long)]
    pub corpus_bytes: Option<usize>,
    /// Choose settings without touching the validation split: set it aside and hold out the
    /// last part (the same fraction) of the training split instead. For screening candidates,
    /// never for the figures a benchmark reports.
    #[arg(long)]
    pub tuning: bool,
    /// Aggregator of round strategies that do not choose one with `[agg=...]`: mean, median,
    /// trimmed-mean[:trim=F], centered-clip[:iterations=L], clipped-mean.
    #[arg(long, value_parser = parse_aggregator)]
    pub aggregator: Option<lowband_protocol::AggregatorSpec>,
    /// Hostile sites, SITE:MODE, comma-separated: signflip, scale=X, noise=S, zeros, nan, stale,
    /// garbage; e.g. `--attacks 2:scale=-10`. DDP, the reference, runs honest.
    #[arg(long, value_parser = parse_attack, value_delimiter = ',')]
    pub attacks: Vec<lowband_runtime::Attack>,
    /// Relative compute speed of each site, comma-separated (e.g. `1,1,0.7,0.4`): the emulated
    /// clock charges each site its steps' compute over its speed, so a round waits for its
    /// slowest site as it would across data centers of different hardware (see goodput in the
    /// report). It changes when things happen; an asynchronous strategy merges in that order.
    #[arg(long, value_delimiter = ',')]
    pub site_speeds: Vec<f64>,
    /// A fault schedule for async-diloco and [quorum=N] strategies: `down:SITE@FROM-TO` (a site
    /// goes down and comes back), `slow:SITE@FROM=FACTOR` (it slows down), at fractions of the
    /// run, comma-separated; or `random:SEED` (a seeded schedule, printed in the report).
    #[arg(long)]
    pub faults: Option<String>,
    /// GFLOP/s of a site of speed 1: the emulated clock charges each inner step its FLOPs over
    /// this rate (a fixed rate, so that emulated time is the same on every machine).
    #[arg(long)]
    pub site_gflop_per_second: Option<f64>,
    /// Write the machine-readable summary (summary.json's content) here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run directory name under --runs-dir (default: from the settings).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace the results of another run in the run directory (other strategies under the
    /// same name); without it such a run is refused.
    #[arg(long)]
    pub force: bool,
    /// Directory that holds run directories.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
}

#[derive(clap::Args, Debug, Default, Clone)]
pub struct CompareArgs {
    /// Strategies, comma-separated: ddp, diloco, fedavg, diloco-int8, diloco-4bit, sparseloco,
    /// frugal, demo-dct, streaming, async-diloco; optionally NAME@H (e.g. sparseloco@30) and [overrides] (e.g.
    /// `sparseloco@30[up=topk:k=32,chunk=4096,values=q2;decay=0.9]`, see ARCHITECTURE.md).
    /// Commas inside brackets belong to the strategy.
    #[arg(long, value_parser = parse_strategy_list)]
    pub strategies: Option<StrategyList>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Continue from the run directory's saved state instead of starting over.
    #[arg(long)]
    pub resume: bool,
    /// Stop each strategy after this many rounds (DDP: this many x inner_steps steps), saving
    /// its state: continue later with the same command and --resume.
    #[arg(long)]
    pub stop_after_rounds: Option<u64>,
    /// Serve the run's live view (page, /api/state, /metrics) on PORT (loopback) or HOST:PORT
    /// while it runs (port 0: any free port; the address is printed).
    #[arg(long, value_parser = crate::dashboard::parse_listen)]
    pub dashboard: Option<std::net::SocketAddr>,
}

/// The strategies a command runs when neither the flags nor the run file name any.
pub const STRATEGIES_DEFAULT: &str = "ddp,diloco,frugal";

/// Settings after the run file and the flags: the run and its strategies.
pub(crate) fn settings(args: &CompareArgs) -> Result<(RunConfig, Vec<Strategy>)> {
    let (config, file_strategies) = run_settings(&args.run)?;
    let names = args
        .strategies
        .clone()
        .map(|l| l.0)
        .or(file_strategies)
        .unwrap_or_else(|| STRATEGIES_DEFAULT.split(',').map(String::from).collect());
    let strategies = strategies_of(&names, &config)?;
    Ok((config, strategies))
}

/// The run file under the flags, checked; and the strategies the file names.
pub(crate) fn run_settings(args: &RunArgs) -> Result<(RunConfig, Option<Vec<String>>)> {
    let file = match &args.config {
        Some(path) => RunFile::read(path)?,
        None => RunFile::default(),
    };
    let mut config = file.run;
    if let Some(v) = &args.preset {
        config.preset = v.clone();
    }
    if let Some(v) = args.sites {
        config.sites = v;
    }
    if let Some(v) = args.site_batch {
        config.site_batch = v;
    }
    if let Some(v) = args.inner_steps {
        config.inner_steps = v;
    }
    if let Some(v) = args.seed {
        config.seed = v;
    }
    if let Some(v) = args.steps {
        config.steps = v;
    }
    if let Some(v) = args.aggregator {
        config.aggregator = v;
    }
    if !args.attacks.is_empty() {
        config.attacks = args.attacks.clone();
    }
    if !args.site_speeds.is_empty() {
        config.site_speeds = args.site_speeds.clone();
    }
    if let Some(v) = args.site_gflop_per_second {
        config.site_gflop_per_second = v;
    }
    if let Some(text) = &args.faults {
        config.faults = lowband_runtime::faults::parse_schedule(text, config.sites)
            .map_err(|e| setting_error("faults", &e))?;
    }
    if let Some(v) = &args.corpus {
        config.corpus = Some(v.clone());
    }
    if let Some(v) = args.corpus_bytes {
        config.corpus_bytes = v;
    }
    if args.tuning {
        config.tuning = true;
    }
    config
        .validate()
        .map_err(|(field, reason)| setting_error(field, &reason))?;
    if let Some(tokens) = args.tokens {
        let context = lowband_engine::preset(&config.preset)?.model.context_length as u64;
        let per_step = config.sites as u64 * config.site_batch as u64 * context;
        if tokens < per_step {
            bail!("--tokens: {tokens} is less than one step ({per_step} tokens: sites x site_batch x context)");
        }
        config.steps = tokens / per_step;
    }
    Ok((config, file.strategies))
}

/// The named strategies, parsed (H defaults to the run's inner_steps), none twice.
fn strategies_of(names: &[String], config: &RunConfig) -> Result<Vec<Strategy>> {
    if names.is_empty() {
        bail!("--strategies: name at least one strategy");
    }
    let strategies = names
        .iter()
        .map(|n| {
            Strategy::parse(n.trim(), config.inner_steps)
                .map_err(|e| anyhow::anyhow!("--strategies: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, strategy) in strategies.iter().enumerate() {
        if strategies[..i].iter().any(|s| s.name() == strategy.name()) {
            bail!("--strategies: {} is listed twice", strategy.name());
        }
        if !config.faults.is_empty() && !strategy.scheduled() {
            bail!("--faults: {} does not run on the emulated clock's schedule; a fault schedule applies to async-diloco and to round strategies with [quorum=N] (plain diloco under faults is diloco[quorum={}])", strategy.name(), config.sites);
        }
    }
    Ok(strategies)
}

/// A refused setting, named as the file names it and as the flag that sets it.
pub(crate) fn setting_error(field: &str, reason: &str) -> anyhow::Error {
    const FLAGS: [&str; 13] = [
        "faults",
        "site_speeds",
        "site_gflop_per_second",
        "preset",
        "sites",
        "site_batch",
        "inner_steps",
        "seed",
        "steps",
        "aggregator",
        "attacks",
        "corpus",
        "corpus_bytes",
    ];
    if FLAGS.contains(&field) {
        anyhow::anyhow!("{field} (--{}): {reason}", field.replace('_', "-"))
    } else {
        anyhow::anyhow!("{field}: {reason}")
    }
}

/// What a comparison produced.
pub struct Outcome {
    pub config: RunConfig,
    pub results: Vec<RunResult>,
    pub split: Split,
    pub run_dir: PathBuf,
}

pub fn run_compare(args: &CompareArgs) -> Result<()> {
    run_with(args).map(|_| ())
}

/// Run the strategies, print and write the report.
pub fn run_with(args: &CompareArgs) -> Result<Outcome> {
    run_with_driver(args, Driver::Memory, &NetworkArgs::default())
}

/// Which driver runs the round strategies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Driver {
    /// Every site and the coordinator in this process, packets handed over in memory.
    Memory,
    /// The coordinator and every site as nodes on loopback QUIC (keys, TLS, signed packets), in
    /// this process; DDP still runs in memory (it is the reference, not a lowband protocol).
    Loopback,
    /// As `Loopback`, with every site a separate `lowband site` process (this process is the
    /// coordinator); `restart_sites`: a site process that dies is started again.
    Processes { restart_sites: bool },
}

/// The run directory: named (`--name`, or from the settings), locked, checked not to hold
/// another run's results, its old state forgotten unless resuming.
struct RunDir {
    name: String,
    path: PathBuf,
    _lock: crate::files::RunLock,
}

fn prepare_run_dir(
    args: &CompareArgs,
    config: &RunConfig,
    strategies: &[Strategy],
) -> Result<RunDir> {
    // A tuning run gets its own default directory, so that it never resumes (or is resumed by)
    // the run on the full corpus.
    let name = args.run.name.clone().unwrap_or_else(|| {
        format!(
            "{}-k{}-{}steps-seed{}{}",
            config.preset,
            config.sites,
            config.steps,
            config.seed,
            if config.tuning { "-tuning" } else { "" }
        )
    });
    crate::files::check_run_name(&name)?;
    let path = args.run.runs_dir.join(&name);
    let lock = crate::files::RunLock::acquire(&path)?;
    if !args.run.force {
        let names: Vec<String> = strategies.iter().map(|s| s.name()).collect();
        crate::files::check_not_another_run(&path, &names)?;
    }
    if !args.resume {
        lowband_runtime::state::forget_run_states(&path.join("state"))?;
    }
    if let Some(json) = &args.run.json {
        crate::files::check_writable(json)?;
    }
    Ok(RunDir {
        name,
        path,
        _lock: lock,
    })
}

/// The run's corpus and split, announced.
fn load_split(config: &RunConfig, strategies: &[Strategy]) -> Result<(Split, String, Option<f64>)> {
    let model = lowband_engine::preset(&config.preset)?.model;
    let (bytes, source, floor) = load_corpus(config)?;
    let split = Split::new(
        &bytes,
        config.validation_fraction,
        config.sites,
        config.shard,
        model.context_length,
    )?;
    let tokens = config.steps * (config.sites * config.site_batch * model.context_length) as u64;
    println!("lowband: {} on {} sites, preset {} ({} params), {} tokens each ({} steps x {} sites x {} x {} bytes)",
        strategies.iter().map(|s| s.name()).collect::<Vec<_>>().join(" vs "), config.sites, config.preset, model.parameter_count(),
        tokens, config.steps, config.sites, config.site_batch, model.context_length);
    println!(
        "corpus: {source}: {} bytes train, {} held out for validation",
        split.train_bytes,
        split.validation.len()
    );
    Ok((split, source, floor))
}

/// Run the strategies with `driver` (a cluster's `[network]` flags in `network`), print and
/// write the report.
pub fn run_with_driver(
    args: &CompareArgs,
    driver: Driver,
    network: &NetworkArgs,
) -> Result<Outcome> {
    let (mut config, strategies) = settings(args)?;
    network.apply(&mut config)?;
    let run_dir = prepare_run_dir(args, &config, &strategies)?;
    let (split, source, floor) = load_split(&config, &strategies)?;
    let watch = crate::dashboard::Watch::start(
        &run_dir.name,
        strategies.iter().map(|s| s.name()).collect(),
        args.dashboard,
    )?;
    let persistence = Persistence {
        observer: Some(watch.observer()),
        state_dir: Some(run_dir.path.join("state")),
        stop_after_rounds: args.stop_after_rounds,
    };
    let mut results: Vec<RunResult> = Vec::new();
    // What happened to site processes (deaths, restarts), for the report.
    let mut events: Vec<String> = Vec::new();
    for strategy in &strategies {
        let networked =
            driver != Driver::Memory && strategy.kind == lowband_runtime::StrategyKind::Rounds;
        let launch = match driver {
            Driver::Processes { restart_sites } => Some(SiteLaunch {
                dir: run_dir.path.join("nodes"),
                restart: restart_sites,
            }),
            _ => None,
        };
        results.push(if networked {
            let (result, happened) =
                run_networked(&config, strategy.clone(), &split, launch, watch.observer())
                    .map_err(crate::failure::ran)?;
            events.extend(
                happened
                    .into_iter()
                    .map(|e| format!("{}: {e}", strategy.name())),
            );
            result
        } else {
            run_one(&config, strategy.clone(), &split, &persistence).map_err(crate::failure::ran)?
        });
        watch.finished(results.last().expect("just pushed"));
    }
    match driver {
        Driver::Loopback => println!("\ncluster: the round, streaming and scheduled strategies ran as a coordinator and {} sites on loopback QUIC (nodes of this one process, ed25519 keys, every packet signed: bytes include 64 per packet); ddp ran in memory as the reference.", config.sites),
        Driver::Processes { .. } => println!("\ncluster: the round, streaming and scheduled strategies ran as this coordinator and {} `lowband site` processes on loopback QUIC (ed25519 keys, every packet signed: bytes include 64 per packet; keys, cluster files and site logs in {}); ddp ran in memory as the reference.", config.sites, run_dir.path.join("nodes").display()),
        Driver::Memory => {}
    }
    let comparison = Comparison {
        config: &config,
        results: &results,
        corpus: &source,
        floor,
        name: &run_dir.name,
        events: &events,
    };
    report::write_all(&comparison, &run_dir.path, args.run.json.as_deref())
        .map_err(crate::failure::ran)?;
    watch.finish(&run_dir.path)?;
    Ok(Outcome {
        config,
        results,
        split,
        run_dir: run_dir.path.clone(),
    })
}

fn run_networked(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    launch: Option<SiteLaunch>,
    observer: lowband_runtime::Observer,
) -> Result<(RunResult, Vec<String>)> {
    let spinner = ProgressBar::new_spinner()
        .with_message(format!("{} over QUIC on loopback", strategy.name()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let result = match launch {
        None => lowband_runtime::network::run_over_loopback(
            config,
            strategy,
            split,
            lowband_net::Limits::default(),
            Some(observer),
        )
        .map(|r| (r, Vec::new()))
        .map_err(anyhow::Error::from),
        Some(launch) => run_site_processes(config, strategy, split, &launch, observer),
    };
    match result {
        Ok((r, events)) => {
            spinner.finish_with_message(format!(
                "{:<11} over QUIC: val loss {:.4}",
                r.strategy.name(),
                r.final_val_loss
            ));
            Ok((r, events))
        }
        Err(e) => {
            spinner.abandon();
            Err(e)
        }
    }
}

fn run_one(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    persistence: &Persistence,
) -> Result<RunResult> {
    let context = lowband_engine::preset(&config.preset)?.model.context_length;
    let tokens = config.steps * (config.sites * config.site_batch * context) as u64;
    if let Some(saved) = lowband_runtime::state::load(persistence, &strategy)? {
        println!(
            "resuming {} from its saved state at step {}",
            strategy.name(),
            saved.step
        );
    }
    let bar = ProgressBar::new(tokens).with_style(
        ProgressStyle::with_template(&format!(
            "{:<11} {{bar:28}} {{percent:>3}}%  {{rate:>14}}  ETA {{eta:>4}}  {{msg}}",
            strategy.name()
        ))?
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.1}k tokens/s", state.per_sec() / 1e3);
            },
        )
        .progress_chars("█▉▊▋▌▍▎▏ "),
    );
    bar.set_message("starting");
    let result = run(config, strategy.clone(), split, persistence, &mut |p| {
        bar.set_position(p.tokens);
        bar.set_message(format!("loss {:.3}", p.loss));
    });
    match result {
        Ok(r) => {
            bar.finish_with_message(format!("val loss {:.4}", r.final_val_loss));
            Ok(r)
        }
        Err(RunError::Stopped { step }) => {
            bar.abandon();
            bail!("{} stopped after {step} steps as requested (its state is saved); continue with the same command and --resume", strategy.name())
        }
        Err(e) => {
            bar.abandon();
            Err(e.into())
        }
    }
}

fn parse_aggregator(text: &str) -> std::result::Result<lowband_protocol::AggregatorSpec, String> {
    text.parse()
}

fn parse_attack(text: &str) -> std::result::Result<lowband_runtime::Attack, String> {
    text.parse()
}

/// `--strategies`: split on commas outside brackets.
#[derive(Clone, Debug)]
pub struct StrategyList(pub Vec<String>);

pub(crate) fn parse_strategy_list(text: &str) -> std::result::Result<StrategyList, String> {
    let (mut names, mut current, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in text.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                names.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if depth != 0 {
        return Err(format!("unbalanced brackets in {text:?}"));
    }
    names.push(current);
    Ok(StrategyList(
        names
            .into_iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
    ))
}
