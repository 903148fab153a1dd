//! A seeded synthetic language whose entropy rate is computed exactly, so a report can state how
//! far a model's loss is from the best any model could do.
//!
//! Words are 1 to 3 random syllables (consonant, vowel, optional final consonant: "ka", "bor",
//! "tisen"), separated by single spaces. The word
//! sequence is a Markov chain: after word w the next word is, with probability 1 − ε, one of w's
//! `successors` own follow-up words (Zipf weights over a random choice), and with probability ε
//! any word (Zipf weights over a random global ranking). The byte stream is a one-to-one coding of
//! the word stream (spaces mark the boundaries), so its entropy rate in bits per byte is the word
//! chain's entropy rate, Σ_w π(w)·H(next | w), divided by the mean bytes per word,
//! Σ_w π(w)·(len(w) + 1), with π the chain's stationary distribution (found by power iteration).

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// The parameters of a synthetic language.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyntheticSpec {
    pub words: usize,
    /// Follow-up words per word.
    pub successors: usize,
    pub zipf_exponent: f64,
    /// ε: probability that the next word ignores the current one.
    pub jump_probability: f64,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    /// The default corpus: 200 words, 8 follow-ups each (Zipf 1.1), 5% free jumps: 0.336 nats
    /// per byte. Chosen so that a 2M-token run sees the `small` model learn the vocabulary and
    /// most of the word-to-word structure (500 words / 16 follow-ups learned it too late to show).
    fn default() -> Self {
        SyntheticSpec {
            words: 200,
            successors: 8,
            zipf_exponent: 1.1,
            jump_probability: 0.05,
            seed: 0x10B0,
        }
    }
}

pub struct SyntheticLanguage {
    pub spec: SyntheticSpec,
    words: Vec<Vec<u8>>,
    /// Per word: follow-up word ids and their cumulative weights (last = 1).
    local: Vec<(Vec<u32>, Vec<f64>)>,
    /// Cumulative weights of the global distribution over all words.
    global_cdf: Vec<f64>,
    global: Vec<f64>,
}

fn zipf(n: usize, exponent: f64) -> Vec<f64> {
    let raw: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-exponent)).collect();
    let total: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / total).collect()
}

fn cumulative(p: &[f64]) -> Vec<f64> {
    let mut acc = 0.0;
    let mut out: Vec<f64> = p
        .iter()
        .map(|x| {
            acc += x;
            acc
        })
        .collect();
    if let Some(last) = out.last_mut() {
        *last = 1.0;
    }
    out
}

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (((rng.next_u64() >> 32) * n as u64) >> 32) as usize
}

impl SyntheticLanguage {
    pub fn new(spec: SyntheticSpec) -> Self {
        assert!(spec.words >= 2 && spec.successors >= 1 && spec.successors <= spec.words);
        assert!((0.0..=1.0).contains(&spec.jump_probability));
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut seen = std::collections::HashSet::new();
        let mut words = Vec::with_capacity(spec.words);
        const ONSETS: &[u8] = b"bdfghklmnprstvwz";
        const VOWELS: &[u8] = b"aeiou";
        const CODAS: &[u8] = b"nrslt";
        while words.len() < spec.words {
            let mut word = Vec::new();
            for _ in 0..1 + below(&mut rng, 3) {
                word.push(ONSETS[below(&mut rng, ONSETS.len())]);
                word.push(VOWELS[below(&mut rng, VOWELS.len())]);
                if below(&mut rng, 3) == 0 {
                    word.push(CODAS[below(&mut rng, CODAS.len())]);
                }
            }
            if seen.insert(word.clone()) {
                words.push(word);
            }
        }
        let mut ranking: Vec<usize> = (0..spec.words).collect();
        for i in (1..ranking.len()).rev() {
            ranking.swap(i, below(&mut rng, i + 1));
        }
        let weights = zipf(spec.words, spec.zipf_exponent);
        let mut global = vec![0.0; spec.words];
        for (rank, &w) in ranking.iter().enumerate() {
            global[w] = weights[rank];
        }
        let local_weights = zipf(spec.successors, spec.zipf_exponent);
        let local = (0..spec.words)
            .map(|_| {
                let mut chosen = Vec::with_capacity(spec.successors);
                while chosen.len() < spec.successors {
                    let w = below(&mut rng, spec.words) as u32;
                    if !chosen.contains(&w) {
                        chosen.push(w);
                    }
                }
                (chosen, cumulative(&local_weights))
            })
            .collect();
        SyntheticLanguage {
            spec,
            words,
            local,
            global_cdf: cumulative(&global),
            global,
        }
    }

    /// `len` bytes of text from the chain, seeded.
    pub fn generate(&self, len: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(len + 16);
        let mut word = below(&mut rng, self.spec.words);
        while out.len() < len {
            out.extend_from_slice(&self.words[word]);
            out.push(b' ');
            word = self.next_word(word, &mut rng);
        }
        out.truncate(len);
        out
    }

    fn next_word(&self, word: usize, rng: &mut ChaCha8Rng) -> usize {
        let u = uniform(rng);
        if u < self.spec.jump_probability {
            let v = uniform(rng);
            self.global_cdf
                .partition_point(|&c| c < v)
                .min(self.spec.words - 1)
        } else {
            let (ids, cdf) = &self.local[word];
            let v = uniform(rng);
            ids[cdf.partition_point(|&c| c < v).min(ids.len() - 1)] as usize
        }
    }

    /// The row of P(next | word) as a dense vector.
    fn row(&self, word: usize, out: &mut [f64]) {
        let eps = self.spec.jump_probability;
        for (o, g) in out.iter_mut().zip(&self.global) {
            *o = eps * g;
        }
        let (ids, cdf) = &self.local[word];
        let mut previous = 0.0;
        for (&id, &c) in ids.iter().zip(cdf) {
            out[id as usize] += (1.0 - eps) * (c - previous);
            previous = c;
        }
    }

    /// The stationary distribution of the word chain (power iteration to 1e-13).
    pub fn stationary(&self) -> Vec<f64> {
        let n = self.spec.words;
        let eps = self.spec.jump_probability;
        let mut pi = vec![1.0 / n as f64; n];
        for _ in 0..10_000 {
            let mut next: Vec<f64> = self.global.iter().map(|g| eps * g).collect();
            for (w, (ids, cdf)) in self.local.iter().enumerate() {
                let mut previous = 0.0;
                for (&id, &c) in ids.iter().zip(cdf) {
                    next[id as usize] += pi[w] * (1.0 - eps) * (c - previous);
                    previous = c;
                }
            }
            let change: f64 = next.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
            pi = next;
            if change < 1e-13 {
                break;
            }
        }
        pi
    }

    /// Entropy rate of the byte stream in bits per byte (see the module doc for the derivation).
    pub fn entropy_rate_bits_per_byte(&self) -> f64 {
        let pi = self.stationary();
        let mut row = vec![0.0; self.spec.words];
        let mut bits_per_word = 0.0;
        let mut bytes_per_word = 0.0;
        for (w, &p) in pi.iter().enumerate() {
            self.row(w, &mut row);
            let h: f64 = row
                .iter()
                .filter(|&&q| q > 0.0)
                .map(|&q| -q * q.log2())
                .sum();
            bits_per_word += p * h;
            bytes_per_word += p * (self.words[w].len() + 1) as f64;
        }
        bits_per_word / bytes_per_word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_seeded_and_made_of_the_vocabulary() {
        let lang = SyntheticLanguage::new(SyntheticSpec::default());
        let a = lang.generate(10_000, 1);
        assert_eq!(a, lang.generate(10_000, 1));
        assert_ne!(a, lang.generate(10_000, 2));
        assert!(a.iter().all(|&b| b == b' ' || b.is_ascii_lowercase()));
    }

    #[test]
    fn entropy_rate_matches_the_empirical_rate_of_a_long_sample() {
        // Estimate −log2 P(word stream) per byte on a long sample with the true model: by the
        // ergodic theorem it converges to the entropy rate.
        let spec = SyntheticSpec {
            words: 300,
            successors: 8,
            ..SyntheticSpec::default()
        };
        let lang = SyntheticLanguage::new(spec);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut row = vec![0.0; spec.words];
        let (mut bits, mut bytes, mut word) = (0.0, 0usize, 0usize);
        for _ in 0..400_000 {
            let next = lang.next_word(word, &mut rng);
            lang.row(word, &mut row);
            bits -= row[next].log2();
            bytes += lang.words[next].len() + 1;
            word = next;
        }
        let empirical = bits / bytes as f64;
        let exact = lang.entropy_rate_bits_per_byte();
        assert!(
            (empirical - exact).abs() < 0.01 * exact,
            "empirical {empirical}, exact {exact}"
        );
    }
}
