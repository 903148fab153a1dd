//! Error feedback: what a codec did not send is kept and added to the next delta.

use rayon::prelude::*;

use crate::{Codec, CodecError};

/// Values per parallel task of the element-wise passes (256 KB of each stream).
const VALUES_PER_TASK: usize = 1 << 16;

/// Per-sender error-feedback state (SparseLoCo and DeMo keep one per site).
///
/// Each call encodes `input = decay · residual + delta` and keeps `residual = input − decoded`,
/// where `decoded` is what the receiver gets from the payload (its own payload, decoded), so
/// the residual is exactly what the receiver did not get. With `decay = 1` the sum of everything
/// sent equals the sum of the deltas minus the current residual; `decay < 1` forgets old residual
/// geometrically (SparseLoCo uses it in place of outer momentum).
///
/// The input is formed in the residual's own buffer, in one pass on all threads; a sparse codec
/// then subtracts its kept values where they are ([`Codec::decode_add`]), so the state is one
/// buffer of the parameters' size (a dense codec's decode needs a second, made on first use).
pub struct ErrorFeedback {
    residual: Vec<f32>,
    /// What a dense codec's payload decodes to (empty until such a codec is used).
    decoded: Vec<f32>,
    decay: f32,
}

impl ErrorFeedback {
    pub fn new(params: usize, decay: f32) -> Self {
        ErrorFeedback {
            residual: vec![0.0; params],
            decoded: Vec::new(),
            decay,
        }
    }

    pub fn decay(&self) -> f32 {
        self.decay
    }

    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Replace the residual (resuming from a saved state). Panics on a length mismatch.
    pub fn set_residual(&mut self, residual: &[f32]) {
        self.residual.copy_from_slice(residual);
    }

    /// Encode `delta` plus the kept residual; append the payload to `out`.
    ///
    /// A non-finite delta value is refused (`CodecError::NonFinite` naming its index) after
    /// the residual absorbed part of the pass: the residual is then cleared (what a sender
    /// starting afresh holds), never left half-updated. Panics on a length mismatch.
    pub fn encode(
        &mut self,
        codec: &mut dyn Codec,
        delta: &[f32],
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        assert_eq!(
            delta.len(),
            self.residual.len(),
            "error feedback was built for another parameter count"
        );
        let decay = self.decay;
        let non_finite = self
            .residual
            .par_chunks_mut(VALUES_PER_TASK)
            .zip(delta.par_chunks(VALUES_PER_TASK))
            .enumerate()
            .filter_map(|(t, (residual, delta))| {
                for (r, d) in residual.iter_mut().zip(delta) {
                    *r = decay * *r + d;
                }
                first_non_finite(delta).map(|i| t * VALUES_PER_TASK + i)
            })
            .min();
        self.finish(codec, non_finite, out)
    }

    /// [`ErrorFeedback::encode`] of `delta = from − to` (a site's θ_start − θ_trained), formed
    /// in the same pass as the input (no delta buffer).
    pub fn encode_difference(
        &mut self,
        codec: &mut dyn Codec,
        from: &[f32],
        to: &[f32],
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        assert!(
            from.len() == self.residual.len() && to.len() == self.residual.len(),
            "error feedback was built for another parameter count"
        );
        let decay = self.decay;
        let non_finite = self
            .residual
            .par_chunks_mut(VALUES_PER_TASK)
            .zip(from.par_chunks(VALUES_PER_TASK))
            .zip(to.par_chunks(VALUES_PER_TASK))
            .enumerate()
            .filter_map(|(t, ((residual, from), to))| {
                let mut bad = None;
                for (i, ((r, f), t)) in residual.iter_mut().zip(from).zip(to).enumerate() {
                    let d = f - t;
                    if !d.is_finite() && bad.is_none() {
                        bad = Some(i);
                    }
                    *r = decay * *r + d;
                }
                bad.map(|i| t * VALUES_PER_TASK + i)
            })
            .min();
        self.finish(codec, non_finite, out)
    }

    /// The residual holds the input: encode it, then take away what the receiver decodes.
    fn finish(
        &mut self,
        codec: &mut dyn Codec,
        non_finite: Option<usize>,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        if let Some(index) = non_finite {
            self.clear();
            return Err(CodecError::NonFinite { index });
        }
        let start = out.len();
        codec.encode(&self.residual, out);
        let subtracted = match codec.decode_add(&out[start..], &mut self.residual, -1.0) {
            Ok(subtracted) => subtracted,
            Err(e) => {
                self.clear();
                return Err(e);
            }
        };
        if !subtracted {
            self.decoded.resize(self.residual.len(), 0.0);
            if let Err(e) = codec.decode(&out[start..], &mut self.decoded) {
                self.clear();
                return Err(e);
            }
            self.residual
                .par_chunks_mut(VALUES_PER_TASK)
                .zip(self.decoded.par_chunks(VALUES_PER_TASK))
                .for_each(|(residual, decoded)| {
                    for (r, d) in residual.iter_mut().zip(decoded) {
                        *r -= d;
                    }
                });
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.residual.par_iter_mut().for_each(|r| *r = 0.0);
    }
}

fn first_non_finite(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| !v.is_finite())
}
