//! The comparison at equal time on the emulated link: when the run's fastest strategy finished,
//! the validation loss each strategy had measured by then (`report`'s column and note); and at
//! equal tokens, where strategies trained different totals (an asynchronous strategy's slower
//! sites train less in the same time).

use lowband_runtime::{Metric, RunResult};

use crate::report::eval_points;

/// When the run's fastest strategy finished, on the emulated link (None: nothing evaluated).
pub(crate) fn equal_time_seconds(results: &[RunResult]) -> Option<f64> {
    results
        .iter()
        .filter(|r| !eval_points(r).is_empty())
        .map(|r| r.emulated_seconds())
        .min_by(f64::total_cmp)
}

/// The latest validation loss of `r` measured by emulated second `seconds`, and its step.
pub(crate) fn loss_by(r: &RunResult, seconds: f64) -> Option<(u64, f64)> {
    r.metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Eval {
                step,
                emulated_seconds,
                val_loss,
                ..
            } if *emulated_seconds <= seconds * (1.0 + 1e-9) => Some((*step, *val_loss)),
            _ => None,
        })
        .next_back()
}

/// The fewest tokens any strategy of the run trained, when they differ (None: every strategy
/// trained the same tokens, and the final losses are the comparison at equal tokens).
pub(crate) fn equal_tokens(results: &[RunResult]) -> Option<u64> {
    let evaluated: Vec<u64> = results
        .iter()
        .filter(|r| !eval_points(r).is_empty())
        .map(|r| r.tokens)
        .collect();
    let fewest = evaluated.iter().copied().min()?;
    evaluated.iter().any(|t| *t != fewest).then_some(fewest)
}

/// The latest validation loss of `r` measured by the time it had trained `tokens`, and its step.
pub(crate) fn loss_by_tokens(r: &RunResult, tokens: u64) -> Option<(u64, f64)> {
    r.metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Eval {
                step,
                tokens: trained,
                val_loss,
                ..
            } if *trained <= tokens => Some((*step, *val_loss)),
            _ => None,
        })
        .next_back()
}
