//! Model shapes, their limits, and the named presets.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Limits that keep a configuration read from a file from asking for absurd memory.
pub const VOCAB_SIZE_MAX: usize = 1 << 20;
pub const CONTEXT_LENGTH_MAX: usize = 1 << 16;
pub const LAYERS_MAX: usize = 1024;
pub const WIDTH_MAX: usize = 1 << 16;
/// Largest parameter count the engine will allocate (4 GiB of f32 per buffer).
pub const PARAMS_MAX: usize = 1 << 30;

/// LayerNorm epsilon, fixed as in GPT-2 (`layer_norm_epsilon: 1e-5`).
pub const LAYER_NORM_EPSILON: f32 = 1e-5;

/// The shape of a GPT-2 family model: token + learned position embeddings, pre-LayerNorm blocks,
/// causal multi-head attention, 4x MLP with tanh-GELU, final LayerNorm, head tied to the embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of token ids (256 for byte-level models).
    pub vocab_size: usize,
    /// Longest sequence the model sees (number of learned positions).
    pub context_length: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Width of the residual stream (channels, C).
    pub width: usize,
    /// Attention heads; `width` must be a multiple of it.
    pub heads: usize,
}

impl ModelConfig {
    /// Check every field; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &'static str, value: usize, max: usize| {
            if value == 0 {
                Err(EngineError::config(field, "must be at least 1"))
            } else if value > max {
                Err(EngineError::config(
                    field,
                    format!("{value} exceeds the limit {max}"),
                ))
            } else {
                Ok(())
            }
        };
        positive("vocab_size", self.vocab_size, VOCAB_SIZE_MAX)?;
        positive("context_length", self.context_length, CONTEXT_LENGTH_MAX)?;
        positive("layers", self.layers, LAYERS_MAX)?;
        positive("width", self.width, WIDTH_MAX)?;
        positive("heads", self.heads, self.width)?;
        if !self.width.is_multiple_of(self.heads) {
            return Err(EngineError::config(
                "heads",
                format!(
                    "width {} is not divisible by heads {}",
                    self.width, self.heads
                ),
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(EngineError::config(
                "vocab_size",
                "token ids must fit in u32",
            ));
        }
        let count = self
            .parameter_count_checked()
            .ok_or_else(|| EngineError::config("width", "parameter count overflows"))?;
        if count > PARAMS_MAX {
            return Err(EngineError::config(
                "width",
                format!("{count} parameters exceed the limit {PARAMS_MAX}"),
            ));
        }
        Ok(())
    }

    /// Channels per head (hs).
    pub fn head_size(&self) -> usize {
        self.width / self.heads
    }

    fn parameter_count_checked(&self) -> Option<usize> {
        let c = self.width;
        let embeddings = self.vocab_size.checked_mul(c)? + self.context_length.checked_mul(c)?;
        // Per block: 2 LayerNorms (4C), qkv (3C*C + 3C), attn proj (C*C + C),
        // fc (4C*C + 4C), mlp proj (C*4C + C).
        let block = c.checked_mul(c)?.checked_mul(12)? + 13 * c;
        embeddings
            .checked_add(block.checked_mul(self.layers)?)?
            .checked_add(2 * c)
    }

    /// Total number of parameters (the tied head counts once).
    pub fn parameter_count(&self) -> usize {
        self.parameter_count_checked().unwrap_or(usize::MAX)
    }

    /// Training FLOPs per token for one forward + backward pass: 6 per weight in a matmul
    /// (every parameter except the position embedding, the head reusing the token embedding),
    /// plus 12·L·T·C for attention scores and their weighted sum (PaLM's accounting, counting the
    /// full T×T square, as the usual MFU figures do).
    pub fn training_flops_per_token(&self, seq_len: usize) -> f64 {
        let matmul_weights = self.parameter_count() - self.context_length * self.width;
        6.0 * matmul_weights as f64 + 12.0 * self.layers as f64 * seq_len as f64 * self.width as f64
    }
}

/// A named model shape with the batch it is meant to be trained and benchmarked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub model: ModelConfig,
    /// Sequences per step.
    pub batch_size: usize,
    pub description: &'static str,
}

/// The named presets. Their numbers:
/// - `tiny`: small enough that a finite-difference check of every parameter runs in a test.
/// - `small`: the 0.84M-parameter model of `shared/reference/diloco_torch.py` (4 layers, width 128,
///   4 heads, context 128), the default for comparisons; batch 16 = 4 sites x 4 sequences.
/// - `ref`: the 3.3M-parameter model the engine decision was measured on (PyTorch CPU 459 ms/step
///   at batch 16, see shared/facts.md); the benchmark model.
pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "tiny",
        model: ModelConfig {
            vocab_size: 256,
            context_length: 32,
            layers: 2,
            width: 32,
            heads: 2,
        },
        batch_size: 4,
        description: "2 layers, width 32, context 32 (tests)",
    },
    Preset {
        name: "small",
        model: ModelConfig {
            vocab_size: 256,
            context_length: 128,
            layers: 4,
            width: 128,
            heads: 4,
        },
        batch_size: 16,
        description: "4 layers, width 128, context 128, 0.84M params (default runs)",
    },
    Preset {
        name: "ref",
        model: ModelConfig {
            vocab_size: 256,
            context_length: 128,
            layers: 4,
            width: 256,
            heads: 4,
        },
        batch_size: 16,
        description: "4 layers, width 256, context 128, 3.3M params (benchmark model)",
    },
];

/// Look a preset up by name; the error lists the known names.
pub fn preset(name: &str) -> Result<Preset> {
    PRESETS
        .iter()
        .copied()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            EngineError::config(
                "preset",
                format!("unknown preset {name:?}; known: {}", known.join(", ")),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_the_reference_models() {
        assert_eq!(preset("small").unwrap().model.parameter_count(), 842_496);
        assert_eq!(preset("ref").unwrap().model.parameter_count(), 3_257_856);
        for p in PRESETS {
            p.model.validate().unwrap();
        }
    }

    #[test]
    fn invalid_configs_name_their_field() {
        let base = preset("tiny").unwrap().model;
        let cases = [
            (ModelConfig { heads: 0, ..base }, "heads"),
            (ModelConfig { heads: 3, ..base }, "heads"),
            (ModelConfig { width: 0, ..base }, "width"),
            (ModelConfig { layers: 0, ..base }, "layers"),
            (
                ModelConfig {
                    vocab_size: 0,
                    ..base
                },
                "vocab_size",
            ),
            (
                ModelConfig {
                    context_length: 0,
                    ..base
                },
                "context_length",
            ),
            (
                ModelConfig {
                    width: WIDTH_MAX,
                    heads: 1,
                    ..base
                },
                "width",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(EngineError::InvalidConfig { field: f, .. }) => {
                    assert_eq!(f, field, "{config:?}")
                }
                other => panic!("{config:?} gave {other:?}"),
            }
        }
    }
}
