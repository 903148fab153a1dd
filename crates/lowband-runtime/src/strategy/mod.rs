//! Strategies: named combinations of how often sites sync, how the updates travel (codecs, error
//! feedback) and how the merge is applied (outer optimizer).
//!
//! | name | uplink (site → coordinator) | downlink | error feedback | outer |
//! |---|---|---|---|---|
//! | `ddp` | fp32 gradients, ring all-reduce every step | | | |
//! | `diloco` | fp32 | fp32 parameters | none | Nesterov (`lr_outer`, `momentum_outer`) |
//! | `fedavg` | fp32 | fp32 parameters | none | mean of the sites (lr 1, no momentum) |
//! | `diloco-int8` | `int8` (chunk 4096, min/max, nearest) | same, as changes | none | Nesterov |
//! | `diloco-4bit` | `int4` (chunk 4096, min/max, nearest) | same, as changes | decay 1 | Nesterov |
//! | `sparseloco` | `topk` 64 of 4096, q2 values | `topk` 64·K of 4096, q2, as changes | decay 0.95 | lr 1, no momentum |
//! | `frugal` (H = 14) | `topk` 16 of 8192, q2 | `topk` 16·K of 8192, q2, as changes | decay 0.95 | lr 4, no momentum; Muon (lr 0.0075) inside |
//! | `demo-dct` | `dct` 8 of 256 coefficients, sign values | `dct` 8·K of 256, as changes | decay 1 | lr 1, no momentum |
//! | `streaming` | `int4` per fragment | same, as changes | decay 1 | Nesterov |
//! | `async-diloco` | fp32 | fp32 parameters | none | Nesterov, on a weighted merge |
//!
//! `streaming` (Streaming DiLoCo) splits the parameters into `fragments` (default 4) contiguous
//! ranges (the layout keeps each block's tensors together, so these are groups of layers); one
//! fragment syncs every H/P steps, in turn, so each syncs every H steps. Sites keep training
//! while the merge travels: it arrives `overlap` inner steps later (default 5; the link time up to
//! that much compute is hidden) and is mixed in as θ_f ← mix·θ_f,local + (1 − mix)·θ_f,global
//! (default mix 0.5). Overrides: `fragments=P;overlap=T;mix=A`.
//!
//! The sparse presets' downlink keeps K times the uplink's density (capped at the chunk), for K
//! sites: the merge of K sparse updates has up to K·k entries per chunk, and re-sparsifying it to
//! fewer lost quality (docs/results.md, "Where the downlink's bits must go"). That costs about
//! what relaying the K packets would, less at large K (Elias-Fano positions get cheaper with
//! density), and keeps the coordinator's error feedback. An explicit `down=` replaces it, and a
//! `up=` keeps the rule with the new uplink (a `randomk` uplink gets a `topk` downlink of K·k; a
//! dense uplink, its own codec).
//!
//! `async-diloco` (asynchronous rounds): no site waits for another. Site k trains a time budget
//! per update, H steps of the fastest site (H·speed_k/speed_max of its own, at least 1), sends
//! its update and trains on; when a merge arrives it carries the progress made since onto it
//! (`lowband_protocol::site::carry`). The coordinator closes a round once every member's update
//! is in, or `grace` round intervals after its first update arrived (default 0.5), and merges
//! the updates with every token alike (one budget long) and weighted by staleness; an update
//! more than `stale` rounds behind (default 4) is refused (`lowband_protocol::AsyncMerge` states
//! the rule). Overrides:
//! `grace=G;stale=S`, and every codec and outer override.
//!
//! `quorum=N` (round strategies but streaming): a round closes on the emulated clock as soon as
//! N updates are in; a later update of that round is refused and its compute lost (synchronous
//! rounds with a quorum, as a networked coordinator runs them with `--quorum`).
//!
//! Round strategies sync every `inner_steps` (H) unless the name says `@H`. Any of it can be
//! overridden in brackets: `sparseloco@30[up=topk:k=32,chunk=4096,values=q2;down=topk:k=128;decay=0.9;lr=0.8;momentum=0.5]`.
//!
//! The sites' inner optimizer: `inner=muon` (Muon on the hidden 2-D weights, AdamW on the rest;
//! `muon_lr=X` its peak learning rate, default 0.02) or `inner=adamw`; default: the run's
//! `[optimizer]`.
//!
//! Untrusted sites: `agg=median` (or `trimmed-mean`, `trimmed-mean:trim=0.25`, `centered-clip`,
//! `clipped-mean`, `mean`) picks the aggregator (default: the run's `aggregator`, the mean), and
//! `norm=X` or `norm=off` the bound on an update's norm relative to its round (default 4), and
//! `cos=X` or `cos=off` the direction check (default 0.25): both on for every aggregator but the
//! mean, off for the mean; see `lowband_protocol::trust`.

mod options;
mod presets;

use lowband_codec::CodecSpec;
#[cfg(test)]
use lowband_codec::ValueCoding;
use lowband_protocol::{AggregatorSpec, Compression, OuterConfig, Robustness};
#[cfg(test)]
use presets::{int, FRUGAL_LR_OUTER, FRUGAL_MUON};
use presets::{preset_defaults, preset_inner};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyKind {
    /// Every step, the sites' gradients are averaged (ring all-reduce of fp32), one AdamW step.
    Ddp,
    /// H inner AdamW steps per site, then an outer step on the merged delta.
    Rounds,
}

/// A strategy: its preset name, sync interval, codecs and outer optimizer.
#[derive(Clone, Debug, PartialEq)]
pub struct Strategy {
    pub kind: StrategyKind,
    /// The preset it was built from (`diloco`, `sparseloco`, ...).
    pub preset: String,
    /// Inner steps per round (1 for DDP).
    pub inner_steps: u64,
    /// The codecs as written (the sparse presets' downlink for K = 4): a run uses
    /// [`Strategy::compression_for`] its number of sites.
    pub compression: Compression,
    /// None: DiLoCo's Nesterov with the run's `lr_outer` and `momentum_outer`.
    pub outer: Option<OuterConfig>,
    /// Streaming DiLoCo's fragment schedule, for `streaming`.
    pub streaming: Option<Streaming>,
    /// None: the run's aggregator.
    pub aggregator: Option<AggregatorSpec>,
    /// The norm bound: None for the aggregator's default, Some(None) for off.
    pub norm_ratio_max: Option<Option<f32>>,
    /// The direction check's ratio: None for the aggregator's default, Some(None) for off.
    pub cosine_ratio_min: Option<Option<f32>>,
    /// `async-diloco`'s settings.
    pub asynchronous: Option<Asynchronous>,
    /// Synchronous rounds closed on the emulated clock once this many updates are in.
    pub quorum: Option<usize>,
    /// The sites' inner optimizer: None for the run's (`[optimizer]`), Some(None) for AdamW,
    /// Some(Some(muon)) for Muon on the hidden weights (`inner=muon`, `muon_lr=X`).
    pub inner_muon: Option<Option<lowband_engine::MuonConfig>>,
    /// The sparse presets: the downlink keeps `sites` times the uplink's density (see
    /// [`Strategy::compression_for`]); false once `down=` is given.
    downlink_follows_sites: bool,
    /// The bracketed overrides in canonical form (part of the name): keys in the documented
    /// order (`OVERRIDE_KEYS`), values as parsed and printed back, so that the same overrides
    /// written in another order, or with a codec's defaults spelled out, are the same strategy.
    overrides: String,
}

/// Streaming DiLoCo's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Streaming {
    /// P: contiguous parameter ranges synchronized in turn.
    pub fragments: usize,
    /// τ: inner steps between a fragment's sync and the arrival of its merge (< H/P).
    pub overlap_steps: u64,
    /// α: weight of the local fragment when the merge arrives.
    pub mix: f32,
}

/// Asynchronous rounds' settings (`async-diloco`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Asynchronous {
    /// The grace window after a round's first update, in round intervals (H steps of the
    /// fastest site).
    pub grace: f32,
    /// Largest staleness merged, in rounds.
    pub staleness_max: u64,
}

/// The override keys, in the order the canonical name lists them (the documented order).
const OVERRIDE_KEYS: [&str; 16] = [
    "up",
    "down",
    "decay",
    "lr",
    "momentum",
    "agg",
    "norm",
    "cos",
    "fragments",
    "overlap",
    "mix",
    "quorum",
    "grace",
    "stale",
    "inner",
    "muon_lr",
];

/// Longest strategy spec (its name becomes a directory name, at most 255 bytes on Linux).
pub const SPEC_CHARS_MAX: usize = 160;

impl Strategy {
    /// Parse `NAME[@H][[KEY=VALUE;...]]`; without `@H`, round strategies use `default_inner_steps`.
    pub fn parse(text: &str, default_inner_steps: u64) -> Result<Strategy, String> {
        let text = text.trim();
        // A strategy names run directories and files: keep it well inside a file name's limit.
        if text.len() > SPEC_CHARS_MAX {
            return Err(format!(
                "strategy {:?}…: {} characters, at most {SPEC_CHARS_MAX}",
                text.chars().take(40).collect::<String>(),
                text.len()
            ));
        }
        let (head, overrides) = match text.split_once('[') {
            Some((head, rest)) => (
                head,
                rest.strip_suffix(']')
                    .ok_or_else(|| format!("strategy {text:?}: overrides must end with ']'"))?,
            ),
            None => (text, ""),
        };
        let (name, h) = match head.split_once('@') {
            Some((name, h)) => {
                let h: u64 = h.parse().map_err(|_| {
                    format!("strategy {text:?}: H after '@' must be a whole number")
                })?;
                if h == 0 {
                    return Err(format!("strategy {text:?}: H must be at least 1"));
                }
                (name, Some(h))
            }
            None => (head, None),
        };
        let (kind, compression, outer) = preset_defaults(name)?;
        // DDP takes only the inner optimizer (`ddp[inner=muon]`, the reference for Muon sites).
        let inner_only = overrides
            .split(';')
            .filter_map(|item| item.split_once('='))
            .all(|(key, _)| matches!(key.trim(), "inner" | "muon_lr"));
        if kind == StrategyKind::Ddp && (h.is_some_and(|h| h != 1) || !inner_only) {
            return Err("ddp synchronises fp32 gradients every step; it takes no @H and no overrides but inner=muon;muon_lr=X".into());
        }
        let (preset_h, inner_muon) = preset_inner(name);
        let inner_steps = match kind {
            StrategyKind::Ddp => 1,
            _ => h.or(preset_h).unwrap_or(default_inner_steps),
        };
        let streaming = (name == "streaming").then_some(Streaming {
            fragments: 4,
            overlap_steps: 5,
            mix: 0.5,
        });
        let asynchronous = (name == "async-diloco").then_some(Asynchronous {
            grace: 0.5,
            staleness_max: 4,
        });
        let downlink_follows_sites = matches!(name, "sparseloco" | "demo-dct" | "frugal");
        let mut strategy = Strategy {
            kind,
            preset: name.to_string(),
            inner_steps,
            compression,
            outer,
            streaming,
            asynchronous,
            quorum: None,
            inner_muon,
            aggregator: None,
            norm_ratio_max: None,
            cosine_ratio_min: None,
            downlink_follows_sites,
            overrides: overrides.to_string(),
        };
        strategy
            .apply_overrides(overrides)
            .map_err(|e| format!("strategy {text:?}: {e}"))?;
        Ok(strategy)
    }

    /// `key`'s value as parsed, printed back (the canonical form the name shows).
    fn override_value(&self, key: &str, written: &str) -> String {
        let ratio = |r: Option<Option<f32>>| match r {
            Some(Some(x)) => x.to_string(),
            Some(None) => "off".into(),
            None => written.into(),
        };
        let outer = self.outer.unwrap_or(OuterConfig::DILOCO);
        match key {
            "up" => self.compression.uplink.to_string(),
            "down" => self.compression.downlink.to_string(),
            "decay" => self
                .compression
                .feedback_decay
                .map_or("none".into(), |d| d.to_string()),
            "lr" => outer.lr.to_string(),
            "momentum" => outer.momentum.to_string(),
            "agg" => self.aggregator.map_or(written.into(), |a| a.to_string()),
            "norm" => ratio(self.norm_ratio_max),
            "cos" => ratio(self.cosine_ratio_min),
            "fragments" => self
                .streaming
                .map_or(written.into(), |s| s.fragments.to_string()),
            "overlap" => self
                .streaming
                .map_or(written.into(), |s| s.overlap_steps.to_string()),
            "mix" => self.streaming.map_or(written.into(), |s| s.mix.to_string()),
            "quorum" => self.quorum.map_or(written.into(), |q| q.to_string()),
            "grace" => self
                .asynchronous
                .map_or(written.into(), |a| a.grace.to_string()),
            "stale" => self
                .asynchronous
                .map_or(written.into(), |a| a.staleness_max.to_string()),
            "inner" => match self.inner_muon {
                Some(Some(_)) => "muon".into(),
                Some(None) => "adamw".into(),
                None => written.into(),
            },
            "muon_lr" => match self.inner_muon {
                Some(Some(muon)) => muon.lr.to_string(),
                _ => written.into(),
            },
            _ => written.into(),
        }
    }

    /// One `key=value` override (`muon_lr_given`: `muon_lr` is among those read before).
    fn apply_override(
        &mut self,
        key: &str,
        value: &str,
        muon_lr_given: bool,
    ) -> Result<(), String> {
        let number = |v: &str| {
            v.parse::<f32>()
                .map_err(|_| format!("{key}=`{v}` is not a number"))
        };
        match key.trim() {
            "up" => self.compression.uplink = value.parse().map_err(|e: lowband_codec::CodecError| e.to_string())?,
            "down" => {
                self.compression.downlink = value.parse().map_err(|e: lowband_codec::CodecError| e.to_string())?;
                self.downlink_follows_sites = false;
            }
            "decay" => self.compression.feedback_decay = if value == "none" { None } else { Some(number(value)?) },
            "lr" => self.outer.get_or_insert(OuterConfig::DILOCO).lr = number(value)?,
            "momentum" => {
                let outer = self.outer.get_or_insert(OuterConfig::DILOCO);
                outer.momentum = number(value)?;
                outer.nesterov = outer.momentum > 0.0;
            }
            "agg" => self.aggregator = Some(value.parse()?),
            "norm" => self.norm_ratio_max = Some(if value.trim() == "off" { None } else { Some(number(value)?) }),
            "cos" => self.cosine_ratio_min = Some(if value.trim() == "off" { None } else { Some(number(value)?) }),
            "fragments" | "overlap" | "mix" => {
                let streaming = self.streaming.as_mut().ok_or_else(|| format!("`{key}` applies to the streaming strategy only"))?;
                match key.trim() {
                    "fragments" => streaming.fragments = value.parse().map_err(|_| format!("fragments=`{value}` is not a whole number"))?,
                    "overlap" => streaming.overlap_steps = value.parse().map_err(|_| format!("overlap=`{value}` is not a whole number"))?,
                    _ => streaming.mix = number(value)?,
                }
            }
            "quorum" | "grace" | "stale" | "inner" | "muon_lr" => {
                self.apply_late_override(key, value, muon_lr_given)?
            }
            other => return Err(format!("unknown override `{other}`; known: up, down, decay, lr, momentum, agg, norm, cos, quorum, inner, muon_lr (streaming: fragments, overlap, mix; async-diloco: grace, stale)")),
        }
        Ok(())
    }

    fn apply_overrides(&mut self, overrides: &str) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        // Canonical value of every key given, for the name.
        let mut canonical: Vec<(usize, String)> = Vec::new();
        for item in overrides
            .split(';')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}` is not KEY=VALUE"))?;
            if !seen.insert(key.trim()) {
                return Err(format!("`{}` is given twice", key.trim()));
            }
            let value = value.trim();
            let muon_lr_given = key.trim() != "muon_lr" && seen.contains("muon_lr");
            self.apply_override(key.trim(), value, muon_lr_given)?;
            let key = key.trim();
            let order = OVERRIDE_KEYS
                .iter()
                .position(|k| *k == key)
                .expect("a known key (checked above)");
            canonical.push((order, format!("{key}={}", self.override_value(key, value))));
        }
        canonical.sort();
        self.overrides = canonical
            .into_iter()
            .map(|(_, item)| item)
            .collect::<Vec<_>>()
            .join(";");
        self.compression.validate()?;
        if let Some(st) = self.streaming {
            if st.fragments == 0 || st.fragments as u64 > self.inner_steps {
                return Err(format!(
                    "fragments must be in 1..=H ({}), not {}",
                    self.inner_steps, st.fragments
                ));
            }
            if st.overlap_steps >= (self.inner_steps / st.fragments as u64).max(1) {
                return Err(format!("overlap must be below H/P = {} steps (a merge must arrive before the next sync)", self.inner_steps / st.fragments as u64));
            }
            if !(0.0..=1.0).contains(&st.mix) {
                return Err(format!("mix {} is not in [0, 1]", st.mix));
            }
        }
        if let Some(outer) = self.outer {
            outer.validate()?;
        }
        self.robustness(AggregatorSpec::Mean).validate()
    }

    /// The codecs of a run with `sites` sites. The sparse presets' downlink (unless `down=` was
    /// given) keeps `sites` times the uplink's k per chunk, at most the whole chunk, with the
    /// uplink's chunk and value coding; everything else is `compression` as written.
    pub fn compression_for(&self, sites: usize) -> Compression {
        let mut compression = self.compression;
        if self.downlink_follows_sites {
            let times =
                |k: u32, chunk: u32| (k as u64 * sites.max(1) as u64).min(chunk as u64) as u32;
            compression.downlink = match compression.uplink {
                // The merge of K random-k packets (each with its own positions) is sparse with up
                // to K·k entries at positions the sites do not know: the largest K·k go down.
                CodecSpec::TopK { k, chunk, values }
                | CodecSpec::RandomK {
                    k, chunk, values, ..
                } => CodecSpec::TopK {
                    k: times(k, chunk),
                    chunk,
                    values,
                },
                CodecSpec::DctTopK { k, chunk, values } => CodecSpec::DctTopK {
                    k: times(k, chunk),
                    chunk,
                    values,
                },
                // A dense uplink: its merge is dense, and goes down in the same codec.
                dense => dense,
            };
        }
        compression
    }

    /// The coordinator's defences under this strategy, given the run's default aggregator.
    pub fn robustness(&self, run_default: AggregatorSpec) -> Robustness {
        let mut robustness = Robustness::with(self.aggregator.unwrap_or(run_default));
        if let Some(bound) = self.norm_ratio_max {
            robustness.norm_ratio_max = bound;
        }
        if let Some(ratio) = self.cosine_ratio_min {
            robustness.cosine_ratio_min = ratio;
        }
        robustness
    }

    /// The name used in reports and state directories: `ddp`, `diloco@50`, `sparseloco@30[...]`.
    pub fn name(&self) -> String {
        match self.kind {
            StrategyKind::Ddp if self.overrides.is_empty() => "ddp".into(),
            StrategyKind::Ddp => format!("ddp[{}]", self.overrides),
            StrategyKind::Rounds if self.overrides.is_empty() => {
                format!("{}@{}", self.preset, self.inner_steps)
            }
            StrategyKind::Rounds => {
                format!("{}@{}[{}]", self.preset, self.inner_steps, self.overrides)
            }
        }
    }

    /// A directory name for this strategy's saved state.
    pub fn dir_name(&self) -> String {
        self.name()
            .replace('@', "-h")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_intervals_and_overrides() {
        let ddp = Strategy::parse("ddp", 50).unwrap();
        assert_eq!((ddp.kind, ddp.inner_steps), (StrategyKind::Ddp, 1));
        assert_eq!(Strategy::parse("diloco", 50).unwrap().name(), "diloco@50");
        assert_eq!(
            Strategy::parse("fedavg@10", 50).unwrap().outer,
            Some(OuterConfig::FEDAVG)
        );
        let sparse = Strategy::parse("sparseloco@30[up=topk:k=32;decay=0.9]", 50).unwrap();
        assert_eq!(
            sparse.compression.uplink,
            CodecSpec::TopK {
                k: 32,
                chunk: 4096,
                values: ValueCoding::Q2
            }
        );
        assert_eq!(sparse.compression.feedback_decay, Some(0.9));
        assert_eq!(sparse.outer, Some(OuterConfig::FEDAVG));
        assert_eq!(sparse.inner_steps, 30);
        let tuned = Strategy::parse("diloco-int8[lr=0.5]", 50).unwrap();
        assert_eq!(tuned.outer.unwrap().lr, 0.5);
        assert_eq!(
            Strategy::parse("diloco-4bit[decay=none]", 50)
                .unwrap()
                .outer,
            None
        );
        assert!(Strategy::parse("ddp@5", 50).is_err());
        assert!(Strategy::parse("ddp[up=int8]", 50).is_err());
        assert!(Strategy::parse("ddp[inner=muon;lr=2]", 50).is_err());
        let frugal = Strategy::parse("frugal", 50).unwrap();
        assert_eq!(frugal.name(), "frugal@14");
        assert_eq!(frugal.inner_muon, Some(Some(FRUGAL_MUON)));
        assert_eq!(frugal.outer.unwrap().lr, FRUGAL_LR_OUTER);
        let topk = |k| CodecSpec::TopK {
            k,
            chunk: 8192,
            values: ValueCoding::Q2,
        };
        assert_eq!(frugal.compression_for(4).downlink, topk(64));
        assert_eq!(frugal.compression_for(8).downlink, topk(128));
        let with_adamw = Strategy::parse("frugal@20[inner=adamw]", 50).unwrap();
        assert_eq!(
            (with_adamw.inner_steps, with_adamw.inner_muon),
            (20, Some(None))
        );
        assert!(Strategy::parse("frugal[muon_lr=0.01;inner=adamw]", 50).is_err());
        assert!(Strategy::parse("frugal[inner=adamw;muon_lr=0.01]", 50).is_err());
        let muon_ddp = Strategy::parse("ddp[muon_lr=0.01]", 50).unwrap();
        assert_eq!(muon_ddp.name(), "ddp[muon_lr=0.01]");
        assert_eq!(muon_ddp.inner_muon.unwrap().unwrap().lr, 0.01);
        assert!(Strategy::parse("diloco@0", 50).is_err());
        assert!(Strategy::parse("diloco@x", 50).is_err());
        assert!(Strategy::parse("sparseloco[up=topk:k=0]", 50).is_err());
        assert!(Strategy::parse("sparseloco[colour=red]", 50).is_err());
        assert!(Strategy::parse("sparseloco[decay=2]", 50).is_err());
        let streaming =
            Strategy::parse("streaming@40[fragments=2;overlap=3;mix=0.25]", 50).unwrap();
        assert_eq!(
            streaming.streaming,
            Some(Streaming {
                fragments: 2,
                overlap_steps: 3,
                mix: 0.25
            })
        );
        assert!(
            Strategy::parse("streaming@8[fragments=4;overlap=2]", 50).is_err(),
            "overlap must be below H/P"
        );
        assert!(Strategy::parse("diloco[fragments=2]", 50).is_err());
        assert!(Strategy::parse("gossip", 50)
            .unwrap_err()
            .contains("unknown strategy"));
        // The sparse presets' downlink follows K unless `down=` is given.
        let preset = Strategy::parse("sparseloco", 50).unwrap();
        assert_eq!(
            preset.compression_for(4),
            preset.compression,
            "the written preset is K = 4's"
        );
        assert_eq!(
            preset.compression_for(8).downlink,
            CodecSpec::TopK {
                k: 512,
                chunk: 4096,
                values: ValueCoding::Q2
            }
        );
        assert_eq!(
            preset.compression_for(100).downlink,
            CodecSpec::TopK {
                k: 4096,
                chunk: 4096,
                values: ValueCoding::Q2
            },
            "at most the chunk"
        );
        let up_only = Strategy::parse("sparseloco[up=topk:k=32,chunk=8192,values=q2]", 50).unwrap();
        assert_eq!(
            up_only.compression_for(3).downlink,
            CodecSpec::TopK {
                k: 96,
                chunk: 8192,
                values: ValueCoding::Q2
            }
        );
        assert_eq!(
            sparse.compression_for(2).downlink,
            CodecSpec::TopK {
                k: 64,
                chunk: 4096,
                values: ValueCoding::Q2
            },
            "no down= given: follows K and the new uplink"
        );
        let fixed =
            Strategy::parse("sparseloco[down=topk:k=128,chunk=4096,values=q2]", 50).unwrap();
        assert_eq!(
            fixed.compression_for(8).downlink,
            CodecSpec::TopK {
                k: 128,
                chunk: 4096,
                values: ValueCoding::Q2
            }
        );
        assert_eq!(
            Strategy::parse("demo-dct", 50)
                .unwrap()
                .compression_for(2)
                .downlink,
            CodecSpec::DctTopK {
                k: 16,
                chunk: 256,
                values: ValueCoding::Sign
            }
        );
        let random =
            Strategy::parse("sparseloco[up=randomk:k=64,chunk=4096,values=q2]", 50).unwrap();
        assert_eq!(
            random.compression_for(4).downlink,
            CodecSpec::TopK {
                k: 256,
                chunk: 4096,
                values: ValueCoding::Q2
            }
        );
        assert_eq!(
            Strategy::parse("sparseloco[up=int8]", 50)
                .unwrap()
                .compression_for(4)
                .downlink,
            int(8)
        );
        assert_eq!(
            Strategy::parse("diloco-int8", 50)
                .unwrap()
                .compression_for(8),
            Strategy::parse("diloco-int8", 50).unwrap().compression
        );
        let robust = Strategy::parse("diloco[agg=trimmed-mean:trim=0.2;norm=3]", 50).unwrap();
        assert_eq!(
            robust.robustness(AggregatorSpec::Mean),
            Robustness {
                norm_ratio_max: Some(3.0),
                ..Robustness::with(AggregatorSpec::TrimmedMean { trim: 0.2 })
            }
        );
        assert_eq!(
            Strategy::parse("diloco[norm=off]", 50)
                .unwrap()
                .robustness(AggregatorSpec::Median)
                .norm_ratio_max,
            None
        );
        assert_eq!(
            Strategy::parse("diloco", 50)
                .unwrap()
                .robustness(AggregatorSpec::Median)
                .aggregator,
            AggregatorSpec::Median,
            "the run's default"
        );
        assert!(Strategy::parse("diloco[agg=mode]", 50).is_err());
        assert!(
            Strategy::parse("diloco[norm=1]", 50).is_err(),
            "a bound must be above 1"
        );
    }

    #[test]
    fn the_same_overrides_written_otherwise_are_the_same_strategy() {
        let name = |text: &str| Strategy::parse(text, 50).unwrap().name();
        // The documented order and the codecs' defaults: the names the docs and results use.
        let written = "sparseloco@14[up=topk:k=16,chunk=8192,values=q2;down=topk:k=64,chunk=8192,values=q2;lr=6]";
        assert_eq!(name(written), written);
        assert_eq!(
            name("sparseloco@14[lr=6.0; down=topk:k=64,chunk=8192 ;up=topk:k=16,chunk=8192]"),
            written
        );
        assert_eq!(
            name("diloco[cos=off;norm=off]"),
            "diloco@50[norm=off;cos=off]"
        );
        assert_eq!(
            name("diloco[decay=0.90;agg=median]"),
            name("diloco[agg=median;decay=0.9]")
        );
        assert_eq!(
            Strategy::parse("diloco[decay=0.90;agg=median]", 50)
                .unwrap()
                .dir_name(),
            Strategy::parse("diloco[agg=median;decay=0.9]", 50)
                .unwrap()
                .dir_name()
        );
    }
}
