//! What a run is: model, sites, budget, optimizers, data (corpus, split, tuning), link profile and
//! the network's deadlines. One TOML-able struct whose defaults are the reference protocol
//! (`shared/reference/diloco_torch.py`): `compare --config`, the cluster file of `coordinator`,
//! `site` and `cluster`, and a saved state all hold this type, and the CLI's flags override it.

use lowband_data::ShardMode;
use lowband_engine::OptimizerConfig;
use lowband_protocol::{AggregatorSpec, OuterConfig};

use crate::attack::Attack;
use serde::{Deserialize, Serialize};

use crate::link::LinkProfile;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Model preset: tiny, small or ref.
    pub preset: String,
    /// Number of sites (K).
    pub sites: usize,
    /// Sequences each site trains on per inner step (the global batch is sites x site_batch).
    pub site_batch: usize,
    /// Inner steps per site. Every strategy trains the same tokens: steps x sites x site_batch x context.
    pub steps: u64,
    /// Inner steps per round (H) for round strategies (diloco, fedavg).
    pub inner_steps: u64,
    pub seed: u64,
    /// The inner AdamW (peak lr, betas, eps, weight decay on 2-D weights, grad clip).
    pub optimizer: OptimizerConfig,
    /// DiLoCo's outer Nesterov SGD.
    pub lr_outer: f32,
    pub momentum_outer: f32,
    /// How the training split is divided among sites: "non-iid" (contiguous, as the reference) or "iid".
    pub shard: ShardMode,
    /// Fraction of the corpus held out for validation (the end of it).
    pub validation_fraction: f64,
    /// Evaluate the global model about every this many inner steps (0: only at the end).
    pub eval_every_steps: u64,
    /// Validation windows used by the evaluations during the run (the final one uses all).
    pub eval_windows: usize,
    pub link: LinkProfile,
    /// Save a resumable state every this many rounds (DDP: every this many x inner_steps steps)
    /// and at the end, when the driver has a state directory (0: never).
    pub checkpoint_every_rounds: u64,
    /// The aggregator of round strategies that do not choose one (`[agg=...]`): mean, median,
    /// trimmed-mean, centered-clip, clipped-mean (see `lowband_protocol::aggregate`).
    pub aggregator: AggregatorSpec,
    /// Hostile sites for experiments, `SITE:MODE` (see `crate::attack`). DDP runs honest.
    pub attacks: Vec<Attack>,
    /// Text file or directory to train on (None: the generated synthetic language). Each node
    /// reads its own copy: the path is not compared between nodes, the corpus's fingerprint is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corpus: Option<std::path::PathBuf>,
    /// Size of the generated corpus when no corpus is given.
    pub corpus_bytes: usize,
    /// Choose settings without touching the validation split: set it aside and hold out the
    /// last part (the same fraction) of the training split instead. For screening candidates,
    /// never for the figures a benchmark reports.
    pub tuning: bool,
    /// Relative compute speed of each site, in site order (empty: all 1): the emulated clock
    /// charges site k each inner step's FLOPs over `site_gflop_per_second` times its speed, so
    /// that sites of different speeds can be measured on one machine (`--site-speeds
    /// 1,1,0.7,0.4`). For a synchronous strategy it changes when things happen on the emulated
    /// clock (a round waits for its slowest site), never what is computed; an asynchronous one
    /// merges updates in the order the clock says they arrive.
    pub site_speeds: Vec<f64>,
    /// What a site of speed 1 computes, in GFLOP/s: the emulated clock charges an inner step of
    /// lowband's engine its FLOPs (`ModelConfig::training_flops_per_token`) over this rate and
    /// the site's speed. A rate, not a measurement, so that the emulated clock (and the
    /// schedule an asynchronous strategy follows) is the same on every run and machine. The
    /// default is the engine's measured rate on the `small` model on this project's 2-core
    /// reference machine (docs/results.md). An external model's sites report their measured
    /// seconds instead.
    pub site_gflop_per_second: f64,
    /// Sites that go down and come back or slow down mid-run (`crate::faults`): for the
    /// strategies that run on the emulated clock's schedule (`async-diloco`, `[quorum=N]`).
    pub faults: Vec<crate::Fault>,
    /// Deadlines and retries of a networked run (`coordinator`, `site`, `cluster`).
    pub network: NetworkConfig,
    /// A model that is not lowband's engine (a PyTorch site's; see `crate::external`): the
    /// coordinator runs its rounds on a flat buffer of this many parameters and `preset` is
    /// not used. None: the engine's preset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<crate::external::ExternalModel>,
}

/// Deadlines and retries of a networked run. They decide when things happen, not what is
/// computed: a fault-free run gives the same model whatever they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Updates that close a round once its deadline has passed (0: every member, so a round
    /// waits for all members still connected).
    pub quorum: usize,
    /// Time after a round opens at which it may close on a quorum: a straggler or a hung site
    /// cannot hold the run longer.
    pub round_deadline_ms: u64,
    /// How long the coordinator waits for the sites before the first round (then it starts with
    /// a quorum), and for any site to come back when all are gone.
    pub join_timeout_ms: u64,
    /// A peer silent this long (no packet, no keep-alive) is gone: a site is dropped and the
    /// round goes on; a site's coordinator is lost and the site reconnects.
    pub idle_timeout_ms: u64,
    /// A site that lost its coordinator (or starts before it) keeps trying to reach it this
    /// long.
    pub reconnect_ms: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            quorum: 0,
            round_deadline_ms: lowband_protocol::coordinator::ROUND_DEADLINE_MS_DEFAULT,
            join_timeout_ms: 120_000,
            idle_timeout_ms: 30_000,
            reconnect_ms: 60_000,
        }
    }
}

/// Size of the generated synthetic corpus by default (8 MiB).
pub const CORPUS_BYTES_DEFAULT: usize = 8 << 20;
/// Largest generated corpus (the synthetic language is made in memory).
pub const GENERATED_BYTES_MAX: usize = 1 << 30;

/// The size of a generated corpus: 4 KiB to 1 GiB.
pub fn check_corpus_bytes(bytes: usize) -> Result<(), String> {
    if !(4096..=GENERATED_BYTES_MAX).contains(&bytes) {
        return Err(format!(
            "{bytes} is outside 4096 ..= {GENERATED_BYTES_MAX} bytes"
        ));
    }
    Ok(())
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            preset: "small".into(),
            sites: 4,
            site_batch: 4,
            steps: 1000,
            inner_steps: 50,
            seed: 0,
            optimizer: OptimizerConfig::default(),
            lr_outer: OuterConfig::DILOCO.lr,
            momentum_outer: OuterConfig::DILOCO.momentum,
            shard: ShardMode::NonIid,
            validation_fraction: 0.05,
            eval_every_steps: 100,
            eval_windows: 64,
            link: LinkProfile::default(),
            checkpoint_every_rounds: 5,
            aggregator: AggregatorSpec::Mean,
            attacks: Vec::new(),
            corpus: None,
            corpus_bytes: CORPUS_BYTES_DEFAULT,
            tuning: false,
            site_speeds: Vec::new(),
            site_gflop_per_second: SITE_GFLOP_PER_SECOND_DEFAULT,
            faults: Vec::new(),
            network: NetworkConfig::default(),
            model: None,
        }
    }
}

/// Default `site_gflop_per_second`: the engine's rate on `small` here (99.9 GFLOP/s measured).
pub const SITE_GFLOP_PER_SECOND_DEFAULT: f64 = 100.0;

/// Largest site count a run accepts (the protocol's own limit is a config field too).
pub const SITES_MAX: usize = 1024;
/// Most inner steps a run may have (a billion: token counts and schedules stay far from u64
/// overflow).
pub const STEPS_MAX: u64 = 1_000_000_000;
/// Largest sync interval.
pub const INNER_STEPS_MAX: u64 = 10_000_000;
/// Largest number of sequences per site per step.
pub const SITE_BATCH_MAX: usize = 4096;
/// Memory the in-memory driver may plan to use for the sites' model state (parameters,
/// gradients and AdamW moments: 16 bytes per parameter per site).
pub const SITE_STATE_BYTES_MAX: u64 = 16 << 30;

impl RunConfig {
    /// Check every field; the error names it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        lowband_engine::preset(&self.preset).map_err(|e| ("preset", e.to_string()))?;
        let at_least_one = |field: &'static str, v: u64| {
            if v == 0 {
                Err((field, "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        at_least_one("sites", self.sites as u64)?;
        if self.sites > SITES_MAX {
            return Err((
                "sites",
                format!("{} exceeds the limit of {SITES_MAX}", self.sites),
            ));
        }
        at_least_one("site_batch", self.site_batch as u64)?;
        if self.site_batch > SITE_BATCH_MAX {
            return Err((
                "site_batch",
                format!("{} exceeds the limit of {SITE_BATCH_MAX}", self.site_batch),
            ));
        }
        at_least_one("steps", self.steps)?;
        if self.steps > STEPS_MAX {
            return Err((
                "steps",
                format!("{} exceeds the limit of {STEPS_MAX}", self.steps),
            ));
        }
        at_least_one("inner_steps", self.inner_steps)?;
        if self.inner_steps > INNER_STEPS_MAX {
            return Err((
                "inner_steps",
                format!(
                    "{} exceeds the limit of {INNER_STEPS_MAX}",
                    self.inner_steps
                ),
            ));
        }
        if let Some(model) = &self.model {
            model.validate()?;
        }
        // (An external model's sites are not in this process.)
        let params = match &self.model {
            Some(_) => 0,
            None => lowband_engine::preset(&self.preset)
                .map(|p| p.model.parameter_count() as u64)
                .unwrap_or(0),
        };
        let state_bytes = params * 16 * self.sites as u64;
        if state_bytes > SITE_STATE_BYTES_MAX {
            return Err(("sites", format!("{} sites of {params} parameters need about {} GiB of model state; the limit is {} GiB", self.sites, state_bytes >> 30, SITE_STATE_BYTES_MAX >> 30)));
        }
        at_least_one("eval_windows", self.eval_windows as u64)?;
        self.optimizer
            .validate()
            .map_err(|e| ("optimizer", e.to_string()))?;
        if self.optimizer.lr == 0.0 {
            return Err(("optimizer.lr", "must be positive".into()));
        }
        self.outer(false).validate().map_err(|e| ("lr_outer", e))?;
        if !(self.validation_fraction > 0.0 && self.validation_fraction < 1.0) {
            return Err(("validation_fraction", "must be in (0, 1)".into()));
        }
        self.validate_attacks()?;
        self.validate_site_speeds()?;
        if self.corpus.is_none() {
            check_corpus_bytes(self.corpus_bytes).map_err(|e| ("corpus_bytes", e))?;
        }
        if self.network.idle_timeout_ms < 100 {
            return Err(("network.idle_timeout_ms", "at least 100".into()));
        }
        if self.network.round_deadline_ms == 0 {
            return Err(("network.round_deadline_ms", "must be at least 1".into()));
        }
        self.link.validate().map_err(|e| ("link", e))
    }

    /// What two nodes of a run (and a run and its saved state) must agree on: every setting but
    /// where the text comes from (`corpus`, `corpus_bytes`, `tuning`: each node reads its own
    /// copy, and the split's fingerprint, compared beside these settings, is what must agree),
    /// the network's deadlines (each process has its own), the checkpoint cadence and where an
    /// external model's initial parameters are read from (only the coordinator reads them).
    pub fn comparable(&self) -> RunConfig {
        RunConfig {
            model: self
                .model
                .clone()
                .map(|model| crate::external::ExternalModel {
                    initial: None,
                    ..model
                }),
            checkpoint_every_rounds: 0,
            corpus: None,
            corpus_bytes: CORPUS_BYTES_DEFAULT,
            tuning: false,
            network: NetworkConfig::default(),
            ..self.clone()
        }
    }

    /// Emulated seconds of one inner step of lowband's engine at speed 1 (None: an external
    /// model, whose sites report their measured seconds).
    pub fn step_seconds(&self) -> Option<f64> {
        if self.model.is_some() {
            return None;
        }
        let model = lowband_engine::preset(&self.preset).ok()?.model;
        let context = model.context_length;
        let tokens = (self.site_batch * context) as f64;
        Some(model.training_flops_per_token(context) * tokens / (self.site_gflop_per_second * 1e9))
    }

    /// Site k's relative compute speed (1 unless `site_speeds` says otherwise).
    pub fn site_speed(&self, k: usize) -> f64 {
        self.site_speeds.get(k).copied().unwrap_or(1.0)
    }

    /// One speed per site (or none), each a positive number; a positive compute rate.
    fn validate_site_speeds(&self) -> Result<(), (&'static str, String)> {
        if !self.site_speeds.is_empty() && self.site_speeds.len() != self.sites {
            return Err((
                "site_speeds",
                format!(
                    "{} speeds for {} sites (give one per site, or none)",
                    self.site_speeds.len(),
                    self.sites
                ),
            ));
        }
        if let Some(speed) = self
            .site_speeds
            .iter()
            .find(|s| !(s.is_finite() && **s > 0.0 && **s <= 1000.0))
        {
            return Err((
                "site_speeds",
                format!("{speed} is not a relative speed (a number above 0, at most 1000)"),
            ));
        }
        for fault in &self.faults {
            fault.validate(self.sites).map_err(|e| ("faults", e))?;
        }
        let rate = self.site_gflop_per_second;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1e9) {
            return Err((
                "site_gflop_per_second",
                format!("{rate} is not a compute rate (GFLOP/s above 0, at most 1e9)"),
            ));
        }
        Ok(())
    }

    /// Hostile sites: each a site of the run, one attack each, and not all of them.
    fn validate_attacks(&self) -> Result<(), (&'static str, String)> {
        for (i, attack) in self.attacks.iter().enumerate() {
            if attack.site as usize >= self.sites {
                return Err((
                    "attacks",
                    format!("{attack}: there are only sites 0 to {}", self.sites - 1),
                ));
            }
            if self.attacks[..i].iter().any(|a| a.site == attack.site) {
                return Err((
                    "attacks",
                    format!("site {} is given two attacks", attack.site),
                ));
            }
        }
        if self.attacks.len() >= self.sites {
            return Err((
                "attacks",
                "every site is hostile: no honest run to defend".into(),
            ));
        }
        Ok(())
    }

    /// The outer optimizer: DiLoCo's Nesterov, or FedAvg's plain average.
    pub fn outer(&self, fedavg: bool) -> OuterConfig {
        if fedavg {
            OuterConfig::FEDAVG
        } else {
            OuterConfig {
                lr: self.lr_outer,
                momentum: self.momentum_outer,
                nesterov: true,
            }
        }
    }
}
