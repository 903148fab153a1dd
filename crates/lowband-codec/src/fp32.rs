//! `fp32`: the identity codec. Payload: codec id (1 byte), count (u32 LE), count x f32 LE.
//! Size: 5 + 4·n bytes; 32 bits per parameter (plus 40 bits per packet).

use crate::{Codec, CodecError, CodecId};

const HEADER_BYTES: usize = 5;

#[derive(Clone, Copy, Debug, Default)]
pub struct Fp32;

impl Codec for Fp32 {
    fn id(&self) -> CodecId {
        CodecId::Fp32
    }

    fn encode(&mut self, values: &[f32], out: &mut Vec<u8>) {
        let count = u32::try_from(values.len()).expect("a delta of more than 2^32 values");
        out.reserve(self.payload_bytes(values.len()));
        out.push(CodecId::Fp32 as u8);
        out.extend_from_slice(&count.to_le_bytes());
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(&self, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        if payload.len() < HEADER_BYTES {
            return Err(CodecError::Truncated { len: payload.len(), needed: HEADER_BYTES });
        }
        let id = CodecId::from_byte(payload[0])?;
        if id != CodecId::Fp32 {
            return Err(CodecError::WrongCodec { expected: CodecId::Fp32, found: id });
        }
        let count = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]) as u64;
        if count != out.len() as u64 {
            return Err(CodecError::WrongLength { expected: out.len(), found: count });
        }
        let needed = self.payload_bytes(out.len());
        if payload.len() < needed {
            return Err(CodecError::Truncated { len: payload.len(), needed });
        }
        if payload.len() > needed {
            return Err(CodecError::TrailingBytes { extra: payload.len() - needed });
        }
        for (i, (o, b)) in out.iter_mut().zip(payload[HEADER_BYTES..].chunks_exact(4)).enumerate() {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if !v.is_finite() {
                return Err(CodecError::NonFinite { index: i });
            }
            *o = v;
        }
        Ok(())
    }

    fn payload_bytes(&self, count: usize) -> usize {
        HEADER_BYTES + 4 * count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_and_size_matches_the_formula() {
        let values = [0.0f32, -0.0, 1.5, -3.25e-38, f32::MIN_POSITIVE / 2.0, 3.0e38];
        let mut payload = Vec::new();
        Fp32.encode(&values, &mut payload);
        assert_eq!(payload.len(), 5 + 4 * values.len());
        let mut out = [9.0f32; 6];
        Fp32.decode(&payload, &mut out).unwrap();
        assert_eq!(out.map(f32::to_bits), values.map(f32::to_bits));
    }

    #[test]
    fn hostile_payloads_are_typed_errors() {
        let mut payload = Vec::new();
        Fp32.encode(&[1.0, 2.0, 3.0], &mut payload);
        let mut out = [0.0f32; 3];
        assert!(matches!(Fp32.decode(&payload[..3], &mut out), Err(CodecError::Truncated { .. })));
        assert!(matches!(Fp32.decode(&payload[..10], &mut out), Err(CodecError::Truncated { .. })));
        assert!(matches!(Fp32.decode(&[payload.clone(), vec![0]].concat(), &mut out), Err(CodecError::TrailingBytes { extra: 1 })));
        assert!(matches!(Fp32.decode(&payload, &mut [0.0; 2]), Err(CodecError::WrongLength { expected: 2, found: 3 })));
        let mut bad = payload.clone();
        bad[0] = 77;
        assert!(matches!(Fp32.decode(&bad, &mut out), Err(CodecError::UnknownCodec(77))));
        let mut huge = payload.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Fp32.decode(&huge, &mut out), Err(CodecError::WrongLength { .. })));
        let mut nan = Vec::new();
        Fp32.encode(&[1.0, f32::NAN, 3.0], &mut nan);
        assert_eq!(Fp32.decode(&nan, &mut out), Err(CodecError::NonFinite { index: 1 }));
    }
}
