//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use lowband_engine::{preset, Gpt, ModelConfig};

/// A deterministic pseudo-random token batch (LCG), with targets = inputs shifted by one.
pub fn batch(config: &ModelConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut stream: Vec<u32> = (0..b * t + b)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % config.vocab_size as u64) as u32
        })
        .collect();
    stream.truncate(b * (t + 1));
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for row in stream.chunks(t + 1) {
        inputs.extend_from_slice(&row[..t]);
        targets.extend_from_slice(&row[1..]);
    }
    (inputs, targets)
}

pub fn tiny() -> ModelConfig {
    preset("tiny").unwrap().model
}

pub fn tiny_model(seed: u64) -> Gpt {
    Gpt::new(tiny(), seed).unwrap()
}
