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

/// The report's notes on the comparison at equal time and (where strategies trained different
/// totals) at equal tokens.
pub(crate) fn notes(results: &[RunResult], eval_every_steps: u64) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = equal_time_seconds(results) {
        let tokens_note = if equal_tokens(results).is_some() {
            "The val loss column is each strategy's end, after the tokens it trained (below)."
        } else {
            "The val loss column compares at equal tokens."
        };
        out.push(format!("- Equal time: the validation loss each strategy had reached (its latest evaluation, every {} steps and at the start) when the fastest finished, {t:.1} s into its emulated run; on this link that is what a strategy buys for the same wall-clock time (chart: loss_vs_time.svg). {tokens_note}", eval_every_steps));
    }
    if let Some(fewest) = equal_tokens(results) {
        let each: Vec<String> = results
            .iter()
            .map(|r| {
                let at = loss_by_tokens(r, fewest).map_or("-".into(), |(step, loss)| {
                    format!("{loss:.4} (step {step})")
                });
                format!(
                    "{} trained {} tokens, at {fewest}: {at}",
                    r.strategy.name(),
                    r.tokens
                )
            })
            .collect();
        out.push(format!("- Equal tokens: the strategies trained different totals (an asynchronous strategy's sites train for the same time, the slower ones fewer tokens); each one's latest evaluation by the fewest: {}.", each.join("; ")));
    }
    out
}
