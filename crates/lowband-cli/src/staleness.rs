//! What an asynchronous run did with late updates: how many were merged at each staleness and
//! how many were refused as too stale (`report`'s note).

use std::collections::BTreeMap;

use lowband_runtime::{Metric, RunResult};

/// One line per asynchronous strategy: merged updates by staleness, and the refused ones.
pub(crate) fn staleness_notes(results: &[RunResult]) -> Vec<String> {
    results
        .iter()
        .filter(|r| r.strategy.asynchronous.is_some())
        .map(|r| {
            let mut by_staleness: BTreeMap<u64, u64> = BTreeMap::new();
            let mut too_stale = 0u64;
            for metric in &r.metrics {
                match metric {
                    Metric::Round {
                        update_staleness, ..
                    } => {
                        for (_, staleness) in update_staleness {
                            *by_staleness.entry(*staleness).or_default() += 1;
                        }
                    }
                    Metric::Refused {
                        too_stale: true, ..
                    } => too_stale += 1,
                    _ => {}
                }
            }
            let held: u64 = by_staleness.values().sum();
            let counts: Vec<String> = by_staleness
                .iter()
                .map(|(staleness, count)| format!("{count} at staleness {staleness}"))
                .collect();
            format!(
                "- {}: {held} updates held by its rounds ({}); {too_stale} refused as too stale.",
                r.strategy.name(),
                if counts.is_empty() {
                    "none".to_string()
                } else {
                    counts.join(", ")
                }
            )
        })
        .collect()
}
