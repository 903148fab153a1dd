//! Top-k selection: the exact k largest magnitudes of a chunk, in index order, with a candidate
//! scan vectorized for AVX-512 or AVX2 when the CPU has them (this crate's only `unsafe`).

use super::{BUCKETS, BUCKET_SHIFT};

/// Positions of the `k` largest magnitudes of `signal`, ascending (ties: the lower index), into
/// `positions` (length k). `candidates` and `magnitudes` are scratch.
///
/// The bits of |v| order like |v| for non-negative floats, so the search works on integers. A
/// histogram of every 16th value's top bits estimates a bucket below which at most ~k/2 of the
/// k largest can lie; one pass (16 values at a time, compared as a block) collects the index of
/// every value from that bucket up, in index order; a selection among those finds the exact
/// threshold, and a filter keeps the k in index order. If the estimate was too high (fewer than
/// k collected), an exact histogram decides instead. Either way the result is the exact top k.
pub(super) fn select_top(
    signal: &[f32],
    k: usize,
    candidates: &mut Vec<u32>,
    magnitudes: &mut Vec<u32>,
    positions: &mut [u32],
) {
    debug_assert!(k >= 1 && k <= signal.len() && positions.len() == k);
    if signal.len() <= SMALL_CHUNK {
        // A histogram of 2,048 buckets costs more than the chunk itself.
        if k <= FEW {
            return running_top(signal, k, positions);
        }
        // Every index is a candidate.
        candidates.clear();
        candidates.extend(0..signal.len() as u32);
        return keep_top(signal, k, candidates, magnitudes, positions);
    }
    const STRIDE: usize = 16;
    let bucket_of = |v: &f32| ((v.to_bits() & 0x7fff_ffff) >> BUCKET_SHIFT) as usize;
    let mut histogram = [0u32; BUCKETS];
    let mut top = 0;
    for v in signal.iter().step_by(STRIDE) {
        let b = bucket_of(v);
        histogram[b] += 1;
        top = top.max(b);
    }
    // Aim for about 2k candidates: the bucket where the sampled count from the top reaches 2k/16
    // (the walk starts at the largest sampled bucket: the ones above it are empty).
    let wanted_sampled = (2 * k).div_ceil(STRIDE);
    let (mut bucket, mut above) = (top, 0usize);
    while bucket > 0 && above + (histogram[bucket] as usize) < wanted_sampled {
        above += histogram[bucket] as usize;
        bucket -= 1;
    }
    collect_from(signal, bucket as u32, candidates);
    if candidates.len() < k {
        // The sample misled us: find the exact bucket of the k-th largest.
        histogram.fill(0);
        for v in signal {
            histogram[bucket_of(v)] += 1;
        }
        let (mut exact, mut count) = (BUCKETS - 1, 0usize);
        while count + (histogram[exact] as usize) < k {
            count += histogram[exact] as usize;
            exact -= 1;
        }
        collect_from(signal, exact as u32, candidates);
    }
    keep_top(signal, k, candidates, magnitudes, positions);
}

/// Chunks of at most this many values skip the histogram (`dct`'s chunks of up to 1,024).
const SMALL_CHUNK: usize = 1024;
/// In such a chunk, up to this many kept values are found in one pass ([`running_top`]).
pub(super) const FEW: usize = 32;

/// The k largest magnitudes of `signal` (ties to the lower index) in one pass, into `positions`
/// in index order: the best k so far are held, and a value enters only if it beats the worst of
/// them (one compare per value, rarely taken once the k are large).
fn running_top(signal: &[f32], k: usize, positions: &mut [u32]) {
    let magnitude = |v: &f32| v.to_bits() & 0x7fff_ffff;
    let mut top = RunningTop::from_pairs(signal[..k].iter().map(magnitude).zip(0..));
    for (i, v) in signal.iter().enumerate().skip(k) {
        if magnitude(v) > top.threshold() {
            top.enter(magnitude(v), i as u32);
        }
    }
    top.positions(positions);
}

/// The k (at most [`FEW`]) largest magnitudes offered so far, in index order of offering, as
/// keys `magnitude << 32 | !index` in increasing order: the first is the worst held (the
/// smallest magnitude, of equal ones the highest index). A newcomer has the highest index so
/// far, so it loses every tie: it enters only with a magnitude above the worst's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunningTop {
    keys: [u64; FEW],
    k: usize,
}

impl RunningTop {
    /// Held: the given (magnitude, index) pairs, k of them, distinct indices.
    #[inline(always)]
    pub(super) fn from_pairs(pairs: impl Iterator<Item = (u32, u32)>) -> RunningTop {
        let mut keys = [u64::MAX; FEW];
        let mut k = 0;
        for (key, (magnitude, index)) in keys.iter_mut().zip(pairs) {
            *key = Self::key(magnitude, index);
            k += 1;
        }
        debug_assert!(k >= 1);
        keys[..k].sort_unstable();
        RunningTop { keys, k }
    }

    /// Held: the keys ([`Self::key`]) of k values in increasing order, distinct indices.
    #[inline(always)]
    pub(super) fn from_sorted_keys(sorted: impl Iterator<Item = u64>) -> RunningTop {
        let mut keys = [u64::MAX; FEW];
        let mut k = 0;
        for (key, sorted) in keys.iter_mut().zip(sorted) {
            *key = sorted;
            k += 1;
        }
        debug_assert!(k >= 1 && keys[..k].is_sorted());
        RunningTop { keys, k }
    }

    /// Offer a value not held, in any order: it enters if it ranks above the worst held
    /// (larger magnitude, or equal and a lower index).
    #[inline(always)]
    pub(super) fn offer(&mut self, magnitude: u32, index: u32) {
        if Self::key(magnitude, index) > self.keys[0] {
            self.enter(magnitude, index);
        }
    }

    /// The order of held values: by magnitude, then the lower index first.
    #[inline(always)]
    pub(super) fn key(magnitude: u32, index: u32) -> u64 {
        (magnitude as u64) << 32 | !index as u64
    }

    /// The index a key was made with.
    #[inline(always)]
    pub(super) fn index_of(key: u64) -> u32 {
        !(key as u32)
    }

    /// The magnitude a newcomer must exceed.
    #[inline(always)]
    pub(super) fn threshold(&self) -> u32 {
        (self.keys[0] >> 32) as u32
    }

    /// A newcomer that ranks above the worst held: the worst leaves and the newcomer takes its place in the
    /// order, without branches (slot j becomes min(a[j+1], max(a[j], x)), the worst's a[0] counted
    /// as below everything and a[k] above).
    #[inline(always)]
    pub(super) fn enter(&mut self, magnitude: u32, index: u32) {
        let x = Self::key(magnitude, index);
        let keys = &mut self.keys[..self.k];
        let last = keys.len() - 1;
        for j in 0..last {
            let below = if j == 0 { 0 } else { keys[j] };
            keys[j] = keys[j + 1].min(below.max(x));
        }
        keys[last] = keys[last].max(x);
    }

    /// The held indices, increasing, into `positions` (length k).
    pub(super) fn positions(&self, positions: &mut [u32]) {
        // Put in order through a bit set of the indices (they are below SMALL_CHUNK here, but
        // any index is handled: by a sort).
        const WORDS: usize = SMALL_CHUNK / 64;
        let keys = &self.keys[..self.k];
        let last = keys
            .iter()
            .map(|&key| Self::index_of(key))
            .max()
            .unwrap_or(0) as usize;
        if last >= SMALL_CHUNK {
            for (position, &key) in positions.iter_mut().zip(keys) {
                *position = Self::index_of(key);
            }
            return positions.sort_unstable();
        }
        let mut set = [0u64; WORDS];
        let set = &mut set[..=last / 64];
        for &key in keys {
            let index = Self::index_of(key) as usize;
            set[index / 64] |= 1 << (index % 64);
        }
        let mut out = positions.iter_mut();
        for (w, &word) in set.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                if let Some(position) = out.next() {
                    *position = (w * 64) as u32 + word.trailing_zeros();
                }
                word &= word - 1;
            }
        }
    }
}

/// The k largest magnitudes among `candidates` (indices in increasing order, at least k), ties
/// to the lower index, into `positions` in index order.
fn keep_top(
    signal: &[f32],
    k: usize,
    candidates: &[u32],
    magnitudes: &mut Vec<u32>,
    positions: &mut [u32],
) {
    let magnitude = |i: u32| signal[i as usize].to_bits() & 0x7fff_ffff;
    // The k-th largest magnitude among the candidates is the threshold; keep everything above it
    // and the lowest-indexed ties.
    magnitudes.clear();
    magnitudes.extend(candidates.iter().map(|&i| magnitude(i)));
    let cut = magnitudes.len() - k;
    let threshold = *magnitudes.select_nth_unstable(cut).1;
    let greater = magnitudes[cut + 1..]
        .iter()
        .filter(|m| **m > threshold)
        .count();
    let mut ties_needed = k - greater;
    let mut at = 0;
    for &i in candidates.iter() {
        let m = magnitude(i);
        if m > threshold || (m == threshold && ties_needed > 0) {
            if m == threshold {
                ties_needed -= 1;
            }
            positions[at] = i;
            at += 1;
        }
    }
    debug_assert_eq!(at, k);
}

/// The index of every value whose magnitude bucket is at least `bucket`, in index order, into
/// `candidates`. A block of values is compared at once into a bit mask; only the set bits are
/// visited. On x86-64 the compare uses AVX-512 or AVX2 when the CPU has them (chosen at run
/// time; every version returns the same indices, tested).
pub(super) fn collect_from(signal: &[f32], bucket: u32, candidates: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            return unsafe { collect_from_avx512(signal, bucket, candidates) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked on the line above).
            return unsafe { collect_from_avx2(signal, bucket, candidates) };
        }
    }
    collect_from_portable(signal, bucket, candidates)
}

/// [`collect_from_portable`] with AVX-512: one compare of 16 lanes gives the block's mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn collect_from_avx512(signal: &[f32], bucket: u32, candidates: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    let threshold = _mm512_set1_epi32((bucket << BUCKET_SHIFT) as i32);
    let magnitude_bits = _mm512_set1_epi32(0x7fff_ffff);
    candidates.clear();
    let mut blocks = signal.chunks_exact(16);
    for (b, block) in blocks.by_ref().enumerate() {
        // SAFETY: `block` holds exactly 16 f32 (64 bytes); the load is unaligned.
        let lanes = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
        let mut mask =
            _mm512_cmpge_epi32_mask(_mm512_and_si512(lanes, magnitude_bits), threshold) as u32;
        while mask != 0 {
            candidates.push((b * 16) as u32 + mask.trailing_zeros());
            mask &= mask - 1;
        }
    }
    collect_tail(signal, blocks.remainder(), bucket, candidates);
}

/// [`collect_from_portable`] with AVX2: two compares of 8 lanes per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) fn collect_from_avx2(signal: &[f32], bucket: u32, candidates: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    // One below the threshold: AVX2 compares only "greater than".
    let below = _mm256_set1_epi32((bucket << BUCKET_SHIFT) as i32 - 1);
    let magnitude_bits = _mm256_set1_epi32(0x7fff_ffff);
    candidates.clear();
    let mut blocks = signal.chunks_exact(8);
    for (b, block) in blocks.by_ref().enumerate() {
        // SAFETY: `block` holds exactly 8 f32 (32 bytes); the load is unaligned.
        let lanes = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
        let above = _mm256_cmpgt_epi32(_mm256_and_si256(lanes, magnitude_bits), below);
        let mut mask = _mm256_movemask_ps(_mm256_castsi256_ps(above)) as u32;
        while mask != 0 {
            candidates.push((b * 8) as u32 + mask.trailing_zeros());
            mask &= mask - 1;
        }
    }
    collect_tail(signal, blocks.remainder(), bucket, candidates);
}

/// The members among the last `tail.len()` values of `signal` (fewer than a block).
fn collect_tail(signal: &[f32], tail: &[f32], bucket: u32, candidates: &mut Vec<u32>) {
    let tail_start = signal.len() - tail.len();
    for (j, v) in tail.iter().enumerate() {
        if (v.to_bits() & 0x7fff_ffff) >> BUCKET_SHIFT >= bucket {
            candidates.push((tail_start + j) as u32);
        }
    }
}

/// The loop every version computes. |v|'s bits are below 2^31, so signed compares are exact
/// (SSE2 and AVX2 have only those).
pub(super) fn collect_from_portable(signal: &[f32], bucket: u32, candidates: &mut Vec<u32>) {
    const BLOCK: usize = 16;
    let threshold = (bucket << BUCKET_SHIFT) as i32;
    let member = |v: &f32| ((v.to_bits() & 0x7fff_ffff) as i32 >= threshold) as u32;
    candidates.clear();
    let mut blocks = signal.chunks_exact(BLOCK);
    for (b, block) in blocks.by_ref().enumerate() {
        let mut mask = 0u32;
        for (j, v) in block.iter().enumerate() {
            mask |= member(v) << j;
        }
        while mask != 0 {
            candidates.push((b * BLOCK) as u32 + mask.trailing_zeros());
            mask &= mask - 1;
        }
    }
    collect_tail(signal, blocks.remainder(), bucket, candidates);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_collect_version_finds_the_same_indices() {
        let mut state = 7u64;
        let signal: Vec<f32> = (0..4099)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5).powi(3);
                if i % 97 == 0 {
                    f32::NAN
                } else if i % 89 == 0 {
                    -0.0
                } else {
                    v
                }
            })
            .collect();
        for bucket in [0u32, 900, 1000, 1010, 1017, 2047] {
            let mut expected = Vec::new();
            collect_from_portable(&signal, bucket, &mut expected);
            let mut found = Vec::new();
            collect_from(&signal, bucket, &mut found);
            assert_eq!(found, expected, "bucket {bucket}");
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    unsafe { collect_from_avx2(&signal, bucket, &mut found) };
                    assert_eq!(found, expected, "avx2, bucket {bucket}");
                }
            }
        }
    }

    /// The selection among all indices (small chunks) and the histogram path both give the textbook top k (magnitude descending, ties to the lower index), with many ties.
    #[test]
    fn every_selection_path_is_the_textbook_top_k() {
        let mut state = 11u64;
        for len in [1usize, 7, 64, 256, 1000, 1024, 1025, 4096] {
            let signal: Vec<f32> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 59) as f32 - 16.0) * 0.25 // 32 levels: ties everywhere
                })
                .collect();
            for k in [1usize, 2, 8, 31, 32, 33, 64] {
                if k > len {
                    continue;
                }
                let mut order: Vec<u32> = (0..len as u32).collect();
                order.sort_by_key(|&i| (std::cmp::Reverse(signal[i as usize].abs().to_bits()), i));
                let mut expected = order[..k].to_vec();
                expected.sort_unstable();
                let (mut candidates, mut magnitudes) = (Vec::new(), Vec::new());
                let mut found = vec![0u32; k];
                select_top(&signal, k, &mut candidates, &mut magnitudes, &mut found);
                assert_eq!(found, expected, "select_top, len {len}, k {k}");
                let all: Vec<u32> = (0..len as u32).collect();
                keep_top(&signal, k, &all, &mut magnitudes, &mut found);
                assert_eq!(found, expected, "keep_top, len {len}, k {k}");
                if k <= FEW {
                    found.fill(u32::MAX);
                    running_top(&signal, k, &mut found);
                    assert_eq!(found, expected, "running_top, len {len}, k {k}");
                }
            }
        }
    }
}
