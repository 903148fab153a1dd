//! The comparison at equal time on the emulated link: when the run's fastest strategy finished,
//! the validation loss each strategy had measured by then (`report`'s column and note).

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
