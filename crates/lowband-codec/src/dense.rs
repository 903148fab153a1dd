//! Dense codecs: `fp32`, `fp16` / `bf16` with a per-chunk scale, and `int8` / `int4` / `int2`.
//!
//! Every encoder and decoder runs on all of rayon's threads: the body is cut at chunk (or block)
//! boundaries, which fall on byte boundaries, and each piece is written or read on its own. The
//! bytes are the same as a one-thread pass (`tests/golden.rs`); the stochastic rounding of `int`
//! draws value i's random number from the stream's i-th state, so it needs no order either.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::bits::{BitReader, BitWriter, SplitMix64};
use crate::spec::{Range, Rounding};
use crate::{check_payload, count_u32, read_f32, Codec, CodecError, CodecSpec};

/// `fp32`: the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fp32;

impl Fp32 {
    /// Check an fp32 payload of `count` values without decoding it (header, exact length, every
    /// value finite): a receiver that must not touch its buffer on a bad payload checks first,
    /// then decodes in place (what decode can then not refuse).
    pub fn check(&self, payload: &[u8], count: usize) -> Result<(), CodecError> {
        check_payload(&CodecSpec::Fp32, payload, count)?;
        let body = &payload[CodecSpec::Fp32.header_bytes()..];
        first_error(
            body.par_chunks(4 * VALUES_PER_TASK)
                .enumerate()
                .map(|(t, bytes)| {
                    match bytes
                        .chunks_exact(4)
                        .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
                    {
                        Some(i) => Err(CodecError::NonFinite {
                            index: t * VALUES_PER_TASK + i,
                        }),
                        None => Ok(()),
                    }
                }),
        )
    }
}

impl Codec for Fp32 {
    fn spec(&self) -> &CodecSpec {
        &CodecSpec::Fp32
    }

    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(self.payload_bytes(values.len()));
        CodecSpec::Fp32.write_header(count_u32(values), 0, out);
        let body = grow(out, 4 * values.len());
        body.par_chunks_mut(4 * VALUES_PER_TASK)
            .zip(values.par_chunks(VALUES_PER_TASK))
            .for_each(|(bytes, values)| {
                for (b, v) in bytes.chunks_exact_mut(4).zip(values) {
                    b.copy_from_slice(&v.to_le_bytes());
                }
            });
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        check_payload(&CodecSpec::Fp32, payload, out.len())?;
        let body = &payload[CodecSpec::Fp32.header_bytes()..];
        first_error(
            out.par_chunks_mut(VALUES_PER_TASK)
                .zip(body.par_chunks(4 * VALUES_PER_TASK))
                .enumerate()
                .map(|(t, (out, bytes))| {
                    for (i, (o, b)) in out.iter_mut().zip(bytes.chunks_exact(4)).enumerate() {
                        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        if !v.is_finite() {
                            return Err(CodecError::NonFinite {
                                index: t * VALUES_PER_TASK + i,
                            });
                        }
                        *o = v;
                    }
                    Ok(())
                }),
        )
    }
}

/// Values per parallel task of the codecs without chunks (fp32).
const VALUES_PER_TASK: usize = 1 << 15;

/// `bytes` more zeroed bytes at the end of `out`, to be written in place.
fn grow(out: &mut Vec<u8>, bytes: usize) -> &mut [u8] {
    let start = out.len();
    out.resize(start + bytes, 0);
    &mut out[start..]
}

/// The error of the lowest piece that failed (so an error names the same index however the work
/// was split), or Ok.
fn first_error(
    results: impl IndexedParallelIterator<Item = Result<(), CodecError>>,
) -> Result<(), CodecError> {
    let results: Vec<Result<(), CodecError>> = results.collect();
    results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

/// Largest magnitude of a slice (0 for an empty one; NaN-free inputs assumed, NaN is skipped).
pub(crate) fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// `fp16` and `bf16`: each chunk is divided by its largest magnitude (stored as f32), so the halves
/// hold values in [-1, 1] and no input overflows them.
pub struct HalfFloat {
    spec: CodecSpec,
    brain: bool,
    chunk: usize,
}

impl HalfFloat {
    pub fn new(spec: CodecSpec) -> Self {
        let (brain, chunk) = match spec {
            CodecSpec::Fp16 { chunk } => (false, chunk),
            CodecSpec::Bf16 { chunk } => (true, chunk),
            _ => unreachable!("HalfFloat is built for fp16 and bf16 only"),
        };
        HalfFloat {
            spec,
            brain,
            chunk: chunk as usize,
        }
    }
}

impl Codec for HalfFloat {
    fn spec(&self) -> &CodecSpec {
        &self.spec
    }

    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(self.payload_bytes(values.len()));
        self.spec.write_header(count_u32(values), 0, out);
        let scales: Vec<f32> = values.par_chunks(self.chunk).map(scale_of).collect();
        for scale in &scales {
            out.extend_from_slice(&scale.to_le_bytes());
        }
        let brain = self.brain;
        let body = grow(out, 2 * values.len());
        body.par_chunks_mut(2 * self.chunk)
            .zip(values.par_chunks(self.chunk))
            .zip(&scales)
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(units, halves): &mut (Vec<f32>, Vec<u16>), ((bytes, chunk), &scale)| {
                    // Division, not a reciprocal: 1 / a subnormal scale overflows.
                    units.clear();
                    units.extend(chunk.iter().map(|&v| v / scale));
                    halves.resize(chunk.len(), 0);
                    // Whole slices at once: `half` converts them with the CPU's conversion
                    // instructions when it has them (the same rounding as one at a time).
                    if brain {
                        halves
                            .reinterpret_cast_mut::<bf16>()
                            .convert_from_f32_slice(units);
                    } else {
                        halves
                            .reinterpret_cast_mut::<f16>()
                            .convert_from_f32_slice(units);
                    }
                    for (b, h) in bytes.chunks_exact_mut(2).zip(halves.iter()) {
                        b.copy_from_slice(&h.to_le_bytes());
                    }
                },
            );
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        check_payload(&self.spec, payload, out.len())?;
        let chunks = out.len().div_ceil(self.chunk);
        let scales_at = self.spec.header_bytes();
        let halves = &payload[scales_at + 4 * chunks..];
        let (brain, size) = (self.brain, self.chunk);
        first_error(
            out.par_chunks_mut(size)
                .zip(halves.par_chunks(2 * size))
                .enumerate()
                .map_init(Vec::new, |bits: &mut Vec<u16>, (c, (chunk, bytes))| {
                    let scale = read_f32(payload, scales_at + 4 * c);
                    if !(scale.is_finite() && scale > 0.0) {
                        return Err(CodecError::NonFinite { index: c * size });
                    }
                    bits.clear();
                    bits.extend(
                        bytes
                            .chunks_exact(2)
                            .map(|b| u16::from_le_bytes([b[0], b[1]])),
                    );
                    // Whole slices at once (the CPU's conversion instructions when it has them).
                    if brain {
                        bits.reinterpret_cast::<bf16>().convert_to_f32_slice(chunk);
                    } else {
                        bits.reinterpret_cast::<f16>().convert_to_f32_slice(chunk);
                    }
                    for (i, o) in chunk.iter_mut().enumerate() {
                        *o *= scale;
                        if !o.is_finite() {
                            return Err(CodecError::NonFinite {
                                index: c * size + i,
                            });
                        }
                    }
                    Ok(())
                }),
        )
    }
}

/// A chunk's scale: its largest magnitude, or 1 for an all-zero chunk (so the scale is always a
/// positive finite number and dividing by it is safe).
fn scale_of(chunk: &[f32]) -> f32 {
    let m = max_abs(chunk);
    if m > 0.0 && m.is_finite() {
        m
    } else {
        1.0
    }
}

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

    fn range_of(&self, chunk: &[f32]) -> (f32, f32) {
        let (min, max) = chunk
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
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
        let ranges: Vec<(f32, f32)> = values
            .par_chunks(self.chunk)
            .map(|chunk| self.range_of(chunk))
            .collect();
        for (lo, hi) in &ranges {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
        if !self.byte_aligned() {
            return self.encode_serial(values, &ranges, out);
        }
        let (bits, size, rounding) = (self.bits, self.chunk, self.rounding);
        let levels = ((1u32 << bits) - 1) as f32;
        let stream = SplitMix64(self.random.0);
        let body = grow(out, (values.len() * bits as usize).div_ceil(8));
        body.par_chunks_mut(size * bits as usize / 8)
            .zip(values.par_chunks(size))
            .zip(&ranges)
            .enumerate()
            .for_each(|(c, ((bytes, chunk), &range))| {
                let quantizer = Quantizer::of(range, levels);
                let mut random = stream.skipped((c * size) as u64);
                let codes = chunk
                    .iter()
                    .map(|&v| quantizer.code(v, rounding, &mut random));
                pack(bytes, codes, bits);
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
                    let step = (hi as f64 - lo as f64) / levels;
                    for (o, code) in chunk.iter_mut().zip(unpack(bytes, bits)) {
                        // Clamped, so rounding can never step outside [lo, hi] (or to infinity).
                        *o = (lo as f64 + code as f64 * step).clamp(lo as f64, hi as f64) as f32;
                    }
                    Ok(())
                }),
        )
    }
}

impl Int {
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
                (position + random.next_unit_f32()).floor().min(self.levels) as u32
            }
        }
    }
}

/// `codes` of `bits` bits (8, 4 or 2) into `bytes`, least significant bits first (as
/// `BitWriter` lays them out); a last byte's unused bits are 0.
#[inline]
fn pack(bytes: &mut [u8], mut codes: impl Iterator<Item = u32>, bits: u32) {
    let per_byte = 8 / bits;
    for byte in bytes.iter_mut() {
        let mut packed = 0u8;
        for slot in 0..per_byte {
            match codes.next() {
                Some(code) => packed |= (code as u8) << (slot * bits),
                None => break,
            }
        }
        *byte = packed;
    }
}

/// The `bits`-bit codes of `bytes`, in the order `pack` wrote them.
#[inline]
fn unpack(bytes: &[u8], bits: u32) -> impl Iterator<Item = u32> + '_ {
    let per_byte = 8 / bits;
    let mask = ((1u32 << bits) - 1) as u8;
    bytes
        .iter()
        .flat_map(move |&b| (0..per_byte).map(move |slot| ((b >> (slot * bits)) & mask) as u32))
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
}
