//! Outer optimizers: how the merged delta moves the global parameters.

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

    /// The same step on `params[range]` with `delta` for that range (a fragment).
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
        let start = range.start;
        let params = &params[range.clone()];
        assert_eq!(params.len(), delta.len());
        let OuterConfig {
            lr,
            momentum,
            nesterov,
        } = self.config;
        let bad = |v: f32| v.is_nan() || v.abs() > abs_max;
        if momentum == 0.0 {
            return params
                .iter()
                .zip(delta)
                .map(|(p, d)| p - lr * d)
                .enumerate()
                .find(|(_, v)| bad(*v))
                .map(|(i, v)| (start + i, v));
        }
        params
            .iter()
            .zip(delta)
            .zip(&self.momentum_buffer[range])
            .map(|((p, d), b)| {
                let b = momentum * b + d;
                p - if nesterov {
                    lr * (d + momentum * b)
                } else {
                    lr * b
                }
            })
            .enumerate()
            .find(|(_, v)| bad(*v))
            .map(|(i, v)| (start + i, v))
    }

    pub fn step_range(&mut self, params: &mut [f32], delta: &[f32], range: std::ops::Range<usize>) {
        let params = &mut params[range.clone()];
        assert_eq!(params.len(), delta.len());
        let OuterConfig {
            lr,
            momentum,
            nesterov,
        } = self.config;
        if momentum == 0.0 {
            for (p, d) in params.iter_mut().zip(delta) {
                *p -= lr * d;
            }
            return;
        }
        for ((p, d), b) in params
            .iter_mut()
            .zip(delta)
            .zip(self.momentum_buffer[range].iter_mut())
        {
            *b = momentum * *b + d;
            *p -= if nesterov {
                lr * (d + momentum * *b)
            } else {
                lr * *b
            };
        }
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
