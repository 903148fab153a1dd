//! Codecs turn a delta (a flat `&[f32]`) into a payload of bytes and back.
//!
//! This crate knows no ML framework, no async runtime and no IO (design.md's never-arrows). Every
//! decoder checks every length against what the caller expects **before** allocating or writing,
//! and refuses non-finite values: no input can panic it, hang it, or make it allocate.
//!
//! Payload layouts are little-endian and documented in `docs/wire-format.md`.

mod fp32;

pub use fp32::Fp32;

/// Codec identifiers, the first byte of every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CodecId {
    Fp32 = 1,
}

impl CodecId {
    pub fn from_byte(byte: u8) -> Result<Self, CodecError> {
        match byte {
            1 => Ok(CodecId::Fp32),
            other => Err(CodecError::UnknownCodec(other)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("payload is for codec {found:?}, expected {expected:?}")]
    WrongCodec { expected: CodecId, found: CodecId },
    #[error("payload truncated: {len} bytes, need at least {needed}")]
    Truncated { len: usize, needed: usize },
    #[error("payload carries {found} values, expected {expected}")]
    WrongLength { expected: usize, found: u64 },
    #[error("payload has {extra} bytes after its end")]
    TrailingBytes { extra: usize },
    #[error("non-finite value at index {index}")]
    NonFinite { index: usize },
}

/// A codec: one direction of a delta's trip over the wire.
pub trait Codec: Send {
    fn id(&self) -> CodecId;
    /// Append the payload for `values` to `out`.
    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>);
    /// Decode `payload` into `out` (whose length is the expected number of values).
    fn decode(&self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError>;
    /// Exact payload size for `count` values, in bytes (the documented formula).
    fn payload_bytes(&self, count: usize) -> usize;
}
