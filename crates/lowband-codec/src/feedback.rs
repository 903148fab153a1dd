//! Error feedback: what a codec did not send is kept and added to the next delta.

use crate::{Codec, CodecError};

/// Per-sender error-feedback state (SparseLoCo and DeMo keep one per site).
///
/// Each call encodes `input = decay · residual + delta`, decodes its own payload (so the residual
/// is exactly what the receiver did not get) and keeps `residual = input − decoded`. With
/// `decay = 1` the sum of everything sent equals the sum of the deltas minus the current residual;
/// `decay < 1` forgets old residual geometrically (SparseLoCo uses it in place of outer momentum).
pub struct ErrorFeedback {
    residual: Vec<f32>,
    input: Vec<f32>,
    decoded: Vec<f32>,
    decay: f32,
}

impl ErrorFeedback {
    pub fn new(params: usize, decay: f32) -> Self {
        ErrorFeedback {
            residual: vec![0.0; params],
            input: vec![0.0; params],
            decoded: vec![0.0; params],
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

    /// Encode `delta` plus the kept residual; append the payload to `out`; return what the
    /// receiver will decode in `self.decoded()`.
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
        for ((i, r), d) in self.input.iter_mut().zip(&self.residual).zip(delta) {
            *i = self.decay * r + d;
        }
        let start = out.len();
        codec.encode(&self.input, out);
        codec.decode(&out[start..], &mut self.decoded)?;
        for ((r, i), d) in self.residual.iter_mut().zip(&self.input).zip(&self.decoded) {
            *r = i - d;
        }
        Ok(())
    }

    /// What the last payload decodes to.
    pub fn decoded(&self) -> &[f32] {
        &self.decoded
    }
}
