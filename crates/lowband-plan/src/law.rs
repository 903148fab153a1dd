//! Loss against model size and tokens, L(N, D) = E + A / N^α + B / D^β, used to price a loss gap
//! in tokens.
//!
//! A strategy whose loss at D tokens is (1 + gap) × DDP's is modelled as DDP's curve at fewer
//! *effective* tokens D_eff: L(N, D_eff) = (1 + gap) L(N, D). To reach DDP's loss it then needs
//! D / D_eff times the tokens (the token factor):
//!
//!   X = (1 + gap) L(N, D) − E − A / N^α,   D_eff = (B / X)^(1/β),   factor = D / D_eff.

use serde::{Deserialize, Serialize};

use crate::{invalid, PlanError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossLaw {
    /// Where the constants come from.
    pub source: String,
    /// Irreducible loss (nats per token).
    pub e: f64,
    pub a: f64,
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl LossLaw {
    /// Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Chinchilla),
    /// the parametric fit of their approach 3 (eq. 10): E = 1.69, A = 406.4, B = 410.7,
    /// α = 0.34, β = 0.28.
    pub fn chinchilla() -> LossLaw {
        LossLaw {
            source: "Hoffmann et al. 2022 (Chinchilla), approach 3".into(),
            e: 1.69,
            a: 406.4,
            b: 410.7,
            alpha: 0.34,
            beta: 0.28,
        }
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        for (name, value) in [
            ("law.e", self.e),
            ("law.a", self.a),
            ("law.b", self.b),
            ("law.alpha", self.alpha),
            ("law.beta", self.beta),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(
                    name,
                    format!("must be a positive number, got {value}"),
                ));
            }
        }
        Ok(())
    }

    /// Loss (nats per token) of an N-parameter model trained on D tokens.
    pub fn loss(&self, params: f64, tokens: f64) -> f64 {
        self.e + self.a / params.powf(self.alpha) + self.b / tokens.powf(self.beta)
    }

    /// Tokens a strategy needs to reach the loss DDP reaches at `tokens`, as a multiple of
    /// `tokens`, given its relative loss gap at `tokens` (module docs). 1 for a zero gap; below 1
    /// for a strategy that beats DDP.
    pub fn token_factor(&self, params: f64, tokens: f64, gap: f64) -> Result<f64, PlanError> {
        if gap == 0.0 {
            return Ok(1.0);
        }
        let data_term =
            (1.0 + gap) * self.loss(params, tokens) - self.e - self.a / params.powf(self.alpha);
        if data_term <= 0.0 {
            return Err(invalid("loss_gap", format!("{gap:+} puts the loss below what {} allows for this model size at any token count", self.source)));
        }
        let effective_tokens = (self.b / data_term).powf(1.0 / self.beta);
        Ok(tokens / effective_tokens)
    }
}
