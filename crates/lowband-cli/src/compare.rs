//! `lowband compare`: several strategies on one budget (same corpus, model, seed and tokens),
//! side by side with DDP; the default command.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowband_data::Split;
use lowband_runtime::{run, Persistence, RunConfig, RunError, RunResult, Strategy};

use crate::cluster::{run_site_processes, SiteLaunch};
use crate::report::{self, Comparison};
use crate::train::load_corpus;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct CompareArgs {
    /// Strategies, comma-separated: ddp, diloco, fedavg, diloco-int8, diloco-4bit, sparseloco,
    /// demo-dct; optionally NAME@H (e.g. sparseloco@30) and [overrides] (e.g.
    /// `sparseloco@30[up=topk:k=32,chunk=4096,values=q2;decay=0.9]`, see ARCHITECTURE.md).
    /// Commas inside brackets belong to the strategy.
    #[arg(long, value_parser = parse_strategy_list)]
    pub strategies: Option<StrategyList>,
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
    /// Text file or directory (default: the generated synthetic language).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Seed of the run (the model's initialization, the data sampling, random codecs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// TOML file with any RunConfig field (and `strategies`, `corpus`); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the machine-readable summary here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run directory name under runs/ (default: from the settings).
    #[arg(long)]
    pub name: Option<String>,
    /// Continue from the run directory's saved state instead of starting over.
    #[arg(long)]
    pub resume: bool,
    /// Replace the results of another run in the run directory (other strategies under the
    /// same name); without it such a run is refused.
    #[arg(long)]
    pub force: bool,
    /// Size of the generated corpus when no corpus is given.
    #[arg(long, default_value_t = 8 << 20)]
    pub corpus_bytes: usize,
    /// Choose settings without touching the validation split: set it aside and hold out the
    /// last part (the same fraction) of the training split instead. For screening candidates,
    /// never for the figures a benchmark reports.
    #[arg(long)]
    pub tuning: bool,
    /// Directory that holds run directories.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Aggregator of round strategies that do not choose one with `[agg=...]`: mean, median,
    /// trimmed-mean[:trim=F], centered-clip[:iterations=L], clipped-mean.
    #[arg(long, value_parser = parse_aggregator)]
    pub aggregator: Option<lowband_protocol::AggregatorSpec>,
    /// Make a site hostile, SITE:MODE (repeatable): signflip, scale=X, noise=S, zeros, nan,
    /// stale, garbage; e.g. `--attack 2:scale=-10`. DDP, the reference, runs honest.
    #[arg(long = "attack", value_parser = parse_attack)]
    pub attacks: Vec<lowband_runtime::Attack>,
    /// Stop each strategy after this many rounds as if killed (to test --resume).
    #[arg(long, hide = true)]
    pub stop_after_rounds: Option<u64>,
}

/// The file form of a comparison: RunConfig's fields, plus these two.
struct FileSettings {
    run: RunConfig,
    strategies: Option<Vec<String>>,
    corpus: Option<PathBuf>,
}

fn read_config(path: &Path) -> Result<FileSettings> {
    let text = crate::files::read_text(path, crate::files::SETTINGS_BYTES_MAX)?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| crate::files::toml_error(path, &text, &e, true))?;
    let strategies = match table.remove("strategies") {
        None => None,
        Some(toml::Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .context("strategies: every entry must be a string")
                })
                .collect::<Result<_>>()?,
        ),
        Some(_) => bail!(
            "{}: strategies: must be an array of strings",
            path.display()
        ),
    };
    let corpus = match table.remove("corpus") {
        None => None,
        Some(toml::Value::String(s)) => Some(PathBuf::from(s)),
        Some(_) => bail!("{}: corpus: must be a string (a path)", path.display()),
    };
    // The rest is a RunConfig. Deserialize it from text (the table written back without the two
    // keys above) so that an error carries a span, from which the field is named.
    let rest = toml::to_string(&table)
        .with_context(|| format!("{}: re-reading the settings", path.display()))?;
    let run: RunConfig = toml::from_str(&rest).map_err(|e| field_error(path, &rest, &e))?;
    Ok(FileSettings {
        run,
        strategies,
        corpus,
    })
}

/// One line naming the field: "FILE: optimizer.lr: invalid type: ...".
fn field_error(path: &Path, text: &str, error: &toml::de::Error) -> anyhow::Error {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return anyhow::anyhow!("{}: {message}", path.display());
    };
    let before = &text[..span.start.min(text.len())];
    let line = text[before.rfind('\n').map_or(0, |i| i + 1)..]
        .lines()
        .next()
        .unwrap_or("");
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').to_string());
    let key = line.split('=').next().unwrap_or("").trim();
    let field = match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}: "),
        (None, false) => format!("{key}: "),
        _ => String::new(),
    };
    anyhow::anyhow!("{}: {field}{message}", path.display())
}

/// Settings after the file and the flags.
fn settings(args: &CompareArgs) -> Result<(RunConfig, Vec<Strategy>, Option<PathBuf>)> {
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None => FileSettings {
            run: RunConfig::default(),
            strategies: None,
            corpus: None,
        },
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
    config
        .validate()
        .map_err(|(field, reason)| anyhow::anyhow!("{field}: {reason}"))?;
    if let Some(tokens) = args.tokens {
        let context = lowband_engine::preset(&config.preset)?.model.context_length as u64;
        let per_step = config.sites as u64 * config.site_batch as u64 * context;
        if tokens < per_step {
            bail!("--tokens: {tokens} is less than one step ({per_step} tokens: sites x site_batch x context)");
        }
        config.steps = tokens / per_step;
    }
    let names = args
        .strategies
        .clone()
        .map(|l| l.0)
        .or(file.strategies)
        .unwrap_or_else(|| vec!["ddp".into(), "diloco".into()]);
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
    }
    Ok((config, strategies, args.corpus.clone().or(file.corpus)))
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
    run_with_driver(args, Driver::Memory)
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

pub fn run_with_driver(args: &CompareArgs, driver: Driver) -> Result<Outcome> {
    let (config, strategies, corpus) = settings(args)?;
    if driver != Driver::Memory && (args.resume || args.stop_after_rounds.is_some()) {
        bail!("cluster: --resume is not supported yet (use `lowband coordinator --resume` and `lowband site --state-dir ... --resume`)");
    }
    // A tuning run gets its own default directory, so that it never resumes (or is resumed by)
    // the run on the full corpus.
    let name = args.name.clone().unwrap_or_else(|| {
        format!(
            "{}-k{}-{}steps-seed{}{}",
            config.preset,
            config.sites,
            config.steps,
            config.seed,
            if args.tuning { "-tuning" } else { "" }
        )
    });
    crate::files::check_run_name(&name)?;
    let run_dir = args.runs_dir.join(&name);
    let state_dir = run_dir.join("state");
    let _lock = crate::files::RunLock::acquire(&run_dir)?;
    if !args.force {
        let names: Vec<String> = strategies.iter().map(|s| s.name()).collect();
        crate::files::check_not_another_run(&run_dir, &names)?;
    }
    if !args.resume {
        lowband_runtime::state::forget_run_states(&state_dir)?;
    }
    if let Some(json) = &args.json {
        crate::files::check_writable(json)?;
    }
    let model = lowband_engine::preset(&config.preset)?.model;
    let (bytes, source, floor) = load_corpus(
        corpus.as_ref(),
        args.corpus_bytes,
        args.tuning.then_some(config.validation_fraction),
    )?;
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
    let persistence = Persistence {
        state_dir: Some(state_dir),
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
                corpus: corpus.clone(),
                corpus_bytes: args.corpus_bytes,
                tuning: args.tuning,
                dir: run_dir.join("nodes"),
                restart: restart_sites,
            }),
            _ => None,
        };
        results.push(if networked {
            let (result, happened) = run_networked(&config, strategy.clone(), &split, launch)
                .map_err(crate::failure::ran)?;
            events.extend(
                happened
                    .into_iter()
                    .map(|e| format!("{}: {e}", strategy.name())),
            );
            result
        } else {
            run_one(&config, strategy.clone(), &split, &persistence, tokens)
                .map_err(crate::failure::ran)?
        });
    }
    match driver {
        Driver::Loopback => println!("\ncluster: the round and streaming strategies ran as a coordinator and {} sites on loopback QUIC (nodes of this one process, ed25519 keys, every packet signed: bytes include 64 per packet); ddp ran in memory as the reference.", config.sites),
        Driver::Processes { .. } => println!("\ncluster: the round and streaming strategies ran as this coordinator and {} `lowband site` processes on loopback QUIC (ed25519 keys, every packet signed: bytes include 64 per packet; keys, cluster files and site logs in {}); ddp ran in memory as the reference.", config.sites, run_dir.join("nodes").display()),
        Driver::Memory => {}
    }
    let comparison = Comparison {
        config: &config,
        results: &results,
        corpus: &source,
        floor,
        name: &name,
        events: &events,
    };
    report::write_all(&comparison, &run_dir, args.json.as_deref()).map_err(crate::failure::ran)?;
    Ok(Outcome {
        config,
        results,
        split,
        run_dir,
    })
}

fn run_networked(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    launch: Option<SiteLaunch>,
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
        )
        .map(|r| (r, Vec::new()))
        .map_err(anyhow::Error::from),
        Some(launch) => run_site_processes(config, strategy, split, &launch),
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
    tokens: u64,
) -> Result<RunResult> {
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
            bail!("{} stopped after {step} steps as requested; continue with the same command and --resume", strategy.name())
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
