//! `int8`, `int4`, `int2`: per-chunk ranges and b-bit codes, each chunk in one task (its range
//! and its codes while it is in cache), the per-value loops in blocks that vectorize (AVX-512
//! when the CPU has it, the same IEEE operations either way, so the same bytes).

use rayon::prelude::*;

use super::{first_error, grow};
use crate::bits::{BitReader, BitWriter, SplitMix64};
use crate::spec::{Range, Rounding};
use crate::{check_payload, count_u32, read_f32, Codec, CodecError, CodecSpec};

/// `int8`, `int4`, `int2`: per chunk a range [lo, hi] (two f32) and b-bit codes of the 2^b levels
/// lo + q·(hi − lo)/(2^b − 1).
pub struct Int {
    spec: CodecSpec,
    bits: u32,
    chunk: usize,
    range: Range,
    rounding: Rounding,
    random: SplitMix64,
}

impl Int {
    pub fn new(spec: CodecSpec) -> Self {
        let CodecSpec::Int {
            bits,
            chunk,
            range,
            rounding,
            seed,
        } = spec
        else {
            unreachable!("Int is built for int codecs only")
        };
        Int {
            spec,
            bits: bits as u32,
            chunk: chunk as usize,
            range,
            rounding,
            random: SplitMix64(seed),
        }
    }

    #[inline(always)]
    fn range_of(&self, chunk: &[f32]) -> (f32, f32) {
        let (min, max) = min_max(chunk);
        if !(min.is_finite() && max.is_finite()) {
            return (0.0, 0.0);
        }
        match self.range {
            Range::MinMax => (min, max),
            Range::Std(k) => {
                let n = chunk.len() as f64;
                let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = chunk
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n;
                let half_width = k as f64 * var.sqrt();
                (
                    ((mean - half_width).max(min as f64)) as f32,
                    ((mean + half_width).min(max as f64)) as f32,
                )
            }
        }
    }
}

impl Codec for Int {
    fn spec(&self) -> &CodecSpec {
        &self.spec
    }

    fn random_state(&self) -> Option<u64> {
        (self.rounding == Rounding::Stochastic).then_some(self.random.0)
    }

    fn set_random_state(&mut self, state: u64) {
        self.random.0 = state;
    }

    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(self.payload_bytes(values.len()));
        self.spec.write_header(count_u32(values), 0, out);
        let chunks = values.len().div_ceil(self.chunk);
        if !self.byte_aligned() {
            let ranges: Vec<(f32, f32)> = values
                .par_chunks(self.chunk)
                .map(|chunk| self.range_of(chunk))
                .collect();
            for (lo, hi) in &ranges {
                out.extend_from_slice(&lo.to_le_bytes());
                out.extend_from_slice(&hi.to_le_bytes());
            }
            return self.encode_serial(values, &ranges, out);
        }
        // Every chunk in one task: its range (into the ranges' table) and its codes (into its
        // bytes) while the chunk is in cache.
        let (bits, size, rounding) = (self.bits, self.chunk, self.rounding);
        let levels = ((1u32 << bits) - 1) as f32;
        let stream = SplitMix64(self.random.0);
        let table_and_body = grow(out, 8 * chunks + (values.len() * bits as usize).div_ceil(8));
        let (table, body) = table_and_body.split_at_mut(8 * chunks);
        let this = &*self;
        body.par_chunks_mut(size * bits as usize / 8)
            .zip(values.par_chunks(size))
            .zip(table.par_chunks_mut(8))
            .enumerate()
            .for_each(|(c, ((bytes, chunk), range_bytes))| {
                let random = stream.skipped((c * size) as u64);
                this.encode_chunk(chunk, range_bytes, bytes, levels, random);
            });
        if rounding == Rounding::Stochastic {
            self.random = stream.skipped(values.len() as u64);
        }
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        check_payload(&self.spec, payload, out.len())?;
        let chunks = out.len().div_ceil(self.chunk);
        let ranges_at = self.spec.header_bytes();
        let body = &payload[ranges_at + 8 * chunks..];
        if !self.byte_aligned() {
            return self.decode_serial(payload, body, out);
        }
        let (bits, size) = (self.bits, self.chunk);
        let levels = ((1u32 << bits) - 1) as f64;
        first_error(
            out.par_chunks_mut(size)
                .zip(body.par_chunks(size * bits as usize / 8))
                .enumerate()
                .map(|(c, (chunk, bytes))| {
                    let (lo, hi) = chunk_range(payload, ranges_at, c, size)?;
                    dequantize(chunk, bytes, bits, (lo, hi), levels);
                    Ok(())
                }),
        )
    }
}

impl Int {
    /// One chunk of a byte-aligned packet: its range into `range_bytes` (lo, hi) and its codes
    /// into `bytes`; `random` is the stream's state at the chunk's first value. On a CPU with
    /// AVX-512, all of it is compiled for AVX-512 (the same IEEE operations, so the same bytes).
    fn encode_chunk(
        &self,
        chunk: &[f32],
        range_bytes: &mut [u8],
        bytes: &mut [u8],
        levels: f32,
        random: SplitMix64,
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has these features (checked above).
            return unsafe { self.encode_chunk_avx512(chunk, range_bytes, bytes, levels, random) };
        }
        self.encode_chunk_portable(chunk, range_bytes, bytes, levels, random)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl")]
    fn encode_chunk_avx512(
        &self,
        chunk: &[f32],
        range_bytes: &mut [u8],
        bytes: &mut [u8],
        levels: f32,
        random: SplitMix64,
    ) {
        self.encode_chunk_portable(chunk, range_bytes, bytes, levels, random)
    }

    #[inline(always)]
    fn encode_chunk_portable(
        &self,
        chunk: &[f32],
        range_bytes: &mut [u8],
        bytes: &mut [u8],
        levels: f32,
        random: SplitMix64,
    ) {
        let (lo, hi) = self.range_of(chunk);
        range_bytes[..4].copy_from_slice(&lo.to_le_bytes());
        range_bytes[4..].copy_from_slice(&hi.to_le_bytes());
        let quantizer = Quantizer::of((lo, hi), levels);
        quantizer.encode_codes(chunk, bytes, self.bits, self.rounding, random);
    }

    /// Whether every chunk's codes start on a byte (then chunks are encoded and decoded in
    /// parallel; otherwise one bit stream runs through them).
    fn byte_aligned(&self) -> bool {
        (self.chunk * self.bits as usize).is_multiple_of(8)
    }

    fn encode_serial(&mut self, values: &[f32], ranges: &[(f32, f32)], out: &mut Vec<u8>) {
        let levels = ((1u32 << self.bits) - 1) as f32;
        let mut writer = BitWriter::new(out);
        for (chunk, &range) in values.chunks(self.chunk).zip(ranges) {
            let quantizer = Quantizer::of(range, levels);
            for &v in chunk {
                writer.write(
                    quantizer.code(v, self.rounding, &mut self.random),
                    self.bits,
                );
            }
        }
        writer.finish();
    }

    fn decode_serial(
        &self,
        payload: &[u8],
        body: &[u8],
        out: &mut [f32],
    ) -> Result<(), CodecError> {
        let ranges_at = self.spec.header_bytes();
        let mut reader = BitReader::new(body);
        let levels = ((1u32 << self.bits) - 1) as f64;
        for (c, chunk) in out.chunks_mut(self.chunk).enumerate() {
            let (lo, hi) = chunk_range(payload, ranges_at, c, self.chunk)?;
            let step = (hi as f64 - lo as f64) / levels;
            for o in chunk.iter_mut() {
                let code = reader.read(self.bits) as f64;
                *o = (lo as f64 + code * step).clamp(lo as f64, hi as f64) as f32;
            }
        }
        Ok(())
    }
}

/// Whether the CPU has the AVX-512 parts the `_avx512` builds of the block loops are compiled
/// for (checked once; cached by the standard library).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// A chunk's values from its packed codes: lo + code · (hi − lo) / levels in f64, clamped to
/// [lo, hi] (so rounding can never step outside it, or to infinity). Blocks of 64 codes are
/// unpacked to bytes first so that the arithmetic vectorizes (AVX-512 when the CPU has it: the
/// same IEEE operations, so the same values).
fn dequantize(chunk: &mut [f32], bytes: &[u8], bits: u32, range: (f32, f32), levels: f64) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has these features (checked above).
        return unsafe { dequantize_avx512(chunk, bytes, bits, range, levels) };
    }
    dequantize_portable(chunk, bytes, bits, range, levels)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl")]
fn dequantize_avx512(chunk: &mut [f32], bytes: &[u8], bits: u32, range: (f32, f32), levels: f64) {
    dequantize_portable(chunk, bytes, bits, range, levels)
}

#[inline(always)]
fn dequantize_portable(
    chunk: &mut [f32],
    bytes: &[u8],
    bits: u32,
    (lo, hi): (f32, f32),
    levels: f64,
) {
    const BLOCK: usize = 64;
    let per_byte = (8 / bits) as usize;
    let step = (hi as f64 - lo as f64) / levels;
    let (lo, hi) = (lo as f64, hi as f64);
    let mut codes = [0u8; BLOCK];
    for (block, packed) in chunk.chunks_mut(BLOCK).zip(bytes.chunks(BLOCK / per_byte)) {
        let codes = &mut codes[..block.len()];
        unpack_codes(codes, packed, bits);
        for (o, &code) in block.iter_mut().zip(codes.iter()) {
            *o = (lo + code as f64 * step).clamp(lo, hi) as f32;
        }
    }
}

/// The inverse of [`pack_codes`]: one code per byte of `codes` (its length says how many).
#[inline(always)]
fn unpack_codes(codes: &mut [u8], bytes: &[u8], bits: u32) {
    match bits {
        8 => codes.copy_from_slice(&bytes[..codes.len()]),
        4 => {
            for (j, c) in codes.iter_mut().enumerate() {
                *c = (bytes[j / 2] >> (4 * (j % 2))) & 0xf;
            }
        }
        _ => {
            for (j, c) in codes.iter_mut().enumerate() {
                *c = (bytes[j / 4] >> (2 * (j % 4))) & 0x3;
            }
        }
    }
}

/// Chunk c's range from the payload, checked: finite, lo <= hi.
fn chunk_range(
    payload: &[u8],
    ranges_at: usize,
    c: usize,
    size: usize,
) -> Result<(f32, f32), CodecError> {
    let lo = read_f32(payload, ranges_at + 8 * c);
    let hi = read_f32(payload, ranges_at + 8 * c + 4);
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(CodecError::NonFinite { index: c * size });
    }
    if lo > hi {
        return Err(CodecError::Malformed("a chunk's range has lo > hi"));
    }
    Ok((lo, hi))
}

/// How one chunk's values become codes: f32 arithmetic unless the range overflows f32 (|lo|,
/// |hi| near f32::MAX) or is so narrow (denormal) that levels / width does.
#[derive(Clone, Copy)]
struct Quantizer {
    lo: f32,
    per_unit: f32,
    fast: bool,
    per_unit_wide: f64,
    levels: f32,
}

impl Quantizer {
    fn of((lo, hi): (f32, f32), levels: f32) -> Quantizer {
        let width = hi - lo;
        let per_unit = if width > 0.0 { levels / width } else { 0.0 };
        Quantizer {
            lo,
            per_unit,
            fast: width.is_finite() && per_unit.is_finite(),
            per_unit_wide: if hi as f64 > lo as f64 {
                levels as f64 / (hi as f64 - lo as f64)
            } else {
                0.0
            },
            levels,
        }
    }

    /// The code of `v`: its position among the levels, rounded to the nearest, or up with the
    /// probability of its fraction (one draw of `random`).
    #[inline]
    fn code(&self, v: f32, rounding: Rounding, random: &mut SplitMix64) -> u32 {
        let position = if self.fast {
            ((v - self.lo) * self.per_unit).clamp(0.0, self.levels)
        } else {
            ((v as f64 - self.lo as f64) * self.per_unit_wide).clamp(0.0, self.levels as f64) as f32
        };
        match rounding {
            // `position.round()` for a position in [0, levels] (or NaN, which gives 0), without
            // the rounding library call: truncation, then up at a fraction of one half or more
            // (the fraction is exact: both are below 2^24).
            Rounding::Nearest => {
                let truncated = position as u32;
                truncated + u32::from(position - truncated as f32 >= 0.5)
            }
            Rounding::Stochastic => {
                stochastic_level(position + random.next_unit_f32(), self.levels)
            }
        }
    }

    /// A chunk's codes into `bytes` (packed as [`pack_codes`] does), in blocks of 64 values whose
    /// loops the compiler can vectorize (the fast path of [`Quantizer::code`], same arithmetic);
    /// `random` is the stream's state at the chunk's first value. Inlined into
    /// [`Int::encode_chunk`]'s builds (AVX-512: 16 lanes, and the random stream's 64-bit
    /// multiplies in vectors).
    #[inline(always)]
    fn encode_codes(
        &self,
        chunk: &[f32],
        bytes: &mut [u8],
        bits: u32,
        rounding: Rounding,
        mut random: SplitMix64,
    ) {
        const BLOCK: usize = 64;
        let per_byte = (8 / bits) as usize;
        let mut codes = [0u8; BLOCK];
        for (block, out) in chunk.chunks(BLOCK).zip(bytes.chunks_mut(BLOCK / per_byte)) {
            let codes = &mut codes[..block.len()];
            match (rounding, self.fast) {
                (Rounding::Nearest, true) => {
                    for (c, &v) in codes.iter_mut().zip(block) {
                        // `clamp` with NaN taken to 0 (`max` returns the number), as `as` did.
                        let position = ((v - self.lo) * self.per_unit).max(0.0).min(self.levels);
                        // SAFETY: 0 <= position <= levels < 256, finite, so its truncation fits
                        // an i32. (The checked `as` made the compiler take lanes one by one.)
                        let truncated = unsafe { position.to_int_unchecked::<i32>() };
                        *c = (truncated + i32::from(position - truncated as f32 >= 0.5)) as u8;
                    }
                }
                (Rounding::Stochastic, true) => {
                    // Draw j of the block is the stream's state + (j + 1) steps: computed
                    // from j, not from the draw before, so the draws vectorize.
                    let first = random;
                    for (j, (c, &v)) in codes.iter_mut().zip(block).enumerate() {
                        let position = ((v - self.lo) * self.per_unit).clamp(0.0, self.levels);
                        let unit = first.skipped(j as u64).next_unit_f32();
                        *c = stochastic_level(position + unit, self.levels) as u8;
                    }
                    random = first.skipped(block.len() as u64);
                }
                _ => {
                    for (c, &v) in codes.iter_mut().zip(block) {
                        *c = self.code(v, rounding, &mut random) as u8;
                    }
                }
            }
            pack_codes(out, codes, bits);
        }
    }
}

/// ⌊x⌋ capped at `levels` for x = position + u in [0, levels + 1) (truncation is the floor
/// there, without the library call); NaN (a NaN input) gives `levels`, as `f32::min` did.
#[inline(always)]
fn stochastic_level(x: f32, levels: f32) -> u32 {
    // `min` gives `levels` for NaN, `max` keeps a (never seen) negative x at 0.
    let level = x.min(levels).max(0.0);
    // SAFETY: 0 <= level <= levels < 256, finite, so its truncation fits an i32. (The checked
    // `as` conversion made the compiler take the lanes one by one.)
    unsafe { level.to_int_unchecked::<i32>() as u32 }
}

/// The smallest and largest value of `values` ignoring NaN (±infinity when there is none), in
/// 8 lanes so that the loop vectorizes.
#[inline(always)]
fn min_max(values: &[f32]) -> (f32, f32) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let lanes = values.chunks_exact(8);
    let rest = lanes.remainder();
    for lane in lanes {
        for j in 0..8 {
            lo[j] = if lane[j] < lo[j] { lane[j] } else { lo[j] };
            hi[j] = if lane[j] > hi[j] { lane[j] } else { hi[j] };
        }
    }
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in lo.iter().chain(rest) {
        min = if v < min { v } else { min };
    }
    for &v in hi.iter().chain(rest) {
        max = if v > max { v } else { max };
    }
    (min, max)
}

/// Codes of `bits` bits (8, 4 or 2), one per byte of `codes`, into `bytes`, least significant
/// bits first (as `BitWriter` lays them out); a last byte's unused bits are 0. One loop per
/// width (they vectorize).
#[inline(always)]
fn pack_codes(bytes: &mut [u8], codes: &[u8], bits: u32) {
    match bits {
        8 => bytes.copy_from_slice(codes),
        4 => {
            let pairs = codes.chunks_exact(2);
            let last = pairs.remainder();
            for (byte, pair) in bytes.iter_mut().zip(pairs) {
                *byte = pair[0] | pair[1] << 4;
            }
            if let [code] = last {
                bytes[codes.len() / 2] = *code;
            }
        }
        _ => {
            debug_assert_eq!(bits, 2);
            let quads = codes.chunks_exact(4);
            let last = quads.remainder();
            for (byte, quad) in bytes.iter_mut().zip(quads) {
                *byte = quad[0] | quad[1] << 2 | quad[2] << 4 | quad[3] << 6;
            }
            if !last.is_empty() {
                let mut packed = 0u8;
                for (slot, c) in last.iter().enumerate() {
                    packed |= c << (2 * slot);
                }
                bytes[codes.len() / 4] = packed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(n: usize) -> Vec<f32> {
        let mut state = 7u64;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5).powi(3)
            })
            .collect()
    }

    /// The parallel int encoder and decoder give the bytes and values of the one-stream pass,
    /// the stochastic stream included (its state after the packet too).
    #[test]
    fn the_parallel_int_codec_is_the_serial_one() {
        let values = input(100_003);
        for text in [
            "int8",
            "int4:chunk=1000",
            "int2:range=std:2",
            "int8:round=stochastic,seed=5",
            "int2:round=stochastic,seed=9,chunk=4100",
        ] {
            let spec: CodecSpec = text.parse().unwrap();
            let (mut parallel, mut serial) = (Int::new(spec), Int::new(spec));
            assert!(parallel.byte_aligned(), "{text}");
            for _ in 0..2 {
                let mut fast = Vec::new();
                parallel.encode(&values, &mut fast);
                let mut slow = Vec::new();
                serial.spec.write_header(count_u32(&values), 0, &mut slow);
                let ranges: Vec<(f32, f32)> = values
                    .chunks(serial.chunk)
                    .map(|c| serial.range_of(c))
                    .collect();
                for (lo, hi) in &ranges {
                    slow.extend_from_slice(&lo.to_le_bytes());
                    slow.extend_from_slice(&hi.to_le_bytes());
                }
                serial.encode_serial(&values, &ranges, &mut slow);
                assert_eq!(fast, slow, "{text}");
                assert_eq!(
                    parallel.random.0, serial.random.0,
                    "{text}: the stream's state"
                );
                let (mut a, mut b) = (vec![0.0; values.len()], vec![0.0; values.len()]);
                parallel.decode(&fast, &mut a).unwrap();
                let body = &fast[spec.header_bytes() + 8 * values.len().div_ceil(serial.chunk)..];
                serial.decode_serial(&fast, body, &mut b).unwrap();
                assert_eq!(
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{text}"
                );
            }
        }
    }

    /// The portable block loops give the bytes and values of the dispatched ones (AVX-512 on
    /// this machine), for every width, rounding and range rule, with ordinary, huge, denormal and
    /// NaN values.
    #[test]
    fn the_portable_loops_are_the_dispatched_ones() {
        let mut values = input(10_000);
        values[5_000..5_100].fill(3e38);
        values[5_050] = -3e38;
        for (i, v) in values[7_000..7_300].iter_mut().enumerate() {
            *v = f32::from_bits(1 + i as u32 * 3); // denormals
        }
        for i in [8_001, 8_002, 8_050, 8_099] {
            values[i] = f32::NAN;
        }
        for bits in [8u8, 4, 2] {
            let levels = ((1u32 << bits) - 1) as f32;
            for rounding in [Rounding::Nearest, Rounding::Stochastic] {
                for range in [Range::MinMax, Range::Std(2.0)] {
                    let spec = CodecSpec::Int {
                        bits,
                        chunk: 100,
                        range,
                        rounding,
                        seed: 11,
                    };
                    let int = Int::new(spec);
                    for (c, chunk) in values.chunks(100).enumerate() {
                        let random = SplitMix64(11).skipped(c as u64 * 100);
                        let len = (chunk.len() * bits as usize).div_ceil(8);
                        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                        let (mut range_a, mut range_b) = ([0u8; 8], [0u8; 8]);
                        int.encode_chunk(chunk, &mut range_a, &mut a, levels, random);
                        int.encode_chunk_portable(chunk, &mut range_b, &mut b, levels, random);
                        assert_eq!(
                            (a.as_slice(), range_a),
                            (b.as_slice(), range_b),
                            "{spec}, chunk {c}"
                        );
                        let lo = f32::from_le_bytes(range_a[..4].try_into().unwrap());
                        let hi = f32::from_le_bytes(range_a[4..].try_into().unwrap());
                        let (mut x, mut y) = (vec![0f32; chunk.len()], vec![0f32; chunk.len()]);
                        dequantize(&mut x, &a, bits as u32, (lo, hi), levels as f64);
                        dequantize_portable(&mut y, &a, bits as u32, (lo, hi), levels as f64);
                        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
                    }
                }
            }
        }
    }
}
