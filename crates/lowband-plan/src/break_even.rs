//! Break-even thresholds: the bandwidth, egress price and accelerator discount at which a strategy costs what centralized training does.

use super::*;

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
