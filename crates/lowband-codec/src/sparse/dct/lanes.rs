//! Getting chunks into lanes and every lane's top k out: the loads (a 16 × 16 transpose in
//! registers on AVX-512) and the selection.

use super::super::select::{RunningTop, FEW};
use super::{Lanes, LANES};

/// Each chunk's values into its lane (zeros past its end, and in lanes without a chunk), and
/// each lane's largest magnitude (as `max` ignores NaN, like the codecs' `max_abs`).
pub(super) fn load(chunks: &[f32], data: &mut [Lanes]) -> Lanes {
    let n = data.len();
    debug_assert!(chunks.len() <= n * LANES);
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(LANES)
        && chunks.len() == n * LANES
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: the CPU has AVX-512F (checked on the line above); the lengths are as
        // `load_tiles` requires.
        return unsafe { load_tiles(chunks, data) };
    }
    load_portable(chunks, data)
}

/// [`load`] on any CPU, one value at a time.
fn load_portable(chunks: &[f32], data: &mut [Lanes]) -> Lanes {
    let n = data.len();
    if chunks.len() < n * LANES {
        data.fill([0.0; LANES]);
    }
    for (lane, chunk) in chunks.chunks(n).enumerate() {
        for (row, &value) in data.iter_mut().zip(chunk) {
            row[lane] = value;
        }
    }
    let mut largest = [0.0f32; LANES];
    for row in data.iter() {
        for lane in 0..LANES {
            largest[lane] = largest[lane].max(row[lane].abs());
        }
    }
    largest
}

/// [`load`] of 16 full chunks whose length is a multiple of 16: each 16 × 16 tile (16 values of
/// every chunk) is read as 16 vectors, transposed in registers (interleave 32-bit, interleave
/// 64-bit, then two rounds of 128-bit lane shuffles) and written as 16 rows. The largest
/// magnitudes are the same as the portable loop's: `max_ps(|v|, largest)` returns `largest`
/// when |v| is NaN, and `largest` is never NaN.
///
/// # Safety
/// The CPU has AVX-512F, `data.len()` is a multiple of 16 and `chunks.len()` is 16 times it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn load_tiles(chunks: &[f32], data: &mut [Lanes]) -> Lanes {
    use std::arch::x86_64::*;
    let n = data.len();
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let mut largest = _mm512_setzero_ps();
    for start in (0..n).step_by(LANES) {
        let mut rows = [_mm512_setzero_ps(); LANES];
        for (lane, row) in rows.iter_mut().enumerate() {
            // SAFETY: lane · n + start + 16 <= 16 · n = chunks.len().
            let at = unsafe { chunks.as_ptr().add(lane * n + start) };
            // SAFETY: as above.
            *row = unsafe { _mm512_loadu_ps(at) };
            // The next batch's same values are wanted after this batch's transform: ask for them
            // now (a prefetch reads nothing it is not allowed to, wherever it points).
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(LANES * n).cast());
        }
        // Pairs of chunks interleaved by 32 bits, then quads by 64: quad[4g + m] holds, in each
        // 128-bit lane L, value 4L + m of chunks 4g .. 4g + 3.
        let mut pairs = [_mm512_setzero_ps(); LANES];
        for c in 0..LANES / 2 {
            pairs[2 * c] = _mm512_unpacklo_ps(rows[2 * c], rows[2 * c + 1]);
            pairs[2 * c + 1] = _mm512_unpackhi_ps(rows[2 * c], rows[2 * c + 1]);
        }
        let mut quads = [_mm512_setzero_ps(); LANES];
        for g in 0..LANES / 4 {
            let pd = |i: usize| _mm512_castps_pd(pairs[4 * g + i]);
            quads[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(0), pd(2)));
            quads[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(0), pd(2)));
            quads[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(1), pd(3)));
            quads[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(1), pd(3)));
        }
        // Value 4L + m of all 16 chunks: 128-bit lane L of quads m, 4 + m, 8 + m, 12 + m.
        for m in 0..4 {
            let even_low = _mm512_shuffle_f32x4::<0x88>(quads[m], quads[4 + m]);
            let odd_low = _mm512_shuffle_f32x4::<0xdd>(quads[m], quads[4 + m]);
            let even_high = _mm512_shuffle_f32x4::<0x88>(quads[8 + m], quads[12 + m]);
            let odd_high = _mm512_shuffle_f32x4::<0xdd>(quads[8 + m], quads[12 + m]);
            let out = [
                (m, _mm512_shuffle_f32x4::<0x88>(even_low, even_high)),
                (4 + m, _mm512_shuffle_f32x4::<0x88>(odd_low, odd_high)),
                (8 + m, _mm512_shuffle_f32x4::<0xdd>(even_low, even_high)),
                (12 + m, _mm512_shuffle_f32x4::<0xdd>(odd_low, odd_high)),
            ];
            for (offset, row) in out {
                // SAFETY: start + offset < n = data.len(); a row is 16 f32.
                unsafe { _mm512_storeu_ps(data[start + offset].as_mut_ptr(), row) };
                let absolute =
                    _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(row), magnitude));
                largest = _mm512_max_ps(absolute, largest);
            }
        }
    }
    let mut out = [0.0f32; LANES];
    // SAFETY: 16 f32.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), largest) };
    out
}

/// Every lane's k largest magnitudes (ties to the lower index), the exact result of
/// `select::running_top` on each chunk, with few entries. The rows are cut into G = min(FEW, n)
/// groups (group g is rows g·n/G up to (g+1)·n/G, never empty); each lane first holds the k best
/// of its G group maxima (k real values, so its k-th largest is at least the worst of them;
/// found for all lanes at once by an insertion network, so usually near the true k-th), then
/// every value not held is offered: one compare of all lanes per row against each lane's worst
/// held finds the few that can enter. `held_rows` (n entries, all 0) is scratch.
#[inline(always)]
pub(super) fn select_lanes<const WIDE: bool>(
    data: &[Lanes],
    k: usize,
    held: &mut [RunningTop; LANES],
    held_rows: &mut [u16],
) {
    let bits = |v: f32| v.to_bits() & 0x7fff_ffff;
    let n = data.len();
    let groups = FEW.min(n);
    debug_assert!(k <= groups && held_rows.len() == n);
    // The held keys of every lane, worst first.
    let mut top = [[0u64; LANES]; FEW];
    for g in 0..groups {
        let (start, end) = (g * n / groups, (g + 1) * n / groups);
        let (largest, row_of) = group_maximum::<WIDE>(&data[start..end], start as u32);
        let mut key = [0u64; LANES];
        for lane in 0..LANES {
            key[lane] = RunningTop::key(largest[lane], row_of[lane]);
        }
        if g < k {
            // Insert into the g held so far.
            for below in top[..g].iter_mut() {
                for lane in 0..LANES {
                    let (low, high) = (below[lane].min(key[lane]), below[lane].max(key[lane]));
                    below[lane] = low;
                    key[lane] = high;
                }
            }
            top[g] = key;
        } else {
            // Insert and let the worst go: slot j becomes min(top[j+1], max(top[j], key)).
            for lane in 0..LANES {
                key[lane] = key[lane].max(top[0][lane]);
            }
            for j in 0..k - 1 {
                for lane in 0..LANES {
                    let next = top[j + 1][lane];
                    top[j][lane] = next.min(key[lane]);
                    key[lane] = next.max(key[lane]);
                }
            }
            top[k - 1] = key;
        }
    }
    // A value can enter only at or above the worst held's magnitude: `bar` is one below it.
    let mut bar = [0u32; LANES];
    for lane in 0..LANES {
        held[lane] = RunningTop::from_sorted_keys(top[..k].iter().map(|keys| keys[lane]));
        bar[lane] = held[lane].threshold().saturating_sub(1);
        for keys in &top[..k] {
            held_rows[RunningTop::index_of(keys[lane]) as usize] |= 1 << lane;
        }
    }
    for (i, row) in data.iter().enumerate() {
        let mut mask = above::<WIDE>(row, &bar) & !(held_rows[i] as u32);
        held_rows[i] = 0;
        while mask != 0 {
            let lane = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            held[lane].offer(bits(row[lane]), i as u32);
            bar[lane] = held[lane].threshold().saturating_sub(1);
        }
    }
}

/// Each lane's largest magnitude (as bits) in `rows` and its row, the first of equal ones
/// (`rows` starts at row `start`, and is not empty).
#[inline(always)]
fn group_maximum<const WIDE: bool>(rows: &[Lanes], start: u32) -> ([u32; LANES], [u32; LANES]) {
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: `WIDE` code runs only inside `compute_avx512`, on a CPU with AVX-512F.
        return unsafe { group_maximum_avx512(rows, start) };
    }
    let (mut largest, mut row_of) = ([0u32; LANES], [start; LANES]);
    for (row, i) in rows.iter().zip(start..) {
        for lane in 0..LANES {
            let m = row[lane].to_bits() & 0x7fff_ffff;
            if m > largest[lane] || i == start {
                largest[lane] = m;
                row_of[lane] = i;
            }
        }
    }
    (largest, row_of)
}

/// [`group_maximum`] with AVX-512 compares and masked moves (LLVM loads the portable loop's
/// lanes one by one).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn group_maximum_avx512(rows: &[Lanes], start: u32) -> ([u32; LANES], [u32; LANES]) {
    use std::arch::x86_64::*;
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    // SAFETY: a row is 16 × 4 bytes; the loads are unaligned.
    let load = |row: &Lanes| unsafe { _mm512_loadu_si512(row.as_ptr().cast()) };
    let mut largest = _mm512_and_si512(load(&rows[0]), magnitude);
    let mut row_of = _mm512_set1_epi32(start as i32);
    // No iterator adapter: its `next` could be compiled outside the AVX-512 build.
    let mut i = start;
    for row in &rows[1..] {
        i += 1;
        let m = _mm512_and_si512(load(row), magnitude);
        let greater = _mm512_cmpgt_epu32_mask(m, largest);
        largest = _mm512_mask_mov_epi32(largest, greater, m);
        row_of = _mm512_mask_mov_epi32(row_of, greater, _mm512_set1_epi32(i as i32));
    }
    let (mut out_largest, mut out_row) = ([0u32; LANES], [0u32; LANES]);
    // SAFETY: 16 × 4 bytes each.
    unsafe {
        _mm512_storeu_si512(out_largest.as_mut_ptr().cast(), largest);
        _mm512_storeu_si512(out_row.as_mut_ptr().cast(), row_of);
    }
    (out_largest, out_row)
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

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_transposing_load_is_the_portable_one_bitwise() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            crate::record_skip(
                "the_transposing_load",
                "SKIPPED: the CPU has no AVX-512F; the portable load is the only one",
            );
            return;
        }
        for n in [16usize, 32, 256] {
            // Every value distinct, with NaN, infinities, -0 and a subnormal among them.
            let mut chunks: Vec<f32> = (0..LANES * n)
                .map(|i| (i as f32 * 0.37).sin() * (1 + i % 7) as f32)
                .collect();
            chunks[3] = f32::NAN;
            chunks[n + 5] = f32::INFINITY;
            chunks[2 * n + 7] = -0.0;
            chunks[5 * n] = f32::NEG_INFINITY;
            chunks[9 * n + 1] = 1e-40;
            chunks[15 * n + n - 1] = -f32::NAN;
            let (mut wide, mut portable) = (vec![[0.0; LANES]; n], vec![[0.0; LANES]; n]);
            // SAFETY: the CPU has AVX-512F; 16 full chunks of a multiple of 16.
            let wide_largest = unsafe { load_tiles(&chunks, &mut wide) };
            let portable_largest = load_portable(&chunks, &mut portable);
            let bits = |rows: &[Lanes]| -> Vec<u32> {
                rows.iter().flatten().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(&wide), bits(&portable), "n {n}");
            assert_eq!(
                wide_largest.map(f32::to_bits),
                portable_largest.map(f32::to_bits)
            );
            assert_eq!(portable[7][2].to_bits(), (-0.0f32).to_bits());
            assert_eq!(portable[n - 1][15].to_bits(), (-f32::NAN).to_bits());
            assert_eq!(
                portable_largest[0],
                chunks[..n].iter().fold(0.0f32, |m, v| m.max(v.abs()))
            );
            assert!(portable_largest[1].is_infinite() && portable_largest[9] > 1.0);
        }
    }
}
