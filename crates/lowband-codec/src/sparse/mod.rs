//! Sparse codecs: `topk` (largest magnitudes per chunk), `randomk` (seeded positions, a control)
//! and `dct` (DeMo-style: the largest coefficients of each chunk's orthonormal DCT-II).
//!
//! Body: one bit stream, chunk after chunk. A chunk holds its f32 scales (32 bits each), then its
//! positions (Elias-Fano; none for `randomk`, whose positions come from the packet's seed), then
//! one code per kept value (see [`ValueCoding`]).

use std::sync::Arc;

use half::f16;
use rayon::prelude::*;
use rustdct::{DctPlanner, TransformType2And3};

use crate::bits::{elias_fano_write, BitWriter, SplitMix64};
use crate::dense::max_abs;
use crate::{count_u32, Codec, CodecError, CodecSpec, ValueCoding};

mod dct;
mod decode;
mod select;

use dct::{Batch, BatchDct, LANES};
use select::{select_top, FEW};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    TopK,
    RandomK,
    Dct,
}

pub struct Sparse {
    spec: CodecSpec,
    kind: Kind,
    chunk: usize,
    values: ValueCoding,
    /// Source of per-packet seeds (`randomk`).
    seeds: SplitMix64,
    /// `randomk` encode scratch, sized for one chunk when the codec is built.
    positions: Vec<u32>,
    taken: Vec<u64>,
    /// Encode: one bit stream (bytes, bits) per group of chunks, written in parallel.
    group_streams: Vec<(Vec<u8>, usize)>,
    /// `dct`: basis[k · chunk + n] = a_k cos(π (2n + 1) k / (2 · chunk)), orthonormal (decode),
    /// and rustdct's DCT-II plan (encode of a chunk length that is not a power of two).
    basis: Vec<f32>,
    plan: Option<Arc<dyn TransformType2And3<f32>>>,
    /// `dct` with a power-of-two chunk: the batched encode (`dct.rs`) in place of `plan`.
    batch_plan: Option<BatchDct>,
}

/// Per-thread encode scratch.
struct Scratch {
    candidates: Vec<u32>,
    magnitudes: Vec<u32>,
    positions: Vec<u32>,
    kept: Vec<f32>,
    signal: Vec<f32>,
    transform: Vec<f32>,
    batch: Option<Batch>,
}

/// Chunks per parallel encode task (32 × 4,096 values: 512 KB of input).
const CHUNKS_PER_GROUP: usize = 32;

impl Sparse {
    pub fn new(spec: CodecSpec) -> Self {
        let (kind, chunk, values, seed) = match spec {
            CodecSpec::TopK { chunk, values, .. } => (Kind::TopK, chunk, values, 0),
            CodecSpec::RandomK {
                chunk,
                values,
                seed,
                ..
            } => (Kind::RandomK, chunk, values, seed),
            CodecSpec::DctTopK { chunk, values, .. } => (Kind::Dct, chunk, values, 0),
            _ => unreachable!("Sparse is built for sparse codecs only"),
        };
        let chunk = chunk as usize;
        let batch_plan = (kind == Kind::Dct).then(|| BatchDct::new(chunk)).flatten();
        let (basis, plan) = match kind {
            Kind::Dct if batch_plan.is_some() => (dct_basis(chunk), None),
            Kind::Dct => (dct_basis(chunk), Some(DctPlanner::new().plan_dct2(chunk))),
            _ => (Vec::new(), None),
        };
        Sparse {
            spec,
            kind,
            chunk,
            values,
            seeds: SplitMix64(seed),
            positions: Vec::with_capacity(chunk),
            taken: vec![0; chunk.div_ceil(64)],
            group_streams: Vec::new(),
            basis,
            plan,
            batch_plan,
        }
    }

    fn scratch(&self) -> Scratch {
        let transform = self.plan.as_ref().map_or(0, |p| p.get_scratch_len());
        let signal = if self.kind == Kind::Dct {
            vec![0.0; self.chunk]
        } else {
            Vec::new()
        };
        Scratch {
            candidates: Vec::with_capacity(self.chunk),
            magnitudes: Vec::with_capacity(self.chunk),
            positions: Vec::with_capacity(self.chunk),
            kept: Vec::with_capacity(self.chunk),
            signal,
            transform: vec![0.0; transform],
            batch: self.batch_plan.as_ref().map(|p| p.batch()),
        }
    }

    /// Up to `LANES` consecutive `dct` chunks into the bit stream, transformed and selected
    /// together (`dct.rs`), each written as [`Self::encode_chunk`] writes one.
    fn encode_dct_batch(&self, chunks: &[f32], scratch: &mut Scratch, writer: &mut BitWriter) {
        let plan = self.batch_plan.as_ref().expect("a batched dct");
        let k = self.spec.kept_in_chunk(self.chunk);
        let Scratch {
            candidates,
            magnitudes,
            positions,
            kept,
            signal,
            batch,
            ..
        } = scratch;
        let batch = batch.as_mut().expect("a batched dct's scratch");
        plan.run(chunks, k, batch);
        positions.resize(k, 0);
        for lane in 0..chunks.len().div_ceil(self.chunk) {
            writer.write(batch.scales[lane].to_bits(), 32);
            if k <= FEW {
                batch.top(lane, positions);
            } else {
                for (s, row) in signal.iter_mut().zip(&batch.data) {
                    *s = row[lane];
                }
                select_top(signal, k, candidates, magnitudes, positions);
            }
            kept.clear();
            kept.extend(positions.iter().map(|&p| batch.data[p as usize][lane]));
            let coded = Some((positions.as_slice(), self.chunk, true));
            write_values(writer, self.values, kept, magnitudes, coded);
        }
    }

    /// One `topk` or `dct` chunk into the bit stream: `dct` transforms it first (and writes its
    /// scale), then the k largest magnitudes' scales, positions and values.
    fn encode_chunk(&self, chunk: &[f32], scratch: &mut Scratch, writer: &mut BitWriter) {
        let k = self.spec.kept_in_chunk(chunk.len());
        let signal: &[f32] = match self.kind {
            // Top-k selects on the chunk itself (no copy); `randomk` never comes here (its
            // positions follow one random stream, chunk after chunk: see `encode`).
            Kind::TopK | Kind::RandomK => chunk,
            Kind::Dct => {
                let m = max_abs(chunk);
                let scale = if m > 0.0 && m.is_finite() { m } else { 1.0 };
                // Division, not a reciprocal: 1 / a subnormal scale overflows.
                let (values, padding) = scratch.signal.split_at_mut(chunk.len());
                for (unit, x) in values.iter_mut().zip(chunk) {
                    *unit = x / scale;
                }
                padding.fill(0.0);
                let plan = self.plan.as_ref().expect("dct has a plan");
                plan.process_dct2_with_scratch(&mut scratch.signal, &mut scratch.transform);
                // rustdct's DCT-II is unnormalized: scale to the orthonormal basis.
                let n = self.chunk as f32;
                let (first, rest) = ((1.0 / n).sqrt(), (2.0 / n).sqrt());
                scratch.signal[0] *= first;
                for c in &mut scratch.signal[1..] {
                    *c *= rest;
                }
                writer.write(scale.to_bits(), 32);
                &scratch.signal
            }
        };
        scratch.positions.resize(k, 0);
        select_top(
            signal,
            k,
            &mut scratch.candidates,
            &mut scratch.magnitudes,
            &mut scratch.positions,
        );
        scratch.kept.clear();
        scratch
            .kept
            .extend(scratch.positions.iter().map(|&p| signal[p as usize]));
        write_values(
            writer,
            self.values,
            &scratch.kept,
            &mut scratch.magnitudes,
            Some((&scratch.positions, signal.len(), true)),
        );
    }

    /// `k` distinct positions in [0, len) from `random` (Floyd's algorithm), ascending.
    fn select_random(
        positions: &mut Vec<u32>,
        taken: &mut [u64],
        random: &mut SplitMix64,
        len: usize,
        k: usize,
    ) {
        positions.clear();
        for j in (len - k)..len {
            let t = random.below(j as u32 + 1) as usize;
            let pick = if taken[t / 64] >> (t % 64) & 1 == 1 {
                j
            } else {
                t
            };
            taken[pick / 64] |= 1 << (pick % 64);
            positions.push(pick as u32);
        }
        for &p in positions.iter() {
            taken[p as usize / 64] = 0;
        }
        positions.sort_unstable();
    }
}

/// Magnitude buckets of the threshold search: the top 11 bits of |v| (exponent and 3 mantissa
/// bits: an eighth of a binade each, so the threshold's bucket holds few values).
const BUCKETS: usize = 1 << 11;
const BUCKET_SHIFT: u32 = 20;

impl Codec for Sparse {
    fn spec(&self) -> &CodecSpec {
        &self.spec
    }

    fn random_state(&self) -> Option<u64> {
        (self.kind == Kind::RandomK).then_some(self.seeds.0)
    }

    fn set_random_state(&mut self, state: u64) {
        self.seeds.0 = state;
    }

    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(self.payload_bytes(values.len()));
        let packet_seed = if self.kind == Kind::RandomK {
            self.seeds.next_u64()
        } else {
            0
        };
        self.spec.write_header(count_u32(values), packet_seed, out);
        let mut writer = BitWriter::new(out);
        if self.kind == Kind::RandomK {
            // Positions follow one random stream, chunk after chunk: one thread.
            let mut random = SplitMix64(packet_seed);
            let mut scratch = self.scratch();
            for chunk in values.chunks(self.chunk) {
                let k = self.spec.kept_in_chunk(chunk.len());
                Self::select_random(
                    &mut self.positions,
                    &mut self.taken,
                    &mut random,
                    chunk.len(),
                    k,
                );
                scratch.kept.clear();
                scratch
                    .kept
                    .extend(self.positions.iter().map(|&p| chunk[p as usize]));
                write_values(
                    &mut writer,
                    self.values,
                    &scratch.kept,
                    &mut scratch.magnitudes,
                    Some((&self.positions, chunk.len(), false)),
                );
            }
        } else {
            // Groups of chunks in parallel, each into its own bit stream; the streams are then
            // joined in order, so the bytes are those of one writer going chunk after chunk.
            let group_values = self.chunk * CHUNKS_PER_GROUP;
            let groups = values.len().div_ceil(group_values);
            let mut streams = std::mem::take(&mut self.group_streams);
            streams.resize_with(groups, || (Vec::new(), 0));
            let this = &*self;
            values
                .par_chunks(group_values)
                .zip(streams.par_iter_mut())
                .for_each_init(
                    || this.scratch(),
                    |scratch, (group, (bytes, bits))| {
                        bytes.clear();
                        let mut group_writer = BitWriter::new(bytes);
                        if this.batch_plan.is_some() {
                            for chunks in group.chunks(this.chunk * LANES) {
                                this.encode_dct_batch(chunks, scratch, &mut group_writer);
                            }
                        } else {
                            for chunk in group.chunks(this.chunk) {
                                this.encode_chunk(chunk, scratch, &mut group_writer);
                            }
                        }
                        *bits = group_writer.bit_len();
                        group_writer.finish();
                    },
                );
            for (bytes, bits) in &streams[..groups] {
                writer.append(bytes, *bits);
            }
            self.group_streams = streams;
        }
        writer.finish();
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        self.decode_into(payload, out)
    }

    fn decode_add(
        &mut self,
        payload: &[u8],
        out: &mut [f32],
        scale: f32,
    ) -> Result<bool, CodecError> {
        self.decode_add_into(payload, out, scale)
    }
}

fn dct_basis(chunk: usize) -> Vec<f32> {
    let mut basis = vec![0.0f32; chunk * chunk];
    for k in 0..chunk {
        let a = if k == 0 {
            (1.0 / chunk as f64).sqrt()
        } else {
            (2.0 / chunk as f64).sqrt()
        };
        for n in 0..chunk {
            basis[k * chunk + n] = (a
                * (std::f64::consts::PI * (2 * n + 1) as f64 * k as f64 / (2 * chunk) as f64).cos())
                as f32;
        }
    }
    basis
}

/// Scales, then (if `positions` is given with the chunk length and whether to code them) the
/// Elias-Fano positions, then the value codes.
fn write_values(
    writer: &mut BitWriter,
    coding: ValueCoding,
    kept: &[f32],
    scratch: &mut Vec<u32>,
    positions: Option<(&[u32], usize, bool)>,
) {
    // The unit of the codings that scale by the largest kept magnitude (unused by the others).
    let unit = match coding {
        ValueCoding::F16 | ValueCoding::Q8 | ValueCoding::Q4 => {
            let magnitude_max = max_abs(kept);
            if magnitude_max > 0.0 && magnitude_max.is_finite() {
                magnitude_max
            } else {
                1.0
            }
        }
        ValueCoding::F32 | ValueCoding::Q2 | ValueCoding::Sign => 1.0,
    };
    let mut median_bits = 0u32;
    match coding {
        ValueCoding::F32 => {}
        ValueCoding::F16 | ValueCoding::Q8 | ValueCoding::Q4 => writer.write(unit.to_bits(), 32),
        ValueCoding::Sign => {
            let mean = (kept.iter().map(|v| v.abs() as f64).sum::<f64>() / kept.len().max(1) as f64)
                as f32;
            writer.write(mean.to_bits(), 32);
        }
        ValueCoding::Q2 => {
            scratch.clear();
            scratch.extend(kept.iter().map(|v| v.to_bits() & 0x7fff_ffff));
            let cut = kept.len() / 2;
            median_bits = *scratch.select_nth_unstable(cut).1;
            let (mut low, mut low_n, mut high, mut high_n) = (0.0f64, 0usize, 0.0f64, 0usize);
            for v in kept {
                if v.to_bits() & 0x7fff_ffff >= median_bits {
                    high += v.abs() as f64;
                    high_n += 1;
                } else {
                    low += v.abs() as f64;
                    low_n += 1;
                }
            }
            writer.write(((low / low_n.max(1) as f64) as f32).to_bits(), 32);
            writer.write(((high / high_n.max(1) as f64) as f32).to_bits(), 32);
        }
    }
    if let Some((positions, len, coded)) = positions {
        if coded {
            elias_fano_write(writer, positions, len);
        }
    }
    if coding == ValueCoding::Sign {
        // One bit a value, 32 to a write.
        for part in kept.chunks(32) {
            let signs = (part.iter().enumerate())
                .fold(0u32, |word, (i, &v)| word | ((v < 0.0) as u32) << i);
            writer.write(signs, part.len() as u32);
        }
        return;
    }
    for &v in kept {
        let sign = (v < 0.0) as u32;
        match coding {
            ValueCoding::F32 => writer.write(v.to_bits(), 32),
            ValueCoding::F16 => writer.write(f16::from_f32(v / unit).to_bits() as u32, 16),
            ValueCoding::Q8 | ValueCoding::Q4 => {
                let levels = ((1u32 << (coding.bits() - 1)) - 1) as f32;
                let level = (v.abs() / unit * levels).round().min(levels) as u32;
                writer.write(sign | level << 1, coding.bits());
            }
            ValueCoding::Q2 => writer.write(
                sign | ((v.to_bits() & 0x7fff_ffff >= median_bits) as u32) << 1,
                2,
            ),
            ValueCoding::Sign => writer.write(sign, 1),
        }
    }
}
