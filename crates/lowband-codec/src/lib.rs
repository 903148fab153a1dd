//! Codecs turn a delta (a flat `&[f32]`) into a payload of bytes and back.
//!
//! This crate knows no ML framework, no async runtime and no IO (design.md's never-arrows). Every
//! decoder checks the payload's header against the codec it was built for and the payload's exact
//! length against the documented formula **before** it reads a value, refuses non-finite values,
//! and decodes into the caller's buffer and scratch sized when the codec was built: no input can
//! panic it, hang it, or make it allocate.
//!
//! Codecs: `fp32` (identity), `fp16` / `bf16` (per-chunk scale), `int8` / `int4` / `int2`
//! (per-chunk range, nearest or stochastic rounding), `topk` (chunked top-k by magnitude,
//! Elias-Fano indices), `randomk` (seeded indices, a control), `dct` (DeMo-style top-k of a
//! chunked DCT-II). Sparse codecs code their kept values as `f32`, `f16`, `q8`, `q4`, `q2` or
//! `sign`. [`ErrorFeedback`] keeps what a codec did not send and adds it to the next delta.
//!
//! Payload layouts are little-endian and documented in `docs/wire-format.md`, each with its exact
//! size formula, which [`Codec::payload_bytes`] implements and the tests hold the encoders to.

mod bits;
mod dense;
mod feedback;
mod sparse;
mod spec;

/// A unit test that cannot run here leaves its reason in `target/tmp/lowband-skipped/NAME`,
/// where `.ci/run` counts and prints the integration tests' skips (a library prints nothing).
#[cfg(test)]
fn record_skip(name: &str, reason: &str) {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/tmp/lowband-skipped"
    );
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(format!("{dir}/{name}"), reason);
}

pub use dense::Fp32;
pub use feedback::ErrorFeedback;
pub use spec::{CodecSpec, Range, Rounding, SparseBits, ValueCoding};

/// Version of every payload layout in this crate (the second byte of a payload).
pub const PAYLOAD_VERSION: u8 = 1;
/// Bytes of the header every payload starts with: codec id, version, count (u32).
pub const COMMON_HEADER_BYTES: usize = 6;
/// Largest chunk any codec accepts (bounds every decoder's scratch).
pub const CHUNK_MAX: u32 = 1 << 16;
/// Largest chunk of the `dct` codec (its cosine table is chunk² floats).
pub const DCT_CHUNK_MAX: u32 = 1024;

/// Codec identifiers, the first byte of every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CodecId {
    Fp32 = 1,
    Fp16 = 2,
    Bf16 = 3,
    Int = 4,
    TopK = 5,
    RandomK = 6,
    DctTopK = 7,
}

impl CodecId {
    pub fn from_byte(byte: u8) -> Result<Self, CodecError> {
        Ok(match byte {
            1 => CodecId::Fp32,
            2 => CodecId::Fp16,
            3 => CodecId::Bf16,
            4 => CodecId::Int,
            5 => CodecId::TopK,
            6 => CodecId::RandomK,
            7 => CodecId::DctTopK,
            other => return Err(CodecError::UnknownCodec(other)),
        })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("payload is for codec {found:?}, expected {expected:?}")]
    WrongCodec { expected: CodecId, found: CodecId },
    #[error("payload layout version {found}, this build reads version {expected}")]
    WrongVersion { expected: u8, found: u8 },
    #[error("payload truncated: {len} bytes, need at least {needed}")]
    Truncated { len: usize, needed: usize },
    #[error("payload carries {found} values, expected {expected}")]
    WrongLength { expected: usize, found: u64 },
    #[error("payload has {extra} bytes after its end")]
    TrailingBytes { extra: usize },
    #[error("non-finite value at index {index}")]
    NonFinite { index: usize },
    #[error("payload parameters {found} do not match this codec ({expected})")]
    WrongParameters { expected: String, found: String },
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
    #[error("invalid codec specification: {0}")]
    InvalidSpec(String),
}

/// A codec: one direction of a delta's trip over the wire.
pub trait Codec: Send {
    fn spec(&self) -> &CodecSpec;
    fn id(&self) -> CodecId {
        self.spec().id()
    }
    /// Append the payload for `values` to `out`. Panics only if `values` has more than
    /// `u32::MAX` entries (callers bound parameter counts far below that).
    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>);
    /// Decode `payload` into `out`, whose length is the expected number of values. On error
    /// `out` may hold partial data and must be discarded.
    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError>;
    /// Add `scale ×` what `payload` decodes to into `out` (with `scale` ±1, exactly `out ±
    /// decoded`), touching only the values the payload carries: `Ok(true)`. The whole payload is
    /// checked before `out` is touched, so on error `out` is unchanged. `Ok(false)` (and `out`
    /// untouched) if this codec has no such path: the dense codecs and `dct`, whose payloads
    /// change every value anyway; decode into a buffer instead.
    fn decode_add(
        &mut self,
        _payload: &[u8],
        _out: &mut [f32],
        _scale: f32,
    ) -> Result<bool, CodecError> {
        Ok(false)
    }
    /// Exact payload size for `count` values, in bytes (the documented formula).
    fn payload_bytes(&self, count: usize) -> usize {
        self.spec().payload_bytes(count)
    }
    /// Where the codec's pseudo-random stream stands (stochastic rounding, random-k packet
    /// seeds): a resumable run saves it so that the resumed packets are the uninterrupted ones.
    /// `None` for deterministic codecs.
    fn random_state(&self) -> Option<u64> {
        None
    }
    /// Continue the pseudo-random stream from a saved [`Codec::random_state`] (no effect on a
    /// deterministic codec).
    fn set_random_state(&mut self, _state: u64) {}
}

/// Build the codec a specification names.
pub fn build(spec: &CodecSpec) -> Result<Box<dyn Codec>, CodecError> {
    spec.validate()?;
    Ok(match *spec {
        CodecSpec::Fp32 => Box::new(dense::Fp32),
        CodecSpec::Fp16 { .. } | CodecSpec::Bf16 { .. } => Box::new(dense::HalfFloat::new(*spec)),
        CodecSpec::Int { .. } => Box::new(dense::Int::new(*spec)),
        CodecSpec::TopK { .. } | CodecSpec::RandomK { .. } | CodecSpec::DctTopK { .. } => {
            Box::new(sparse::Sparse::new(*spec))
        }
    })
}

/// What a payload's header says, checked against the limits but not against an expected codec.
#[derive(Debug, Clone, PartialEq)]
pub struct PacketInfo {
    pub spec: CodecSpec,
    pub count: usize,
    pub payload_bytes: usize,
    /// `8 · payload_bytes / count`.
    pub bits_per_param: f64,
}

/// Read a payload's header (for `lowband inspect`, or to build the codec that decodes it).
pub fn describe(payload: &[u8]) -> Result<PacketInfo, CodecError> {
    let (spec, count) = spec::read_header(payload)?;
    let payload_bytes = spec.payload_bytes(count);
    Ok(PacketInfo {
        bits_per_param: 8.0 * payload_bytes as f64 / count.max(1) as f64,
        spec,
        count,
        payload_bytes,
    })
}

/// Decode a payload of any codec into `out` (whose length is the expected count).
pub fn decode_any(payload: &[u8], out: &mut [f32]) -> Result<CodecSpec, CodecError> {
    let (spec, _) = spec::read_header(payload)?;
    let mut codec = build(&spec)?;
    codec.decode(payload, out)?;
    Ok(spec)
}

/// Checks shared by every decoder: id, version, count, the codec's own parameters, exact length.
pub(crate) fn check_payload(
    spec: &CodecSpec,
    payload: &[u8],
    expected_count: usize,
) -> Result<(), CodecError> {
    let (found, count) = spec::read_header(payload)?;
    if found.id() != spec.id() {
        return Err(CodecError::WrongCodec {
            expected: spec.id(),
            found: found.id(),
        });
    }
    if count != expected_count {
        return Err(CodecError::WrongLength {
            expected: expected_count,
            found: count as u64,
        });
    }
    if !found.same_wire_parameters(spec) {
        return Err(CodecError::WrongParameters {
            expected: spec.to_string(),
            found: found.to_string(),
        });
    }
    let needed = spec.payload_bytes(count);
    if payload.len() < needed {
        return Err(CodecError::Truncated {
            len: payload.len(),
            needed,
        });
    }
    if payload.len() > needed {
        return Err(CodecError::TrailingBytes {
            extra: payload.len() - needed,
        });
    }
    Ok(())
}

pub(crate) fn read_f32(bytes: &[u8], offset: usize) -> f32 {
    f32::from_le_bytes([
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    ])
}

pub(crate) fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    ])
}

pub(crate) fn count_u32(values: &[f32]) -> u32 {
    u32::try_from(values.len()).expect("a delta of more than 2^32 values")
}
