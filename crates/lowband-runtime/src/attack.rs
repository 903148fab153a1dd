//! Attacks for experiments: a site that sends something other than its honest update.
//!
//! `SITE:MODE` (e.g. `2:scale=-10`), SITE is the 0-based site id. With δ the honest delta of the
//! round (θ_start − θ_trained, of the round's fragment):
//!
//! | mode | what the site sends |
//! |---|---|
//! | `signflip` | −δ |
//! | `scale=X` | X·δ |
//! | `noise=S` | Gaussian noise of standard deviation S per parameter, in place of δ |
//! | `zeros` | 0 (a free rider: it trains nothing useful but wants to be counted) |
//! | `nan` | δ with every 7th value NaN; the fp32, fp16, bf16, top-k and DCT encoders carry NaN into the packet, the int and random-k encoders drop it (NaN never wins a min/max) |
//! | `stale` | its first round's δ again, in every later round (a valid packet for the round) |
//! | `garbage` | random bytes, as many as an honest packet |
//!
//! The attacked delta goes through the site's own codec and error feedback, so it arrives as
//! the compression delivers it. Randomness is seeded by (run seed, site, round): runs replay.
//! DDP, the reference, is always run honest (its all-reduce has no aggregator to defend it).

use std::fmt;
use std::str::FromStr;

use lowband_codec::{build, CodecSpec};
use lowband_protocol::wire::{self, MessageKind};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttackMode {
    SignFlip,
    Scale(f32),
    Noise(f32),
    Zeros,
    Nan,
    Stale,
    Garbage,
}

/// One hostile site.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Attack {
    pub site: u32,
    pub mode: AttackMode,
}

const MODES: &str = "signflip, scale=X, noise=S, zeros, nan, stale, garbage";

impl fmt::Display for AttackMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttackMode::SignFlip => f.write_str("signflip"),
            AttackMode::Scale(x) => write!(f, "scale={x}"),
            AttackMode::Noise(s) => write!(f, "noise={s}"),
            AttackMode::Zeros => f.write_str("zeros"),
            AttackMode::Nan => f.write_str("nan"),
            AttackMode::Stale => f.write_str("stale"),
            AttackMode::Garbage => f.write_str("garbage"),
        }
    }
}

impl FromStr for AttackMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let number = |v: &str| {
            v.trim()
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("attack mode `{text}`: `{v}` is not a finite number"))
        };
        match text.trim().split_once('=') {
            Some(("scale", v)) => Ok(AttackMode::Scale(number(v)?)),
            Some(("noise", v)) => {
                let s = number(v)?;
                if s < 0.0 {
                    return Err(format!(
                        "attack mode `{text}`: the noise's standard deviation must not be negative"
                    ));
                }
                Ok(AttackMode::Noise(s))
            }
            Some(_) => Err(format!("unknown attack mode `{text}` (known: {MODES})")),
            None => match text.trim() {
                "signflip" => Ok(AttackMode::SignFlip),
                "zeros" => Ok(AttackMode::Zeros),
                "nan" => Ok(AttackMode::Nan),
                "stale" => Ok(AttackMode::Stale),
                "garbage" => Ok(AttackMode::Garbage),
                other => Err(format!("unknown attack mode `{other}` (known: {MODES})")),
            },
        }
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.site, self.mode)
    }
}

impl FromStr for Attack {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (site, mode) = text
            .split_once(':')
            .ok_or_else(|| format!("attack `{text}`: expected SITE:MODE, e.g. 2:scale=-10"))?;
        let site = site
            .trim()
            .parse()
            .map_err(|_| format!("attack `{text}`: site `{site}` is not a site number"))?;
        Ok(Attack {
            site,
            mode: mode.parse()?,
        })
    }
}

impl TryFrom<String> for Attack {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Attack> for String {
    fn from(attack: Attack) -> String {
        attack.to_string()
    }
}

/// A hostile site's state during a run.
pub(crate) struct Attacker {
    mode: AttackMode,
    site: u32,
    seed: u64,
    /// `stale`: the first delta it computed.
    pub(crate) stale: Option<Vec<f32>>,
}

impl Attacker {
    pub(crate) fn new(attack: Attack, seed: u64) -> Self {
        Attacker {
            mode: attack.mode,
            site: attack.site,
            seed,
            stale: None,
        }
    }

    fn rng(&self, round: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(
            self.seed
                ^ 0x6174_7461_636b
                ^ ((self.site as u64) << 48)
                ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
    }

    /// The parameters the site reports instead of `trained` (for the modes that change the delta;
    /// `nan` and `garbage` send honest parameters here and replace the packet afterwards).
    pub(crate) fn tamper(
        &mut self,
        start: &[f32],
        trained: &[f32],
        range: std::ops::Range<usize>,
        round: u64,
    ) -> Vec<f32> {
        let mut sent = trained.to_vec();
        let delta = |j: usize| start[j] - trained[j];
        match self.mode {
            AttackMode::SignFlip => range.for_each(|j| sent[j] = start[j] + delta(j)),
            AttackMode::Scale(x) => range.for_each(|j| sent[j] = start[j] - x * delta(j)),
            AttackMode::Zeros => range.for_each(|j| sent[j] = start[j]),
            AttackMode::Noise(sigma) => {
                let mut rng = self.rng(round);
                for j in range {
                    sent[j] = start[j] - sigma * gaussian(&mut rng);
                }
            }
            AttackMode::Stale => {
                let first = self
                    .stale
                    .get_or_insert_with(|| range.clone().map(delta).collect());
                if first.len() == range.len() {
                    for (j, d) in range.zip(first.iter()) {
                        sent[j] = start[j] - d;
                    }
                }
            }
            AttackMode::Nan | AttackMode::Garbage => {}
        }
        sent
    }

    /// The packet the site sends in place of its honest `packet` (`nan`, `garbage`), if any.
    pub(crate) fn replace_packet(
        &self,
        packet: &[u8],
        start: &[f32],
        trained: &[f32],
        range: std::ops::Range<usize>,
        round: u64,
        uplink: &CodecSpec,
    ) -> Option<Vec<u8>> {
        match self.mode {
            AttackMode::Garbage => {
                let mut rng = self.rng(round);
                let mut bytes = vec![0u8; packet.len()];
                rng.fill_bytes(&mut bytes);
                Some(bytes)
            }
            AttackMode::Nan => {
                let mut delta: Vec<f32> = range.map(|j| start[j] - trained[j]).collect();
                delta.iter_mut().step_by(7).for_each(|d| *d = f32::NAN);
                let mut codec = build(uplink).ok()?;
                let mut payload = Vec::new();
                codec.encode(&delta, &mut payload);
                Some(wire::encode(
                    MessageKind::Update,
                    round,
                    self.site,
                    &payload,
                ))
            }
            _ => None,
        }
    }
}

/// A standard normal draw (Box-Muller on two uniforms in (0, 1]).
fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_parse_and_print() {
        for text in [
            "2:signflip",
            "0:scale=-10",
            "3:noise=0.01",
            "1:zeros",
            "1:nan",
            "7:stale",
            "5:garbage",
        ] {
            assert_eq!(text.parse::<Attack>().unwrap().to_string(), text);
        }
        for bad in [
            "signflip",
            "x:zeros",
            "1:flip",
            "1:scale=",
            "1:scale=inf",
            "1:noise=-1",
            "1:zeros=2",
        ] {
            assert!(bad.parse::<Attack>().is_err(), "{bad}");
        }
    }

    #[test]
    fn each_mode_sends_what_it_says() {
        let start = [1.0f32, 1.0, 1.0, 1.0];
        let trained = [0.5f32, 0.0, 2.0, 1.0];
        let sent = |mode: &str, round: u64, attacker: &mut Attacker| {
            let _ = mode;
            let s = attacker.tamper(&start, &trained, 0..4, round);
            start
                .iter()
                .zip(&s)
                .map(|(a, b)| a - b)
                .collect::<Vec<f32>>()
        };
        let new = |mode: &str| Attacker::new(format!("0:{mode}").parse().unwrap(), 1);
        assert_eq!(
            sent("signflip", 0, &mut new("signflip")),
            vec![-0.5, -1.0, 1.0, 0.0]
        );
        assert_eq!(
            sent("scale", 0, &mut new("scale=-10")),
            vec![-5.0, -10.0, 10.0, 0.0]
        );
        assert_eq!(sent("zeros", 0, &mut new("zeros")), vec![0.0; 4]);
        let mut stale = new("stale");
        assert_eq!(sent("stale", 0, &mut stale), vec![0.5, 1.0, -1.0, 0.0]);
        let trained_later = [9.0f32; 4];
        let later = stale.tamper(&start, &trained_later, 0..4, 5);
        assert_eq!(
            start
                .iter()
                .zip(&later)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>(),
            vec![0.5, 1.0, -1.0, 0.0],
            "replays round 0"
        );
        // Noise: seeded by round, standard deviation about S.
        let mut noise = new("noise=2");
        let many_start = vec![0.0f32; 20_000];
        let draws = noise.tamper(&many_start, &many_start, 0..20_000, 3);
        let std =
            (draws.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / draws.len() as f64).sqrt();
        assert!((std - 2.0).abs() < 0.05, "std {std}");
        assert_eq!(
            draws,
            noise.tamper(&many_start, &many_start, 0..20_000, 3),
            "replays"
        );
        assert_ne!(draws, noise.tamper(&many_start, &many_start, 0..20_000, 4));
    }

    #[test]
    fn nan_and_garbage_replace_the_packet() {
        let start = vec![1.0f32; 100];
        let trained = vec![0.9f32; 100];
        let fp32 = CodecSpec::Fp32;
        let honest = vec![7u8; 50];
        let garbage = Attacker::new("1:garbage".parse().unwrap(), 0)
            .replace_packet(&honest, &start, &trained, 0..100, 2, &fp32)
            .unwrap();
        assert_eq!(garbage.len(), 50);
        assert_ne!(garbage, honest);
        let nan = Attacker::new("1:nan".parse().unwrap(), 0)
            .replace_packet(&honest, &start, &trained, 0..100, 2, &fp32)
            .unwrap();
        let message = wire::decode(&nan, 1 << 20).unwrap();
        assert_eq!(
            (message.kind, message.round, message.site),
            (MessageKind::Update, 2, 1)
        );
        let mut out = vec![0.0; 100];
        assert!(
            build(&fp32)
                .unwrap()
                .decode(message.payload, &mut out)
                .is_err(),
            "the decoder refuses NaN"
        );
        assert!(Attacker::new("1:zeros".parse().unwrap(), 0)
            .replace_packet(&honest, &start, &trained, 0..100, 2, &fp32)
            .is_none());
    }
}
