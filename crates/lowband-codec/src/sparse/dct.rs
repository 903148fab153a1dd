//! `dct`'s encode for power-of-two chunks: 16 chunks at a time, one per SIMD lane. Each chunk is
//! divided by its scale, transformed (the orthonormal DCT-II, by Lee's radix-2 recursion written
//! level by level), and its k largest coefficients are found, all with one vector operation per
//! 16 values: the lanes never exchange data, so nothing is shuffled. On x86-64 the loops are
//! compiled for AVX-512 too and that build is chosen at run time when the CPU has it (the same
//! IEEE operations in the same order: the same bits either way, tested).
//!
//! Lee's recursion (B. G. Lee, "A new algorithm to compute the discrete cosine transform", IEEE
//! Trans. ASSP 32(6), 1984), for X[k] = Σ x[i] cos(π (2i + 1) k / (2m)): with
//! a[i] = x[i] + x[m−1−i] and b[i] = (x[i] − x[m−1−i]) / (2 cos(π (2i + 1) / (2m))), i < m/2,
//! X[2k] = A[k] and X[2k+1] = B[k] + B[k+1] (B[m/2] = 0), A and B the transforms of a and b.

use super::select::{RunningTop, FEW};

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

    /// Each chunk's values into its lane (zeros past its end, and in lanes without a chunk).
    fn load(&self, chunks: &[f32], batch: &mut Batch) {
        debug_assert!(chunks.len() <= self.n * LANES);
        if chunks.len() < self.n * LANES {
            batch.data.fill([0.0; LANES]);
        }
        for (lane, chunk) in chunks.chunks(self.n).enumerate() {
            for (row, &value) in batch.data.iter_mut().zip(chunk) {
                row[lane] = value;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn compute_avx512(&self, k: usize, batch: &mut Batch) {
        self.compute::<true>(k, batch)
    }

    /// Scale, transform, normalize and (k <= FEW) select, on `batch` as loaded.
    /// `WIDE`: compiled inside `compute_avx512` (its selection compares with AVX-512 itself).
    #[inline(always)]
    fn compute<const WIDE: bool>(&self, k: usize, batch: &mut Batch) {
        debug_assert!(k >= 1 && k <= self.n);
        // Each lane's largest magnitude (as `max` ignores NaN, like the codecs' `max_abs`).
        let mut largest = [0.0f32; LANES];
        for row in &batch.data {
            let row = *row;
            for lane in 0..LANES {
                largest[lane] = largest[lane].max(row[lane].abs());
            }
        }
        for (scale, m) in batch.scales.iter_mut().zip(largest) {
            *scale = if m > 0.0 && m.is_finite() { m } else { 1.0 };
        }
        self.transform(&mut batch.data, &mut batch.other, &batch.scales);
        if k <= FEW {
            select_lanes::<WIDE>(&batch.data, k, &mut batch.held);
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
        // pass on local rows (`eight_block`): 11 passes over the batch instead of 16 at n = 256.
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
        // Split: each block of m values becomes [a | b] (m = n, …, 2 · bottom).
        let (mut from, mut to) = (data, other);
        let mut swaps = 0;
        for factors in &self.factors[..levels - bottom_levels] {
            let m = factors.len() * 2;
            let divide = (m == n).then_some(scales);
            for (x, out) in from.chunks_exact(m).zip(to.chunks_exact_mut(m)) {
                split_block(x, out, factors, divide);
            }
            std::mem::swap(&mut from, &mut to);
            swaps += 1;
        }
        // The last level writes orthonormal coefficients (each level's own factor is 1).
        let scaling = |m: usize| {
            if m == n {
                (self.first, self.rest)
            } else {
                (1.0, 1.0)
            }
        };
        let half = self.factors[levels - 1][0];
        if bottom == 8 {
            let (eight, four) = (&self.factors[levels - 3], &self.factors[levels - 2]);
            let (first, rest) = scaling(8);
            for block in from.chunks_exact_mut(8) {
                eight_block(block, eight, four, half, first, rest);
            }
        } else {
            for pair in from.chunks_exact_mut(2) {
                pair_block(pair, half);
            }
            if n == 2 {
                for (row, factor) in from.iter_mut().zip([self.first, self.rest]) {
                    let mut scaled = *row;
                    for value in scaled.iter_mut() {
                        *value *= factor;
                    }
                    *row = scaled;
                }
            }
        }
        // Merge: X[2k] = A[k], X[2k+1] = B[k] + B[k+1] (m = 2 · bottom, …, n).
        let mut m = 2 * bottom;
        while m <= n {
            let (first, rest) = scaling(m);
            for (x, out) in from.chunks_exact(m).zip(to.chunks_exact_mut(m)) {
                merge_block(x, out, first, rest);
            }
            std::mem::swap(&mut from, &mut to);
            swaps += 1;
            m *= 2;
        }
        // Split and merge levels are as many, so the result is back in `data`.
        debug_assert_eq!(swaps % 2, 0);
    }
}

/// The transform of a block of 2 rows in place (its split and merge are one step).
#[inline(always)]
fn pair_block(pair: &mut [Lanes], half: f32) {
    let (x0, x1) = (pair[0], pair[1]);
    let (mut sum, mut difference) = ([0.0; LANES], [0.0; LANES]);
    for lane in 0..LANES {
        sum[lane] = x0[lane] + x1[lane];
        difference[lane] = (x0[lane] - x1[lane]) * half;
    }
    pair[0] = sum;
    pair[1] = difference;
}

/// The transform of a block of 8 rows in place, every level on local rows; its last merge
/// scales by `first` and `rest` (see [`merge_block`]).
#[inline(always)]
fn eight_block(block: &mut [Lanes], eight: &[f32], four: &[f32], half: f32, first: f32, rest: f32) {
    let mut x = [[0.0; LANES]; 8];
    x.copy_from_slice(block);
    let mut t = [[0.0; LANES]; 8];
    split_block(&x, &mut t, eight, None);
    split_block(&t[..4], &mut x[..4], four, None);
    split_block(&t[4..], &mut x[4..], four, None);
    for pair in x.chunks_exact_mut(2) {
        pair_block(pair, half);
    }
    merge_block(&x[..4], &mut t[..4], 1.0, 1.0);
    merge_block(&x[4..], &mut t[4..], 1.0, 1.0);
    merge_block(&t, &mut x, first, rest);
    block.copy_from_slice(&x);
}

/// One block of a split level: x (m rows) becomes [a | b] in `out`; `divide`: the first level,
/// which divides the values by their lane's scale as it reads them. Whole rows go through locals,
/// so that the lane loops compile to vector operations.
#[inline(always)]
fn split_block(x: &[Lanes], out: &mut [Lanes], factors: &[f32], divide: Option<&Lanes>) {
    let m = x.len();
    let (a, b) = out.split_at_mut(m / 2);
    for (i, &factor) in factors.iter().enumerate() {
        let (mut low, mut high) = (x[i], x[m - 1 - i]);
        if let Some(scales) = divide {
            for lane in 0..LANES {
                low[lane] /= scales[lane];
                high[lane] /= scales[lane];
            }
        }
        let (mut sum, mut difference) = ([0.0; LANES], [0.0; LANES]);
        for lane in 0..LANES {
            sum[lane] = low[lane] + high[lane];
            difference[lane] = (low[lane] - high[lane]) * factor;
        }
        a[i] = sum;
        b[i] = difference;
    }
}

/// One block of a merge level: X[2k] = A[k] · (k = 0: `first`, else `rest`), X[2k+1] = (B[k] +
/// B[k+1]) · `rest` (both 1 but at the last level, which writes orthonormal coefficients).
#[inline(always)]
fn merge_block(x: &[Lanes], out: &mut [Lanes], first: f32, rest: f32) {
    let (a, b) = x.split_at(x.len() / 2);
    for k in 0..a.len() {
        let (even, this) = (a[k], b[k]);
        let next = b.get(k + 1).copied().unwrap_or([0.0; LANES]);
        let factor = if k == 0 { first } else { rest };
        let (mut even_out, mut odd_out) = ([0.0; LANES], [0.0; LANES]);
        for lane in 0..LANES {
            even_out[lane] = even[lane] * factor;
            odd_out[lane] = (this[lane] + next[lane]) * rest;
        }
        out[2 * k] = even_out;
        out[2 * k + 1] = odd_out;
    }
}

impl Batch {
    /// Lane `lane`'s k largest coefficients (k <= FEW, as given to `run`): their positions in
    /// increasing order into `positions` (length k).
    pub(super) fn top(&self, lane: usize, positions: &mut [u32]) {
        self.held[lane].positions(positions)
    }
}

/// Every lane's k largest magnitudes (ties to the lower index), the exact result of
/// `select::running_top` on each chunk, with few entries: the rows are cut into k groups (group
/// g is rows g·n/k up to (g+1)·n/k, never empty), each lane first holds its k group maxima (k
/// real values, so its k-th largest is at least the smallest of them), then every other value is
/// offered; one compare of all lanes per row against each lane's worst held finds the few that
/// can enter.
#[inline(always)]
fn select_lanes<const WIDE: bool>(data: &[Lanes], k: usize, held: &mut [RunningTop; LANES]) {
    let bits = |v: f32| v.to_bits() & 0x7fff_ffff;
    let n = data.len();
    let group_start = |g: usize| g * n / k;
    // Each group's largest magnitude per lane and its row (the first, of equal ones).
    let mut group_max = [[0u32; LANES]; FEW];
    let mut group_row = [[0u32; LANES]; FEW];
    for g in 0..k {
        let (start, end) = (group_start(g), group_start(g + 1));
        let (mut largest, mut row_of) = (data[start].map(bits), [start as u32; LANES]);
        for (i, row) in data.iter().enumerate().take(end).skip(start + 1) {
            let row = *row;
            for lane in 0..LANES {
                let m = bits(row[lane]);
                if m > largest[lane] {
                    largest[lane] = m;
                    row_of[lane] = i as u32;
                }
            }
        }
        group_max[g] = largest;
        group_row[g] = row_of;
    }
    // A value can enter only at or above the worst held's magnitude: `bar` is one below it.
    let mut bar = [0u32; LANES];
    for lane in 0..LANES {
        held[lane] =
            RunningTop::from_pairs((0..k).map(|g| (group_max[g][lane], group_row[g][lane])));
        bar[lane] = held[lane].threshold().saturating_sub(1);
    }
    let (mut g, mut group_end) = (0, group_start(1));
    for (i, row) in data.iter().enumerate() {
        if i == group_end {
            g += 1;
            group_end = group_start(g + 1);
        }
        let mut mask = above::<WIDE>(row, &bar);
        while mask != 0 {
            let lane = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if group_row[g][lane] == i as u32 {
                continue; // held from the start
            }
            held[lane].offer(bits(row[lane]), i as u32);
            bar[lane] = held[lane].threshold().saturating_sub(1);
        }
    }
}

/// The lanes whose magnitude is above their bar, as a bit mask.
#[inline(always)]
fn above<const WIDE: bool>(row: &Lanes, bar: &[u32; LANES]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: `WIDE` code runs only inside `compute_avx512`, on a CPU with AVX-512F.
        return unsafe { above_avx512(row, bar) };
    }
    let mut mask = 0u32;
    for lane in 0..LANES {
        mask |= (((row[lane].to_bits() & 0x7fff_ffff) > bar[lane]) as u32) << lane;
    }
    mask
}

/// [`above`] as one AVX-512 compare (LLVM splits the portable loop into pieces).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn above_avx512(row: &Lanes, bar: &[u32; LANES]) -> u32 {
    use std::arch::x86_64::*;
    // SAFETY: both are 16 × 4 bytes; the loads are unaligned.
    let (values, bar) = unsafe {
        (
            _mm512_loadu_si512(row.as_ptr().cast()),
            _mm512_loadu_si512(bar.as_ptr().cast()),
        )
    };
    let magnitudes = _mm512_and_si512(values, _mm512_set1_epi32(0x7fff_ffff));
    _mm512_cmpgt_epu32_mask(magnitudes, bar) as u32
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
        for n in [2usize, 4, 8, 16, 256, 1024] {
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
        let n = 64;
        // Few levels: ties everywhere.
        let values: Vec<f32> = signal(LANES * n, 3)
            .iter()
            .map(|v| (v * 2.0).round())
            .collect();
        let plan = BatchDct::new(n).unwrap();
        for k in [1usize, 3, 7, 8, FEW] {
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
                assert_eq!(found, expected, "k {k} lane {lane}");
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
                assert_eq!(bits(&wide), bits(&batch), "k {k}");
                assert_eq!(wide.held, batch.held, "k {k}");
            }
        }
    }
}
