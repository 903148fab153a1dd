//! Outer optimizers: how the merged delta moves the global parameters.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Outer SGD on the pseudo-gradient. DiLoCo: lr 0.7, momentum 0.9, Nesterov. FedAvg: lr 1,
/// no momentum (the new parameters are the mean of the sites').
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OuterConfig {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
}

impl OuterConfig {
    pub const DILOCO: OuterConfig = OuterConfig {
        lr: 0.7,
        momentum: 0.9,
        nesterov: true,
    };
    pub const FEDAVG: OuterConfig = OuterConfig {
        lr: 1.0,
        momentum: 0.0,
        nesterov: false,
    };

    pub fn validate(&self) -> Result<(), String> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err("lr_outer must be a positive number".into());
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err("momentum_outer must be in [0, 1)".into());
        }
        Ok(())
    }
}

/// The outer optimizer and its momentum buffer (in the parameter layout).
#[derive(Clone, Debug, PartialEq)]
pub struct OuterOptimizer {
    pub config: OuterConfig,
    pub momentum_buffer: Vec<f32>,
}

impl OuterOptimizer {
    pub fn new(config: OuterConfig, params: usize) -> Self {
        let momentum_buffer = if config.momentum > 0.0 {
            vec![0.0; params]
        } else {
            Vec::new()
        };
        OuterOptimizer {
            config,
            momentum_buffer,
        }
    }

    /// θ ← θ − lr·(δ + m·b) with b ← m·b + δ (Nesterov), θ ← θ − lr·b (heavy ball), or
    /// θ ← θ − lr·δ without momentum. δ is θ_start − θ_site averaged: a descent direction's negative.
    pub fn step(&mut self, params: &mut [f32], delta: &[f32]) {
        let n = params.len();
        self.step_range(params, delta, 0..n);
    }

    /// One parameter's outer step from its value `p`, its delta `d` and its momentum `b`: the new
    /// value and the new momentum. The one formula that both the range check and the step use.
    #[inline]
    fn stepped(config: OuterConfig, p: f32, d: f32, b: f32) -> (f32, f32) {
        let OuterConfig {
            lr,
            momentum,
            nesterov,
        } = config;
        if momentum == 0.0 {
            return (p - lr * d, b);
        }
        let b = momentum * b + d;
        let step = if nesterov {
            lr * (d + momentum * b)
        } else {
            lr * b
        };
        (p - step, b)
    }

    /// The first parameter of `range` that `step_range` would make non-finite or larger than
    /// `abs_max` in magnitude, with the value it would take (nothing is changed: a merge that
    /// fails this is refused before it touches θ or the momentum).
    pub fn first_out_of_range(
        &self,
        params: &[f32],
        delta: &[f32],
        range: std::ops::Range<usize>,
        abs_max: f32,
    ) -> Option<(usize, f32)> {
        assert_eq!(range.len(), delta.len());
        let config = self.config;
        let bad = |value: f32| value.is_nan() || value.abs() > abs_max;
        let start = range.start;
        let params = &params[range.clone()];
        let piece = crate::par::PIECE;
        let momentum: &[f32] = if config.momentum == 0.0 {
            &[]
        } else {
            &self.momentum_buffer[range]
        };
        let found = params
            .par_chunks(piece)
            .zip(delta.par_chunks(piece))
            .enumerate()
            .filter_map(|(t, (params, delta))| {
                let at = t * piece;
                let position = if momentum.is_empty() {
                    params
                        .iter()
                        .zip(delta)
                        .position(|(p, d)| bad(Self::stepped(config, *p, *d, 0.0).0))
                } else {
                    params
                        .iter()
                        .zip(delta)
                        .zip(&momentum[at..at + params.len()])
                        .position(|((p, d), b)| bad(Self::stepped(config, *p, *d, *b).0))
                };
                position.map(|i| at + i)
            })
            .min();
        found.map(|i| {
            let b = if config.momentum == 0.0 {
                0.0
            } else {
                self.momentum_buffer[start + i]
            };
            (start + i, Self::stepped(config, params[i], delta[i], b).0)
        })
    }

    /// The same step on `params[range]` with `delta` for that range (a fragment).
    pub fn step_range(&mut self, params: &mut [f32], delta: &[f32], range: std::ops::Range<usize>) {
        let config = self.config;
        let params = &mut params[range.clone()];
        assert_eq!(params.len(), delta.len());
        if config.momentum == 0.0 {
            crate::par::zip_apply(params, delta, |p, d| {
                *p = Self::stepped(config, *p, *d, 0.0).0;
            });
            return;
        }
        let momentum = &mut self.momentum_buffer[range];
        params
            .par_chunks_mut(crate::par::PIECE)
            .zip(delta.par_chunks(crate::par::PIECE))
            .zip(momentum.par_chunks_mut(crate::par::PIECE))
            .for_each(|((params, delta), momentum)| {
                for ((p, d), b) in params.iter_mut().zip(delta).zip(momentum.iter_mut()) {
                    (*p, *b) = Self::stepped(config, *p, *d, *b);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesterov_matches_a_hand_computation() {
        // Reference: buf = m*buf + delta; theta -= lr * (delta + m*buf).
        let mut opt = OuterOptimizer::new(OuterConfig::DILOCO, 2);
        let mut theta = vec![1.0f32, -2.0];
        opt.step(&mut theta, &[0.5, -1.0]);
        // buf = [0.5, -1]; step = 0.7 * ([0.5, -1] + 0.9 * [0.5, -1]) = [0.665, -1.33]
        assert!(
            (theta[0] - 0.335).abs() < 1e-6 && (theta[1] + 0.67).abs() < 1e-6,
            "{theta:?}"
        );
        opt.step(&mut theta, &[0.1, 0.0]);
        // buf = [0.55, -0.9]; step = 0.7 * ([0.1, 0] + [0.495, -0.81]) = [0.4165, -0.567]
        assert!(
            (theta[0] - (0.335 - 0.4165)).abs() < 1e-6 && (theta[1] - (-0.67 + 0.567)).abs() < 1e-6,
            "{theta:?}"
        );
    }

    #[test]
    fn fedavg_lands_on_the_mean_of_the_sites() {
        let mut opt = OuterOptimizer::new(OuterConfig::FEDAVG, 2);
        let start = [1.0f32, 2.0];
        let sites = [[0.0f32, 2.0], [1.0, 4.0]];
        let delta: Vec<f32> = (0..2)
            .map(|i| start[i] - (sites[0][i] + sites[1][i]) / 2.0)
            .collect();
        let mut theta = start.to_vec();
        opt.step(&mut theta, &delta);
        assert_eq!(theta, vec![0.5, 3.0]);
    }
}
