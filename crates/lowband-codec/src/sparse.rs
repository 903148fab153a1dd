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

use crate::bits::{elias_fano_read, elias_fano_write, BitReader, BitWriter, SplitMix64};
use crate::dense::max_abs;
use crate::{check_payload, count_u32, Codec, CodecError, CodecSpec, ValueCoding};

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
    /// Decode scratch, sized for one chunk when the codec is built.
    positions: Vec<u32>,
    magnitude_bits: Vec<u32>,
    kept: Vec<f32>,
    taken: Vec<u64>,
    /// Encode: every chunk's picks (k slots per chunk) and `dct` scales, filled in parallel.
    all_positions: Vec<u32>,
    all_kept: Vec<f32>,
    chunk_scales: Vec<f32>,
    /// `dct`: basis[k · chunk + n] = a_k cos(π (2n + 1) k / (2 · chunk)), orthonormal (decode),
    /// and a fast DCT-II plan (encode).
    basis: Vec<f32>,
    plan: Option<Arc<dyn TransformType2And3<f32>>>,
}

/// Per-thread encode scratch.
struct Scratch {
    candidates: Vec<(u32, u32)>,
    magnitudes: Vec<u32>,
    signal: Vec<f32>,
    transform: Vec<f32>,
}

impl Sparse {
    pub fn new(spec: CodecSpec) -> Self {
        let (kind, chunk, values, seed) = match spec {
            CodecSpec::TopK { chunk, values, .. } => (Kind::TopK, chunk, values, 0),
            CodecSpec::RandomK { chunk, values, seed, .. } => (Kind::RandomK, chunk, values, seed),
            CodecSpec::DctTopK { chunk, values, .. } => (Kind::Dct, chunk, values, 0),
            _ => unreachable!("Sparse is built for sparse codecs only"),
        };
        let chunk = chunk as usize;
        let (basis, plan) = if kind == Kind::Dct { (dct_basis(chunk), Some(DctPlanner::new().plan_dct2(chunk))) } else { (Vec::new(), None) };
        Sparse {
            spec,
            kind,
            chunk,
            values,
            seeds: SplitMix64(seed),
            positions: Vec::with_capacity(chunk),
            magnitude_bits: Vec::with_capacity(chunk),
            kept: Vec::with_capacity(chunk),
            taken: vec![0; chunk.div_ceil(64)],
            all_positions: Vec::new(),
            all_kept: Vec::new(),
            chunk_scales: Vec::new(),
            basis,
            plan,
        }
    }

    fn scratch(&self) -> Scratch {
        let transform = self.plan.as_ref().map_or(0, |p| p.get_scratch_len());
        let signal = if self.kind == Kind::Dct { vec![0.0; self.chunk] } else { Vec::new() };
        Scratch { candidates: Vec::with_capacity(self.chunk), magnitudes: Vec::with_capacity(self.chunk), signal, transform: vec![0.0; transform] }
    }

    /// Pick one chunk's values: `dct` transforms it first. Writes the ascending positions and
    /// their values into the slots and returns the chunk's scale (1 except for `dct`).
    fn pick(&self, chunk: &[f32], k: usize, scratch: &mut Scratch, positions: &mut [u32], kept: &mut [f32]) -> f32 {
        let (signal, scale): (&[f32], f32) = match self.kind {
            // Top-k selects on the chunk itself (no copy).
            Kind::TopK | Kind::RandomK => (chunk, 1.0),
            Kind::Dct => {
                let m = max_abs(chunk);
                let scale = if m > 0.0 && m.is_finite() { m } else { 1.0 };
                // Division, not a reciprocal: 1 / a subnormal scale overflows.
                for (unit, x) in scratch.signal.iter_mut().zip(chunk.iter().chain(std::iter::repeat(&0.0))) {
                    *unit = x / scale;
                }
                let plan = self.plan.as_ref().expect("dct has a plan");
                plan.process_dct2_with_scratch(&mut scratch.signal, &mut scratch.transform);
                // rustdct's DCT-II is unnormalized: scale to the orthonormal basis.
                let n = self.chunk as f32;
                let (first, rest) = ((1.0 / n).sqrt(), (2.0 / n).sqrt());
                for (i, c) in scratch.signal.iter_mut().enumerate() {
                    *c *= if i == 0 { first } else { rest };
                }
                (&scratch.signal, scale)
            }
        };
        select_top(signal, k, &mut scratch.candidates, &mut scratch.magnitudes, positions);
        for (v, &p) in kept.iter_mut().zip(positions.iter()) {
            *v = signal[p as usize];
        }
        scale
    }

    /// `k` distinct positions in [0, len) from `random` (Floyd's algorithm), ascending.
    fn select_random(positions: &mut Vec<u32>, taken: &mut [u64], random: &mut SplitMix64, len: usize, k: usize) {
        positions.clear();
        for j in (len - k)..len {
            let t = random.below(j as u32 + 1) as usize;
            let pick = if taken[t / 64] >> (t % 64) & 1 == 1 { j } else { t };
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

/// Positions of the `k` largest magnitudes of `signal`, ascending (ties: the lower index), into
/// `positions` (length k). `candidates` and `magnitudes` are scratch.
///
/// The bits of |v| order like |v| for non-negative floats, so the search works on integers. A
/// histogram of every 16th value's top bits estimates a bucket below which at most ~k/2 of the
/// k largest can lie; one (branch-free) pass collects every value from that bucket up, in index
/// order; a selection among those finds the exact threshold, and a filter keeps the k in index
/// order. If the estimate was too high (fewer than k collected), an exact histogram decides
/// instead. Either way the result is the exact top k.
fn select_top(signal: &[f32], k: usize, candidates: &mut Vec<(u32, u32)>, magnitudes: &mut Vec<u32>, positions: &mut [u32]) {
    debug_assert!(k >= 1 && k <= signal.len() && positions.len() == k);
    const STRIDE: usize = 16;
    let bucket_of = |v: &f32| ((v.to_bits() & 0x7fff_ffff) >> BUCKET_SHIFT) as usize;
    let mut histogram = [0u32; BUCKETS];
    for v in signal.iter().step_by(STRIDE) {
        histogram[bucket_of(v)] += 1;
    }
    // Aim for about 2k candidates: the bucket where the sampled count from the top reaches 2k/16.
    let wanted_sampled = (2 * k).div_ceil(STRIDE);
    let (mut bucket, mut above) = (BUCKETS - 1, 0usize);
    while bucket > 0 && above + (histogram[bucket] as usize) < wanted_sampled {
        above += histogram[bucket] as usize;
        bucket -= 1;
    }
    let mut found = collect_from(signal, bucket as u32, candidates);
    if found < k {
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
        found = collect_from(signal, exact as u32, candidates);
    }
    let candidates = &candidates[..found];
    // The k-th largest magnitude among the candidates is the threshold; keep everything above it
    // and the lowest-indexed ties.
    magnitudes.clear();
    magnitudes.extend(candidates.iter().map(|c| c.0));
    let cut = magnitudes.len() - k;
    let threshold = *magnitudes.select_nth_unstable(cut).1;
    let greater = magnitudes[cut + 1..].iter().filter(|m| **m > threshold).count();
    let mut ties_needed = k - greater;
    let mut at = 0;
    for &(m, i) in candidates.iter() {
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

/// Every (|v| bits, index) whose bucket is at least `bucket`, in index order, into the front of
/// `candidates`; returns how many (branch-free: each value is written, the count advances only
/// for members). The scratch keeps its length between calls (no clearing).
fn collect_from(signal: &[f32], bucket: u32, candidates: &mut Vec<(u32, u32)>) -> usize {
    if candidates.len() < signal.len() + 1 {
        candidates.resize(signal.len() + 1, (0, 0));
    }
    let mut found = 0usize;
    for (i, v) in signal.iter().enumerate() {
        let m = v.to_bits() & 0x7fff_ffff;
        candidates[found] = (m, i as u32);
        found += ((m >> BUCKET_SHIFT) >= bucket) as usize;
    }
    found
}

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
        let packet_seed = if self.kind == Kind::RandomK { self.seeds.next_u64() } else { 0 };
        self.spec.write_header(count_u32(values), packet_seed, out);
        // Phase 1: pick every chunk's positions and values (in parallel, except `randomk`, whose
        // positions follow one random stream).
        let k_max = self.spec.kept_in_chunk(self.chunk.min(values.len().max(1)));
        let chunks = values.len().div_ceil(self.chunk);
        let slots = k_max.max(1);
        let (mut all_positions, mut all_kept, mut chunk_scales) = (std::mem::take(&mut self.all_positions), std::mem::take(&mut self.all_kept), std::mem::take(&mut self.chunk_scales));
        all_positions.resize(chunks * slots, 0);
        all_kept.resize(chunks * slots, 0.0);
        chunk_scales.resize(chunks, 1.0);
        if self.kind == Kind::RandomK {
            let mut random = SplitMix64(packet_seed);
            for (c, chunk) in values.chunks(self.chunk).enumerate() {
                let k = self.spec.kept_in_chunk(chunk.len());
                Self::select_random(&mut self.positions, &mut self.taken, &mut random, chunk.len(), k);
                all_positions[c * slots..c * slots + k].copy_from_slice(&self.positions);
                for (v, &p) in all_kept[c * slots..c * slots + k].iter_mut().zip(&self.positions) {
                    *v = chunk[p as usize];
                }
            }
        } else {
            let this = &*self;
            values
                .par_chunks(self.chunk)
                .zip(all_positions.par_chunks_mut(slots))
                .zip(all_kept.par_chunks_mut(slots))
                .zip(chunk_scales.par_iter_mut())
                .for_each_init(
                    || this.scratch(),
                    |scratch, (((chunk, positions), kept), scale)| {
                        let k = this.spec.kept_in_chunk(chunk.len());
                        *scale = this.pick(chunk, k, scratch, &mut positions[..k], &mut kept[..k]);
                    },
                );
        }
        // Phase 2: the bit stream, chunk after chunk.
        let mut writer = BitWriter::new(out);
        for (c, chunk) in values.chunks(self.chunk).enumerate() {
            let k = self.spec.kept_in_chunk(chunk.len());
            let signal_len = if self.kind == Kind::Dct { self.chunk } else { chunk.len() };
            if self.kind == Kind::Dct {
                writer.write(chunk_scales[c].to_bits(), 32);
            }
            let positions = &all_positions[c * slots..c * slots + k];
            write_values(&mut writer, self.values, &all_kept[c * slots..c * slots + k], &mut self.magnitude_bits, Some((positions, signal_len, self.kind != Kind::RandomK)));
        }
        writer.finish();
        (self.all_positions, self.all_kept, self.chunk_scales) = (all_positions, all_kept, chunk_scales);
    }

    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        check_payload(&self.spec, payload, out.len())?;
        let packet_seed = match self.kind {
            Kind::RandomK => u64::from_le_bytes(payload[15..23].try_into().expect("length checked")),
            _ => 0,
        };
        let mut random = SplitMix64(packet_seed);
        let mut reader = BitReader::new(&payload[self.spec.header_bytes()..]);
        for (c, chunk) in out.chunks_mut(self.chunk).enumerate() {
            let first = c * self.chunk;
            let k = self.spec.kept_in_chunk(chunk.len());
            let signal_len = if self.kind == Kind::Dct { self.chunk } else { chunk.len() };
            let chunk_scale = if self.kind == Kind::Dct {
                let s = f32::from_bits(reader.read(32));
                if !(s.is_finite() && s > 0.0) {
                    return Err(CodecError::NonFinite { index: first });
                }
                s
            } else {
                1.0
            };
            let scales = read_scales(&mut reader, self.values).ok_or(CodecError::NonFinite { index: first })?;
            self.positions.clear();
            match self.kind {
                Kind::TopK | Kind::Dct => {
                    self.positions.resize(k, 0);
                    elias_fano_read(&mut reader, &mut self.positions, signal_len).ok_or(CodecError::Malformed("positions are not an increasing set inside the chunk"))?;
                }
                Kind::RandomK => Self::select_random(&mut self.positions, &mut self.taken, &mut random, signal_len, k),
            }
            self.kept.clear();
            for _ in 0..k {
                let v = read_value(&mut reader, self.values, scales);
                if !v.is_finite() {
                    return Err(CodecError::NonFinite { index: first });
                }
                self.kept.push(v);
            }
            chunk.fill(0.0);
            match self.kind {
                Kind::TopK | Kind::RandomK => {
                    for (&p, &v) in self.positions.iter().zip(&self.kept) {
                        chunk[p as usize] = v;
                    }
                }
                Kind::Dct => {
                    // Reconstruct in units of the chunk's scale, where the truth lies in [-1, 1]:
                    // clamping to it never moves a value away from the truth, and keeps the final
                    // product finite even at f32::MAX.
                    for (&p, &v) in self.positions.iter().zip(&self.kept) {
                        let row = &self.basis[p as usize * self.chunk..p as usize * self.chunk + chunk.len()];
                        for (o, b) in chunk.iter_mut().zip(row) {
                            *o += v * b;
                        }
                    }
                    for o in chunk.iter_mut() {
                        *o = o.clamp(-1.0, 1.0) * chunk_scale;
                    }
                    if let Some(i) = chunk.iter().position(|v| !v.is_finite()) {
                        return Err(CodecError::NonFinite { index: first + i });
                    }
                }
            }
        }
        Ok(())
    }
}

fn dct_basis(chunk: usize) -> Vec<f32> {
    let mut basis = vec![0.0f32; chunk * chunk];
    for k in 0..chunk {
        let a = if k == 0 { (1.0 / chunk as f64).sqrt() } else { (2.0 / chunk as f64).sqrt() };
        for n in 0..chunk {
            basis[k * chunk + n] = (a * (std::f64::consts::PI * (2 * n + 1) as f64 * k as f64 / (2 * chunk) as f64).cos()) as f32;
        }
    }
    basis
}

/// Scales, then (if `positions` is given with the chunk length and whether to code them) the
/// Elias-Fano positions, then the value codes.
fn write_values(writer: &mut BitWriter, coding: ValueCoding, kept: &[f32], scratch: &mut Vec<u32>, positions: Option<(&[u32], usize, bool)>) {
    let magnitude_max = max_abs(kept);
    let unit = if magnitude_max > 0.0 && magnitude_max.is_finite() { magnitude_max } else { 1.0 };
    let mut median_bits = 0u32;
    match coding {
        ValueCoding::F32 => {}
        ValueCoding::F16 | ValueCoding::Q8 | ValueCoding::Q4 => writer.write(unit.to_bits(), 32),
        ValueCoding::Sign => {
            let mean = (kept.iter().map(|v| v.abs() as f64).sum::<f64>() / kept.len().max(1) as f64) as f32;
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
            ValueCoding::Q2 => writer.write(sign | ((v.to_bits() & 0x7fff_ffff >= median_bits) as u32) << 1, 2),
            ValueCoding::Sign => writer.write(sign, 1),
        }
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
        ValueCoding::F16 => f16::from_bits(code as u16).to_f32() * scales[0],
        ValueCoding::Q8 | ValueCoding::Q4 => {
            let levels = ((1u32 << (coding.bits() - 1)) - 1) as f32;
            signed((code >> 1) as f32 / levels * scales[0])
        }
        ValueCoding::Q2 => signed(scales[(code >> 1) as usize & 1]),
        ValueCoding::Sign => signed(scales[0]),
    }
}
