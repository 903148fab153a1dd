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

mod break_even;
mod exchange;
mod inputs;
mod plans;

pub use break_even::*;
pub use exchange::*;
pub use inputs::*;
pub use plans::*;

#[cfg(test)]
mod tests;
