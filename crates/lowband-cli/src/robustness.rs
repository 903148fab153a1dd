//! `lowband bench robustness`: every attack x every aggregator, for each strategy and each
//! (sites, hostile sites) setting, against the honest run; one markdown table (docs/results.md)
//! and a JSON file of every cell.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowband_data::Split;
use lowband_engine::checkpoint::write_atomic;
use lowband_protocol::AggregatorSpec;
use lowband_runtime::{run, Attack, AttackMode, Persistence, RunConfig, Strategy, StrategyKind};
use serde::{Deserialize, Serialize};

use crate::compare::StrategyList;
use crate::train::load_corpus;

#[derive(clap::Args, Debug)]
pub struct RobustnessArgs {
    /// Round strategies to attack (DDP has no aggregator to defend).
    #[arg(long, value_parser = crate::compare::parse_strategy_list,
        default_value = "diloco@50,sparseloco@42[up=topk:k=32,chunk=4096,values=q2;down=topk:k=128,chunk=4096,values=q2]")]
    pub strategies: StrategyList,
    /// The grid's (sites, hostile sites) settings as K:HOSTILE, comma-separated; hostile sites
    /// are 1, then every K/HOSTILE-th.
    #[arg(long, default_value = "4:1,8:2")]
    pub site_grid: String,
    /// Attack modes, comma-separated (`none` is the honest run of each aggregator); the grid
    /// puts each on its hostile sites.
    #[arg(
        long,
        default_value = "none,signflip,scale=-10,noise=0.05,zeros,nan,stale,garbage"
    )]
    pub attack_modes: String,
    /// Aggregators, comma-separated.
    #[arg(
        long,
        default_value = "mean,median,trimmed-mean,centered-clip,clipped-mean"
    )]
    pub aggregators: String,
    /// Model preset (tiny, small, ref).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Training tokens of every run (the same at every K).
    #[arg(long, default_value_t = 524_288)]
    pub tokens: u64,
    /// Text file or directory (default: the generated synthetic language).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Size of the generated corpus when no corpus is given.
    #[arg(long, default_value_t = 4 << 20)]
    pub corpus_bytes: usize,
    /// Seed of every run of the grid.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The grid's cells (JSON), read and extended: cells already in this file are not run again
    /// (delete it to rerun), so an interrupted grid continues.
    #[arg(long, default_value = "runs/robustness.json")]
    pub cells: PathBuf,
    /// Run nothing: print the table and plots of the cells already in the JSON file.
    #[arg(long)]
    pub report_only: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Cell {
    preset: String,
    tokens: u64,
    seed: u64,
    strategy: String,
    sites: usize,
    hostile: Vec<u32>,
    attack: String,
    aggregator: String,
    final_val_loss: f64,
    excluded: Vec<u32>,
    refused_updates: u64,
}

impl Cell {
    fn key(&self) -> (String, usize, String, String, String, u64, u64) {
        (
            self.strategy.clone(),
            self.sites,
            self.attack.clone(),
            self.aggregator.clone(),
            self.preset.clone(),
            self.tokens,
            self.seed,
        )
    }
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The grid's axes, parsed from the flags.
struct Grid {
    /// (sites, hostile sites).
    settings: Vec<(usize, usize)>,
    attacks: Vec<String>,
    aggregators: Vec<AggregatorSpec>,
    strategies: Vec<Strategy>,
}

fn parse_grid(args: &RobustnessArgs) -> Result<Grid> {
    let settings: Vec<(usize, usize)> = list(&args.site_grid)
        .iter()
        .map(|s| {
            let (k, f) = s
                .split_once(':')
                .with_context(|| format!("--site-grid: `{s}` is not K:HOSTILE"))?;
            let (k, f): (usize, usize) = (
                k.parse().with_context(|| format!("--site-grid: `{k}`"))?,
                f.parse().with_context(|| format!("--site-grid: `{f}`"))?,
            );
            anyhow::ensure!(
                k >= 2 && f >= 1 && 2 * f < k,
                "--site-grid: {k}:{f}: need fewer than half hostile, at least one"
            );
            Ok((k, f))
        })
        .collect::<Result<_>>()?;
    let attacks = list(&args.attack_modes);
    for a in attacks.iter().filter(|a| *a != "none") {
        a.parse::<AttackMode>()
            .map_err(|e| anyhow::anyhow!("--attack-modes: {e}"))?;
    }
    let aggregators: Vec<AggregatorSpec> = list(&args.aggregators)
        .iter()
        .map(|a| {
            a.parse()
                .map_err(|e: String| anyhow::anyhow!("--aggregators: {e}"))
        })
        .collect::<Result<_>>()?;
    let strategies: Vec<Strategy> = args
        .strategies
        .0
        .iter()
        .map(|s| Strategy::parse(s, 50).map_err(|e| anyhow::anyhow!("--strategies: {e}")))
        .collect::<Result<_>>()?;
    if let Some(s) = strategies
        .iter()
        .find(|s| s.kind == StrategyKind::Ddp || s.aggregator.is_some())
    {
        bail!("--strategies: {}: give round strategies without [agg=...] (the grid sets the aggregator)", s.name());
    }
    Ok(Grid {
        settings,
        attacks,
        aggregators,
        strategies,
    })
}

/// The cells of earlier runs of the grid (none if the file does not exist yet).
fn read_cells(path: &Path) -> Result<Vec<Cell>> {
    match lowband_data::corpus::read_bounded(path, crate::files::METRICS_BYTES_MAX) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: not a robustness result file; delete it to start over",
                path.display()
            )
        }),
        Err(lowband_data::DataError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(e).context("--cells: reading the grid's earlier cells"),
    }
}

pub fn run_grid(args: &RobustnessArgs) -> Result<()> {
    let grid = parse_grid(args)?;
    let mut done = read_cells(&args.cells)?;
    let (bytes, source, _) = load_corpus(&RunConfig {
        corpus: args.corpus.clone(),
        corpus_bytes: args.corpus_bytes,
        ..RunConfig::default()
    })?;
    let total =
        grid.strategies.len() * grid.settings.len() * grid.attacks.len() * grid.aggregators.len();
    println!("lowband bench robustness: {total} runs ({} strategies x {} settings x {} attacks x {} aggregators), preset {}, {} tokens each, corpus {source}",
        grid.strategies.len(), grid.settings.len(), grid.attacks.len(), grid.aggregators.len(), args.preset, args.tokens);
    let bar = ProgressBar::new(total as u64).with_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} runs  ETA {eta}  {msg}",
    )?);
    for &(k, f) in &grid.settings {
        run_setting(args, &grid, (k, f), &bytes, &mut done, &bar)?;
    }
    bar.finish_with_message("done");
    let cells: Vec<Cell> = done
        .into_iter()
        .filter(|c| c.preset == args.preset && c.tokens == args.tokens && c.seed == args.seed)
        .collect();
    println!(
        "\n{}",
        table(
            &cells,
            &grid.strategies,
            &grid.settings,
            &grid.attacks,
            &grid.aggregators
        )
    );
    plot_grid(args, &grid, &cells)?;
    println!("cells: {}", args.cells.display());
    Ok(())
}

/// Every cell of one (sites, hostile) setting not run yet; each is saved as soon as it is done.
fn run_setting(
    args: &RobustnessArgs,
    grid: &Grid,
    (k, f): (usize, usize),
    bytes: &[u8],
    done: &mut Vec<Cell>,
    bar: &ProgressBar,
) -> Result<()> {
    let model = lowband_engine::preset(&args.preset)?.model;
    let base = RunConfig {
        preset: args.preset.clone(),
        sites: k,
        seed: args.seed,
        eval_every_steps: 0,
        ..RunConfig::default()
    };
    let per_step = (k * base.site_batch * model.context_length) as u64;
    anyhow::ensure!(
        args.tokens >= per_step,
        "--tokens: {} is less than one step at K = {k} ({per_step} tokens)",
        args.tokens
    );
    let base = RunConfig {
        steps: args.tokens / per_step,
        ..base
    };
    let split = Split::new(
        bytes,
        base.validation_fraction,
        k,
        base.shard,
        model.context_length,
    )?;
    let hostile: Vec<u32> = (0..f).map(|i| (1 + i * k / f) as u32).collect();
    for strategy in &grid.strategies {
        for attack in &grid.attacks {
            for aggregator in &grid.aggregators {
                bar.set_message(format!("{} K={k} {attack} {aggregator}", strategy.name()));
                let key = (
                    strategy.name(),
                    k,
                    attack.clone(),
                    aggregator.to_string(),
                    args.preset.clone(),
                    args.tokens,
                    args.seed,
                );
                if !args.report_only && !done.iter().any(|c| c.key() == key) {
                    let hostile = if attack == "none" {
                        Vec::new()
                    } else {
                        hostile.clone()
                    };
                    let config = RunConfig {
                        aggregator: *aggregator,
                        attacks: hostile
                            .iter()
                            .map(|&site| Attack {
                                site,
                                mode: attack.parse().expect("checked"),
                            })
                            .collect(),
                        ..base.clone()
                    };
                    done.push(run_cell(args, &config, strategy, &split, hostile, key)?);
                    if let Some(dir) = args.cells.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                    write_atomic(&args.cells, &serde_json::to_vec_pretty(&done)?)?;
                }
                bar.inc(1);
            }
        }
    }
    Ok(())
}

/// One run of the grid, as its cell.
fn run_cell(
    args: &RobustnessArgs,
    config: &RunConfig,
    strategy: &Strategy,
    split: &Split,
    hostile: Vec<u32>,
    key: (String, usize, String, String, String, u64, u64),
) -> Result<Cell> {
    let result = run(
        config,
        strategy.clone(),
        split,
        &Persistence::default(),
        &mut |_| {},
    )
    .map_err(|e| crate::failure::ran(e.into()))?;
    Ok(Cell {
        preset: args.preset.clone(),
        tokens: args.tokens,
        seed: args.seed,
        strategy: key.0,
        sites: key.1,
        hostile,
        attack: key.2,
        aggregator: key.3,
        final_val_loss: result.final_val_loss,
        excluded: result
            .site_scores
            .iter()
            .filter(|(_, s)| s.excluded.is_some())
            .map(|(k, _)| *k)
            .collect(),
        refused_updates: result.site_scores.iter().map(|(_, s)| s.refused).sum(),
    })
}

/// A chart per strategy and setting: each aggregator's loss under each attack, relative to the
/// honest run with the mean.
fn plot_grid(args: &RobustnessArgs, grid: &Grid, cells: &[Cell]) -> Result<()> {
    let dir = args
        .cells
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_default();
    for (i, strategy) in grid.strategies.iter().enumerate() {
        for &(k, f) in &grid.settings {
            let find = |attack: &str, aggregator: &str| {
                cells.iter().find(|c| {
                    c.strategy == strategy.name()
                        && c.sites == k
                        && c.attack == attack
                        && c.aggregator == aggregator
                })
            };
            let Some(honest) = find("none", "mean") else {
                continue;
            };
            let series: Vec<(String, Vec<Option<f64>>)> = grid
                .aggregators
                .iter()
                .map(|a| {
                    (
                        a.to_string(),
                        grid.attacks
                            .iter()
                            .map(|attack| {
                                find(attack, &a.to_string()).map(|c| {
                                    (c.final_val_loss / honest.final_val_loss - 1.0) * 100.0
                                })
                            })
                            .collect(),
                    )
                })
                .collect();
            let path = dir.join(format!("robustness-s{i}-k{k}.svg"));
            crate::plots::robustness_chart(
                &path,
                &format!("{}: K = {k}, {f} hostile", strategy.preset),
                &grid.attacks,
                &series,
            )?;
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

/// One table per (strategy, K): rows attacks, columns aggregators; each cell the final
/// validation loss and its gap to the honest mean run (✓ within 3%).
fn table(
    cells: &[Cell],
    strategies: &[Strategy],
    settings: &[(usize, usize)],
    attacks: &[String],
    aggregators: &[AggregatorSpec],
) -> String {
    let mut out = String::new();
    for strategy in strategies {
        for &(k, f) in settings {
            let find = |attack: &str, aggregator: &str| {
                cells.iter().find(|c| {
                    c.strategy == strategy.name()
                        && c.sites == k
                        && c.attack == attack
                        && c.aggregator == aggregator
                })
            };
            let Some(honest) = find("none", "mean") else {
                continue;
            };
            let _ = writeln!(out, "**{}, K = {k}, {f} hostile** (honest run with the mean: {:.4}; cells: loss, gap to it; ✓ within 3%; x: hostile sites excluded)\n", strategy.name(), honest.final_val_loss);
            let _ = writeln!(
                out,
                "| attack | {} |",
                aggregators
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = writeln!(out, "|---|{}", "---|".repeat(aggregators.len()));
            for attack in attacks {
                let row: Vec<String> = aggregators
                    .iter()
                    .map(|a| match find(attack, &a.to_string()) {
                        Some(c) => {
                            let gap = c.final_val_loss / honest.final_val_loss - 1.0;
                            let ok = if gap.abs() <= 0.03 { " ✓" } else { "" };
                            let excluded = if c.excluded.is_empty() {
                                String::new()
                            } else {
                                format!(" x{}", c.excluded.len())
                            };
                            if c.final_val_loss.is_finite() && c.final_val_loss < 100.0 {
                                format!(
                                    "{:.4} ({:+.1}%){ok}{excluded}",
                                    c.final_val_loss,
                                    gap * 100.0
                                )
                            } else {
                                format!("{:.3e} (diverged){excluded}", c.final_val_loss)
                            }
                        }
                        None => "-".into(),
                    })
                    .collect();
                let name = if attack == "none" {
                    "none (honest)"
                } else {
                    attack.as_str()
                };
                let _ = writeln!(out, "| {name} | {} |", row.join(" | "));
            }
            out.push('\n');
        }
    }
    out
}
