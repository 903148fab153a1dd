//! Causal self-attention's forward and backward kernels.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{exp_approx, matmul, Mat};

// ---------------------------------------------------------------------------------------------
// Causal self-attention: per (b, head), P = softmax(mask(q kᵀ / sqrt(hs))), y = P v

/// y (B, T, C) and probabilities att (B, NH, T, T) from qkv (B, T, 3C). Masked entries of att are 0.
pub fn attention_forward(
    y: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    t_len: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    y.par_chunks_mut(t_len * c)
        .zip(att.par_chunks_mut(nh * t_len * t_len))
        .enumerate()
        .for_each(|(b, (y_b, att_b))| {
            let qkv_b = &qkv[b * t_len * 3 * c..][..t_len * 3 * c];
            for h in 0..nh {
                let p = &mut att_b[h * t_len * t_len..][..t_len * t_len];
                let q = Mat::rows(&qkv_b[h * hs..], 3 * c);
                let k_t = Mat::transposed(&qkv_b[c + h * hs..], 3 * c);
                matmul(
                    p,
                    t_len,
                    (t_len, t_len, hs),
                    q,
                    k_t,
                    scale,
                    false,
                    Parallelism::None,
                );
                for (t, row) in p.chunks_mut(t_len).enumerate() {
                    softmax_causal_row(row, t + 1);
                }
                let v = Mat::rows(&qkv_b[2 * c + h * hs..], 3 * c);
                matmul(
                    &mut y_b[h * hs..],
                    c,
                    (t_len, hs, t_len),
                    Mat::rows(p, t_len),
                    v,
                    1.0,
                    false,
                    Parallelism::None,
                );
            }
        });
}

fn softmax_causal_row(row: &mut [f32], visible: usize) {
    let (live, masked) = row.split_at_mut(visible);
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in live.iter_mut() {
        *v = exp_approx(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in live.iter_mut() {
        *v *= inv;
    }
    masked.fill(0.0);
}

/// Overwrites dqkv (B, T, 3C) from dy (B, T, C); datt (B, NH, T, T) is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dy: &[f32],
    qkv: &[f32],
    att: &[f32],
    t_len: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let tt = t_len * t_len;
    dqkv.par_chunks_mut(t_len * 3 * c)
        .zip(datt.par_chunks_mut(nh * tt))
        .enumerate()
        .for_each(|(b, (dqkv_b, datt_b))| {
            let qkv_b = &qkv[b * t_len * 3 * c..][..t_len * 3 * c];
            let dy_b = &dy[b * t_len * c..][..t_len * c];
            for h in 0..nh {
                let (p, dp) = (&att[(b * nh + h) * tt..][..tt], &mut datt_b[h * tt..][..tt]);
                head_backward(dqkv_b, dp, dy_b, qkv_b, p, (h, hs, c, t_len), scale);
            }
        });
}

/// One head's backward (head `h` of `hs` channels in C, sequence T): dv, then dS from dP in
/// place in `dp`, then dq and dk, into the head's columns of dqkv.
fn head_backward(
    dqkv_b: &mut [f32],
    dp: &mut [f32],
    dy_b: &[f32],
    qkv_b: &[f32],
    p: &[f32],
    (h, hs, c, t_len): (usize, usize, usize, usize),
    scale: f32,
) {
    let dy_h = Mat::rows(&dy_b[h * hs..], c);
    let none = Parallelism::None;
    // dP = dy · vᵀ ; dv = Pᵀ · dy
    matmul(
        dp,
        t_len,
        (t_len, t_len, hs),
        dy_h,
        Mat::transposed(&qkv_b[2 * c + h * hs..], 3 * c),
        1.0,
        false,
        none,
    );
    matmul(
        &mut dqkv_b[2 * c + h * hs..],
        3 * c,
        (t_len, hs, t_len),
        Mat::transposed(p, t_len),
        dy_h,
        1.0,
        false,
        none,
    );
    // dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place
    for (t, (dp_row, p_row)) in dp.chunks_mut(t_len).zip(p.chunks(t_len)).enumerate() {
        let visible = t + 1;
        let dot: f32 = dp_row[..visible]
            .iter()
            .zip(&p_row[..visible])
            .map(|(a, b)| a * b)
            .sum();
        for j in 0..visible {
            dp_row[j] = p_row[j] * (dp_row[j] - dot);
        }
        dp_row[visible..].fill(0.0);
    }
    let ds = &*dp;
    // dq = dS · k · scale ; dk = dSᵀ · q · scale
    matmul(
        &mut dqkv_b[h * hs..],
        3 * c,
        (t_len, hs, t_len),
        Mat::rows(ds, t_len),
        Mat::rows(&qkv_b[c + h * hs..], 3 * c),
        scale,
        false,
        none,
    );
    matmul(
        &mut dqkv_b[c + h * hs..],
        3 * c,
        (t_len, hs, t_len),
        Mat::transposed(ds, t_len),
        Mat::rows(&qkv_b[h * hs..], 3 * c),
        scale,
        false,
        none,
    );
}
