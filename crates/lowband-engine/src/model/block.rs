//! One transformer block's forward and backward passes (pre-norm attention, then pre-norm MLP),
//! on the flat parameter and gradient buffers; `Gpt` chains them.

use super::{Activations, Scratch};
use crate::kernels as k;
use crate::layout::BlockOffsets;

/// Forward through block `l` (its input: the embeddings for block 0, else the previous block's
/// output), keeping what the backward pass needs in `a`.
pub(super) fn block_forward(
    l: usize,
    o: &BlockOffsets,
    (b, t, c, nh): (usize, usize, usize, usize),
    p: &[f32],
    a: &mut Activations,
) {
    let n = b * t;
    let (nc, nc3, nc4, att_len) = (n * c, n * 3 * c, n * 4 * c, b * nh * t * t);
    let residual: &[f32] = if l == 0 {
        &a.encoded[..nc]
    } else {
        &a.residual_3[(l - 1) * nc..][..nc]
    };
    let ln_1 = &mut a.ln_1[l * nc..][..nc];
    k::layernorm_forward(
        ln_1,
        &mut a.ln_1_mean[l * n..][..n],
        &mut a.ln_1_rstd[l * n..][..n],
        residual,
        &p[o.ln_1_weight..][..c],
        &p[o.ln_1_bias..][..c],
        c,
    );
    let qkv = &mut a.qkv[l * nc3..][..nc3];
    k::linear_forward(
        qkv,
        ln_1,
        &p[o.qkv_weight..][..3 * c * c],
        Some(&p[o.qkv_bias..][..3 * c]),
        c,
        3 * c,
    );
    let atty = &mut a.atty[l * nc..][..nc];
    k::attention_forward(atty, &mut a.att[l * att_len..][..att_len], qkv, t, c, nh);
    // residual_2 = residual + atty · Wprojᵀ + b
    let residual_2 = &mut a.residual_2[l * nc..][..nc];
    k::linear_forward(
        residual_2,
        atty,
        &p[o.attn_proj_weight..][..c * c],
        Some(&p[o.attn_proj_bias..][..c]),
        c,
        c,
    );
    k::residual_add(residual_2, residual);
    let ln_2 = &mut a.ln_2[l * nc..][..nc];
    k::layernorm_forward(
        ln_2,
        &mut a.ln_2_mean[l * n..][..n],
        &mut a.ln_2_rstd[l * n..][..n],
        residual_2,
        &p[o.ln_2_weight..][..c],
        &p[o.ln_2_bias..][..c],
        c,
    );
    let fch = &mut a.fch[l * nc4..][..nc4];
    k::linear_forward(
        fch,
        ln_2,
        &p[o.fc_weight..][..4 * c * c],
        Some(&p[o.fc_bias..][..4 * c]),
        c,
        4 * c,
    );
    let fch_gelu = &mut a.fch_gelu[l * nc4..][..nc4];
    k::gelu_forward(fch_gelu, fch);
    let residual_3 = &mut a.residual_3[l * nc..][..nc];
    k::linear_forward(
        residual_3,
        fch_gelu,
        &p[o.mlp_proj_weight..][..4 * c * c],
        Some(&p[o.mlp_proj_bias..][..c]),
        4 * c,
        c,
    );
    k::residual_add(residual_3, residual_2);
}

/// Backward through block `l`: d_residual holds d(output of block l) and leaves holding d(input).
#[allow(clippy::too_many_arguments)]
pub(super) fn block_backward(
    l: usize,
    o: &BlockOffsets,
    (b, t, c, nh): (usize, usize, usize, usize),
    p: &[f32],
    g: &mut [f32],
    a: &Activations,
    s: &mut Scratch,
) {
    let n = b * t;
    let nc = n * c;
    let residual: &[f32] = if l == 0 {
        &a.encoded[..nc]
    } else {
        &a.residual_3[(l - 1) * nc..][..nc]
    };
    let residual_2 = &a.residual_2[l * nc..][..nc];
    mlp_backward(l, o, (b, t, c), p, g, a, s, residual_2);
    attention_backward(l, o, (b, t, c, nh), p, g, a, s, residual);
}

/// The block's MLP half: d_residual holds d(block output) and leaves holding d(residual_2).
#[allow(clippy::too_many_arguments)]
fn mlp_backward(
    l: usize,
    o: &BlockOffsets,
    (b, t, c): (usize, usize, usize),
    p: &[f32],
    g: &mut [f32],
    a: &Activations,
    s: &mut Scratch,
    residual_2: &[f32],
) {
    let n = b * t;
    let (nc, nc4) = (n * c, n * 4 * c);
    // MLP: residual_3 = residual_2 + gelu(ln_2 · Wfcᵀ + b) · Wprojᵀ + b
    let (dw, db) = tensor_pair(g, o.mlp_proj_weight, o.mlp_proj_bias, 4 * c * c);
    k::linear_backward(
        Some(&mut s.d_fch_gelu[..nc4]),
        dw,
        Some(&mut db[..c]),
        &s.d_residual[..nc],
        &a.fch_gelu[l * nc4..][..nc4],
        &p[o.mlp_proj_weight..][..4 * c * c],
        &s.ones,
        4 * c,
        c,
    );
    k::gelu_backward(
        &mut s.d_fch[..nc4],
        &a.fch[l * nc4..][..nc4],
        &s.d_fch_gelu[..nc4],
    );
    let (dw, db) = tensor_pair(g, o.fc_weight, o.fc_bias, 4 * c * c);
    k::linear_backward(
        Some(&mut s.d_c[..nc]),
        dw,
        Some(&mut db[..4 * c]),
        &s.d_fch[..nc4],
        &a.ln_2[l * nc..][..nc],
        &p[o.fc_weight..][..4 * c * c],
        &s.ones,
        c,
        4 * c,
    );
    let (dw, db) = tensor_pair(g, o.ln_2_weight, o.ln_2_bias, c);
    k::layernorm_backward(
        &mut s.d_residual[..nc],
        dw,
        &mut db[..c],
        &mut s.partials,
        &s.d_c[..nc],
        residual_2,
        &p[o.ln_2_weight..][..c],
        &a.ln_2_mean[l * n..][..n],
        &a.ln_2_rstd[l * n..][..n],
        c,
    );
}

/// The block's attention half: d_residual holds d(residual_2) and leaves holding d(block input).
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    l: usize,
    o: &BlockOffsets,
    (b, t, c, nh): (usize, usize, usize, usize),
    p: &[f32],
    g: &mut [f32],
    a: &Activations,
    s: &mut Scratch,
    residual: &[f32],
) {
    let n = b * t;
    let (nc, nc3, att_len) = (n * c, n * 3 * c, b * nh * t * t);
    // Attention: residual_2 = residual + attn(ln_1 · Wqkvᵀ + b) · Wprojᵀ + b
    let (dw, db) = tensor_pair(g, o.attn_proj_weight, o.attn_proj_bias, c * c);
    k::linear_backward(
        Some(&mut s.d_c[..nc]),
        dw,
        Some(&mut db[..c]),
        &s.d_residual[..nc],
        &a.atty[l * nc..][..nc],
        &p[o.attn_proj_weight..][..c * c],
        &s.ones,
        c,
        c,
    );
    k::attention_backward(
        &mut s.d_qkv[..nc3],
        &mut s.d_att[..att_len],
        &s.d_c[..nc],
        &a.qkv[l * nc3..][..nc3],
        &a.att[l * att_len..][..att_len],
        t,
        c,
        nh,
    );
    let (dw, db) = tensor_pair(g, o.qkv_weight, o.qkv_bias, 3 * c * c);
    k::linear_backward(
        Some(&mut s.d_c[..nc]),
        dw,
        Some(&mut db[..3 * c]),
        &s.d_qkv[..nc3],
        &a.ln_1[l * nc..][..nc],
        &p[o.qkv_weight..][..3 * c * c],
        &s.ones,
        c,
        3 * c,
    );
    let (dw, db) = tensor_pair(g, o.ln_1_weight, o.ln_1_bias, c);
    k::layernorm_backward(
        &mut s.d_residual[..nc],
        dw,
        &mut db[..c],
        &mut s.partials,
        &s.d_c[..nc],
        residual,
        &p[o.ln_1_weight..][..c],
        &a.ln_1_mean[l * n..][..n],
        &a.ln_1_rstd[l * n..][..n],
        c,
    );
}

/// Two disjoint mutable views: `len` elements at `first`, and everything from `second` on
/// (`second` > `first`), e.g. a weight's gradient and its bias's.
pub(super) fn tensor_pair(
    g: &mut [f32],
    first: usize,
    second: usize,
    len: usize,
) -> (&mut [f32], &mut [f32]) {
    debug_assert!(first + len <= second);
    let (head, tail) = g.split_at_mut(second);
    (&mut head[first..first + len], tail)
}
