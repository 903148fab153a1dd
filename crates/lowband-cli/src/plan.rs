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

/// The plan file. Every field is optional; flags override it.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    params: Option<f64>,
    tokens: Option<f64>,
    sites: Option<usize>,
    batch_tokens: Option<f64>,
    hardware: Option<String>,
    accelerators_per_site: Option<u32>,
    link: Option<String>,
    ddp_bits_per_param: Option<f64>,
    data_bits_per_token: Option<f64>,
    step_seconds: Option<f64>,
    /// Per-site changes to the defaults, in site order (fewer entries than sites: the rest keep
    /// the defaults).
    #[serde(default)]
    site: Vec<SitePatch>,
    central: Option<HardwarePatch>,
    relay: Option<Relay>,
    law: Option<LossLaw>,
    /// Strategies described by hand (added to those of --from-run, or replacing the defaults).
    #[serde(default)]
    strategy: Vec<Strategy>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct HardwarePatch {
    preset: Option<String>,
    peak_flops_per_second: Option<f64>,
    mfu: Option<f64>,
    accelerators: Option<u32>,
    dollars_per_accelerator_hour: Option<f64>,
    fabric_gbit_per_second: Option<f64>,
}

impl HardwarePatch {
    fn apply(&self, base: Hardware) -> Result<Hardware> {
        let base = match &self.preset {
            Some(name) => Hardware {
                accelerators: base.accelerators,
                ..presets::hardware(name)?
            },
            None => base,
        };
        Ok(Hardware {
            peak_flops_per_second: self
                .peak_flops_per_second
                .unwrap_or(base.peak_flops_per_second),
            mfu: self.mfu.unwrap_or(base.mfu),
            accelerators: self.accelerators.unwrap_or(base.accelerators),
            dollars_per_accelerator_hour: self
                .dollars_per_accelerator_hour
                .unwrap_or(base.dollars_per_accelerator_hour),
            fabric_gbit_per_second: self
                .fabric_gbit_per_second
                .unwrap_or(base.fabric_gbit_per_second),
        })
    }
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct SitePatch {
    #[serde(default)]
    hardware: HardwarePatch,
    link: Option<String>,
    bandwidth_gbit_per_second: Option<f64>,
    rtt_ms: Option<f64>,
    egress_dollars_per_gb: Option<f64>,
}

/// A compare run's summary.json (`report::Summary`: one definition for the writer and readers).
type RunSummary = crate::report::Summary;

fn read_summary(run: &Path) -> Result<RunSummary> {
    let path = if run.is_dir() {
        run.join("summary.json")
    } else {
        run.to_path_buf()
    };
    let text =
        crate::files::read_text(&path, crate::files::SETTINGS_BYTES_MAX).with_context(|| {
            format!(
                "--from-run: reading {} (a `lowband compare` run directory has one)",
                path.display()
            )
        })?;
    serde_json::from_str(&text)
        .with_context(|| format!("--from-run: {} is not a compare summary", path.display()))
}

/// A compare run's strategies as the planner's: lowband's coordinator relays (sites upload, the
/// coordinator sends each site the downlink packet). Bits per H steps come from the per-step
/// figures, so streaming's fragment syncs count once per round.
fn strategies_from_summary(summary: &RunSummary) -> Result<Vec<Strategy>> {
    let mut out = Vec::new();
    for s in summary.strategies.iter().filter(|s| s.strategy != "ddp") {
        let Some(gap) = s.loss_gap_vs_ddp else {
            bail!("--from-run: {} has no ddp run, so {}'s loss gap is unknown (run compare with ddp among --strategies)", summary.name, s.strategy);
        };
        let h = s.inner_steps as f64;
        let syncs_per_round = s.rounds as f64 * h / summary.config.steps.max(1) as f64;
        let up = s.bits_per_param_per_round * syncs_per_round;
        let per_step = s.bits_per_param_per_step.unwrap_or(
            s.inter_site_bytes as f64 * 8.0
                / (summary.config.sites as f64
                    * s.params as f64
                    * summary.config.steps.max(1) as f64),
        );
        let total = per_step * h;
        out.push(Strategy {
            name: s.strategy.clone(),
            inner_steps: s.inner_steps,
            bits_per_param_up: up,
            bits_per_param_down: Some((total - up).max(0.0)),
            pattern: Pattern::Relay,
            fragments: s.fragments.unwrap_or(1).max(1) as u32,
            overlap_steps: s.overlap_steps.unwrap_or(0) as f64,
            loss_gap: gap,
        });
    }
    if out.is_empty() {
        bail!(
            "--from-run: {} has no round strategy to plan (only ddp)",
            summary.name
        );
    }
    Ok(out)
}

/// Published systems, with their own quality claims (gap 0: "comparable to data-parallel");
/// --from-run replaces them with measured figures.
fn default_strategies() -> Vec<Strategy> {
    vec![
        // INTELLECT-1 (arXiv 2412.01152): int8 ring all-reduce of the pseudo-gradient every 100 steps.
        Strategy {
            name: "intellect-1 (int8, H=100)".into(),
            inner_steps: 100,
            bits_per_param_up: 8.0,
            bits_per_param_down: None,
            pattern: Pattern::AllReduce,
            fragments: 1,
            overlap_steps: 0.0,
            loss_gap: 0.0,
        },
        // Streaming DiLoCo (arXiv 2501.18512): 4-bit outer gradients, fragments in turn, each
        // sync overlapping one step plus a backward pass (as in its Table 4); 4 fragments.
        Strategy {
            name: "streaming diloco (fp4, H=100)".into(),
            inner_steps: 100,
            bits_per_param_up: 4.0,
            bits_per_param_down: None,
            pattern: Pattern::AllReduce,
            fragments: 4,
            overlap_steps: 1.0 + lowband_plan::BACKWARD_STEPS,
            loss_gap: 0.0,
        },
        // SparseLoCo: 64 of 4,096 entries at 2 bits + 12-bit indices (0.22 bits per parameter),
        // every 30 steps, all-gathered.
        Strategy {
            name: "sparseloco (top-k 2-bit, H=30)".into(),
            inner_steps: 30,
            bits_per_param_up: 64.0 * 14.0 / 4096.0,
            bits_per_param_down: None,
            pattern: Pattern::AllGather,
            fragments: 1,
            overlap_steps: 0.0,
            loss_gap: 0.0,
        },
    ]
}

struct Inputs {
    scenario: Scenario,
    strategies: Vec<Strategy>,
    source: String,
}

fn build(args: &PlanArgs) -> Result<Inputs> {
    let file: PlanFile = match &args.config {
        Some(path) => {
            let text = crate::files::read_text(path, crate::files::SETTINGS_BYTES_MAX)
                .with_context(|| format!("--config: reading {}", path.display()))?;
            toml::from_str(&text).map_err(|e| crate::files::toml_error(path, &text, &e, false))?
        }
        None => PlanFile::default(),
    };
    let summary = args.from_run.as_deref().map(read_summary).transpose()?;
    let params = args
        .params
        .or(file.params)
        .context("params: give --params (or `params` in the plan file)")?;
    let sites = args
        .sites
        .or(file.sites)
        .or(summary.as_ref().map(|s| s.config.sites))
        .context("sites: give --sites (or `sites` in the plan file, or --from-run)")?;
    if !(1..=lowband_plan::SITES_MAX).contains(&sites) {
        bail!(
            "sites: {sites} is outside 1 ..= {} (K >= 1)",
            lowband_plan::SITES_MAX
        );
    }
    if file.site.len() > sites {
        bail!(
            "site: the plan file describes {} sites but the plan has {sites}",
            file.site.len()
        );
    }
    let mut hardware = presets::hardware(
        args.hardware
            .as_deref()
            .or(file.hardware.as_deref())
            .unwrap_or("h100"),
    )?;
    hardware.accelerators = args
        .accelerators_per_site
        .or(file.accelerators_per_site)
        .unwrap_or(64);
    let link = match (args.link.as_deref().or(file.link.as_deref()), &summary) {
        (Some(name), _) => presets::link(name)?,
        (None, Some(run)) => Link {
            bandwidth_gbit_per_second: run.config.link.bandwidth_gbit_per_s,
            rtt_ms: 2.0 * run.config.link.latency_ms,
            egress_dollars_per_gb: run.config.link.price_per_gb,
        },
        (None, None) => presets::link("transatlantic")?,
    };
    let mut site_list = Vec::with_capacity(sites);
    for index in 0..sites {
        let patch = file.site.get(index).cloned().unwrap_or_default();
        let base_link = match &patch.link {
            Some(name) => presets::link(name)?,
            None => link.clone(),
        };
        site_list.push(Site {
            hardware: patch.hardware.apply(hardware.clone())?,
            link: Link {
                bandwidth_gbit_per_second: patch
                    .bandwidth_gbit_per_second
                    .unwrap_or(base_link.bandwidth_gbit_per_second),
                rtt_ms: patch.rtt_ms.unwrap_or(base_link.rtt_ms),
                egress_dollars_per_gb: patch
                    .egress_dollars_per_gb
                    .unwrap_or(base_link.egress_dollars_per_gb),
            },
        });
    }
    let total_accelerators: u32 = site_list.iter().map(|s| s.hardware.accelerators).sum();
    let central_base = Hardware {
        accelerators: total_accelerators,
        ..hardware.clone()
    };
    let central = match &file.central {
        Some(patch) => patch.apply(central_base)?,
        None => central_base,
    };
    let scenario = Scenario {
        params,
        tokens: args.tokens.or(file.tokens).unwrap_or(20.0 * params),
        batch_tokens: args
            .batch_tokens
            .or(file.batch_tokens)
            .unwrap_or_else(|| presets::batch_tokens(params, sites)),
        sites: site_list,
        relay: file
            .relay
            .unwrap_or_else(|| presets::relay(link.egress_dollars_per_gb)),
        central,
        ddp_bits_per_param: file
            .ddp_bits_per_param
            .unwrap_or(presets::DDP_BITS_PER_PARAM),
        data_bits_per_token: file
            .data_bits_per_token
            .unwrap_or(presets::DATA_BITS_PER_TOKEN),
        law: file.law.unwrap_or_else(LossLaw::chinchilla),
        step_seconds: file.step_seconds,
    };
    scenario.validate()?;
    let (mut strategies, source) = match &summary {
        Some(run) => (
            strategies_from_summary(run)?,
            format!("strategies measured in run {}", run.name),
        ),
        None if file.strategy.is_empty() => (
            default_strategies(),
            "published strategies, gaps as their papers claim (0); --from-run measures them".into(),
        ),
        None => (Vec::new(), "strategies from the plan file".into()),
    };
    strategies.extend(file.strategy);
    for strategy in &strategies {
        strategy.validate()?;
    }
    Ok(Inputs {
        scenario,
        strategies,
        source,
    })
}

fn human_duration(seconds: f64) -> String {
    match seconds {
        s if s >= 2.0 * 86400.0 => format!("{:.1} d", s / 86400.0),
        s if s >= 2.0 * 3600.0 => format!("{:.1} h", s / 3600.0),
        s if s >= 120.0 => format!("{:.1} min", s / 60.0),
        s => format!("{s:.1} s"),
    }
}

fn dollars(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("${:.2}M", v / 1e6),
        v if v >= 1e4 => format!("${:.0}k", v / 1e3),
        v => format!("${v:.0}"),
    }
}

/// The plans as a markdown table, relative to the centralized plan (the first).
pub fn plans_table(plans: &[Plan]) -> String {
    let central = plans
        .iter()
        .find(|p| p.kind == PlanKind::Centralized)
        .map_or(f64::NAN, |p| p.total_dollars);
    let mut out = String::new();
    let _ = writeln!(out, "| plan | H | bits/param/sync (up) | loss gap | tokens for DDP's loss | wall time | utilization | WAN bytes | egress $ | compute $ | total $ | vs centralized |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in plans {
        let h = if p.kind == PlanKind::Strategy {
            p.inner_steps.to_string()
        } else {
            "-".into()
        };
        let bits = match p.kind {
            PlanKind::ShipData | PlanKind::Centralized => "-".into(),
            _ => format!("{:.3}", p.bits_per_param_up),
        };
        let _ = writeln!(
            out,
            "| {} | {h} | {bits} | {:+.1}% | {:+.0}% | {} | {:.1}% | {} | {} | {} | {} | {:.2}x |",
            p.name,
            p.loss_gap * 100.0,
            (p.token_factor - 1.0) * 100.0,
            human_duration(p.wall_seconds),
            p.utilization * 100.0,
            crate::report::human_bytes(p.wan_bytes as u64),
            dollars(p.egress_dollars),
            dollars(p.compute_dollars),
            dollars(p.total_dollars),
            p.total_dollars / central,
        );
    }
    out
}

fn threshold(value: Threshold, unit: impl Fn(f64) -> String) -> String {
    match value {
        Threshold::Always => "always".into(),
        Threshold::Never => "never".into(),
        Threshold::At(x) => unit(x),
    }
}

pub fn break_even_table(rows: &[BreakEven]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| strategy | cheaper than centralized at WAN bandwidth >= | at egress <= | at accelerator discount >= |");
    let _ = writeln!(out, "|---|---|---|---|");
    for b in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            b.strategy,
            threshold(b.min_wan_gbit_per_second, |x| format!("{x:.3} Gbit/s")),
            threshold(b.max_egress_dollars_per_gb, |x| format!("${x:.4}/GB")),
            threshold(b.min_accelerator_discount, |x| format!("{:.1}%", x * 100.0)),
        );
    }
    out
}

fn describe(scenario: &Scenario) -> String {
    let site = &scenario.sites[0];
    let uniform = scenario.sites.iter().all(|s| s == site);
    let sites = if uniform {
        format!(
            "{} sites of {} accelerators ({:.0} TFLOP/s peak, MFU {:.0}%, ${:.2}/h), each on {} Gbit/s, {} ms RTT, ${}/GB egress",
            scenario.sites.len(),
            site.hardware.accelerators,
            site.hardware.peak_flops_per_second / 1e12,
            site.hardware.mfu * 100.0,
            site.hardware.dollars_per_accelerator_hour,
            site.link.bandwidth_gbit_per_second,
            site.link.rtt_ms,
            site.link.egress_dollars_per_gb
        )
    } else {
        format!("{} sites (differing; see --json)", scenario.sites.len())
    };
    format!(
        "N = {:.3e} parameters, D = {:.3e} tokens, global batch {:.3e} tokens/step; {sites}; centralized: {} accelerators at ${:.2}/h, {} Gbit/s fabric each; loss law: {}.",
        scenario.params, scenario.tokens, scenario.batch_tokens, scenario.central.accelerators, scenario.central.dollars_per_accelerator_hour, scenario.central.fabric_gbit_per_second, scenario.law.source
    )
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
    if !summary.strategies.iter().any(|s| s.strategy == "ddp")
        || summary.strategies.iter().all(|s| s.strategy == "ddp")
    {
        return Ok(String::new());
    }
    let strategies = strategies_from_summary(&summary)?;
    let mut out = String::new();
    let link = &summary.config.link;
    let _ = writeln!(
        out,
        "What this run's strategies would cost at scale (`lowband plan`: {} sites of 64 H100 on this run's link, {} Gbit/s, ${}/GB; D = 20 N; the gap measured here priced in as extra tokens, Chinchilla law; docs/economics.md):\n",
        summary.config.sites, link.bandwidth_gbit_per_s, link.price_per_gb
    );
    let _ = writeln!(
        out,
        "| N | plan | wall time | utilization | total $ | vs centralized |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for params in [1e9, 1e10, 1e11] {
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
                let _ = writeln!(out, "| {params:.0e} | (not plannable: {error}) | | | | |");
                continue;
            }
        };
        let central = plans[0].total_dollars;
        for p in plans.iter().filter(|p| p.kind != PlanKind::ShipData) {
            let _ = writeln!(
                out,
                "| {params:.0e} | {} | {} | {:.1}% | {} | {:.2}x |",
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
