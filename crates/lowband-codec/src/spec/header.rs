//! A payload's header: written by every encoder, read (and checked) by every decoder.

use super::{CodecSpec, Range, Rounding, ValueCoding};
use crate::{read_f32, read_u32, CodecError, CodecId, COMMON_HEADER_BYTES, PAYLOAD_VERSION};

impl CodecSpec {
    /// Write the header for `count` values (`seed`: the per-packet seed of `randomk`).
    pub(crate) fn write_header(&self, count: u32, seed: u64, out: &mut Vec<u8>) {
        out.push(self.id() as u8);
        out.push(PAYLOAD_VERSION);
        out.extend_from_slice(&count.to_le_bytes());
        match *self {
            CodecSpec::Fp32 => {}
            CodecSpec::Fp16 { chunk } | CodecSpec::Bf16 { chunk } => {
                out.extend_from_slice(&chunk.to_le_bytes())
            }
            CodecSpec::Int {
                bits,
                chunk,
                range,
                rounding,
                ..
            } => {
                out.push(bits);
                let (range_byte, std_multiple) = match range {
                    Range::MinMax => (0u8, 0.0f32),
                    Range::Std(k) => (1, k),
                };
                out.push(range_byte);
                out.push(match rounding {
                    Rounding::Nearest => 0,
                    Rounding::Stochastic => 1,
                });
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&std_multiple.to_le_bytes());
            }
            CodecSpec::TopK { k, chunk, values }
            | CodecSpec::DctTopK { k, chunk, values }
            | CodecSpec::RandomK {
                k, chunk, values, ..
            } => {
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&chunk.to_le_bytes());
                out.push(values.byte());
                if matches!(self, CodecSpec::RandomK { .. }) {
                    out.extend_from_slice(&seed.to_le_bytes());
                }
            }
        }
    }
}

/// Parse a payload's header: the codec, its parameters (validated) and the value count.
pub(crate) fn read_header(payload: &[u8]) -> Result<(CodecSpec, usize), CodecError> {
    let truncated = |needed| CodecError::Truncated {
        len: payload.len(),
        needed,
    };
    if payload.len() < COMMON_HEADER_BYTES {
        return Err(truncated(COMMON_HEADER_BYTES));
    }
    let id = CodecId::from_byte(payload[0])?;
    if payload[1] != PAYLOAD_VERSION {
        return Err(CodecError::WrongVersion {
            expected: PAYLOAD_VERSION,
            found: payload[1],
        });
    }
    let count = read_u32(payload, 2) as usize;
    let at = COMMON_HEADER_BYTES;
    let need = |extra: usize| {
        if payload.len() < at + extra {
            Err(truncated(at + extra))
        } else {
            Ok(())
        }
    };
    let spec = match id {
        CodecId::Fp32 => CodecSpec::Fp32,
        CodecId::Fp16 | CodecId::Bf16 => {
            need(4)?;
            let chunk = read_u32(payload, at);
            if id == CodecId::Fp16 {
                CodecSpec::Fp16 { chunk }
            } else {
                CodecSpec::Bf16 { chunk }
            }
        }
        CodecId::Int => {
            need(11)?;
            int_header(payload, at)?
        }
        CodecId::TopK | CodecId::DctTopK | CodecId::RandomK => {
            need(if id == CodecId::RandomK { 17 } else { 9 })?;
            sparse_header(id, payload, at)?
        }
    };
    spec.validate()
        .map_err(|_| CodecError::Malformed("codec parameters out of range"))?;
    Ok((spec, count))
}

/// An int codec's parameters (11 bytes at `at`, present).
fn int_header(payload: &[u8], at: usize) -> Result<CodecSpec, CodecError> {
    let bits = payload[at];
    let range = match payload[at + 1] {
        0 => Range::MinMax,
        1 => Range::Std(read_f32(payload, at + 7)),
        _ => return Err(CodecError::Malformed("unknown range mode")),
    };
    let rounding = match payload[at + 2] {
        0 => Rounding::Nearest,
        1 => Rounding::Stochastic,
        _ => return Err(CodecError::Malformed("unknown rounding mode")),
    };
    Ok(CodecSpec::Int {
        bits,
        chunk: read_u32(payload, at + 3),
        range,
        rounding,
        seed: 0,
    })
}

/// A sparse codec's parameters (9 bytes at `at`, 17 for randomk with its seed, present).
fn sparse_header(id: CodecId, payload: &[u8], at: usize) -> Result<CodecSpec, CodecError> {
    let k = read_u32(payload, at);
    let chunk = read_u32(payload, at + 4);
    let values = ValueCoding::from_byte(payload[at + 8])
        .ok_or(CodecError::Malformed("unknown value coding"))?;
    Ok(match id {
        CodecId::TopK => CodecSpec::TopK { k, chunk, values },
        CodecId::DctTopK => CodecSpec::DctTopK { k, chunk, values },
        _ => {
            let seed = u64::from_le_bytes(payload[at + 9..at + 17].try_into().expect("8 bytes"));
            CodecSpec::RandomK {
                k,
                chunk,
                values,
                seed,
            }
        }
    })
}
