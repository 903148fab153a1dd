//! What a plan is made of: hardware, links, sites, relays, strategies and the scenario.

use super::*;

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

    pub(crate) fn bits_per_param_down(&self, sites: usize) -> f64 {
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

    pub(crate) fn gradient_bytes(&self) -> f64 {
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

    pub(crate) fn site_accelerators(&self) -> f64 {
        self.sites
            .iter()
            .map(|s| s.hardware.accelerators as f64)
            .sum()
    }
}
