//! Codec specifications: what a strategy names (`topk:k=64,chunk=4096,values=q2`), what a payload
//! header carries, and the exact payload size formula of each codec.

mod header;
mod text;

pub(crate) use header::read_header;

use crate::bits::elias_fano_bits;
use crate::{CodecError, CodecId, CHUNK_MAX, COMMON_HEADER_BYTES, DCT_CHUNK_MAX};

/// How a quantizer picks each chunk's range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Range {
    /// The chunk's minimum and maximum: every value is inside.
    MinMax,
    /// mean ± k·std of the chunk (INTELLECT-1's choice), clipped to min/max; values outside are
    /// clamped to the range.
    Std(f32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    Nearest,
    /// Round up with probability equal to the fraction (unbiased), from a seeded SplitMix64 stream.
    Stochastic,
}

/// How a sparse codec codes the values it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueCoding {
    F32,
    /// Half floats of value / (chunk's largest kept magnitude).
    F16,
    /// Sign + 7-bit magnitude level, uniform in [0, largest kept magnitude].
    Q8,
    /// Sign + 3-bit magnitude level.
    Q4,
    /// Sign + 1 bit choosing one of two magnitudes: the means of the kept magnitudes below and
    /// above their median (SparseLoCo's 2-bit "bin means").
    Q2,
    /// Sign only, times the mean kept magnitude of the chunk.
    Sign,
}

impl ValueCoding {
    pub fn bits(self) -> u32 {
        match self {
            ValueCoding::F32 => 32,
            ValueCoding::F16 => 16,
            ValueCoding::Q8 => 8,
            ValueCoding::Q4 => 4,
            ValueCoding::Q2 => 2,
            ValueCoding::Sign => 1,
        }
    }
    /// f32 scales stored per chunk.
    pub fn scales(self) -> usize {
        match self {
            ValueCoding::F32 => 0,
            ValueCoding::F16 | ValueCoding::Q8 | ValueCoding::Q4 | ValueCoding::Sign => 1,
            ValueCoding::Q2 => 2,
        }
    }
    fn byte(self) -> u8 {
        match self {
            ValueCoding::F32 => 0,
            ValueCoding::F16 => 1,
            ValueCoding::Q8 => 2,
            ValueCoding::Q4 => 3,
            ValueCoding::Q2 => 4,
            ValueCoding::Sign => 5,
        }
    }
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => ValueCoding::F32,
            1 => ValueCoding::F16,
            2 => ValueCoding::Q8,
            3 => ValueCoding::Q4,
            4 => ValueCoding::Q2,
            5 => ValueCoding::Sign,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            ValueCoding::F32 => "f32",
            ValueCoding::F16 => "f16",
            ValueCoding::Q8 => "q8",
            ValueCoding::Q4 => "q4",
            ValueCoding::Q2 => "q2",
            ValueCoding::Sign => "sign",
        }
    }
}

/// A codec and its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CodecSpec {
    Fp32,
    Fp16 {
        chunk: u32,
    },
    Bf16 {
        chunk: u32,
    },
    /// `bits` ∈ {2, 4, 8}. `seed` starts the stochastic-rounding stream (not on the wire).
    Int {
        bits: u8,
        chunk: u32,
        range: Range,
        rounding: Rounding,
        seed: u64,
    },
    TopK {
        k: u32,
        chunk: u32,
        values: ValueCoding,
    },
    /// `seed` starts the encoder's stream of per-packet seeds; a payload carries its own.
    RandomK {
        k: u32,
        chunk: u32,
        values: ValueCoding,
        seed: u64,
    },
    DctTopK {
        k: u32,
        chunk: u32,
        values: ValueCoding,
    },
}

pub const DEFAULT_CHUNK: u32 = 4096;
pub const DEFAULT_SPARSE_K: u32 = 64;
pub const DEFAULT_DCT_CHUNK: u32 = 64;
pub const DEFAULT_DCT_K: u32 = 4;

impl CodecSpec {
    pub fn id(&self) -> CodecId {
        match self {
            CodecSpec::Fp32 => CodecId::Fp32,
            CodecSpec::Fp16 { .. } => CodecId::Fp16,
            CodecSpec::Bf16 { .. } => CodecId::Bf16,
            CodecSpec::Int { .. } => CodecId::Int,
            CodecSpec::TopK { .. } => CodecId::TopK,
            CodecSpec::RandomK { .. } => CodecId::RandomK,
            CodecSpec::DctTopK { .. } => CodecId::DctTopK,
        }
    }

    pub fn is_dense(&self) -> bool {
        !matches!(
            self,
            CodecSpec::TopK { .. } | CodecSpec::RandomK { .. } | CodecSpec::DctTopK { .. }
        )
    }

    pub fn validate(&self) -> Result<(), CodecError> {
        let bad = |reason: String| Err(CodecError::InvalidSpec(format!("{self}: {reason}")));
        let chunk = match *self {
            CodecSpec::Fp32 => return Ok(()),
            CodecSpec::Fp16 { chunk } | CodecSpec::Bf16 { chunk } => chunk,
            CodecSpec::Int {
                bits, chunk, range, ..
            } => {
                if !matches!(bits, 2 | 4 | 8) {
                    return bad(format!("bits must be 2, 4 or 8, not {bits}"));
                }
                if let Range::Std(k) = range {
                    if !(k.is_finite() && k > 0.0) {
                        return bad("the std multiple must be positive and finite".into());
                    }
                }
                chunk
            }
            CodecSpec::TopK { k, chunk, .. }
            | CodecSpec::RandomK { k, chunk, .. }
            | CodecSpec::DctTopK { k, chunk, .. } => {
                // The chunk first: `chunk=0` is a bad chunk, whatever k is.
                if chunk == 0 || chunk > CHUNK_MAX {
                    return bad(format!("chunk must be in 1..={CHUNK_MAX}, not {chunk}"));
                }
                if k == 0 || k > chunk {
                    return bad(format!("k must be in 1..={chunk}, not {k}"));
                }
                if matches!(self, CodecSpec::DctTopK { .. }) && chunk > DCT_CHUNK_MAX {
                    return bad(format!("the dct chunk may be at most {DCT_CHUNK_MAX}"));
                }
                chunk
            }
        };
        if chunk == 0 || chunk > CHUNK_MAX {
            return bad(format!("chunk must be in 1..={CHUNK_MAX}, not {chunk}"));
        }
        Ok(())
    }

    /// Bytes of this codec's header (common part included).
    pub fn header_bytes(&self) -> usize {
        COMMON_HEADER_BYTES
            + match self {
                CodecSpec::Fp32 => 0,
                CodecSpec::Fp16 { .. } | CodecSpec::Bf16 { .. } => 4,
                CodecSpec::Int { .. } => 11,
                CodecSpec::TopK { .. } | CodecSpec::DctTopK { .. } => 9,
                CodecSpec::RandomK { .. } => 17,
            }
    }

    pub(crate) fn chunk(&self) -> usize {
        match *self {
            CodecSpec::Fp32 => usize::MAX,
            CodecSpec::Fp16 { chunk }
            | CodecSpec::Bf16 { chunk }
            | CodecSpec::Int { chunk, .. } => chunk as usize,
            CodecSpec::TopK { chunk, .. }
            | CodecSpec::RandomK { chunk, .. }
            | CodecSpec::DctTopK { chunk, .. } => chunk as usize,
        }
    }

    /// Values kept in a sparse chunk of `len` entries (all of a `dct` chunk's are padded to full).
    pub(crate) fn kept_in_chunk(&self, len: usize) -> usize {
        let (k, chunk) = match *self {
            CodecSpec::TopK { k, chunk, .. } | CodecSpec::RandomK { k, chunk, .. } => {
                (k as usize, chunk as usize)
            }
            CodecSpec::DctTopK { k, .. } => return k as usize,
            _ => return len,
        };
        if len == chunk {
            k
        } else {
            (k * len).div_ceil(chunk).clamp(1, len)
        }
    }

    /// Index bits of a sparse chunk of `len` entries.
    pub(crate) fn index_bits(&self, len: usize) -> usize {
        match *self {
            CodecSpec::TopK { .. } => elias_fano_bits(len, self.kept_in_chunk(len)),
            CodecSpec::DctTopK { k, chunk, .. } => elias_fano_bits(chunk as usize, k as usize),
            _ => 0,
        }
    }

    /// f32 scales per chunk.
    pub(crate) fn scales_per_chunk(&self) -> usize {
        match *self {
            CodecSpec::Fp32 => 0,
            CodecSpec::Fp16 { .. } | CodecSpec::Bf16 { .. } => 1,
            CodecSpec::Int { .. } => 2,
            CodecSpec::TopK { values, .. } | CodecSpec::RandomK { values, .. } => values.scales(),
            CodecSpec::DctTopK { values, .. } => 1 + values.scales(),
        }
    }

    /// Where a sparse payload's bits go, for `count` values (`None` for dense codecs): what
    /// `inspect` reports as bits per kept entry. The parts add up to the payload exactly.
    pub fn sparse_bits(&self, count: usize) -> Option<SparseBits> {
        let values = match *self {
            CodecSpec::TopK { values, .. }
            | CodecSpec::RandomK { values, .. }
            | CodecSpec::DctTopK { values, .. } => values,
            _ => return None,
        };
        let header_bits = 8 * self.header_bytes();
        if count == 0 {
            return Some(SparseBits {
                kept: 0,
                position_bits: 0,
                value_bits: 0,
                scale_bits: 0,
                header_bits,
                padding_bits: 0,
            });
        }
        let chunk = self.chunk();
        let chunks = count.div_ceil(chunk.min(count));
        let last = count - (chunks - 1) * chunk;
        let kept = (chunks - 1) * self.kept_in_chunk(chunk) + self.kept_in_chunk(last);
        let position_bits = (chunks - 1) * self.index_bits(chunk) + self.index_bits(last);
        let scale_bits = 32 * self.scales_per_chunk() * chunks;
        let value_bits = kept * values.bits() as usize;
        let padding_bits =
            8 * self.payload_bytes(count) - header_bits - scale_bits - position_bits - value_bits;
        Some(SparseBits {
            kept,
            position_bits,
            value_bits,
            scale_bits,
            header_bits,
            padding_bits,
        })
    }

    /// Exact payload size in bytes for `count` values: the formulas of docs/wire-format.md.
    pub fn payload_bytes(&self, count: usize) -> usize {
        let header = self.header_bytes();
        if count == 0 {
            return header;
        }
        let chunk = self.chunk();
        let chunks = count.div_ceil(chunk.min(count));
        let scales = 4 * self.scales_per_chunk() * chunks;
        header
            + match *self {
                CodecSpec::Fp32 => 4 * count,
                CodecSpec::Fp16 { .. } | CodecSpec::Bf16 { .. } => scales + 2 * count,
                CodecSpec::Int { bits, .. } => scales + (count * bits as usize).div_ceil(8),
                CodecSpec::TopK { values, .. }
                | CodecSpec::RandomK { values, .. }
                | CodecSpec::DctTopK { values, .. } => {
                    let last = count - (chunks - 1) * chunk;
                    let full_bits =
                        self.index_bits(chunk) + self.kept_in_chunk(chunk) * values.bits() as usize;
                    let last_bits =
                        self.index_bits(last) + self.kept_in_chunk(last) * values.bits() as usize;
                    scales + ((chunks - 1) * full_bits + last_bits).div_ceil(8)
                }
            }
    }

    /// Whether `other` would read this codec's payloads (seeds are not compared: a `randomk`
    /// payload carries its own, and a quantizer's rounding seed stays with its encoder).
    pub fn same_wire_parameters(&self, other: &CodecSpec) -> bool {
        match (self, other) {
            (
                CodecSpec::Int {
                    bits: b1,
                    chunk: c1,
                    range: r1,
                    rounding: o1,
                    ..
                },
                CodecSpec::Int {
                    bits: b2,
                    chunk: c2,
                    range: r2,
                    rounding: o2,
                    ..
                },
            ) => b1 == b2 && c1 == c2 && r1 == r2 && o1 == o2,
            (
                CodecSpec::RandomK {
                    k: k1,
                    chunk: c1,
                    values: v1,
                    ..
                },
                CodecSpec::RandomK {
                    k: k2,
                    chunk: c2,
                    values: v2,
                    ..
                },
            ) => k1 == k2 && c1 == c2 && v1 == v2,
            _ => self == other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_print_and_reparse() {
        for text in [
            "fp32",
            "fp16",
            "bf16:chunk=128",
            "int8",
            "int4:range=std:3,round=stochastic,seed=5",
            "int2:chunk=64",
            "topk",
            "topk:k=32,values=sign",
            "randomk:k=8,chunk=512,seed=9",
            "dct",
            "dct:k=8,chunk=128,values=f16",
        ] {
            let spec: CodecSpec = text.parse().unwrap();
            let again: CodecSpec = spec.to_string().parse().unwrap();
            assert_eq!(spec, again, "{text}");
        }
        for bad in [
            "fp8",
            "topk:k=0",
            "topk:k=5000",
            "topk:z=3",
            "int3",
            "int8:range=median",
            "dct:chunk=4096",
            "fp16:chunk=0",
            "topk:k",
        ] {
            assert!(bad.parse::<CodecSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn size_formulas_match_hand_computed_cases() {
        let topk: CodecSpec = "topk:k=64,chunk=4096,values=q2".parse().unwrap();
        // 15-byte header; per full chunk 2 scales (8 bytes) and 511 index + 128 value bits.
        assert_eq!(
            topk.payload_bytes(4096),
            15 + 8 + (511 + 128usize).div_ceil(8)
        );
        assert_eq!(CodecSpec::Fp32.payload_bytes(10), 46);
        assert_eq!(
            "int8".parse::<CodecSpec>().unwrap().payload_bytes(4097),
            17 + 16 + 4097
        );
        assert_eq!(
            "fp16:chunk=10"
                .parse::<CodecSpec>()
                .unwrap()
                .payload_bytes(25),
            10 + 12 + 50
        );
    }
}

/// A sparse payload's bits by purpose (see [`CodecSpec::sparse_bits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseBits {
    /// Entries kept (non-zero or not, each has a position and a value code).
    pub kept: usize,
    /// Elias-Fano positions (none for `randomk`: its packet seed gives them).
    pub position_bits: usize,
    /// Value codes.
    pub value_bits: usize,
    /// Per-chunk f32 scales.
    pub scale_bits: usize,
    pub header_bits: usize,
    /// Zero bits that round the body up to whole bytes (0..8).
    pub padding_bits: usize,
}

impl SparseBits {
    /// Every bit of the payload per kept entry.
    pub fn per_kept_entry(&self) -> f64 {
        (self.position_bits
            + self.value_bits
            + self.scale_bits
            + self.header_bits
            + self.padding_bits) as f64
            / self.kept.max(1) as f64
    }
}
