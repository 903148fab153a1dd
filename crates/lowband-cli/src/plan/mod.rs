//! `lowband plan`: the break-even planner's command line. The cost model is `lowband-plan` (pure);
//! this file reads its inputs (flags, a plan file, a measured run's summary.json) and prints,
//! saves and plots its outputs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lowband_engine::checkpoint::write_atomic;
use lowband_plan::{
    break_even, plan_all, presets, BreakEven, Hardware, Link, LossLaw, Pattern, Plan, PlanKind,
    Relay, Scenario, Site, Strategy, Threshold,
};
use serde::{Deserialize, Serialize};

mod inputs;
mod tables;

use inputs::{build, strategies_from_summary, Inputs, RunSummary};
pub use tables::{break_even_table, plans_table};
use tables::{describe, dollars, human_duration};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Model parameters (N): 1e9, 10B, 350M.
    #[arg(long, value_parser = parse_count, required_unless_present_any = ["published", "config", "from_run"])]
    params: Option<f64>,
    /// Training tokens at DDP quality (D; default 20 N, Chinchilla).
    #[arg(long, value_parser = parse_count)]
    tokens: Option<f64>,
    /// Sites (K); default: the run's with --from-run.
    #[arg(long)]
    sites: Option<usize>,
    /// A plan file (TOML): presets, per-site hardware and links, prices, strategies
    /// (docs/economics.md lists every field).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Take the strategies (H, bits per parameter up and down, loss gap) from a measured
    /// `lowband compare` run (its summary.json) instead of the published defaults.
    #[arg(long)]
    from_run: Option<PathBuf>,
    /// Hardware preset of every site and of the centralized cluster: h100, a100 (default h100).
    #[arg(long)]
    hardware: Option<String>,
    /// Accelerators per site (default 64); the centralized cluster has them all.
    #[arg(long)]
    accelerators_per_site: Option<u32>,
    /// Link class of every site: intra-dc, metro, transatlantic, consumer (default: the run's
    /// link with --from-run, else transatlantic).
    #[arg(long)]
    link: Option<String>,
    /// Global batch in tokens per step (default: the Charles et al. 2025 fit, presets.rs).
    #[arg(long, value_parser = parse_count)]
    batch_tokens: Option<f64>,
    /// Write the plans and break-even thresholds as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Plot total dollars against WAN bandwidth for every plan (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the checks against published figures (INTELLECT-1, Streaming DiLoCo) and exit.
    #[arg(long)]
    published: bool,
}

/// "10B" → 1e10; plain numbers and exponents too.
fn parse_count(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, scale) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 1e3),
        Some('M' | 'm') => (&text[..text.len() - 1], 1e6),
        Some('B' | 'b' | 'G' | 'g') => (&text[..text.len() - 1], 1e9),
        Some('T' | 't') => (&text[..text.len() - 1], 1e12),
        _ => (text, 1.0),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number (e.g. 1e9, 10B, 350M)"))?;
    let value = value * scale;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("must be a positive number, got {text}"));
    }
    Ok(value)
}

#[derive(Serialize)]
struct PlanReport<'a> {
    scenario: &'a Scenario,
    strategies_from: &'a str,
    plans: &'a [Plan],
    break_even: &'a [BreakEven],
}

pub fn run(args: &PlanArgs) -> Result<()> {
    if args.published {
        print!("{}", published_checks()?);
        return Ok(());
    }
    let inputs = build(args)?;
    let plans = plan_all(&inputs.scenario, &inputs.strategies)?;
    let thresholds: Vec<BreakEven> = inputs
        .strategies
        .iter()
        .map(|s| break_even(&inputs.scenario, s))
        .collect::<Result<_, _>>()?;
    println!("{}\n", describe(&inputs.scenario));
    println!(
        "Plans ({}); total $ with the loss gap priced in as extra tokens:\n",
        inputs.source
    );
    println!("{}", plans_table(&plans));
    println!("Break-even against centralized training (one input moved, the others as above):\n");
    println!("{}", break_even_table(&thresholds));
    if let Some(path) = &args.json {
        let report = PlanReport {
            scenario: &inputs.scenario,
            strategies_from: &inputs.source,
            plans: &plans,
            break_even: &thresholds,
        };
        write_atomic(path, &serde_json::to_vec_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        cost_chart(path, &inputs)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Total dollars against the slowest site's WAN bandwidth, for every plan (centralized is flat).
fn cost_chart(path: &Path, inputs: &Inputs) -> Result<()> {
    let bandwidths: Vec<f64> = (0..=40)
        .map(|i| 10f64.powf(-2.0 + i as f64 * 0.1))
        .collect();
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (index, gbit) in bandwidths.iter().enumerate() {
        let plans = plan_all(
            &inputs.scenario.with_wan_bandwidth(*gbit),
            &inputs.strategies,
        )?;
        for (row, plan) in plans.iter().enumerate() {
            if index == 0 {
                series.push((plan.name.clone(), Vec::new()));
            }
            series[row].1.push((*gbit, plan.total_dollars));
        }
    }
    crate::plots::cost_vs_bandwidth(
        path,
        &format!(
            "total cost vs WAN bandwidth ({} sites, N = {:.0e})",
            inputs.scenario.sites.len(),
            inputs.scenario.params
        ),
        &series,
    )
}

/// The report section `lowband compare` ends with: its own measured strategies planned at 1B,
/// 10B and 100B parameters on its link profile (H100 sites of 64 accelerators).
pub fn projection(summary_json: &[u8]) -> Result<String> {
    let summary: RunSummary = serde_json::from_slice(summary_json)?;
    if !summary.strategies.iter().any(|s| s.is_ddp())
        || summary.strategies.iter().all(|s| s.is_ddp())
    {
        return Ok(String::new());
    }
    let mut strategies = strategies_from_summary(&summary)?;
    let mut out = String::new();
    let link = &summary.config.link;
    let _ = writeln!(
        out,
        "What this run's strategies would cost at scale (`lowband plan`: {} sites of 64 H100 on this run's link, {} Gbit/s, ${}/GB; D = 20 N; their traffic as measured here; docs/economics.md). The loss gap priced in (as extra tokens, Chinchilla law) is not this run's: a small model's gap does not hold at 1e9 parameters. It is DiLoCo's published size-aware gap, a power law through +2.0% at 35M and +0.3% at 2.4B parameters (4 replicas, H = 30; Charles et al., arXiv 2503.09799), the same for every strategy here; the measured gap is the table's above.\n",
        summary.config.sites, link.bandwidth_gbit_per_s, link.price_per_gb
    );
    let _ = writeln!(
        out,
        "| N | gap priced | plan | wall time | utilization | total $ | vs centralized |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for params in [1e9, 1e10, 1e11] {
        let gap = published_diloco_gap(params);
        for strategy in &mut strategies {
            strategy.loss_gap = gap;
        }
        let args = PlanArgs {
            params: Some(params),
            tokens: None,
            sites: Some(summary.config.sites),
            config: None,
            from_run: None,
            hardware: None,
            accelerators_per_site: None,
            link: None,
            batch_tokens: None,
            json: None,
            plot: None,
            published: false,
        };
        let mut inputs = build(&args)?;
        for site in &mut inputs.scenario.sites {
            site.link = Link {
                bandwidth_gbit_per_second: link.bandwidth_gbit_per_s,
                rtt_ms: 2.0 * link.latency_ms,
                egress_dollars_per_gb: link.price_per_gb,
            };
        }
        inputs.scenario.relay = presets::relay(link.price_per_gb);
        let plans = match plan_all(&inputs.scenario, &strategies) {
            Ok(plans) => plans,
            Err(error) => {
                let _ = writeln!(out, "| {params:.0e} | | (not plannable: {error}) | | | | |");
                continue;
            }
        };
        let central = plans[0].total_dollars;
        for p in plans.iter().filter(|p| p.kind != PlanKind::ShipData) {
            let gap_priced = if p.kind == PlanKind::Strategy {
                format!("{:+.2}%", gap * 100.0)
            } else {
                "-".to_string()
            };
            let _ = writeln!(
                out,
                "| {params:.0e} | {gap_priced} | {} | {} | {:.1}% | {} | {:.2}x |",
                p.name,
                human_duration(p.wall_seconds),
                p.utilization * 100.0,
                dollars(p.total_dollars),
                p.total_dollars / central
            );
        }
    }
    Ok(out)
}

/// DiLoCo's loss gap to data-parallel training at `params` parameters, from the published
/// scaling laws (Charles et al., "Scaling Laws for DiLoCo", arXiv 2503.09799: +2.0% at 35M and
/// +0.3% at 2.4B parameters, 4 replicas, H = 30): the power law through those two points,
/// 2.0% · (N / 35M)^−0.449. Outside 35M..2.4B it is an extrapolation, as the paper's own are.
pub fn published_diloco_gap(params: f64) -> f64 {
    let (small, small_gap, large, large_gap): (f64, f64, f64, f64) = (35e6, 0.020, 2.4e9, 0.003);
    let exponent: f64 = (small_gap / large_gap).ln() / (large / small).ln();
    small_gap * (params / small).powf(-exponent)
}

/// The planner against published figures (the tables in docs/results.md).
pub fn published_checks() -> Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## INTELLECT-1 (arXiv 2412.01152): compute utilization\n"
    );
    let _ = writeln!(out, "10B, 14 nodes of 8 H100, int8 ring all-reduce every H = 100 steps, 38 min of compute per round. Link bandwidth: the one at which the ring takes the published median all-reduce time (the report publishes times, not bandwidths).\n");
    let _ = writeln!(out, "| setting | median all-reduce (published) | implied link | RTT (assumed) | utilization (planner) | utilization (published) | difference |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (setting, seconds, rtt_ms, published) in
        [("USA", 103.0, 60.0, 95.7), ("global", 469.0, 200.0, 83.0)]
    {
        let (scenario, strategy) = presets::intellect_1(seconds, rtt_ms)?;
        let plan = lowband_plan::plan_strategy(&scenario, &strategy)?;
        let utilization = plan.utilization * 100.0;
        let _ = writeln!(
            out,
            "| {setting} | {seconds} s | {:.2} Gbit/s | {rtt_ms} ms | {utilization:.1}% | {published}% | {:+.1} points |",
            scenario.sites[0].link.bandwidth_gbit_per_second,
            utilization - published
        );
    }
    let _ = writeln!(out, "\n## Streaming DiLoCo's Table 4 (arXiv 2501.18512): Gbit/s to reach a compute utilization\n");
    let _ = writeln!(out, "Their setup as the caption states it: pure-compute step time per size, H = 100, fragments of 3 layers, BF16 exchanges (FP4 in the last variant). Ours where it is silent: 2 workers, no latency, every sync overlaps one backward pass (as Douillard's simulator states), overlapped = one step more. Each cell: planner / paper (Gbit/s per worker link).\n");
    let _ = writeln!(out, "| N | step | method | 50% | 80% | 90% | 95% | 99% |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (params, layers, step, rows) in presets::STREAMING_DILOCO_TABLE_4 {
        let (scenario, strategies) = presets::streaming_diloco_table_4(params, layers, step)?;
        for (strategy, (name, published)) in strategies.iter().zip(rows) {
            let mut cells = Vec::new();
            for (target, paper) in presets::TABLE_4_TARGETS.iter().zip(published) {
                let ours =
                    match lowband_plan::bandwidth_for_utilization(&scenario, strategy, *target)? {
                        Some(gbit) => format!("{gbit:.1}"),
                        None => "unreachable".into(),
                    };
                cells.push(format!("{ours} / {paper}"));
            }
            let _ = writeln!(
                out,
                "| {params:.0e} | {step} s | {name} | {} |",
                cells.join(" | ")
            );
        }
    }
    let _ = writeln!(out, "\ndocs/economics.md explains the differences.");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::published_diloco_gap;

    #[test]
    fn the_size_aware_gap_goes_through_the_published_points_and_shrinks() {
        assert!((published_diloco_gap(35e6) - 0.020).abs() < 1e-12);
        assert!((published_diloco_gap(2.4e9) - 0.003).abs() < 1e-12);
        let (one, ten, hundred) = (
            published_diloco_gap(1e9),
            published_diloco_gap(1e10),
            published_diloco_gap(1e11),
        );
        assert!(0.003 < one && one < 0.005, "{one}");
        assert!(hundred < ten && ten < one);
    }
}
