//! AdamW (decoupled weight decay, bias correction) over the flat buffer, global grad-norm clipping,
//! and the warmup + cosine learning-rate schedule.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::kernels::sum_of_squares;
use crate::layout::TensorInfo;

/// Inner-optimizer settings. Defaults are the reference's (`shared/reference/diloco_torch.py`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to 2-D weights only.
    pub weight_decay: f32,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f32,
    /// Muon for the hidden 2-D weights (`crate::muon`); None: AdamW for every tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub muon: Option<crate::muon::MuonConfig>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            muon: None,
        }
    }
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(EngineError::config(field, what.to_string()))
            }
        };
        check(
            "lr",
            self.lr.is_finite() && self.lr >= 0.0,
            "must be a finite number >= 0",
        )?;
        check(
            "beta1",
            (0.0..1.0).contains(&self.beta1),
            "must be in [0, 1)",
        )?;
        check(
            "beta2",
            (0.0..1.0).contains(&self.beta2),
            "must be in [0, 1)",
        )?;
        check(
            "eps",
            self.eps.is_finite() && self.eps > 0.0,
            "must be a finite number > 0",
        )?;
        check(
            "weight_decay",
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "must be a finite number >= 0",
        )?;
        check(
            "grad_clip",
            self.grad_clip.is_finite() && self.grad_clip >= 0.0,
            "must be a finite number >= 0 (0 disables)",
        )?;
        match &self.muon {
            Some(muon) => muon.validate(),
            None => Ok(()),
        }
    }
}

/// Linear warmup to the peak, then cosine decay to `min_lr_ratio` x peak at `total_steps`
/// (the reference: warmup min(100, steps / 10), floor 10% of peak).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_lr_ratio: f32,
}

impl LrSchedule {
    /// The reference's schedule for a run of `total_steps`.
    pub fn reference(peak: f32, total_steps: u64) -> Self {
        LrSchedule {
            peak,
            warmup_steps: (total_steps / 10).min(100),
            total_steps,
            min_lr_ratio: 0.1,
        }
    }

    /// Learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let ratio = self.min_lr_ratio as f64;
        (self.peak as f64 * (ratio + (1.0 - ratio) * cosine)) as f32
    }
}

/// AdamW moments in the parameter layout, and the step count. With Muon, a Muon weight's
/// momentum is its `m` (its `v` stays 0): the state keeps one format.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub config: OptimizerConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Steps taken so far (bias correction uses step + 1 on the next one).
    pub step: u64,
    norm_partials: Vec<f64>,
    muon_scratch: crate::muon::Scratch,
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f32,
    pub lr: f32,
}

const ELEMENTS_PER_TASK: usize = 1 << 14;

impl AdamW {
    pub fn new(config: OptimizerConfig, params: usize) -> Self {
        AdamW {
            config,
            m: vec![0.0; params],
            v: vec![0.0; params],
            step: 0,
            norm_partials: Vec::new(),
            muon_scratch: Default::default(),
        }
    }

    /// Clip the gradient to `grad_clip` (global norm, as `torch.nn.utils.clip_grad_norm_`), then one
    /// AdamW update with learning rate `lr`, in PyTorch's arithmetic order. Refuses a non-finite
    /// gradient without touching the parameters.
    pub fn update(
        &mut self,
        tensors: &[TensorInfo],
        params: &mut [f32],
        grads: &mut [f32],
        lr: f32,
    ) -> Result<StepReport> {
        assert_eq!(params.len(), self.m.len());
        assert_eq!(grads.len(), self.m.len());
        let norm = sum_of_squares(grads, &mut self.norm_partials).sqrt();
        if !norm.is_finite() {
            let (tensor, index) = first_non_finite(tensors, grads);
            return Err(EngineError::NonFinite {
                tensor: format!("gradient of {tensor}"),
                index,
            });
        }
        let clip = self.config.grad_clip as f64;
        // PyTorch: clip_coef = max_norm / (total_norm + 1e-6), applied when < 1.
        let grad_scale = if clip > 0.0 && norm > clip {
            (clip / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        self.step += 1;
        let c = self.config;
        let bias_correction1 = 1.0 - (c.beta1 as f64).powi(self.step as i32);
        let bias_correction2 = 1.0 - (c.beta2 as f64).powi(self.step as i32);
        let step_size = (lr as f64 / bias_correction1) as f32;
        let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
        for tensor in tensors {
            if let Some(muon) = c.muon.filter(|_| crate::muon::applies_to(tensor)) {
                // Muon's rate follows the schedule: its peak x (this step's lr / AdamW's peak).
                let scale = if c.lr > 0.0 { lr / c.lr } else { 0.0 };
                let r = tensor.range();
                crate::muon::step(
                    &muon,
                    tensor,
                    &mut params[r.clone()],
                    &grads[r.clone()],
                    grad_scale,
                    &mut self.m[r],
                    (muon.lr * scale, c.weight_decay),
                    &mut self.muon_scratch,
                );
                continue;
            }
            let decay = if tensor.weight_decay {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            let r = tensor.range();
            params[r.clone()]
                .par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(grads[r.clone()].par_chunks(ELEMENTS_PER_TASK))
                .zip(self.m[r.clone()].par_chunks_mut(ELEMENTS_PER_TASK))
                .zip(self.v[r].par_chunks_mut(ELEMENTS_PER_TASK))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        let grad = g[i] * grad_scale;
                        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * grad;
                        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * grad * grad;
                        let denom = v[i].sqrt() / bias_correction2_sqrt + c.eps;
                        p[i] = p[i] * decay - step_size * m[i] / denom;
                    }
                });
        }
        Ok(StepReport {
            grad_norm: norm as f32,
            lr,
        })
    }
}

fn first_non_finite(tensors: &[TensorInfo], values: &[f32]) -> (String, usize) {
    for t in tensors {
        if let Some(i) = values[t.range()].iter().position(|v| !v.is_finite()) {
            return (t.name.clone(), i);
        }
    }
    ("?".into(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_reference_formula() {
        let s = LrSchedule::reference(3e-3, 1000);
        assert_eq!(s.warmup_steps, 100);
        assert!((s.lr_at(0) - 3e-5).abs() < 1e-9);
        assert!((s.lr_at(99) - 3e-3).abs() < 1e-9);
        // Reference: lr * (0.1 + 0.45 * (1 + cos(pi * (t - warm) / (steps - warm))))
        for t in [100u64, 300, 550, 999] {
            let expected = 3e-3
                * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * (t - 100) as f64 / 900.0).cos()));
            assert!((s.lr_at(t) as f64 - expected).abs() < 1e-8, "step {t}");
        }
        assert!(
            (s.lr_at(5000) - 3e-4).abs() < 1e-9,
            "after the end it stays at the floor"
        );
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_times_sign() {
        // With bias correction, step 1 moves by lr * g / (|g| + eps) ~ lr * sign(g), plus decay.
        let t = vec![TensorInfo {
            name: "w".into(),
            shape: vec![2, 2],
            offset: 0,
            len: 4,
            weight_decay: true,
        }];
        let config = OptimizerConfig {
            grad_clip: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(config, 4);
        let mut p = vec![1.0, -1.0, 0.5, 0.0];
        let mut g = vec![0.3, -0.2, 0.0, 1e-3];
        opt.update(&t, &mut p, &mut g, 0.01).unwrap();
        let decay = 1.0 - 0.01 * 0.1;
        assert!((p[0] - (1.0 * decay - 0.01)).abs() < 1e-6);
        assert!((p[1] - (-decay + 0.01)).abs() < 1e-6);
        assert!((p[2] - 0.5 * decay).abs() < 1e-7);
        assert!((p[3] + 0.01 * 1e-3 / (1e-3 + 1e-8)).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_the_gradient_to_the_bound_and_nan_is_refused() {
        let t = vec![TensorInfo {
            name: "b".into(),
            shape: vec![2],
            offset: 0,
            len: 2,
            weight_decay: false,
        }];
        let mut opt = AdamW::new(OptimizerConfig::default(), 2);
        let mut p = vec![0.0; 2];
        let report = opt.update(&t, &mut p, &mut [3.0, 4.0], 0.1).unwrap();
        assert!((report.grad_norm - 5.0).abs() < 1e-6);
        let mut g = vec![f32::NAN, 0.0];
        let before = p.clone();
        assert!(matches!(
            opt.update(&t, &mut p, &mut g, 0.1),
            Err(EngineError::NonFinite { .. })
        ));
        assert_eq!(p, before, "a refused step leaves the parameters alone");
    }
}
