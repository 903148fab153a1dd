//! Dense codecs: `fp32`, `fp16` / `bf16` with a per-chunk scale, and `int8` / `int4` / `int2`.

use half::{bf16, f16};

use crate::bits::{BitReader, BitWriter, SplitMix64};
use crate::spec::{Range, Rounding};
use crate::{check_payload, count_u32, read_f32, Codec, CodecError, CodecSpec};

/// `fp32`: the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fp32;

impl Codec for Fp32 {
    fn spec(&self) -> &CodecSpec {
        &CodecSpec::Fp32
    }

    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(self.payload_bytes(values.len()));
        CodecSpec::Fp32.write_header(count_u32(values), 0, out);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        check_payload(&CodecSpec::Fp32, payload, out.len())?;
        let body = &payload[CodecSpec::Fp32.header_bytes()..];
        for (i, (o, b)) in out.iter_mut().zip(body.chunks_exact(4)).enumerate() {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if !v.is_finite() {
                return Err(CodecError::NonFinite { index: i });
            }
            *o = v;
        }
        Ok(())
    }
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
        for chunk in values.chunks(self.chunk) {
            out.extend_from_slice(&scale_of(chunk).to_le_bytes());
        }
        for chunk in values.chunks(self.chunk) {
            let scale = scale_of(chunk);
            for &v in chunk {
                // Division, not a reciprocal: 1 / a subnormal scale overflows.
                let unit = v / scale;
                let bits = if self.brain {
                    bf16::from_f32(unit).to_bits()
                } else {
                    f16::from_f32(unit).to_bits()
                };
                out.extend_from_slice(&bits.to_le_bytes());
            }
        }
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        check_payload(&self.spec, payload, out.len())?;
        let chunks = out.len().div_ceil(self.chunk);
        let scales_at = self.spec.header_bytes();
        let mut halves = payload[scales_at + 4 * chunks..].chunks_exact(2);
        for (c, chunk) in out.chunks_mut(self.chunk).enumerate() {
            let scale = read_f32(payload, scales_at + 4 * c);
            if !(scale.is_finite() && scale > 0.0) {
                return Err(CodecError::NonFinite {
                    index: c * self.chunk,
                });
            }
            for (i, o) in chunk.iter_mut().enumerate() {
                let b = halves.next().expect("length checked");
                let bits = u16::from_le_bytes([b[0], b[1]]);
                let unit = if self.brain {
                    bf16::from_bits(bits).to_f32()
                } else {
                    f16::from_bits(bits).to_f32()
                };
                let v = unit * scale;
                if !v.is_finite() {
                    return Err(CodecError::NonFinite {
                        index: c * self.chunk + i,
                    });
                }
                *o = v;
            }
        }
        Ok(())
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
            .chunks(self.chunk)
            .map(|chunk| self.range_of(chunk))
            .collect();
        for (lo, hi) in &ranges {
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&hi.to_le_bytes());
        }
        let levels = ((1u32 << self.bits) - 1) as f32;
        let mut writer = BitWriter::new(out);
        for (chunk, &(lo, hi)) in values.chunks(self.chunk).zip(&ranges) {
            // f32 arithmetic unless the range overflows f32 (|lo|, |hi| near f32::MAX) or is so
            // narrow (denormal) that levels / width does.
            let width = hi - lo;
            let per_unit = if width > 0.0 { levels / width } else { 0.0 };
            let fast = width.is_finite() && per_unit.is_finite();
            let per_unit_wide = if hi as f64 > lo as f64 {
                levels as f64 / (hi as f64 - lo as f64)
            } else {
                0.0
            };
            for &v in chunk {
                let position = if fast {
                    ((v - lo) * per_unit).clamp(0.0, levels)
                } else {
                    ((v as f64 - lo as f64) * per_unit_wide).clamp(0.0, levels as f64) as f32
                };
                let code = match self.rounding {
                    Rounding::Nearest => position.round(),
                    Rounding::Stochastic => {
                        (position + self.random.next_unit_f32()).floor().min(levels)
                    }
                };
                writer.write(code as u32, self.bits);
            }
        }
        writer.finish();
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        check_payload(&self.spec, payload, out.len())?;
        let chunks = out.len().div_ceil(self.chunk);
        let ranges_at = self.spec.header_bytes();
        let mut reader = BitReader::new(&payload[ranges_at + 8 * chunks..]);
        let levels = ((1u32 << self.bits) - 1) as f64;
        for (c, chunk) in out.chunks_mut(self.chunk).enumerate() {
            let lo = read_f32(payload, ranges_at + 8 * c);
            let hi = read_f32(payload, ranges_at + 8 * c + 4);
            if !(lo.is_finite() && hi.is_finite()) {
                return Err(CodecError::NonFinite {
                    index: c * self.chunk,
                });
            }
            if lo > hi {
                return Err(CodecError::Malformed("a chunk's range has lo > hi"));
            }
            let step = (hi as f64 - lo as f64) / levels;
            for o in chunk.iter_mut() {
                let code = reader.read(self.bits) as f64;
                // Clamped, so rounding can never step outside [lo, hi] (or to infinity).
                *o = (lo as f64 + code * step).clamp(lo as f64, hi as f64) as f32;
            }
        }
        Ok(())
    }
}
