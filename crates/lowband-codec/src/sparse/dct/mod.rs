//! `dct`'s encode for power-of-two chunks: 16 chunks at a time, one per SIMD lane. Each chunk is
//! divided by its scale, transformed (the orthonormal DCT-II, by Lee's radix-2 recursion written
//! level by level, two levels a pass: `levels.rs`), and its k largest coefficients are found
//! (`lanes.rs`), all with one vector operation per 16 values: past the load (a transpose), the
//! lanes never exchange data. On x86-64 the loops are compiled for AVX-512 too and that build is
//! chosen at run time when the CPU has it (the same IEEE operations in the same order: the same
//! bits either way, tested).
//!
//! Lee's recursion (B. G. Lee, "A new algorithm to compute the discrete cosine transform", IEEE
//! Trans. ASSP 32(6), 1984), for X[k] = Σ x[i] cos(π (2i + 1) k / (2m)): with
//! a[i] = x[i] + x[m−1−i] and b[i] = (x[i] − x[m−1−i]) / (2 cos(π (2i + 1) / (2m))), i < m/2,
//! X[2k] = A[k] and X[2k+1] = B[k] + B[k+1] (B[m/2] = 0), A and B the transforms of a and b.

mod lanes;
mod levels;

use super::select::{RunningTop, FEW};
use lanes::select_lanes;
use levels::{
    eight_block, merge_block, merge_two_levels, pair_block, split_block, split_two_levels,
};

/// Chunks transformed together (one per lane; 16 f32 are one AVX-512 register).
pub(super) const LANES: usize = 16;
pub(super) type Lanes = [f32; LANES];

/// The plan of one chunk length (a power of two, at least 2).
pub(super) struct BatchDct {
    n: usize,
    /// Lee's factors 1 / (2 cos(π (2i + 1) / (2m))), i < m/2, for m = n, n/2, …, 2.
    factors: Vec<Vec<f32>>,
    /// Orthonormal scaling: coefficient 0, and every other one.
    first: f32,
    rest: f32,
}

/// One encoding thread's batch: the chunks' values, coefficient-major (`data[i][lane]`), a
/// second buffer of the same size, and each lane's running top k (magnitude bits, index).
pub(super) struct Batch {
    pub(super) data: Vec<Lanes>,
    other: Vec<Lanes>,
    held: [RunningTop; LANES],
    /// Per row, the lanes holding it (selection scratch, all 0 between batches).
    held_rows: Vec<u16>,
    /// Each lane's chunk scale (1 for a lane without a chunk).
    pub(super) scales: Lanes,
}

impl BatchDct {
    /// A plan for chunks of `n` values: None unless `n` is a power of two of at least 2.
    pub(super) fn new(n: usize) -> Option<BatchDct> {
        if n < 2 || !n.is_power_of_two() {
            return None;
        }
        let mut factors = Vec::new();
        let mut m = n;
        while m >= 2 {
            factors.push(
                (0..m / 2)
                    .map(|i| {
                        let angle = std::f64::consts::PI * (2 * i + 1) as f64 / (2 * m) as f64;
                        (0.5 / angle.cos()) as f32
                    })
                    .collect(),
            );
            m /= 2;
        }
        Some(BatchDct {
            n,
            factors,
            first: (1.0 / n as f64).sqrt() as f32,
            rest: (2.0 / n as f64).sqrt() as f32,
        })
    }

    pub(super) fn batch(&self) -> Batch {
        Batch {
            data: vec![[0.0; LANES]; self.n],
            other: vec![[0.0; LANES]; self.n],
            held: [RunningTop::from_pairs(std::iter::once((0, 0))); LANES],
            held_rows: vec![0; self.n],
            scales: [1.0; LANES],
        }
    }

    /// Load up to `LANES` chunks of `chunks` (consecutive chunks of `n` values; the last may be
    /// shorter and is padded with zeros) into `batch`, each divided by its scale (its largest
    /// magnitude, or 1 if that is 0 or not finite), transform them to orthonormal DCT-II
    /// coefficients and, if `k <= FEW`, find each chunk's k largest (see [`Batch::top`]).
    pub(super) fn run(&self, chunks: &[f32], k: usize, batch: &mut Batch) {
        self.load(chunks, batch);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            return unsafe { self.compute_avx512(k, batch) };
        }
        self.compute::<false>(k, batch)
    }

    /// Each chunk's values into its lane (zeros past its end, and in lanes without a chunk), and
    /// its scale: its largest magnitude, or 1 if that is 0 or not finite.
    fn load(&self, chunks: &[f32], batch: &mut Batch) {
        let largest = lanes::load(chunks, &mut batch.data);
        for (scale, m) in batch.scales.iter_mut().zip(largest) {
            *scale = if m > 0.0 && m.is_finite() { m } else { 1.0 };
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn compute_avx512(&self, k: usize, batch: &mut Batch) {
        self.compute::<true>(k, batch)
    }

    /// Transform, normalize and (k <= FEW) select, on `batch` as loaded.
    /// `WIDE`: compiled inside `compute_avx512` (its selection compares with AVX-512 itself).
    #[inline(always)]
    fn compute<const WIDE: bool>(&self, k: usize, batch: &mut Batch) {
        debug_assert!(k >= 1 && k <= self.n);
        self.transform(&mut batch.data, &mut batch.other, &batch.scales);
        if k <= FEW {
            select_lanes::<WIDE>(&batch.data, k, &mut batch.held, &mut batch.held_rows);
        }
    }

    /// The orthonormal DCT-II of every lane of `data` (length n) divided by its lane's scale, in
    /// place; `other` is scratch. The division is done as the first level reads the values
    /// (division, not a reciprocal: 1 / a subnormal scale overflows), the normalization as the
    /// last level writes the coefficients.
    #[inline(always)]
    fn transform(&self, data: &mut [Lanes], other: &mut [Lanes], scales: &Lanes) {
        let n = self.n;
        let levels = self.factors.len();
        // The bottom levels of each block of 8 rows (split 8, 4, 2, merge 4, 8) are done in one
        // pass on local rows (`eight_block`), and the others two at a time where they pair up:
        // 7 passes over the batch instead of 16 at n = 256.
        let bottom: usize = if n >= 8 { 8 } else { 2 };
        let bottom_levels = bottom.trailing_zeros() as usize;
        if n == bottom {
            // No split level reads the values: divide them here.
            for row in data.iter_mut() {
                let mut unit = *row;
                for lane in 0..LANES {
                    unit[lane] /= scales[lane];
                }
                *row = unit;
            }
        }
        // Split: each block of m values becomes [a | b] (m = n, …, 2 · bottom), two levels
        // (m and m/2) a pass while two are left.
        let (mut from, mut to) = (data, other);
        let mut passes = 0;
        let split_levels = &self.factors[..levels - bottom_levels];
        let mut level = 0;
        while level < split_levels.len() {
            let m = n >> level;
            let divide = (m == n).then_some(scales);
            // Plain loops (an iterator adapter's closure could be compiled outside the
            // AVX-512 build).
            let blocks = from.chunks_exact(m).zip(to.chunks_exact_mut(m));
            if let Some(inner) = split_levels.get(level + 1) {
                let outer = &split_levels[level];
                for (x, out) in blocks {
                    split_two_levels(x, out, outer, inner, divide);
                }
                level += 2;
            } else {
                let factors = &split_levels[level];
                for (x, out) in blocks {
                    split_block(x, out, factors, divide);
                }
                level += 1;
            }
            std::mem::swap(&mut from, &mut to);
            passes += 1;
        }
        self.bottom_blocks(from, bottom);
        // Merge: X[2k] = A[k], X[2k+1] = B[k] + B[k+1] (m = 2 · bottom, …, n), paired from the
        // top (the first level alone if their number is odd).
        let mut m = 2 * bottom;
        if split_levels.len() % 2 == 1 {
            let (first, rest) = self.scaling(m);
            for (x, out) in from.chunks_exact(m).zip(to.chunks_exact_mut(m)) {
                merge_block(x, out, first, rest);
            }
            std::mem::swap(&mut from, &mut to);
            passes += 1;
            m *= 2;
        }
        while m < n {
            let (first, rest) = self.scaling(2 * m);
            for (x, out) in from.chunks_exact(2 * m).zip(to.chunks_exact_mut(2 * m)) {
                merge_two_levels(x, out, first, rest);
            }
            std::mem::swap(&mut from, &mut to);
            passes += 1;
            m *= 4;
        }
        // Split and merge passes are as many, so the result is back in `data`.
        debug_assert_eq!(passes % 2, 0);
    }

    /// The bottom levels of every block of `bottom` rows (8, or 2 for n = 2) in place.
    #[inline(always)]
    fn bottom_blocks(&self, rows: &mut [Lanes], bottom: usize) {
        let levels = self.factors.len();
        let half = self.factors[levels - 1][0];
        if bottom == 8 {
            let (eight, four) = (&self.factors[levels - 3], &self.factors[levels - 2]);
            let (first, rest) = self.scaling(8);
            for block in rows.chunks_exact_mut(8) {
                eight_block(block, eight, four, half, first, rest);
            }
            return;
        }
        for pair in rows.chunks_exact_mut(2) {
            pair_block(pair, half);
        }
        if self.n == 2 {
            for (row, factor) in rows.iter_mut().zip([self.first, self.rest]) {
                let mut scaled = *row;
                for value in scaled.iter_mut() {
                    *value *= factor;
                }
                *row = scaled;
            }
        }
    }

    /// The scalings of a merge level of blocks of m: the last level (m = n) writes orthonormal
    /// coefficients, the others none (each level's own factor is 1).
    #[inline(always)]
    fn scaling(&self, m: usize) -> (f32, f32) {
        if m == self.n {
            (self.first, self.rest)
        } else {
            (1.0, 1.0)
        }
    }
}

impl Batch {
    /// Lane `lane`'s k largest coefficients (k <= FEW, as given to `run`): their positions in
    /// increasing order into `positions` (length k).
    pub(super) fn top(&self, lane: usize, positions: &mut [u32]) {
        self.held[lane].positions(positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orthonormal DCT-II by its definition, in f64.
    fn by_definition(x: &[f32]) -> Vec<f64> {
        let n = x.len();
        (0..n)
            .map(|k| {
                let a = if k == 0 {
                    1.0 / n as f64
                } else {
                    2.0 / n as f64
                }
                .sqrt();
                a * (x.iter().enumerate())
                    .map(|(i, &v)| {
                        let angle = std::f64::consts::PI * (2 * i + 1) as f64 * k as f64;
                        v as f64 * (angle / (2 * n) as f64).cos()
                    })
                    .sum::<f64>()
            })
            .collect()
    }

    fn max_abs(values: &[f32]) -> f32 {
        values.iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    fn signal(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    #[test]
    fn the_batch_transform_is_the_orthonormal_dct_of_every_chunk() {
        // Every way the levels pair up: 0 to 7 levels above the block of 8.
        for n in [2usize, 4, 8, 16, 32, 64, 128, 256, 512, 1024] {
            // 5 chunks and a short one: lanes without a chunk stay empty.
            let values = signal(5 * n + n / 2 + 1, n as u64);
            let plan = BatchDct::new(n).unwrap();
            let mut batch = plan.batch();
            plan.run(&values, 1, &mut batch);
            for (lane, chunk) in values.chunks(n).enumerate() {
                let mut padded = chunk.to_vec();
                padded.resize(n, 0.0);
                let scale = max_abs(chunk);
                let unit: Vec<f32> = padded.iter().map(|v| v / scale).collect();
                let expected = by_definition(&unit);
                for (i, e) in expected.iter().enumerate() {
                    let found = batch.data[i][lane] as f64;
                    assert!(
                        (found - e).abs() < 2e-5 * n as f64,
                        "n {n} lane {lane} coefficient {i}: {found} vs {e}"
                    );
                }
                assert_eq!(batch.scales[lane], scale);
            }
            assert!(batch
                .data
                .iter()
                .all(|row| row[6..].iter().all(|v| *v == 0.0)));
        }
        assert!(BatchDct::new(1).is_none() && BatchDct::new(24).is_none());
    }

    #[test]
    fn every_lane_keeps_its_textbook_top_k_and_both_builds_agree() {
        // Groups of 1, 2, 8 and 32 rows.
        for n in [16usize, 64, 256, 1024] {
            lanes_keep_their_top_k(n);
        }
    }

    fn lanes_keep_their_top_k(n: usize) {
        // Few levels: ties everywhere.
        let values: Vec<f32> = signal(LANES * n, 3)
            .iter()
            .map(|v| (v * 2.0).round())
            .collect();
        let plan = BatchDct::new(n).unwrap();
        for k in [1usize, 3, 7, 8, 16, FEW].into_iter().filter(|&k| k <= n) {
            let mut batch = plan.batch();
            plan.load(&values, &mut batch);
            plan.compute::<false>(k, &mut batch);
            for lane in 0..LANES {
                let coefficient = |i: u32| batch.data[i as usize][lane].abs().to_bits();
                let mut order: Vec<u32> = (0..n as u32).collect();
                order.sort_by_key(|&i| (std::cmp::Reverse(coefficient(i)), i));
                let mut expected = order[..k].to_vec();
                expected.sort_unstable();
                let mut found = vec![0u32; k];
                batch.top(lane, &mut found);
                assert_eq!(found, expected, "n {n} k {k} lane {lane}");
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut wide = plan.batch();
                plan.load(&values, &mut wide);
                // SAFETY: the CPU has AVX-512F.
                unsafe { plan.compute_avx512(k, &mut wide) };
                let bits = |b: &Batch| -> Vec<u32> {
                    b.data.iter().flatten().map(|v| v.to_bits()).collect()
                };
                assert_eq!(bits(&wide), bits(&batch), "n {n} k {k}");
                assert_eq!(wide.held, batch.held, "n {n} k {k}");
            }
        }
    }
}
