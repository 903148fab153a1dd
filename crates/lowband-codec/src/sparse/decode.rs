//! Sparse decoding. Every full chunk of `topk` and `dct` takes the same number of bits in the
//! stream (the size formula of `docs/wire-format.md`), so group g of chunks starts at a known bit
//! and groups decode in parallel; `randomk` decodes chunk after chunk (its positions follow one
//! random stream). Either way a payload's first error in stream order is the one reported.

use rayon::prelude::*;

use super::{Kind, Sparse, CHUNKS_PER_GROUP};
use crate::bits::{elias_fano_read, BitReader, SplitMix64};
use crate::{check_payload, CodecError, ValueCoding};

/// One decoding thread's scratch, one chunk's worth.
pub(super) struct DecodeScratch {
    positions: Vec<u32>,
    kept: Vec<f32>,
    taken: Vec<u64>,
    /// `dct`: the chunk's scale (the values are in its units).
    chunk_scale: f32,
}

/// What a decode does with each chunk it has read.
#[derive(Clone, Copy)]
enum Apply {
    /// Write the chunk (zeros where nothing was kept).
    Write,
    /// Read and check only.
    Check,
    /// `out[p] += scale · value` at the kept positions only (`topk`, `randomk`).
    Add(f32),
}

impl Sparse {
    fn decode_scratch(&self) -> DecodeScratch {
        DecodeScratch {
            positions: Vec::with_capacity(self.chunk),
            kept: Vec::with_capacity(self.chunk),
            taken: vec![0; self.chunk.div_ceil(64)],
            chunk_scale: 1.0,
        }
    }

    /// Bits of one full chunk in the stream.
    fn full_chunk_bits(&self) -> usize {
        32 * self.spec.scales_per_chunk()
            + self.spec.index_bits(self.chunk)
            + self.spec.kept_in_chunk(self.chunk) * self.values.bits() as usize
    }

    /// Read one chunk of `len` values (its first value is `first` of the whole): scales,
    /// positions (read, or drawn for `randomk`) and values into `scratch`, every one checked.
    fn read_chunk(
        &self,
        reader: &mut BitReader,
        random: &mut SplitMix64,
        len: usize,
        first: usize,
        scratch: &mut DecodeScratch,
    ) -> Result<(), CodecError> {
        let k = self.spec.kept_in_chunk(len);
        let signal_len = if self.kind == Kind::Dct {
            self.chunk
        } else {
            len
        };
        scratch.chunk_scale = 1.0;
        if self.kind == Kind::Dct {
            let s = f32::from_bits(reader.read(32));
            if !(s.is_finite() && s > 0.0) {
                return Err(CodecError::NonFinite { index: first });
            }
            scratch.chunk_scale = s;
        }
        let scales =
            read_scales(reader, self.values).ok_or(CodecError::NonFinite { index: first })?;
        match self.kind {
            Kind::TopK | Kind::Dct => {
                scratch.positions.clear();
                scratch.positions.resize(k, 0);
                elias_fano_read(reader, &mut scratch.positions, signal_len).ok_or(
                    CodecError::Malformed("positions are not an increasing set inside the chunk"),
                )?;
            }
            Kind::RandomK => Self::select_random(
                &mut scratch.positions,
                &mut scratch.taken,
                random,
                signal_len,
                k,
            ),
        }
        scratch.kept.clear();
        for _ in 0..k {
            let v = read_value(reader, self.values, scales);
            if !v.is_finite() {
                return Err(CodecError::NonFinite { index: first });
            }
            scratch.kept.push(v);
        }
        Ok(())
    }

    /// Do `apply` with a chunk read into `scratch`. `dct` rebuilds the chunk from its
    /// coefficients in units of its scale, where the truth lies in [-1, 1]: clamping to it never
    /// moves a value away from the truth, and keeps the final product finite even at f32::MAX.
    fn apply_chunk(
        &self,
        chunk: &mut [f32],
        first: usize,
        scratch: &DecodeScratch,
        apply: Apply,
    ) -> Result<(), CodecError> {
        let kept = scratch.positions.iter().zip(&scratch.kept);
        match (apply, self.kind) {
            (Apply::Check, _) => {}
            (Apply::Add(scale), _) => {
                debug_assert!(self.kind != Kind::Dct, "dct has no sparse add");
                for (&p, &v) in kept {
                    chunk[p as usize] += scale * v;
                }
            }
            (Apply::Write, Kind::TopK | Kind::RandomK) => {
                chunk.fill(0.0);
                for (&p, &v) in kept {
                    chunk[p as usize] = v;
                }
            }
            (Apply::Write, Kind::Dct) => self.inverse_dct(chunk, first, scratch)?,
        }
        Ok(())
    }

    /// `dct`: the chunk from its kept coefficients, `BLOCK` values at a time: each block sums
    /// its part of every kept basis row in a local array (the same additions, in the same order,
    /// as row after row over the whole chunk), then clamps, scales and checks it in one pass.
    /// Compiled for AVX-512 too, chosen at run time (the same IEEE operations: the same bits).
    fn inverse_dct(
        &self,
        chunk: &mut [f32],
        first: usize,
        scratch: &DecodeScratch,
    ) -> Result<(), CodecError> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            return unsafe { self.inverse_dct_avx512(chunk, first, scratch) };
        }
        self.inverse_dct_portable(chunk, first, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn inverse_dct_avx512(
        &self,
        chunk: &mut [f32],
        first: usize,
        scratch: &DecodeScratch,
    ) -> Result<(), CodecError> {
        self.inverse_dct_portable(chunk, first, scratch)
    }

    #[inline(always)]
    fn inverse_dct_portable(
        &self,
        chunk: &mut [f32],
        first: usize,
        scratch: &DecodeScratch,
    ) -> Result<(), CodecError> {
        const BLOCK: usize = 64;
        for (b, out) in chunk.chunks_mut(BLOCK).enumerate() {
            let start = b * BLOCK;
            let mut sum = [0.0f32; BLOCK];
            let sum = &mut sum[..out.len()];
            for (&p, &v) in scratch.positions.iter().zip(&scratch.kept) {
                let row = p as usize * self.chunk + start;
                for (s, basis) in sum.iter_mut().zip(&self.basis[row..row + out.len()]) {
                    *s += v * basis;
                }
            }
            let mut finite = true;
            for (o, s) in out.iter_mut().zip(sum.iter()) {
                *o = s.clamp(-1.0, 1.0) * scratch.chunk_scale;
                finite &= o.is_finite();
            }
            if !finite {
                let i = out.iter().position(|v| !v.is_finite()).expect("one is not");
                return Err(CodecError::NonFinite {
                    index: first + start + i,
                });
            }
        }
        Ok(())
    }

    /// Read every chunk of `payload` (checked against `out`'s length first) and `apply` it to
    /// its part of `out`. On error `out` may hold partial data (none for `Apply::Check`).
    fn decode_with(&self, payload: &[u8], out: &mut [f32], apply: Apply) -> Result<(), CodecError> {
        check_payload(&self.spec, payload, out.len())?;
        let body = &payload[self.spec.header_bytes()..];
        if self.kind == Kind::RandomK {
            let seed = u64::from_le_bytes(payload[15..23].try_into().expect("length checked"));
            let mut random = SplitMix64(seed);
            let mut reader = BitReader::new(body);
            let mut scratch = self.decode_scratch();
            for (c, chunk) in out.chunks_mut(self.chunk).enumerate() {
                let first = c * self.chunk;
                self.read_chunk(&mut reader, &mut random, chunk.len(), first, &mut scratch)?;
                self.apply_chunk(chunk, first, &scratch, apply)?;
            }
            return Ok(());
        }
        let group_values = self.chunk * CHUNKS_PER_GROUP;
        let group_bits = self.full_chunk_bits() * CHUNKS_PER_GROUP;
        let results: Vec<Result<(), CodecError>> = out
            .par_chunks_mut(group_values)
            .enumerate()
            .map_init(
                || self.decode_scratch(),
                |scratch, (g, group)| {
                    let mut reader = BitReader::at(body, g * group_bits);
                    let mut unused = SplitMix64(0);
                    for (c, chunk) in group.chunks_mut(self.chunk).enumerate() {
                        let first = g * group_values + c * self.chunk;
                        self.read_chunk(&mut reader, &mut unused, chunk.len(), first, scratch)?;
                        self.apply_chunk(chunk, first, scratch, apply)?;
                    }
                    Ok(())
                },
            )
            .collect();
        results.into_iter().collect()
    }

    pub(super) fn decode_into(&self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        self.decode_with(payload, out, Apply::Write)
    }

    /// `out += scale · decoded`, touching only the kept positions; the whole payload is checked
    /// first, so on error `out` is unchanged. `dct` has no such path (`Ok(false)`).
    pub(super) fn decode_add_into(
        &self,
        payload: &[u8],
        out: &mut [f32],
        scale: f32,
    ) -> Result<bool, CodecError> {
        if self.kind == Kind::Dct {
            return Ok(false);
        }
        self.decode_with(payload, out, Apply::Check)?;
        self.decode_with(payload, out, Apply::Add(scale))?;
        Ok(true)
    }
}

/// A chunk's value scales; `None` if any is negative or not finite.
fn read_scales(reader: &mut BitReader, coding: ValueCoding) -> Option<[f32; 2]> {
    let mut scales = [0.0f32; 2];
    for s in scales.iter_mut().take(coding.scales()) {
        *s = f32::from_bits(reader.read(32));
        if !(s.is_finite() && *s >= 0.0) {
            return None;
        }
    }
    Some(scales)
}

fn read_value(reader: &mut BitReader, coding: ValueCoding, scales: [f32; 2]) -> f32 {
    let code = reader.read(coding.bits());
    let signed = |magnitude: f32| if code & 1 == 1 { -magnitude } else { magnitude };
    match coding {
        ValueCoding::F32 => f32::from_bits(code),
        ValueCoding::F16 => half::f16::from_bits(code as u16).to_f32() * scales[0],
        ValueCoding::Q8 | ValueCoding::Q4 => {
            let levels = ((1u32 << (coding.bits() - 1)) - 1) as f32;
            signed((code >> 1) as f32 / levels * scales[0])
        }
        ValueCoding::Q2 => signed(scales[(code >> 1) as usize & 1]),
        ValueCoding::Sign => signed(scales[0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CodecSpec;

    /// The AVX-512 build of the inverse DCT gives the portable one's bits, with values that
    /// clamp, whole and short blocks, and scales up to near f32::MAX.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn both_builds_of_the_inverse_dct_agree_bitwise() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            crate::record_skip(
                "both_builds_of_the_inverse_dct",
                "SKIPPED: the CPU has no AVX-512F; the portable inverse DCT is the only one",
            );
            return;
        }
        for (chunk, scale) in [(256usize, 0.37f32), (100, 3e38), (24, 1.0)] {
            let spec: CodecSpec = format!("dct:k=5,chunk={chunk},values=f32").parse().unwrap();
            let codec = Sparse::new(spec);
            let mut scratch = codec.decode_scratch();
            scratch.positions = vec![0, 1, 7, 13, chunk as u32 - 1];
            scratch.kept = vec![20.0, -15.5, 0.31, 17.0, -0.02];
            scratch.chunk_scale = scale;
            let (mut wide, mut portable) = (vec![0.0; chunk], vec![0.0; chunk]);
            // SAFETY: the CPU has AVX-512F.
            let wide_result = unsafe { codec.inverse_dct_avx512(&mut wide, 0, &scratch) };
            let portable_result = codec.inverse_dct_portable(&mut portable, 0, &scratch);
            assert_eq!(format!("{wide_result:?}"), format!("{portable_result:?}"));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&wide), bits(&portable), "chunk {chunk}");
            assert!(
                portable.iter().any(|v| v.abs() == scale),
                "some value clamps"
            );
        }
    }
}
