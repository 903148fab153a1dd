//! The per-parameter passes on all of rayon's threads. Element-wise passes give the same bits
//! however they are split; reductions are cut into fixed pieces of [`PIECE`] values whose
//! partial sums are added in order, so a result depends on the input alone, never on the
//! thread count.

use rayon::prelude::*;

/// Values per piece (256 KB of f32).
pub(crate) const PIECE: usize = 1 << 16;

/// Σ f(v) in f64, piece by piece, the pieces' sums added in order.
pub(crate) fn sum_f64(values: &[f32], f: impl Fn(f32) -> f64 + Sync) -> f64 {
    let partials: Vec<f64> = values
        .par_chunks(PIECE)
        .map(|piece| piece.iter().map(|v| f(*v)).sum::<f64>())
        .collect();
    partials.into_iter().sum()
}

/// ‖values‖₂, summed in f64.
pub(crate) fn norm(values: &[f32]) -> f32 {
    sum_f64(values, |v| (v as f64) * (v as f64)).sqrt() as f32
}

/// `out[i] = f(out[i], values[i])`.
pub(crate) fn zip_apply<T: Send, U: Sync>(
    out: &mut [T],
    values: &[U],
    f: impl Fn(&mut T, &U) + Sync,
) {
    assert_eq!(out.len(), values.len());
    out.par_chunks_mut(PIECE)
        .zip(values.par_chunks(PIECE))
        .for_each(|(out, values)| {
            for (o, v) in out.iter_mut().zip(values) {
                f(o, v);
            }
        });
}
