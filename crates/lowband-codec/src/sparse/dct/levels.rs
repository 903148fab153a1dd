//! The levels of Lee's recursion on blocks of rows (each row one value of 16 chunks). A level
//! reads a block and writes it elsewhere; two levels fused into one pass do exactly the same
//! operations in the same order (so the same bits) with half the loads and stores. Whole rows go
//! through locals, so that the lane loops compile to vector operations.

use super::{Lanes, LANES};

/// `a + b` lane by lane.
#[inline(always)]
fn add(a: Lanes, b: Lanes) -> Lanes {
    let mut out = [0.0; LANES];
    for lane in 0..LANES {
        out[lane] = a[lane] + b[lane];
    }
    out
}

/// `(a − b) · factor` lane by lane.
#[inline(always)]
fn scaled_difference(a: Lanes, b: Lanes, factor: f32) -> Lanes {
    let mut out = [0.0; LANES];
    for lane in 0..LANES {
        out[lane] = (a[lane] - b[lane]) * factor;
    }
    out
}

/// `a · factor` lane by lane.
#[inline(always)]
fn scaled(a: Lanes, factor: f32) -> Lanes {
    let mut out = a;
    for value in out.iter_mut() {
        *value *= factor;
    }
    out
}

/// `a / scales` lane by lane (the first level divides each chunk by its scale as it reads it).
#[inline(always)]
fn divided(a: Lanes, scales: Option<&Lanes>) -> Lanes {
    let mut out = a;
    if let Some(scales) = scales {
        for lane in 0..LANES {
            out[lane] /= scales[lane];
        }
    }
    out
}

/// One block of a split level: x (m rows) becomes [a | b] in `out`, a[i] = x[i] + x[m−1−i] and
/// b[i] = (x[i] − x[m−1−i]) · factors[i]; `divide`: the first level (see [`divided`]).
#[inline(always)]
pub(super) fn split_block(x: &[Lanes], out: &mut [Lanes], factors: &[f32], divide: Option<&Lanes>) {
    let m = x.len();
    let (a, b) = out.split_at_mut(m / 2);
    for (i, &factor) in factors.iter().enumerate() {
        let (low, high) = (divided(x[i], divide), divided(x[m - 1 - i], divide));
        a[i] = add(low, high);
        b[i] = scaled_difference(low, high, factor);
    }
}

/// Two split levels in one pass: x (m rows) becomes the level-m/2 split of each half of its
/// level-m split, [aa | ab | ba | bb]; `outer` are level m's factors, `inner` level m/2's.
#[inline(always)]
pub(super) fn split_two_levels(
    x: &[Lanes],
    out: &mut [Lanes],
    outer: &[f32],
    inner: &[f32],
    divide: Option<&Lanes>,
) {
    let m = x.len();
    let (q, h) = (m / 4, m / 2);
    for (i, &inner_factor) in inner.iter().enumerate() {
        let j = h - 1 - i;
        let (x0, x3) = (divided(x[i], divide), divided(x[m - 1 - i], divide));
        let (x1, x2) = (divided(x[j], divide), divided(x[h + i], divide));
        // Level m at rows i and j of each half.
        let (a_i, b_i) = (add(x0, x3), scaled_difference(x0, x3, outer[i]));
        let (a_j, b_j) = (add(x1, x2), scaled_difference(x1, x2, outer[j]));
        // Level m/2 of each half at row i.
        out[i] = add(a_i, a_j);
        out[q + i] = scaled_difference(a_i, a_j, inner_factor);
        out[h + i] = add(b_i, b_j);
        out[h + q + i] = scaled_difference(b_i, b_j, inner_factor);
    }
}

/// One block of a merge level: X[2k] = A[k] · (k = 0: `first`, else `rest`), X[2k+1] = (B[k] +
/// B[k+1]) · `rest`, B[m/2] = 0 (the scalings are 1 but at the last level, which writes
/// orthonormal coefficients).
#[inline(always)]
pub(super) fn merge_block(x: &[Lanes], out: &mut [Lanes], first: f32, rest: f32) {
    let (a, b) = x.split_at(x.len() / 2);
    for k in 0..a.len() {
        let next = b.get(k + 1).copied().unwrap_or([0.0; LANES]);
        let factor = if k == 0 { first } else { rest };
        out[2 * k] = scaled(a[k], factor);
        out[2 * k + 1] = scaled(add(b[k], next), rest);
    }
}

/// Two merge levels in one pass: x (2m rows, the quarters Q0..Q3 of m/2 rows each) is merged at
/// level m in each half (M0 from [Q0 | Q1], M1 from [Q2 | Q3], whose scalings are 1 and are
/// skipped: multiplying by 1 changes no value) and the halves at level 2m with `first` and `rest`.
#[inline(always)]
pub(super) fn merge_two_levels(x: &[Lanes], out: &mut [Lanes], first: f32, rest: f32) {
    let q = x.len() / 4;
    let row = |quarter: usize, j: usize| {
        if j < q {
            x[quarter * q + j]
        } else {
            [0.0; LANES]
        }
    };
    for j in 0..q {
        // M0[2j] = Q0[j], M0[2j+1] = Q1[j] + Q1[j+1]; M1[2j] = Q2[j], M1[2j+1] = Q3[j] + Q3[j+1],
        // M1[2j+2] = Q2[j+1] (0 past the end, as the level's B[m] is).
        let (m0_even, m0_odd) = (row(0, j), add(row(1, j), row(1, j + 1)));
        let (m1_even, m1_odd, m1_next) = (row(2, j), add(row(3, j), row(3, j + 1)), row(2, j + 1));
        out[4 * j] = scaled(m0_even, if j == 0 { first } else { rest });
        out[4 * j + 1] = scaled(add(m1_even, m1_odd), rest);
        out[4 * j + 2] = scaled(m0_odd, rest);
        out[4 * j + 3] = scaled(add(m1_odd, m1_next), rest);
    }
}

/// The transform of a block of 2 rows in place (its split and merge are one step).
#[inline(always)]
pub(super) fn pair_block(pair: &mut [Lanes], half: f32) {
    let (x0, x1) = (pair[0], pair[1]);
    pair[0] = add(x0, x1);
    pair[1] = scaled_difference(x0, x1, half);
}

/// The transform of a block of 8 rows in place, every level on local rows; its last merge
/// scales by `first` and `rest` (see [`merge_block`]).
#[inline(always)]
pub(super) fn eight_block(
    block: &mut [Lanes],
    eight: &[f32],
    four: &[f32],
    half: f32,
    first: f32,
    rest: f32,
) {
    let mut x = [[0.0; LANES]; 8];
    x.copy_from_slice(block);
    let mut t = [[0.0; LANES]; 8];
    split_two_levels(&x, &mut t, eight, four, None);
    for pair in t.chunks_exact_mut(2) {
        pair_block(pair, half);
    }
    merge_two_levels(&t, &mut x, first, rest);
    block.copy_from_slice(&x);
}
