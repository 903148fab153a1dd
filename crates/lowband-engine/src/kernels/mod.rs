//! The GPT kernels, each forward beside its backward (llm.c style).
//!
//! Shapes in the comments: B batch, T time, C channels, NH heads, hs = C / NH, V vocab,
//! IC / OC a matmul's input / output channels, N = B * T rows. All buffers are row-major.
//! Backward kernels **overwrite** their outputs unless their doc says they accumulate.
//! Reductions run over fixed-size row groups and are summed in group order, so results are the same
//! bitwise whatever the thread count; matmuls come from `gemm`, which splits work over output
//! blocks only (never over the summed dimension).

use gemm::Parallelism;
use rayon::prelude::*;

mod attention;

pub use attention::{attention_backward, attention_forward};

/// Rows per parallel task in the row-wise kernels and their reductions. Fixed (not derived from the
/// thread count) so that the reduction order, and therefore every bit of the result, is too.
pub const ROWS_PER_TASK: usize = 64;

/// Number of row groups the reductions over N rows use (the size of their scratch, in groups).
pub fn row_groups(rows: usize) -> usize {
    rows.div_ceil(ROWS_PER_TASK)
}

/// A strided matrix operand: element (i, j) is at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Mat {
            data,
            row_stride,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major matrix whose rows are `row_stride` apart.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Mat {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix operand out of bounds");
        }
    }
}

/// `dst[m, n] = scale * lhs[m, k] · rhs[k, n]` (+ the old `dst` if `accumulate`), with `dst` rows
/// `dst_row_stride` apart. Bounds are checked once per call, then `gemm` does the work.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    accumulate: bool,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    Mat::rows(dst, dst_row_stride).check(m, n);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_row_stride..i * dst_row_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every index gemm touches is within the bounds checked above; dst does not alias
    // lhs or rhs (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

fn all_threads() -> Parallelism {
    Parallelism::Rayon(0)
}

// ---------------------------------------------------------------------------------------------
// Encoder: x[b, t] = wte[token[b, t]] + wpe[t]

/// out (N, C) from tokens (N,) laid out as B rows of T; wte (V, C), wpe (>=T, C).
pub fn encoder_forward(
    out: &mut [f32],
    tokens: &[u32],
    wte: &[f32],
    wpe: &[f32],
    t_len: usize,
    c: usize,
) {
    out.par_chunks_mut(c)
        .zip(tokens.par_iter())
        .enumerate()
        .for_each(|(row, (o, &tok))| {
            let t = row % t_len;
            let e = &wte[tok as usize * c..][..c];
            let p = &wpe[t * c..][..c];
            for i in 0..c {
                o[i] = e[i] + p[i];
            }
        });
}

/// Accumulates into dwte (V, C) (the tied head wrote it first); overwrites dwpe rows 0..T.
pub fn encoder_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    b_len: usize,
    t_len: usize,
    c: usize,
) {
    dwpe[..t_len * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(t, d)| {
            d.fill(0.0);
            for b in 0..b_len {
                let src = &dout[(b * t_len + t) * c..][..c];
                for i in 0..c {
                    d[i] += src[i];
                }
            }
        });
    for (row, &tok) in tokens.iter().enumerate() {
        let d = &mut dwte[tok as usize * c..][..c];
        let src = &dout[row * c..][..c];
        for i in 0..c {
            d[i] += src[i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm: y = (x - mean) * rstd * weight + bias, per row of C

/// out, x (N, C); mean, rstd (N,).
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    out.par_chunks_mut(c)
        .zip(mean.par_iter_mut())
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .with_min_len(8)
        .for_each(|(((o, m), r), xr)| {
            let mu = xr.iter().sum::<f32>() / c as f32;
            let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / c as f32;
            let s = 1.0 / (var + crate::config::LAYER_NORM_EPSILON).sqrt();
            for i in 0..c {
                o[i] = (xr[i] - mu) * s * weight[i] + bias[i];
            }
            *m = mu;
            *r = s;
        });
}

/// Accumulates into dx (N, C); overwrites dweight, dbias (C,). `partials` holds
/// `row_groups(N) * 2C` floats of scratch.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    partials: &mut [f32],
    dout: &[f32],
    x: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let rows = mean.len();
    let groups = row_groups(rows);
    let partials = &mut partials[..groups * 2 * c];
    dx.par_chunks_mut(ROWS_PER_TASK * c)
        .zip(partials.par_chunks_mut(2 * c))
        .enumerate()
        .for_each(|(g, (dx_group, part))| {
            part.fill(0.0);
            let (pw, pb) = part.split_at_mut(c);
            for (j, dxr) in dx_group.chunks_mut(c).enumerate() {
                let row = g * ROWS_PER_TASK + j;
                let (xr, dor) = (&x[row * c..][..c], &dout[row * c..][..c]);
                let (mu, s) = (mean[row], rstd[row]);
                let mut dnorm_mean = 0.0f32;
                let mut dnorm_norm_mean = 0.0f32;
                for i in 0..c {
                    let norm = (xr[i] - mu) * s;
                    let dnorm = weight[i] * dor[i];
                    dnorm_mean += dnorm;
                    dnorm_norm_mean += dnorm * norm;
                }
                dnorm_mean /= c as f32;
                dnorm_norm_mean /= c as f32;
                for i in 0..c {
                    let norm = (xr[i] - mu) * s;
                    let dnorm = weight[i] * dor[i];
                    pb[i] += dor[i];
                    pw[i] += norm * dor[i];
                    dxr[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
                }
            }
        });
    dweight.fill(0.0);
    dbias.fill(0.0);
    for part in partials.chunks(2 * c) {
        for i in 0..c {
            dweight[i] += part[i];
            dbias[i] += part[c + i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear: out = x · Wᵀ + bias, W stored (OC, IC)

/// out (N, OC) from x (N, IC), weight (OC, IC), bias (OC,).
pub fn linear_forward(
    out: &mut [f32],
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    ic: usize,
    oc: usize,
) {
    let n = x.len() / ic;
    if let Some(bias) = bias {
        out.par_chunks_mut(oc)
            .with_min_len(16)
            .for_each(|row| row.copy_from_slice(bias));
    }
    matmul(
        out,
        oc,
        (n, oc, ic),
        Mat::rows(x, ic),
        Mat::transposed(weight, ic),
        1.0,
        bias.is_some(),
        all_threads(),
    );
}

/// Overwrites dx (N, IC) (if given), dweight (OC, IC) and dbias (OC,) (if given) from dout (N, OC).
/// `ones` is N ones (the bias gradient is the matmul onesᵀ · dout, which keeps it deterministic).
/// dx and dweight cost the same FLOPs and are independent, so they run side by side, each on half
/// of the threads: less synchronisation inside each matmul than running them one after the other.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    weight: &[f32],
    ones: &[f32],
    ic: usize,
    oc: usize,
) {
    let n = x.len() / ic;
    let threads = rayon::current_num_threads();
    let split = |count: usize| {
        if count <= 1 {
            Parallelism::None
        } else {
            Parallelism::Rayon(count)
        }
    };
    let (dx_threads, dweight_threads) = if dx.is_some() {
        (threads / 2, threads - threads / 2)
    } else {
        (0, threads)
    };
    let weight_part = || {
        matmul(
            dweight,
            ic,
            (oc, ic, n),
            Mat::transposed(dout, oc),
            Mat::rows(x, ic),
            1.0,
            false,
            split(dweight_threads),
        );
        if let Some(dbias) = dbias {
            matmul(
                dbias,
                oc,
                (1, oc, n),
                Mat::rows(&ones[..n], n),
                Mat::rows(dout, oc),
                1.0,
                false,
                split(dweight_threads),
            );
        }
    };
    // dx (N, IC) = dout (N, OC) · weight (OC, IC)
    let input_part = |dx: &mut [f32], parallelism| {
        matmul(
            dx,
            ic,
            (n, ic, oc),
            Mat::rows(dout, oc),
            Mat::rows(weight, ic),
            1.0,
            false,
            parallelism,
        )
    };
    match dx {
        Some(dx) if threads >= 2 => {
            rayon::join(|| input_part(dx, split(dx_threads)), weight_part);
        }
        Some(dx) => {
            input_part(dx, all_threads());
            weight_part();
        }
        None => weight_part(),
    }
}

// ---------------------------------------------------------------------------------------------
// GELU, tanh approximation (GPT-2's `gelu_new`, PyTorch's `approximate='tanh'`)
//
// gelu(x) = 0.5·x·(1 + tanh(u)), u = sqrt(2/π)·(x + 0.044715·x³). Since 0.5·(1 + tanh(u)) is
// exactly sigmoid(2u), we compute x·s with s = 1 / (1 + e^(−2u)), and the derivative
// s + 2·x·s·(1 − s)·du/dx. `exp_approx` is branch-free so the loops vectorize (libm's tanhf,
// called per element, cost a third of a training step).

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_CUBIC: f32 = 0.044_715;
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// e^x for f32 with a relative error below 2e-7 on [−87, 88] (clamped outside): x = k·ln2 + r,
/// |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation < 5e-9), times 2^k built from
/// the exponent bits.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let k = shifted - ROUND;
    // The low mantissa bits of `shifted` hold k as an integer: no float-to-int conversion needed.
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(k_bits.wrapping_add(127) << 23)
}

#[inline(always)]
fn gelu_sigmoid(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    1.0 / (1.0 + exp_approx(-2.0 * u))
}

pub fn gelu_forward(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(x.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x * gelu_sigmoid(x);
            }
        });
}

/// Overwrites dx.
pub fn gelu_backward(dx: &mut [f32], x: &[f32], dout: &[f32]) {
    dx.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(x.par_chunks(ELEMENTS_PER_TASK))
        .zip(dout.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|((dx, x), dout)| {
            for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dout) {
                let s = gelu_sigmoid(x);
                let du_dx = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x);
                *d = (s + 2.0 * x * s * (1.0 - s) * du_dx) * g;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Residual: out = a + b (in place: a += b)

pub fn residual_add(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(b.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(a, b)| {
            for (a, b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Softmax + cross-entropy over V per row

/// probs (N, V) and per-row losses (N,) from logits (N, V) and targets (N,).
pub fn crossentropy_forward(
    probs: &mut [f32],
    losses: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    v: usize,
) {
    probs
        .par_chunks_mut(v)
        .zip(losses.par_iter_mut())
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .with_min_len(8)
        .for_each(|(((p, loss), l), &target)| {
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (p, &l) in p.iter_mut().zip(l) {
                *p = exp_approx(l - max);
                sum += *p;
            }
            let inv = 1.0 / sum;
            for p in p.iter_mut() {
                *p *= inv;
            }
            *loss = sum.ln() + max - l[target as usize];
        });
}

/// Overwrites dlogits (N, V) with d(mean loss)/d logits = (probs − onehot) · dloss.
pub fn crossentropy_backward(
    dlogits: &mut [f32],
    probs: &[f32],
    targets: &[u32],
    dloss: f32,
    v: usize,
) {
    dlogits
        .par_chunks_mut(v)
        .zip(probs.par_chunks(v))
        .zip(targets.par_iter())
        .with_min_len(8)
        .for_each(|((d, p), &target)| {
            for (d, &p) in d.iter_mut().zip(p) {
                *d = p * dloss;
            }
            d[target as usize] -= dloss;
        });
}

/// Sum of squares of a buffer in f64, reduced over fixed-size groups in order (deterministic).
/// `partials` is reused scratch (no allocation once it has grown).
pub fn sum_of_squares(x: &[f32], partials: &mut Vec<f64>) -> f64 {
    x.par_chunks(ELEMENTS_PER_TASK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .collect_into_vec(partials);
    partials.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_within_2e7_relative_of_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            let error = ((exp_approx(x) as f64 - exact) / exact).abs();
            worst = worst.max(error);
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let xs: Vec<f32> = (-800..=800).map(|i| i as f32 * 0.01).collect();
        let mut out = vec![0.0; xs.len()];
        gelu_forward(&mut out, &xs);
        for (&x, &y) in xs.iter().zip(&out) {
            let x64 = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            let exact = 0.5 * x64 * (1.0 + u.tanh());
            assert!(
                (y as f64 - exact).abs() <= 1e-6 * exact.abs().max(1e-2),
                "gelu({x}) = {y}, expected {exact}"
            );
        }
    }
}
