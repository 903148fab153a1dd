//! A plan's inputs: flags, a plan file (TOML, unknown fields refused) and a compare run's
//! summary.json (`--from-run`), into a `Scenario` and its strategies.

use super::*;

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
pub(super) type RunSummary = crate::report::Summary;

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
pub(super) fn strategies_from_summary(summary: &RunSummary) -> Result<Vec<Strategy>> {
    let mut out = Vec::new();
    for s in summary.strategies.iter().filter(|s| !s.is_ddp()) {
        // An external model's run (PyTorch sites) has no validation loss, so no measured gap:
        // its traffic is measured, its gap is taken as 0 (what the published strategies
        // assume), and the plan's source line says so.
        let gap = match (s.loss_gap_vs_ddp, s.final_train_loss) {
            (Some(gap), _) => gap,
            (None, Some(_)) => 0.0,
            (None, None) => bail!("--from-run: {} has no ddp run, so {}'s loss gap is unknown (run compare with ddp among --strategies)", summary.name, s.strategy),
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

pub(super) struct Inputs {
    pub scenario: Scenario,
    pub strategies: Vec<Strategy>,
    pub source: String,
}

pub(super) fn build(args: &PlanArgs) -> Result<Inputs> {
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
    let link = base_link(args, &file, summary.as_ref())?;
    let scenario = scenario(args, &file, params, sites, &hardware, &link)?;
    let (strategies, source) = strategies(&file, summary.as_ref())?;
    Ok(Inputs {
        scenario,
        strategies,
        source,
    })
}

/// Every site's link unless the plan file says otherwise: `--link`, the file's, the measured
/// run's, or a transatlantic one.
fn base_link(args: &PlanArgs, file: &PlanFile, summary: Option<&RunSummary>) -> Result<Link> {
    Ok(
        match (args.link.as_deref().or(file.link.as_deref()), summary) {
            (Some(name), _) => presets::link(name)?,
            (None, Some(run)) => Link {
                bandwidth_gbit_per_second: run.config.link.bandwidth_gbit_per_s,
                rtt_ms: 2.0 * run.config.link.latency_ms,
                egress_dollars_per_gb: run.config.link.price_per_gb,
            },
            (None, None) => presets::link("transatlantic")?,
        },
    )
}

/// The sites (the plan file's per-site patches over the common hardware and link) and the
/// scenario around them, checked.
fn scenario(
    args: &PlanArgs,
    file: &PlanFile,
    params: f64,
    sites: usize,
    hardware: &Hardware,
    link: &Link,
) -> Result<Scenario> {
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
            .clone()
            .unwrap_or_else(|| presets::relay(link.egress_dollars_per_gb)),
        central,
        ddp_bits_per_param: file
            .ddp_bits_per_param
            .unwrap_or(presets::DDP_BITS_PER_PARAM),
        data_bits_per_token: file
            .data_bits_per_token
            .unwrap_or(presets::DATA_BITS_PER_TOKEN),
        law: file.law.clone().unwrap_or_else(LossLaw::chinchilla),
        step_seconds: file.step_seconds,
    };
    scenario.validate()?;
    Ok(scenario)
}

/// The strategies to plan: a measured run's, else the published ones (unless the plan file
/// names its own), plus the plan file's; checked.
fn strategies(file: &PlanFile, summary: Option<&RunSummary>) -> Result<(Vec<Strategy>, String)> {
    let (mut strategies, source) = match summary {
        Some(run) if run.strategies.iter().any(|s| s.final_train_loss.is_some()) => (
            strategies_from_summary(run)?,
            format!(
                "traffic measured in run {} (an external model: its loss gap is not measured, taken as 0 as the published strategies claim)",
                run.name
            ),
        ),
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
    strategies.extend(file.strategy.iter().cloned());
    for strategy in &strategies {
        strategy.validate()?;
    }
    Ok((strategies, source))
}
