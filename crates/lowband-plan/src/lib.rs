//! `lowband-plan`: when is training one model across several sites cheaper than training it in
//! one place, and at what quality? A cost model as a pure library: no IO, no ML, no clock.
//!
//! Inputs are a [`Scenario`] (model size, tokens, hardware and link of every site, the centralized
//! alternative, a loss-vs-tokens law) and [`Strategy`] figures (sync interval, bits per parameter,
//! exchange pattern, overlap, measured loss gap), usually taken from a measured `lowband compare`
//! run. Outputs are [`Plan`]s (time, utilization, bytes, dollars, with the quality penalty priced
//! in) for the strategies and the four baselines, and [`BreakEven`] thresholds.
//!
//! Every formula, assumption and source is in `docs/economics.md`; the unit tests below check the
//! formulas on hand-computed cases and `tests/properties.rs` checks that more bandwidth, cheaper
//! egress or fewer bits never make a plan more expensive.

pub mod law;
pub mod presets;

use serde::{Deserialize, Serialize};

pub use law::LossLaw;

/// Bad input: the field it concerns and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PlanError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn positive(field: &str, value: f64) -> Result<(), PlanError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be a positive number, got {value}"),
        ))
    }
}

fn non_negative(field: &str, value: f64) -> Result<(), PlanError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be a number >= 0, got {value}"),
        ))
    }
}

const SECONDS_PER_HOUR: f64 = 3600.0;

/// Largest model a plan prices (a quadrillion parameters), largest token count (1e18), and most
/// sites: past these the arithmetic leaves the range where its dollars and hours mean anything.
pub const PARAMS_MAX: f64 = 1e15;
pub const TOKENS_MAX: f64 = 1e18;
pub const SITES_MAX: usize = 10_000;
const BYTES_PER_GB: f64 = 1e9;

/// What one site (or the centralized cluster) computes with, and what it costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// Peak dense FLOP/s of one accelerator at the training precision.
    pub peak_flops_per_second: f64,
    /// Model FLOPs utilization: the fraction of peak a training step reaches (0..1].
    pub mfu: f64,
    /// Accelerators at the site.
    pub accelerators: u32,
    /// Price of one accelerator for one hour, paid for wall-clock time (idle or not).
    pub dollars_per_accelerator_hour: f64,
    /// Bandwidth of the site's internal fabric per accelerator (Gbit/s): it carries the
    /// gradient all-reduce among the site's own accelerators every inner step.
    pub fabric_gbit_per_second: f64,
}

impl Hardware {
    pub fn validate(&self, field: &str) -> Result<(), PlanError> {
        positive(
            &format!("{field}.peak_flops_per_second"),
            self.peak_flops_per_second,
        )?;
        positive(&format!("{field}.mfu"), self.mfu)?;
        if self.mfu > 1.0 {
            return Err(invalid(
                format!("{field}.mfu"),
                format!("is a fraction of peak, at most 1, got {}", self.mfu),
            ));
        }
        if self.accelerators == 0 {
            return Err(invalid(
                format!("{field}.accelerators"),
                "must be at least 1",
            ));
        }
        non_negative(
            &format!("{field}.dollars_per_accelerator_hour"),
            self.dollars_per_accelerator_hour,
        )?;
        positive(
            &format!("{field}.fabric_gbit_per_second"),
            self.fabric_gbit_per_second,
        )
    }

    /// FLOP/s the whole site delivers to training: peak × MFU × accelerators.
    pub fn training_flops_per_second(&self) -> f64 {
        self.peak_flops_per_second * self.mfu * self.accelerators as f64
    }

    pub fn dollars_per_hour(&self) -> f64 {
        self.dollars_per_accelerator_hour * self.accelerators as f64
    }
}

/// A site's wide-area link (symmetric, full duplex).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Each direction.
    pub bandwidth_gbit_per_second: f64,
    /// Round-trip time to the other sites (and the relay).
    pub rtt_ms: f64,
    /// Price per GB (1e9 bytes) the site sends.
    pub egress_dollars_per_gb: f64,
}

impl Link {
    pub fn validate(&self, field: &str) -> Result<(), PlanError> {
        positive(
            &format!("{field}.bandwidth_gbit_per_second"),
            self.bandwidth_gbit_per_second,
        )?;
        non_negative(&format!("{field}.rtt_ms"), self.rtt_ms)?;
        non_negative(
            &format!("{field}.egress_dollars_per_gb"),
            self.egress_dollars_per_gb,
        )
    }

    pub fn bytes_per_second(&self) -> f64 {
        self.bandwidth_gbit_per_second * 1e9 / 8.0
    }

    pub fn one_way_seconds(&self) -> f64 {
        self.rtt_ms / 2000.0
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub hardware: Hardware,
    pub link: Link,
}

/// The relay of the `relay` pattern (lowband's coordinator): a small machine with a fat link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    pub bandwidth_gbit_per_second: f64,
    pub egress_dollars_per_gb: f64,
    pub dollars_per_hour: f64,
}

impl Relay {
    pub fn validate(&self) -> Result<(), PlanError> {
        positive(
            "relay.bandwidth_gbit_per_second",
            self.bandwidth_gbit_per_second,
        )?;
        non_negative("relay.egress_dollars_per_gb", self.egress_dollars_per_gb)?;
        non_negative("relay.dollars_per_hour", self.dollars_per_hour)
    }

    pub fn bytes_per_second(&self) -> f64 {
        self.bandwidth_gbit_per_second * 1e9 / 8.0
    }
}

/// How the sites exchange their packets at a sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Ring all-reduce among the sites: each sends and receives 2(K−1)/K packets.
    AllReduce,
    /// Every site sends its packet to every other: each sends and receives K−1 packets.
    AllGather,
    /// Every site sends its packet to a relay, which sends every site a downlink packet
    /// (lowband's coordinator: the merged update in the downlink codec, or the relayed packets).
    Relay,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pattern::AllReduce => "all-reduce",
            Pattern::AllGather => "all-gather",
            Pattern::Relay => "relay",
        })
    }
}

/// A strategy as the planner sees it: what the measured runs give.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    pub name: String,
    /// Inner steps per round (H); 1 syncs every step.
    pub inner_steps: u64,
    /// Bits per parameter in the packet a site sends per round.
    pub bits_per_param_up: f64,
    /// `relay` only: bits per parameter in the packet a site receives per round (default:
    /// the other K−1 sites' packets relayed, (K−1) × bits_per_param_up).
    #[serde(default)]
    pub bits_per_param_down: Option<f64>,
    pub pattern: Pattern,
    /// Streaming DiLoCo's fragments: the packet is sent in this many equal parts, staggered
    /// evenly over the round (1: the whole model at once).
    #[serde(default = "one")]
    pub fragments: u32,
    /// Inner steps (fractions allowed) a sync may overlap with compute before the sites wait
    /// for it (Streaming DiLoCo's τ; 0: the sites wait for every sync; [`BACKWARD_STEPS`]: the
    /// sync overlaps one backward pass). A fragment's sync of T seconds stalls the sites
    /// max(0, T − overlap_steps × step) seconds.
    #[serde(default)]
    pub overlap_steps: f64,
    /// Validation loss at equal tokens relative to DDP's, minus one (+0.02 = 2% worse).
    #[serde(default)]
    pub loss_gap: f64,
}

/// The backward pass's share of a step (4 of the 6 N FLOPs per token): what a gradient
/// all-reduce (or an outer sync started at the last backward) can hide behind.
pub const BACKWARD_STEPS: f64 = 2.0 / 3.0;

fn one() -> u32 {
    1
}

impl Strategy {
    pub fn validate(&self) -> Result<(), PlanError> {
        let field = |name: &str| format!("strategy {}: {name}", self.name);
        if self.inner_steps == 0 {
            return Err(invalid(field("inner_steps"), "must be at least 1"));
        }
        positive(&field("bits_per_param_up"), self.bits_per_param_up)?;
        if let Some(down) = self.bits_per_param_down {
            if self.pattern != Pattern::Relay {
                return Err(invalid(field("bits_per_param_down"), format!("only a relay has a separate downlink packet; {} sends the same packets both ways", self.pattern)));
            }
            non_negative(&field("bits_per_param_down"), down)?;
        }
        if self.fragments == 0 {
            return Err(invalid(field("fragments"), "must be at least 1"));
        }
        if !(self.overlap_steps.is_finite() && self.overlap_steps >= 0.0)
            || self.overlap_steps > self.inner_steps as f64
        {
            return Err(invalid(
                field("overlap_steps"),
                format!(
                    "must be in [0, inner_steps = {}]: a sync cannot overlap the next round's",
                    self.inner_steps
                ),
            ));
        }
        if !(self.loss_gap.is_finite() && self.loss_gap > -1.0) {
            return Err(invalid(
                field("loss_gap"),
                format!(
                    "must be a number > -1 (a relative gap), got {}",
                    self.loss_gap
                ),
            ));
        }
        Ok(())
    }

    fn bits_per_param_down(&self, sites: usize) -> f64 {
        self.bits_per_param_down
            .unwrap_or((sites.saturating_sub(1)) as f64 * self.bits_per_param_up)
    }
}

/// Everything a plan needs besides the strategy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Model parameters (N).
    pub params: f64,
    /// Training tokens at DDP quality (D; the CLI defaults to 20 N, Chinchilla).
    pub tokens: f64,
    /// Global batch in tokens per inner step (all sites together; each site takes 1/K).
    pub batch_tokens: f64,
    pub sites: Vec<Site>,
    pub relay: Relay,
    /// The centralized alternative: all its accelerators in one site.
    pub central: Hardware,
    /// Bits per parameter of a gradient all-reduce (DDP, and every site's internal one).
    pub ddp_bits_per_param: f64,
    /// Bits per token of the training data, for shipping the data instead.
    pub data_bits_per_token: f64,
    /// Loss against tokens, used to price a strategy's loss gap in extra tokens.
    pub law: LossLaw,
    /// Measured compute seconds of one inner step at a site (replaces the FLOP estimate; the
    /// centralized step is scaled by the ratio of accelerator counts).
    #[serde(default)]
    pub step_seconds: Option<f64>,
}

impl Scenario {
    pub fn validate(&self) -> Result<(), PlanError> {
        positive("params", self.params)?;
        positive("tokens", self.tokens)?;
        positive("batch_tokens", self.batch_tokens)?;
        for (field, value, max) in [
            ("params", self.params, PARAMS_MAX),
            ("tokens", self.tokens, TOKENS_MAX),
            ("batch_tokens", self.batch_tokens, TOKENS_MAX),
        ] {
            if value > max {
                return Err(invalid(
                    field,
                    format!("{value:e} exceeds the limit of {max:e}"),
                ));
            }
        }
        if self.sites.is_empty() || self.sites.len() > SITES_MAX {
            return Err(invalid(
                "sites",
                format!("need 1 to {SITES_MAX} sites, got {}", self.sites.len()),
            ));
        }
        for (index, site) in self.sites.iter().enumerate() {
            site.hardware
                .validate(&format!("sites[{index}].hardware"))?;
            site.link.validate(&format!("sites[{index}].link"))?;
        }
        self.relay.validate()?;
        self.central.validate("central")?;
        positive("ddp_bits_per_param", self.ddp_bits_per_param)?;
        positive("data_bits_per_token", self.data_bits_per_token)?;
        self.law.validate()?;
        if let Some(seconds) = self.step_seconds {
            positive("step_seconds", seconds)?;
        }
        Ok(())
    }

    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    fn gradient_bytes(&self) -> f64 {
        self.params * self.ddp_bits_per_param / 8.0
    }

    /// Pure compute seconds of one inner step at a site (its 1/K of the global batch), and the
    /// step's time once the site's own gradient all-reduce (overlapped with the backward pass)
    /// is accounted for.
    pub fn site_step_seconds(&self, site: &Site) -> (f64, f64) {
        let compute = match self.step_seconds {
            Some(seconds) => seconds,
            None => {
                6.0 * self.params * (self.batch_tokens / self.site_count() as f64)
                    / site.hardware.training_flops_per_second()
            }
        };
        let fabric = ring_all_reduce_seconds(
            site.hardware.accelerators as usize,
            self.gradient_bytes(),
            site.hardware.fabric_gbit_per_second * 1e9 / 8.0,
            0.0,
        );
        (compute, compute.max(fabric))
    }

    /// The same scenario with every WAN link (and the relay) scaled so the slowest site link
    /// has `gbit_per_second`.
    pub fn with_wan_bandwidth(&self, gbit_per_second: f64) -> Scenario {
        let scale = gbit_per_second / self.slowest_link_gbit_per_second();
        let mut out = self.clone();
        for site in &mut out.sites {
            site.link.bandwidth_gbit_per_second *= scale;
        }
        out.relay.bandwidth_gbit_per_second *= scale;
        out
    }

    /// The same scenario with every WAN sender (sites and relay) paying `dollars_per_gb`.
    pub fn with_egress_price(&self, dollars_per_gb: f64) -> Scenario {
        let mut out = self.clone();
        for site in &mut out.sites {
            site.link.egress_dollars_per_gb = dollars_per_gb;
        }
        out.relay.egress_dollars_per_gb = dollars_per_gb;
        out
    }

    /// The same scenario with the sites' accelerators `discount` (0..1) cheaper.
    pub fn with_site_discount(&self, discount: f64) -> Scenario {
        let mut out = self.clone();
        for site in &mut out.sites {
            site.hardware.dollars_per_accelerator_hour *= 1.0 - discount;
        }
        out
    }

    pub fn slowest_link_gbit_per_second(&self) -> f64 {
        self.sites
            .iter()
            .map(|s| s.link.bandwidth_gbit_per_second)
            .fold(f64::INFINITY, f64::min)
    }

    fn site_accelerators(&self) -> f64 {
        self.sites
            .iter()
            .map(|s| s.hardware.accelerators as f64)
            .sum()
    }
}

/// Seconds of a ring all-reduce of `payload_bytes` among `members` at `bytes_per_second` each,
/// with `one_way_seconds` of latency per hop: 2(n−1)/n × payload / bandwidth + 2(n−1) × latency.
pub fn ring_all_reduce_seconds(
    members: usize,
    payload_bytes: f64,
    bytes_per_second: f64,
    one_way_seconds: f64,
) -> f64 {
    if members <= 1 {
        return 0.0;
    }
    let n = members as f64;
    2.0 * (n - 1.0) / n * payload_bytes / bytes_per_second + 2.0 * (n - 1.0) * one_way_seconds
}

/// One sync: how long it takes and who sends how much.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Exchange {
    pub seconds: f64,
    /// Bytes each site sends (same order as the scenario's sites).
    pub site_bytes_sent: Vec<f64>,
    /// Bytes each site sends plus receives: the link's load.
    pub site_bytes_moved: Vec<f64>,
    pub relay_bytes_sent: f64,
}

impl Exchange {
    pub fn wan_bytes(&self) -> f64 {
        self.site_bytes_sent.iter().sum::<f64>() + self.relay_bytes_sent
    }
}

/// One sync of `up_bytes` per site (and `down_bytes` per site from the relay, for `relay`).
pub fn exchange(
    pattern: Pattern,
    sites: &[Site],
    relay: &Relay,
    up_bytes: f64,
    down_bytes: f64,
) -> Exchange {
    let k = sites.len();
    let n = k as f64;
    let slowest = sites
        .iter()
        .map(|s| s.link.bytes_per_second())
        .fold(f64::INFINITY, f64::min);
    let longest_one_way = sites
        .iter()
        .map(|s| s.link.one_way_seconds())
        .fold(0.0, f64::max);
    match pattern {
        Pattern::AllReduce => {
            let sent = if k > 1 {
                2.0 * (n - 1.0) / n * up_bytes
            } else {
                0.0
            };
            Exchange {
                seconds: ring_all_reduce_seconds(k, up_bytes, slowest, longest_one_way),
                site_bytes_sent: vec![sent; k],
                site_bytes_moved: vec![2.0 * sent; k],
                relay_bytes_sent: 0.0,
            }
        }
        Pattern::AllGather => {
            let sent = (n - 1.0) * up_bytes;
            Exchange {
                seconds: if k > 1 {
                    sent / slowest + longest_one_way
                } else {
                    0.0
                },
                site_bytes_sent: vec![sent; k],
                site_bytes_moved: vec![2.0 * sent; k],
                relay_bytes_sent: 0.0,
            }
        }
        Pattern::Relay => {
            let upload = sites
                .iter()
                .map(|s| up_bytes / s.link.bytes_per_second())
                .fold(n * up_bytes / relay.bytes_per_second(), f64::max);
            let download = sites
                .iter()
                .map(|s| down_bytes / s.link.bytes_per_second())
                .fold(n * down_bytes / relay.bytes_per_second(), f64::max);
            Exchange {
                seconds: upload + download + 2.0 * longest_one_way,
                site_bytes_sent: vec![up_bytes; k],
                site_bytes_moved: vec![up_bytes + down_bytes; k],
                relay_bytes_sent: n * down_bytes,
            }
        }
    }
}

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

/// Where a strategy stops (or starts) being cheaper than centralized training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Threshold {
    /// Cheaper over the whole range searched.
    Always,
    At(f64),
    /// Never cheaper over the whole range searched.
    Never,
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::Always => f.write_str("always"),
            Threshold::Never => f.write_str("never"),
            Threshold::At(value) => write!(f, "{value:.4}"),
        }
    }
}

/// The range searched for the bandwidth break-even (Gbit/s of the slowest site link).
pub const BANDWIDTH_SEARCH_GBIT_PER_SECOND: (f64, f64) = (1e-4, 1e5);

/// Each threshold moves one input and holds the others at the scenario's values; "cheaper"
/// compares total dollars with the quality gap priced in against centralized training.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakEven {
    pub strategy: String,
    /// The slowest site link at and above which the strategy is cheaper.
    pub min_wan_gbit_per_second: Threshold,
    /// The egress price (every WAN sender) at and below which it is cheaper.
    pub max_egress_dollars_per_gb: Threshold,
    /// The discount on the sites' accelerator price (0..1) at and above which it is cheaper.
    pub min_accelerator_discount: Threshold,
}

pub fn break_even(scenario: &Scenario, strategy: &Strategy) -> Result<BreakEven, PlanError> {
    let central = plan_centralized(scenario)?.total_dollars;
    let cost_at_bandwidth = |gbit: f64| {
        plan_strategy(&scenario.with_wan_bandwidth(gbit), strategy).map(|p| p.total_dollars)
    };
    let (low, high) = BANDWIDTH_SEARCH_GBIT_PER_SECOND;
    let min_wan_gbit_per_second = if cost_at_bandwidth(high)? > central {
        Threshold::Never
    } else if cost_at_bandwidth(low)? <= central {
        Threshold::Always
    } else {
        // Cost never rises with bandwidth (tests/properties.rs): bisect on a log scale.
        let (mut cheap, mut dear) = (high.ln(), low.ln());
        for _ in 0..80 {
            let middle = 0.5 * (cheap + dear);
            if cost_at_bandwidth(middle.exp())? <= central {
                cheap = middle;
            } else {
                dear = middle;
            }
        }
        Threshold::At(cheap.exp())
    };
    let plan = plan_strategy(scenario, strategy)?;
    let wan_gb = plan.wan_bytes / BYTES_PER_GB;
    let max_egress_dollars_per_gb = if plan.compute_dollars > central {
        Threshold::Never
    } else if wan_gb == 0.0 {
        Threshold::Always
    } else {
        Threshold::At((central - plan.compute_dollars) / wan_gb)
    };
    let relay_hours = if strategy.pattern == Pattern::Relay {
        scenario.relay.dollars_per_hour * plan.wall_seconds / SECONDS_PER_HOUR
    } else {
        0.0
    };
    let site_compute_dollars = plan.compute_dollars - relay_hours;
    let room = central - plan.egress_dollars - relay_hours;
    let min_accelerator_discount = if room <= 0.0 {
        Threshold::Never
    } else if site_compute_dollars <= room {
        Threshold::Always
    } else {
        Threshold::At(1.0 - room / site_compute_dollars)
    };
    Ok(BreakEven {
        strategy: strategy.name.clone(),
        min_wan_gbit_per_second,
        max_egress_dollars_per_gb,
        min_accelerator_discount,
    })
}

/// The slowest-site bandwidth (Gbit/s) at which a strategy reaches `target` compute utilization
/// (at the scenario's tokens), or None if it cannot within the searched range.
pub fn bandwidth_for_utilization(
    scenario: &Scenario,
    strategy: &Strategy,
    target: f64,
) -> Result<Option<f64>, PlanError> {
    if !(target > 0.0 && target < 1.0) {
        return Err(invalid(
            "target utilization",
            format!("must be in (0, 1), got {target}"),
        ));
    }
    let utilization = |gbit: f64| {
        plan_strategy(&scenario.with_wan_bandwidth(gbit), strategy).map(|p| p.utilization)
    };
    let (low, high) = BANDWIDTH_SEARCH_GBIT_PER_SECOND;
    if utilization(high)? < target {
        return Ok(None);
    }
    if utilization(low)? >= target {
        return Ok(Some(low));
    }
    let (mut enough, mut short) = (high.ln(), low.ln());
    for _ in 0..80 {
        let middle = 0.5 * (enough + short);
        if utilization(middle.exp())? >= target {
            enough = middle;
        } else {
            short = middle;
        }
    }
    Ok(Some(enough.exp()))
}

#[cfg(test)]
mod tests;
