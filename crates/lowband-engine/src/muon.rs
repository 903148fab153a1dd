//! Muon (momentum orthogonalized by Newton-Schulz) for the hidden 2-D weights, in PyTorch's
//! arithmetic (`torch.optim.Muon`, 2.9+), except that the Newton-Schulz iteration runs in float32
//! where PyTorch's runs in bfloat16. Every other tensor (embeddings, norms, biases) stays with
//! AdamW, as Muon's authors and PyTorch's documentation prescribe.
//!
//! Per weight W (A x B, PyTorch's `Linear` layout) with gradient G:
//! `buf ← buf + (1 − μ)(G − buf)`; `U = G + μ(buf − G)` (Nesterov); `O = NS5(U)`;
//! `W ← W·(1 − lr·wd) − lr·√max(1, A/B)·O`. NS5: X = U / max(‖U‖_F, 1e-7) (transposed when A > B),
//! five times `X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X` with (a, b, c) = (3.4445, −4.7750, 2.0315).

use gemm::Parallelism;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::kernels::{matmul, Mat};
use crate::layout::TensorInfo;

/// Muon's settings (`[optimizer.muon]` in a run file). Its learning rate follows the run's
/// schedule: at each step, `lr` x the schedule's factor.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MuonConfig {
    /// Peak learning rate of the Muon weights (PyTorch's default 1e-3; 0.02 in Muon's own runs).
    pub lr: f32,
    pub momentum: f32,
    pub ns_steps: u32,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            lr: 0.02,
            momentum: 0.95,
            ns_steps: 5,
        }
    }
}

impl MuonConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(EngineError::config(
                "muon.lr",
                "must be a finite number >= 0",
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(EngineError::config("muon.momentum", "must be in [0, 1)"));
        }
        if !(1..100).contains(&self.ns_steps) {
            return Err(EngineError::config("muon.ns_steps", "must be in 1..100"));
        }
        Ok(())
    }
}

const NS_COEFFICIENTS: (f32, f32, f32) = (3.4445, -4.775, 2.0315);
const NS_EPS: f32 = 1e-7;

/// Whether Muon updates `tensor`: the 2-D weights but the embeddings.
pub fn applies_to(tensor: &TensorInfo) -> bool {
    tensor.shape.len() == 2 && tensor.name != "wte" && tensor.name != "wpe"
}

/// The scratch of the Newton-Schulz iteration, sized once for the largest weight.
#[derive(Clone, Debug, Default)]
pub struct Scratch {
    x: Vec<f32>,
    next: Vec<f32>,
    gram: Vec<f32>,
    update: Vec<f32>,
}

/// One Muon step of `tensor`: `params` and `grads` are its values (the gradient already
/// clipped by `grad_scale`), `buf` its momentum.
#[allow(clippy::too_many_arguments)]
pub fn step(
    config: &MuonConfig,
    tensor: &TensorInfo,
    params: &mut [f32],
    grads: &[f32],
    grad_scale: f32,
    buf: &mut [f32],
    (lr, weight_decay): (f32, f32),
    scratch: &mut Scratch,
) {
    let (a, b) = (tensor.shape[0], tensor.shape[1]);
    let mu = config.momentum;
    // U (Nesterov), row-major A x B, into scratch.x (transposed to B x A when A > B).
    let transposed = a > b;
    let (rows, cols) = if transposed { (b, a) } else { (a, b) };
    scratch.x.resize(a * b, 0.0);
    for i in 0..a {
        for j in 0..b {
            let k = i * b + j;
            let g = grads[k] * grad_scale;
            buf[k] += (1.0 - mu) * (g - buf[k]);
            let u = g + mu * (buf[k] - g);
            let at = if transposed { j * a + i } else { k };
            scratch.x[at] = u;
        }
    }
    let Scratch {
        x,
        next,
        gram,
        update,
    } = scratch;
    orthogonalize(x, rows, cols, config.ns_steps, (next, gram, update));
    let adjusted = lr * ((a as f32 / b as f32).max(1.0)).sqrt();
    let decay = 1.0 - lr * weight_decay;
    for i in 0..a {
        for j in 0..b {
            let k = i * b + j;
            let o = if transposed {
                scratch.x[j * a + i]
            } else {
                scratch.x[k]
            };
            params[k] = params[k] * decay - adjusted * o;
        }
    }
}

/// Newton-Schulz in place on X (rows x cols, rows <= cols, row-major).
fn orthogonalize(
    x: &mut [f32],
    rows: usize,
    cols: usize,
    steps: u32,
    (next, gram, update): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
) {
    let norm = x
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt() as f32;
    let inverse = 1.0 / norm.max(NS_EPS);
    x.iter_mut().for_each(|v| *v *= inverse);
    let (ca, cb, cc) = NS_COEFFICIENTS;
    next.resize(rows * cols, 0.0);
    gram.resize(rows * rows, 0.0);
    update.resize(rows * rows, 0.0);
    let threads = Parallelism::Rayon(0);
    for _ in 0..steps {
        // gram = X Xᵀ; update = b·gram + c·gram·gram; X ← a·X + update·X.
        let lhs = Mat::rows(x, cols);
        let rhs = Mat::transposed(x, cols);
        matmul(
            gram,
            rows,
            (rows, rows, cols),
            lhs,
            rhs,
            1.0,
            false,
            threads,
        );
        let g = Mat::rows(gram, rows);
        matmul(update, rows, (rows, rows, rows), g, g, cc, false, threads);
        update
            .iter_mut()
            .zip(gram.iter())
            .for_each(|(u, g)| *u += cb * g);
        let rhs = Mat::rows(x, cols);
        matmul(
            next,
            cols,
            (rows, cols, rows),
            Mat::rows(update, rows),
            rhs,
            1.0,
            false,
            threads,
        );
        x.iter_mut()
            .zip(next.iter())
            .for_each(|(v, n)| *v = ca * *v + n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newton_schulz_brings_the_singular_values_near_one() {
        // A 4 x 8 matrix of mixed scales: after NS5, X Xᵀ is near the identity (the quintic
        // iteration lands its singular values in about [0.7, 1.2], not exactly at 1).
        let (rows, cols) = (4, 8);
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * (1.0 + (i / cols) as f32))
            .collect();
        let (mut next, mut gram, mut update) = (Vec::new(), Vec::new(), Vec::new());
        orthogonalize(&mut x, rows, cols, 5, (&mut next, &mut gram, &mut update));
        for i in 0..rows {
            let row = &x[i * cols..(i + 1) * cols];
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((0.5..1.5).contains(&norm), "row {i}: {norm}");
        }
    }
}
