//! Where a run's rounds fall in its steps (shared by the networked coordinator, lowband's own
//! sites and PyTorch sites, so that every node agrees on which steps a round covers).

use crate::config::RunConfig;
use crate::strategy::Strategy;

/// Where a run's rounds fall in its steps. Round strategies: round r trains steps
/// [rH, min((r + 1)H, T)). Streaming (P fragments): fragment sync r comes after step
/// max(⌊(r + 1)H/P⌋, r + 1) while that is before T, as in the in-memory driver, then P final
/// syncs at T (no training between them).
#[derive(Clone, Copy, Debug)]
pub struct RoundSteps {
    steps: u64,
    inner_steps: u64,
    /// P; 0 for whole-model rounds.
    pub(super) fragments: u64,
}

impl RoundSteps {
    /// Streaming DiLoCo's fragments (P); 0 for whole-model rounds.
    pub fn fragments(&self) -> u64 {
        self.fragments
    }

    pub fn of(config: &RunConfig, strategy: &Strategy) -> RoundSteps {
        RoundSteps {
            steps: config.steps,
            inner_steps: strategy.inner_steps,
            fragments: strategy.streaming.map_or(0, |s| s.fragments as u64),
        }
    }

    /// The step after which round `round`'s updates are sent.
    pub fn end_step(&self, round: u64) -> u64 {
        if self.fragments == 0 {
            return round
                .saturating_add(1)
                .saturating_mul(self.inner_steps)
                .min(self.steps);
        }
        (round.saturating_add(1).saturating_mul(self.inner_steps) / self.fragments)
            .max(round.saturating_add(1))
            .min(self.steps)
    }

    /// The first step round `round` trains.
    pub fn first_step(&self, round: u64) -> u64 {
        if round == 0 {
            0
        } else {
            self.end_step(round - 1)
        }
    }

    /// Streaming: fragment syncs during training (those before step T); the end step grows
    /// strictly with the round, so a binary search finds the first one at T.
    pub fn syncs_in_run(&self) -> u64 {
        let (mut low, mut high) = (0u64, self.steps);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.end_step(middle) < self.steps {
                low = middle + 1
            } else {
                high = middle
            }
        }
        low
    }

    /// Every round the coordinator runs.
    pub fn rounds(&self) -> u64 {
        if self.fragments == 0 {
            self.steps.div_ceil(self.inner_steps)
        } else {
            self.syncs_in_run() + self.fragments
        }
    }
}
