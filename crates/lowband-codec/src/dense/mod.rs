//! Dense codecs: `fp32`, `fp16` / `bf16` with a per-chunk scale, and `int8` / `int4` / `int2`.
//!
//! Every encoder and decoder runs on all of rayon's threads: the body is cut at chunk (or block)
//! boundaries, which fall on byte boundaries, and each piece is written or read on its own. The
//! bytes are the same as a one-thread pass (`tests/golden.rs`); the stochastic rounding of `int`
//! draws value i's random number from the stream's i-th state, so it needs no order either.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::{check_payload, count_u32, read_f32, Codec, CodecError, CodecSpec};

mod int;

pub use int::Int;

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
