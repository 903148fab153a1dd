//! Text generation: temperature and top-k sampling, seeded.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use crate::error::{EngineError, Result};
use crate::model::Gpt;

/// How to pick each next token.
#[derive(Clone, Copy, Debug)]
pub struct SampleConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

/// Continue `prompt` (non-empty) by up to `max_new_tokens` tokens; the model sees the last
/// `context_length` tokens each time. Returns only the new tokens.
pub fn generate(model: &mut Gpt, prompt: &[u32], config: &SampleConfig) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidBatch("the prompt is empty".into()));
    }
    if !(config.temperature.is_finite() && config.temperature >= 0.0) {
        return Err(EngineError::config(
            "temperature",
            "must be a finite number >= 0",
        ));
    }
    let vocab = model.config().vocab_size;
    let context = model.config().context_length;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut tokens = prompt.to_vec();
    let mut scratch: Vec<(f32, u32)> = Vec::with_capacity(vocab);
    for _ in 0..config.max_new_tokens {
        let window = &tokens[tokens.len().saturating_sub(context)..];
        model.forward(window, None, 1, window.len())?;
        let last = &model.logits()[(window.len() - 1) * vocab..][..vocab];
        let next = pick(last, config, &mut rng, &mut scratch);
        tokens.push(next);
    }
    Ok(tokens.split_off(prompt.len()))
}

fn pick(
    logits: &[f32],
    config: &SampleConfig,
    rng: &mut ChaCha8Rng,
    scratch: &mut Vec<(f32, u32)>,
) -> u32 {
    scratch.clear();
    scratch.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
    // Most likely first; ties broken by token id so the order is deterministic.
    scratch.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if config.temperature == 0.0 {
        return scratch[0].1;
    }
    let keep = if config.top_k == 0 {
        scratch.len()
    } else {
        config.top_k.min(scratch.len())
    };
    let kept = &mut scratch[..keep];
    let max = kept[0].0;
    let mut total = 0.0f64;
    for (l, _) in kept.iter_mut() {
        *l = ((*l - max) / config.temperature).exp();
        total += *l as f64;
    }
    let mut target = ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) * total;
    for &(w, token) in kept.iter() {
        target -= w as f64;
        if target <= 0.0 {
            return token;
        }
    }
    kept[keep - 1].1
}
