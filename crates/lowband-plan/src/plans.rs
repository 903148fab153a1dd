//! Plans: a run's time, utilization, bytes and dollars, for every strategy and baseline.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanKind {
    /// All accelerators in one site, DDP over its fabric.
    Centralized,
    /// DDP across the sites over the WAN (the naive way).
    DecentralizedDdp,
    /// Move the data to one site, then train centrally.
    ShipData,
    /// A measured (or described) round strategy.
    Strategy,
}

/// One row of the planner's table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub name: String,
    pub kind: PlanKind,
    pub inner_steps: u64,
    pub pattern: Option<Pattern>,
    pub bits_per_param_up: f64,
    pub loss_gap: f64,
    /// Tokens needed to reach DDP's loss, as a multiple of the scenario's tokens.
    pub token_factor: f64,
    /// Tokens trained (scenario tokens × token_factor).
    pub tokens: f64,
    pub rounds: f64,
    pub round_seconds: f64,
    pub compute_seconds_per_round: f64,
    /// Link seconds of one round's syncs (ship the data: the whole transfer).
    pub communication_seconds_per_round: f64,
    pub wall_seconds: f64,
    /// Time the accelerators compute / wall time (mean over sites).
    pub utilization: f64,
    /// Bytes sent over WAN links in the whole run (sites and relay).
    pub wan_bytes: f64,
    /// Most bytes one site's link carries (up + down) in one sync (one fragment's).
    pub peak_site_bytes_per_sync: f64,
    pub egress_dollars: f64,
    pub compute_dollars: f64,
    pub total_dollars: f64,
    /// The same plan at the scenario's tokens (quality gap not priced in).
    pub wall_seconds_equal_tokens: f64,
    pub total_dollars_equal_tokens: f64,
}

#[derive(Clone)]
struct Run {
    rounds: f64,
    round_seconds: f64,
    compute_per_round: f64,
    communication_per_round: f64,
    wall_seconds: f64,
    utilization: f64,
    wan_bytes: f64,
    peak_site_bytes_per_sync: f64,
    egress_dollars: f64,
    compute_dollars: f64,
}

fn run_strategy(scenario: &Scenario, strategy: &Strategy, tokens: f64) -> Run {
    let k = scenario.site_count();
    let h = strategy.inner_steps as f64;
    let rounds = tokens / scenario.batch_tokens / h;
    let steps: Vec<(f64, f64)> = scenario
        .sites
        .iter()
        .map(|s| scenario.site_step_seconds(s))
        .collect();
    let compute_per_round = h * steps.iter().map(|s| s.1).fold(0.0, f64::max);
    let fragments = strategy.fragments as f64;
    let up_bytes = scenario.params * strategy.bits_per_param_up / 8.0 / fragments;
    let down_bytes = scenario.params * strategy.bits_per_param_down(k) / 8.0 / fragments;
    // One fragment's sync; all of a round's fragments together move the whole packet.
    let sync = exchange(
        strategy.pattern,
        &scenario.sites,
        &scenario.relay,
        up_bytes,
        down_bytes,
    );
    let step = steps.iter().map(|s| s.1).fold(0.0, f64::max);
    let stall = (sync.seconds - strategy.overlap_steps * step).max(0.0);
    // The sites stall for what a fragment's sync cannot hide, and the link cannot carry more
    // than one round's fragments per round.
    let round_seconds = (compute_per_round + fragments * stall).max(fragments * sync.seconds);
    let wall_seconds = rounds * round_seconds;
    let utilization = if round_seconds > 0.0 {
        steps.iter().map(|s| h * s.0 / round_seconds).sum::<f64>() / k as f64
    } else {
        1.0
    };
    let egress_per_round = fragments
        * scenario
            .sites
            .iter()
            .zip(&sync.site_bytes_sent)
            .map(|(s, b)| b * s.link.egress_dollars_per_gb)
            .sum::<f64>()
        + fragments * sync.relay_bytes_sent * scenario.relay.egress_dollars_per_gb;
    let relay_dollars_per_hour = if strategy.pattern == Pattern::Relay {
        scenario.relay.dollars_per_hour
    } else {
        0.0
    };
    let dollars_per_hour = scenario
        .sites
        .iter()
        .map(|s| s.hardware.dollars_per_hour())
        .sum::<f64>()
        + relay_dollars_per_hour;
    Run {
        rounds,
        round_seconds,
        compute_per_round,
        communication_per_round: fragments * sync.seconds,
        wall_seconds,
        utilization,
        wan_bytes: rounds * fragments * sync.wan_bytes(),
        peak_site_bytes_per_sync: sync.site_bytes_moved.iter().cloned().fold(0.0, f64::max),
        egress_dollars: rounds * egress_per_round / BYTES_PER_GB,
        compute_dollars: wall_seconds / SECONDS_PER_HOUR * dollars_per_hour,
    }
}

fn plan_from_runs(
    name: String,
    kind: PlanKind,
    strategy: Option<&Strategy>,
    token_factor: f64,
    tokens: f64,
    priced: Run,
    equal: Run,
) -> Plan {
    Plan {
        name,
        kind,
        inner_steps: strategy.map_or(1, |s| s.inner_steps),
        pattern: strategy.map(|s| s.pattern),
        bits_per_param_up: strategy.map_or(0.0, |s| s.bits_per_param_up),
        loss_gap: strategy.map_or(0.0, |s| s.loss_gap),
        token_factor,
        tokens: tokens * token_factor,
        rounds: priced.rounds,
        round_seconds: priced.round_seconds,
        compute_seconds_per_round: priced.compute_per_round,
        communication_seconds_per_round: priced.communication_per_round,
        wall_seconds: priced.wall_seconds,
        utilization: priced.utilization,
        wan_bytes: priced.wan_bytes,
        peak_site_bytes_per_sync: priced.peak_site_bytes_per_sync,
        egress_dollars: priced.egress_dollars,
        compute_dollars: priced.compute_dollars,
        total_dollars: priced.egress_dollars + priced.compute_dollars,
        wall_seconds_equal_tokens: equal.wall_seconds,
        total_dollars_equal_tokens: equal.egress_dollars + equal.compute_dollars,
    }
}

/// A round strategy across the sites, its loss gap priced in as extra tokens.
pub fn plan_strategy(scenario: &Scenario, strategy: &Strategy) -> Result<Plan, PlanError> {
    scenario.validate()?;
    strategy.validate()?;
    // A strategy that beat DDP gets no credit: an advantage measured on a short, small run is not
    // assumed to carry over to the planned size (docs/economics.md).
    let factor =
        scenario
            .law
            .token_factor(scenario.params, scenario.tokens, strategy.loss_gap.max(0.0))?;
    let priced = run_strategy(scenario, strategy, scenario.tokens * factor);
    let equal = run_strategy(scenario, strategy, scenario.tokens);
    Ok(plan_from_runs(
        strategy.name.clone(),
        PlanKind::Strategy,
        Some(strategy),
        factor,
        scenario.tokens,
        priced,
        equal,
    ))
}

/// DDP across the sites over the WAN: a gradient all-reduce every step, overlapped with the
/// backward pass.
pub fn decentralized_ddp_strategy(scenario: &Scenario) -> Strategy {
    Strategy {
        name: "decentralized ddp".into(),
        inner_steps: 1,
        bits_per_param_up: scenario.ddp_bits_per_param,
        bits_per_param_down: None,
        pattern: Pattern::AllReduce,
        fragments: 1,
        overlap_steps: BACKWARD_STEPS,
        loss_gap: 0.0,
    }
}

pub fn plan_decentralized_ddp(scenario: &Scenario) -> Result<Plan, PlanError> {
    scenario.validate()?;
    let strategy = decentralized_ddp_strategy(scenario);
    // No gap: the priced run is the equal-token run.
    let run = run_strategy(scenario, &strategy, scenario.tokens);
    let mut plan = plan_from_runs(
        strategy.name.clone(),
        PlanKind::DecentralizedDdp,
        Some(&strategy),
        1.0,
        scenario.tokens,
        run.clone(),
        run,
    );
    plan.bits_per_param_up = scenario.ddp_bits_per_param;
    Ok(plan)
}

fn run_centralized(scenario: &Scenario, tokens: f64) -> Run {
    let central = &scenario.central;
    let steps = tokens / scenario.batch_tokens;
    let compute = match scenario.step_seconds {
        Some(seconds) => seconds * scenario.site_accelerators() / central.accelerators as f64,
        None => 6.0 * scenario.params * scenario.batch_tokens / central.training_flops_per_second(),
    };
    let fabric = ring_all_reduce_seconds(
        central.accelerators as usize,
        scenario.gradient_bytes(),
        central.fabric_gbit_per_second * 1e9 / 8.0,
        0.0,
    );
    let step = compute.max(fabric);
    let wall_seconds = steps * step;
    Run {
        rounds: steps,
        round_seconds: step,
        compute_per_round: compute,
        communication_per_round: 0.0,
        wall_seconds,
        utilization: compute / step,
        wan_bytes: 0.0,
        peak_site_bytes_per_sync: 0.0,
        egress_dollars: 0.0,
        compute_dollars: wall_seconds / SECONDS_PER_HOUR * central.dollars_per_hour(),
    }
}

/// All accelerators in one site, DDP over its fabric.
pub fn plan_centralized(scenario: &Scenario) -> Result<Plan, PlanError> {
    scenario.validate()?;
    let run = run_centralized(scenario, scenario.tokens);
    let mut plan = plan_from_runs(
        "centralized".into(),
        PlanKind::Centralized,
        None,
        1.0,
        scenario.tokens,
        run.clone(),
        run,
    );
    plan.bits_per_param_up = scenario.ddp_bits_per_param;
    Ok(plan)
}

/// Move every other site's share of the data to site 0 (the data split evenly among the sites,
/// at `data_bits_per_token`), then train centrally; training starts on the local share while the
/// rest streams in, so the wall time is the longer of the two.
pub fn plan_ship_data(scenario: &Scenario) -> Result<Plan, PlanError> {
    scenario.validate()?;
    let k = scenario.site_count();
    let share_bytes = scenario.tokens / k as f64 * scenario.data_bits_per_token / 8.0;
    let receiver = &scenario.sites[0].link;
    let senders = &scenario.sites[1..];
    let transfer_seconds = senders
        .iter()
        .map(|s| share_bytes / s.link.bytes_per_second() + s.link.one_way_seconds())
        .fold(
            senders.len() as f64 * share_bytes / receiver.bytes_per_second(),
            f64::max,
        );
    let mut run = run_centralized(scenario, scenario.tokens);
    let wall_seconds = run.wall_seconds.max(transfer_seconds);
    let compute_seconds = run.wall_seconds * run.utilization;
    run.compute_dollars = wall_seconds / SECONDS_PER_HOUR * scenario.central.dollars_per_hour();
    run.wall_seconds = wall_seconds;
    run.utilization = compute_seconds / wall_seconds;
    run.wan_bytes = share_bytes * senders.len() as f64;
    run.peak_site_bytes_per_sync = run.wan_bytes;
    run.communication_per_round = transfer_seconds;
    run.egress_dollars = senders
        .iter()
        .map(|s| share_bytes * s.link.egress_dollars_per_gb)
        .sum::<f64>()
        / BYTES_PER_GB;
    Ok(plan_from_runs(
        "ship the data".into(),
        PlanKind::ShipData,
        None,
        1.0,
        scenario.tokens,
        run.clone(),
        run,
    ))
}

/// The four baselines, then every strategy.
pub fn plan_all(scenario: &Scenario, strategies: &[Strategy]) -> Result<Vec<Plan>, PlanError> {
    let mut plans = vec![
        plan_centralized(scenario)?,
        plan_decentralized_ddp(scenario)?,
        plan_ship_data(scenario)?,
    ];
    for strategy in strategies {
        plans.push(plan_strategy(scenario, strategy)?);
    }
    Ok(plans)
}
