//! The GPT model: one flat parameter buffer, one flat gradient buffer, activations sized once.
//!
//! `forward` stores what `backward` needs; `backward` overwrites every gradient (no zeroing step).
//! Buffers grow to the largest (batch, sequence) seen and are then reused: no allocation per step.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kernels::{self as k, row_groups};
use crate::layout::{ParamLayout, TensorInfo};

mod block;

use block::tensor_pair;

/// Largest activation memory a batch may ask for, in f32 values (16 GiB); a larger batch is an
/// error, not an allocation failure.
pub const ACTIVATION_VALUES_MAX: usize = 1 << 32;

/// Standard deviation of GPT-2's (and the reference's) normal init for weights and embeddings.
pub const INIT_STD: f32 = 0.02;

/// Activations kept by the forward pass, per layer where the backward pass needs them.
#[derive(Default)]
pub(crate) struct Activations {
    pub(crate) encoded: Vec<f32>,    // (N, C)
    pub(crate) ln_1: Vec<f32>,       // (L, N, C)
    pub(crate) ln_1_mean: Vec<f32>,  // (L, N)
    pub(crate) ln_1_rstd: Vec<f32>,  // (L, N)
    pub(crate) qkv: Vec<f32>,        // (L, N, 3C)
    pub(crate) atty: Vec<f32>,       // (L, N, C)
    pub(crate) att: Vec<f32>,        // (L, B, NH, T, T)
    pub(crate) residual_2: Vec<f32>, // (L, N, C)
    pub(crate) ln_2: Vec<f32>,       // (L, N, C)
    pub(crate) ln_2_mean: Vec<f32>,  // (L, N)
    pub(crate) ln_2_rstd: Vec<f32>,  // (L, N)
    pub(crate) fch: Vec<f32>,        // (L, N, 4C)
    pub(crate) fch_gelu: Vec<f32>,   // (L, N, 4C)
    pub(crate) residual_3: Vec<f32>, // (L, N, C)
    pub(crate) ln_f: Vec<f32>,       // (N, C)
    pub(crate) ln_f_mean: Vec<f32>,  // (N,)
    pub(crate) ln_f_rstd: Vec<f32>,  // (N,)
    pub(crate) logits: Vec<f32>,     // (N, V)
    pub(crate) probs: Vec<f32>,      // (N, V)
    pub(crate) losses: Vec<f32>,     // (N,)
}

/// Scratch for the backward pass, reused across layers.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) d_residual: Vec<f32>, // (N, C)
    pub(crate) d_c: Vec<f32>,        // (N, C)
    pub(crate) d_qkv: Vec<f32>,      // (N, 3C)
    pub(crate) d_att: Vec<f32>,      // (B, NH, T, T)
    pub(crate) d_fch: Vec<f32>,      // (N, 4C)
    pub(crate) d_fch_gelu: Vec<f32>, // (N, 4C)
    pub(crate) d_logits: Vec<f32>,   // (N, V)
    pub(crate) ones: Vec<f32>,       // (N,)
    pub(crate) partials: Vec<f32>,   // (groups, 2C)
    pub(crate) tokens: Vec<u32>,     // (N,)
    pub(crate) targets: Vec<u32>,    // (N,)
}

fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

/// The GPT-2 family model on flat buffers.
pub struct Gpt {
    config: ModelConfig,
    layout: ParamLayout,
    params: Vec<f32>,
    grads: Vec<f32>,
    acts: Activations,
    scratch: Scratch,
    /// (B, T) of the last forward pass, and whether it had targets (so backward may run).
    last_shape: Option<(usize, usize, bool)>,
}

impl Gpt {
    /// A freshly initialized model: weights and embeddings N(0, 0.02), biases 0, LayerNorm
    /// weights 1 (GPT-2's init as the reference uses it), drawn from ChaCha8 seeded with `seed`.
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        let mut params = vec![0.0f32; layout.total];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for tensor in &layout.tensors {
            let view = &mut params[tensor.range()];
            if tensor.shape.len() >= 2 {
                fill_normal(view, INIT_STD, &mut rng);
            } else if tensor.name.contains("ln_") && tensor.name.ends_with(".weight") {
                view.fill(1.0);
            }
        }
        Self::from_params(config, params)
    }

    /// A model over given parameters (in this crate's layout); they must be finite.
    pub fn from_params(config: ModelConfig, params: Vec<f32>) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        if params.len() != layout.total {
            return Err(EngineError::config(
                "params",
                format!(
                    "{} values for a model of {} parameters",
                    params.len(),
                    layout.total
                ),
            ));
        }
        check_finite(&layout, &params)?;
        let grads = vec![0.0; layout.total];
        Ok(Gpt {
            config,
            layout,
            params,
            grads,
            acts: Activations::default(),
            scratch: Scratch::default(),
            last_shape: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    pub fn params(&self) -> &[f32] {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }
    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }
    /// The layout with both buffers writable (for the optimizer).
    pub fn tensors_params_grads_mut(&mut self) -> (&[TensorInfo], &mut [f32], &mut [f32]) {
        (&self.layout.tensors, &mut self.params, &mut self.grads)
    }

    /// Logits (B, T, V) of the last forward pass.
    pub fn logits(&self) -> &[f32] {
        match self.last_shape {
            Some((b, t, _)) => &self.acts.logits[..b * t * self.config.vocab_size],
            None => &[],
        }
    }

    /// Make sure every buffer fits a (B, T) batch; allocates only when a batch is larger than any before.
    fn ensure_capacity(&mut self, b: usize, t: usize) {
        let ModelConfig {
            vocab_size: v,
            layers: l,
            width: c,
            heads: nh,
            ..
        } = self.config;
        let n = b * t;
        let a = &mut self.acts;
        for (buf, len) in [
            (&mut a.encoded, n * c),
            (&mut a.ln_1, l * n * c),
            (&mut a.ln_1_mean, l * n),
            (&mut a.ln_1_rstd, l * n),
            (&mut a.qkv, l * n * 3 * c),
            (&mut a.atty, l * n * c),
            (&mut a.att, l * b * nh * t * t),
            (&mut a.residual_2, l * n * c),
            (&mut a.ln_2, l * n * c),
            (&mut a.ln_2_mean, l * n),
            (&mut a.ln_2_rstd, l * n),
            (&mut a.fch, l * n * 4 * c),
            (&mut a.fch_gelu, l * n * 4 * c),
            (&mut a.residual_3, l * n * c),
            (&mut a.ln_f, n * c),
            (&mut a.ln_f_mean, n),
            (&mut a.ln_f_rstd, n),
            (&mut a.logits, n * v),
            (&mut a.probs, n * v),
            (&mut a.losses, n),
        ] {
            grow(buf, len);
        }
        let s = &mut self.scratch;
        for (buf, len) in [
            (&mut s.d_residual, n * c),
            (&mut s.d_c, n * c),
            (&mut s.d_qkv, n * 3 * c),
            (&mut s.d_att, b * nh * t * t),
            (&mut s.d_fch, n * 4 * c),
            (&mut s.d_fch_gelu, n * 4 * c),
            (&mut s.d_logits, n * v),
            (&mut s.partials, row_groups(n) * 2 * c),
        ] {
            grow(buf, len);
        }
        if s.ones.len() < n {
            s.ones.resize(n, 1.0);
        }
    }

    fn check_batch(
        &self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<()> {
        if b == 0 || t == 0 {
            return Err(EngineError::InvalidBatch(format!(
                "empty batch ({b} x {t})"
            )));
        }
        if t > self.config.context_length {
            return Err(EngineError::InvalidBatch(format!(
                "sequence length {t} exceeds the context length {}",
                self.config.context_length
            )));
        }
        let n = b
            .checked_mul(t)
            .ok_or_else(|| EngineError::InvalidBatch("batch too large".into()))?;
        let c = self.config;
        // What ensure_capacity would hold: per layer about 16 values per (row, channel) plus the
        // attention probabilities, and the logits twice.
        let per_layer = n.saturating_mul(c.width).saturating_mul(16).saturating_add(
            b.saturating_mul(c.heads)
                .saturating_mul(t)
                .saturating_mul(t),
        );
        let values = per_layer
            .saturating_mul(c.layers)
            .saturating_add(n.saturating_mul(c.vocab_size).saturating_mul(3));
        if values > ACTIVATION_VALUES_MAX {
            return Err(EngineError::InvalidBatch(format!(
                "a {b} x {t} batch needs about {} GiB of activations; the limit is {} GiB",
                (values * 4) >> 30,
                (ACTIVATION_VALUES_MAX * 4) >> 30
            )));
        }
        for (what, tokens) in [("inputs", Some(inputs)), ("targets", targets)] {
            let Some(tokens) = tokens else { continue };
            if tokens.len() != n {
                return Err(EngineError::InvalidBatch(format!(
                    "{what}: {} tokens for a {b} x {t} batch",
                    tokens.len()
                )));
            }
            if let Some((i, &tok)) = tokens
                .iter()
                .enumerate()
                .find(|(_, &tok)| tok as usize >= self.config.vocab_size)
            {
                return Err(EngineError::InvalidBatch(format!(
                    "{what}[{i}] = {tok} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Run the model on `inputs` (B, T); with `targets`, return the mean cross-entropy (nats).
    pub fn forward(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>> {
        self.check_batch(inputs, targets, b, t)?;
        self.ensure_capacity(b, t);
        let n = b * t;
        self.scratch.tokens.clear();
        self.scratch.tokens.extend_from_slice(inputs);
        let ModelConfig {
            vocab_size: v,
            width: c,
            heads: nh,
            ..
        } = self.config;
        let p = &self.params;
        let lay = &self.layout;
        let a = &mut self.acts;
        k::encoder_forward(
            &mut a.encoded[..n * c],
            inputs,
            &p[lay.wte..],
            &p[lay.wpe..],
            t,
            c,
        );
        for (l, o) in lay.blocks.iter().enumerate() {
            block::block_forward(l, o, (b, t, c, nh), p, a);
        }
        let last_layer = self.config.layers - 1;
        let residual = &a.residual_3[last_layer * n * c..][..n * c];
        k::layernorm_forward(
            &mut a.ln_f[..n * c],
            &mut a.ln_f_mean[..n],
            &mut a.ln_f_rstd[..n],
            residual,
            &p[lay.ln_f_weight..][..c],
            &p[lay.ln_f_bias..][..c],
            c,
        );
        k::linear_forward(
            &mut a.logits[..n * v],
            &a.ln_f[..n * c],
            &p[lay.wte..][..v * c],
            None,
            c,
            v,
        );
        self.last_shape = Some((b, t, targets.is_some()));
        let Some(targets) = targets else {
            return Ok(None);
        };
        self.scratch.targets.clear();
        self.scratch.targets.extend_from_slice(targets);
        k::crossentropy_forward(
            &mut a.probs[..n * v],
            &mut a.losses[..n],
            &a.logits[..n * v],
            targets,
            v,
        );
        let loss = a.losses[..n].iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        Ok(Some(loss as f32))
    }

    /// Mean loss over `windows` sequences of T = inputs.len() / windows tokens, `batch` sequences
    /// per forward pass (evaluation: no gradients).
    pub fn mean_loss(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        windows: usize,
        batch: usize,
    ) -> Result<f64> {
        if windows == 0 || batch == 0 || !inputs.len().is_multiple_of(windows) {
            return Err(EngineError::InvalidBatch(format!(
                "{} tokens in {windows} windows, batch {batch}",
                inputs.len()
            )));
        }
        let t = inputs.len() / windows;
        let mut total = 0.0;
        for start in (0..windows).step_by(batch) {
            let count = batch.min(windows - start);
            let range = start * t..(start + count) * t;
            let loss = self
                .forward(&inputs[range.clone()], Some(&targets[range]), count, t)?
                .unwrap_or(f32::NAN);
            total += loss as f64 * count as f64;
        }
        Ok(total / windows as f64)
    }

    /// Gradients of the mean loss of the last forward pass (which must have had targets) into
    /// the gradient buffer (overwritten).
    pub fn backward(&mut self) -> Result<()> {
        let Some((b, t, true)) = self.last_shape else {
            return Err(EngineError::InvalidBatch(
                "backward needs a forward pass with targets first".into(),
            ));
        };
        let ModelConfig {
            vocab_size: v,
            width: c,
            heads: nh,
            ..
        } = self.config;
        let n = b * t;
        let (p, g, lay, a, s) = (
            &self.params,
            &mut self.grads,
            &self.layout,
            &self.acts,
            &mut self.scratch,
        );
        let nc = n * c;
        k::crossentropy_backward(
            &mut s.d_logits[..n * v],
            &a.probs[..n * v],
            &s.targets[..n],
            1.0 / n as f32,
            v,
        );
        // Tied head: logits = ln_f · wteᵀ. Its dx goes to d_c, its dweight is the first write to dwte.
        k::linear_backward(
            Some(&mut s.d_c[..nc]),
            &mut g[lay.wte..][..v * c],
            None,
            &s.d_logits[..n * v],
            &a.ln_f[..nc],
            &p[lay.wte..][..v * c],
            &s.ones,
            c,
            v,
        );
        let last_residual = &a.residual_3[(self.config.layers - 1) * nc..][..nc];
        s.d_residual[..nc].fill(0.0);
        let (dw, db) = tensor_pair(g, lay.ln_f_weight, lay.ln_f_bias, c);
        k::layernorm_backward(
            &mut s.d_residual[..nc],
            dw,
            db,
            &mut s.partials,
            &s.d_c[..nc],
            last_residual,
            &p[lay.ln_f_weight..][..c],
            &a.ln_f_mean[..n],
            &a.ln_f_rstd[..n],
            c,
        );
        for (l, o) in lay.blocks.iter().enumerate().rev() {
            block::block_backward(l, o, (b, t, c, nh), p, g, a, s);
        }
        let (dwte, rest) = g.split_at_mut(lay.wpe);
        k::encoder_backward(
            &mut dwte[lay.wte..],
            rest,
            &s.d_residual[..nc],
            &s.tokens[..n],
            b,
            t,
            c,
        );
        Ok(())
    }
}

/// Box-Muller normals from the seeded stream (pairs; the second of the last pair may be unused).
fn fill_normal(out: &mut [f32], std: f32, rng: &mut ChaCha8Rng) {
    let uniform =
        |rng: &mut ChaCha8Rng| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    for pair in out.chunks_mut(2) {
        let (u1, u2) = (uniform(rng), uniform(rng));
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        pair[0] = (radius * angle.cos()) as f32 * std;
        if pair.len() > 1 {
            pair[1] = (radius * angle.sin()) as f32 * std;
        }
    }
}

/// The first non-finite parameter, named by tensor, as an error.
pub fn check_finite(layout: &ParamLayout, params: &[f32]) -> Result<()> {
    for tensor in &layout.tensors {
        if let Some(index) = params[tensor.range()].iter().position(|v| !v.is_finite()) {
            return Err(EngineError::NonFinite {
                tensor: tensor.name.clone(),
                index,
            });
        }
    }
    Ok(())
}
