//! The in-memory driver: K sites and the coordinator in one process, deterministic, every packet
//! through the real protocol code and counted in the ledger. Time is emulated: each round costs
//! the slowest site's measured compute time plus the link time of its packets (sites run side by
//! side in reality, one after the other here).

use std::time::Instant;

use lowband_codec::CodecSpec;
use lowband_data::{Sampler, Split};
use lowband_engine::{preset, Batch, CpuTrainer, Gpt, LrSchedule, Trainer};
use lowband_protocol::{
    Compression, Coordinator, CoordinatorConfig, Event, Site, SiteAction, SiteEvent, SiteScore,
};
use serde::{Deserialize, Serialize};

use crate::attack::Attacker;
use crate::config::RunConfig;
use crate::ledger::{Endpoint, Ledger};
use crate::state::{self, RunState};
use crate::strategy::{Strategy, StrategyKind};
use crate::RunError;

mod books;
mod ddp;
mod rounds;
mod scheduled;

pub(crate) use scheduled::{run_scheduled_remote, CuedSite, Cues};
mod streaming;

pub(crate) use books::{absorb, checkpoint_due, Common, SyncBytes};
pub(crate) use rounds::finish_rounds;
pub(crate) use streaming::mix_in;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Metric {
    /// Mean training loss over the sites at one inner step.
    Step { step: u64, loss: f32, lr: f32 },
    /// A closed round (DDP: none; its traffic is per step).
    Round {
        round: u64,
        step: u64,
        inter_site_bytes: u64,
        delta_norm: f32,
        /// (site, L2 norm) of every update the coordinator decoded this round.
        #[serde(default)]
        update_norms: Vec<(u32, f32)>,
        /// (site, cosine of its update with the sum of the others).
        #[serde(default)]
        update_cosines: Vec<(u32, f32)>,
        /// Asynchronous rounds: (site, staleness in rounds) of every update the round held.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        update_staleness: Vec<(u32, u64)>,
    },
    /// The coordinator refused a site's update (it forfeits the round).
    Refused {
        round: u64,
        site: u32,
        reason: String,
        /// Asynchronous rounds: refused for staleness alone (`ProtocolError::TooStale`), not
        /// for what the update holds.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        too_stale: bool,
    },
    /// The coordinator excluded a site for repeated refusals.
    Excluded {
        round: u64,
        site: u32,
        reason: String,
    },
    /// Networked runs: a site (re)joined; it takes part from the next round that opens.
    Joined { round: u64, site: u32 },
    /// Networked runs: a site's connection ended (it left, was lost, or was asked to rejoin).
    Left {
        round: u64,
        site: u32,
        reason: String,
    },
    /// Networked runs: a round closed on a quorum after its deadline without this member.
    Missed { round: u64, site: u32 },
    /// Validation loss of the global model.
    Eval {
        step: u64,
        tokens: u64,
        inter_site_bytes: u64,
        emulated_seconds: f64,
        val_loss: f64,
        windows: usize,
    },
}

impl Metric {
    /// The coordinator refused `site`'s update of `round` for `reason`.
    pub fn refused(round: u64, site: u32, reason: &lowband_protocol::ProtocolError) -> Metric {
        Metric::Refused {
            round,
            site,
            reason: reason.to_string(),
            too_stale: matches!(reason, lowband_protocol::ProtocolError::TooStale { .. }),
        }
    }
}

/// Progress for a display: tokens trained so far of the total, and the latest mean loss.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub tokens: u64,
    pub tokens_total: u64,
    pub loss: f32,
}

/// What one run of one strategy measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub strategy: Strategy,
    pub params: usize,
    pub tokens: u64,
    /// Outer rounds (DDP: steps).
    pub rounds: u64,
    pub ledger: Ledger,
    pub metrics: Vec<Metric>,
    pub final_val_loss: f64,
    pub validation_windows: usize,
    /// Emulated: the slowest site's measured compute, summed over rounds.
    pub compute_seconds: f64,
    /// Emulated: link time of the packets on the configured link profile.
    pub communication_seconds: f64,
    pub final_params: Vec<f32>,
    /// The last round's packets of site 0, as sent: ("update", bytes) and ("global", bytes), for
    /// `lowband inspect packet`. Empty for DDP.
    pub sample_packets: Vec<(String, bytes::Bytes)>,
    /// Largest number of bytes one site moved (up + down) in one sync: what its link must carry
    /// at peak. DDP: one step's all-reduce share.
    pub peak_sync_bytes_per_site: u64,
    /// The coordinator's score of every site that sent something (round strategies).
    pub site_scores: Vec<(u32, SiteScore)>,
    /// The aggregator the coordinator used ("mean" for DDP's all-reduce).
    pub aggregator: String,
    /// Over a network: the bytes of the sites' training reports (per-step losses and compute
    /// seconds, `wire::TrainingReport`), sent beside the updates. Telemetry, not the algorithm's
    /// traffic, so not in the ledger; 0 in memory.
    pub telemetry_bytes: u64,
    /// Per site: the share of the run's emulated time that went into updates that were merged
    /// (not idle waiting for slower sites, not refused), between 0 and 1.
    pub site_goodput: Vec<f64>,
}

impl RunResult {
    pub fn emulated_seconds(&self) -> f64 {
        self.compute_seconds + self.communication_seconds
    }

    /// The run's goodput: its sites' mean share of the emulated time in merged updates.
    pub fn goodput(&self) -> f64 {
        if self.site_goodput.is_empty() {
            return 0.0;
        }
        self.site_goodput.iter().sum::<f64>() / self.site_goodput.len() as f64
    }

    /// Bits a site sends per token it trains on, averaged over sites.
    pub fn bits_per_token(&self, sites: usize) -> f64 {
        let sent: u64 = (0..sites as u32)
            .map(|k| self.ledger.bytes_sent_by(Endpoint::Site(k)))
            .sum();
        sent as f64 * 8.0 / self.tokens as f64
    }
}

/// What a run keeps and tells besides its result: where to save a resumable state, where to
/// stop early (to test resuming), and who watches it as it goes.
#[derive(Clone, Debug, Default)]
pub struct Persistence {
    pub state_dir: Option<std::path::PathBuf>,
    /// Stop after this many rounds as if killed (tests).
    pub stop_after_rounds: Option<u64>,
    /// The live view's observer (every metric and ledger entry as it is recorded).
    pub observer: Option<crate::Observer>,
}

pub(crate) struct SiteRuntime {
    pub(crate) site: Site,
    pub(crate) trainer: CpuTrainer,
    pub(crate) sampler: Sampler,
    /// Set when the run makes this site hostile (`RunConfig::attacks`).
    pub(crate) attacker: Option<Attacker>,
}

impl SiteRuntime {
    /// Finish the site's round: its update packet (a hostile site's attack, if it is one).
    pub(crate) fn update(
        &mut self,
        round: u64,
        range: std::ops::Range<usize>,
        uplink: &CodecSpec,
    ) -> Result<Vec<u8>, RunError> {
        self.update_from(round, None, range, uplink)
    }

    /// The update of δ = start − trained, where start is `reference` (an asynchronous site's:
    /// where this update began) or the global parameters the site holds.
    pub(crate) fn update_from(
        &mut self,
        round: u64,
        reference: Option<&[f32]>,
        range: std::ops::Range<usize>,
        uplink: &CodecSpec,
    ) -> Result<Vec<u8>, RunError> {
        let encode = |site: &mut Site, params: &[f32]| match reference {
            Some(reference) => Ok(site.update_from(round, reference, params)?),
            None => expect_send(site.handle(SiteEvent::TrainingDone { round, params })?),
        };
        let Some(attacker) = self.attacker.as_mut() else {
            return encode(&mut self.site, self.trainer.params());
        };
        let start = reference.unwrap_or(self.site.round_start()).to_vec();
        let sent = attacker.tamper(&start, self.trainer.params(), range.clone(), round);
        let packet = encode(&mut self.site, &sent)?;
        Ok(attacker
            .replace_packet(&packet, &start, self.trainer.params(), range, round, uplink)
            .unwrap_or(packet))
    }
}

fn attacker_of(config: &RunConfig, k: usize) -> Option<Attacker> {
    config
        .attacks
        .iter()
        .find(|a| a.site as usize == k)
        .map(|a| Attacker::new(*a, config.seed))
}

/// Sequences per site step and their length.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchShape {
    pub(crate) site_batch: usize,
    pub(crate) context: usize,
}

/// `losses.len()` inner steps of one site from global step `first` on its shard; each step's loss
/// is added to `losses`; returns the measured seconds. Both drivers train through this.
pub(crate) fn train_steps(
    site: &mut SiteRuntime,
    shard: &[u8],
    batch: BatchShape,
    schedule: &LrSchedule,
    first: u64,
    losses: &mut [f32],
    buffers: (&mut Vec<u32>, &mut Vec<u32>),
) -> Result<f64, RunError> {
    let start = Instant::now();
    let (inputs, targets) = buffers;
    for (i, loss_sum) in losses.iter_mut().enumerate() {
        site.sampler
            .fill(shard, batch.site_batch, batch.context, inputs, targets);
        let b = Batch {
            inputs,
            targets,
            batch_size: batch.site_batch,
            seq_len: batch.context,
        };
        let (loss, _) = site.trainer.step(&b, schedule.lr_at(first + i as u64))?;
        *loss_sum += loss;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Site k's data stream, seeded as the reference does: seed * 1000 + k.
fn site_sampler(config: &RunConfig, k: usize) -> Sampler {
    Sampler::new(config.seed.wrapping_mul(1000).wrapping_add(k as u64))
}

fn new_trainer(
    config: &RunConfig,
    optimizer: lowband_engine::OptimizerConfig,
    initial: &[f32],
) -> Result<CpuTrainer, RunError> {
    let model = preset(&config.preset)?.model;
    Ok(CpuTrainer::new(
        Gpt::from_params(model, initial.to_vec())?,
        optimizer,
    )?)
}

pub(crate) fn new_sites(
    config: &RunConfig,
    strategy: &Strategy,
    initial: &[f32],
) -> Result<Vec<SiteRuntime>, RunError> {
    (0..config.sites)
        .map(|k| strategy_site(config, strategy, initial, k))
        .collect()
}

/// Site k of a run: its protocol state, trainer, data stream and (if hostile) attacker.
pub(crate) fn new_site(
    config: &RunConfig,
    (compression, optimizer): (Compression, lowband_engine::OptimizerConfig),
    initial: &[f32],
    k: usize,
) -> Result<SiteRuntime, RunError> {
    let site = Site::with_initial(k as u32, initial.to_vec(), compression)?;
    Ok(SiteRuntime {
        site,
        trainer: new_trainer(config, optimizer, initial)?,
        sampler: site_sampler(config, k),
        attacker: attacker_of(config, k),
    })
}

/// The coordinator of a round strategy: `quorum` updates close a round after
/// `round_deadline_ms` (in memory: every site, and no deadline that matters); the sites start
/// from the seed's parameters, so the first round sends none. The in-memory and the network
/// drivers build it here.
pub(crate) fn coordinator_config(
    config: &RunConfig,
    strategy: &Strategy,
    params: usize,
    quorum: usize,
    round_deadline_ms: u64,
) -> CoordinatorConfig {
    let outer = strategy.outer.unwrap_or_else(|| config.outer(false));
    CoordinatorConfig {
        quorum,
        round_deadline_ms,
        sites_max: config.sites,
        compression: strategy.compression_for(config.sites),
        sites_start_synced: true,
        fragments: strategy
            .streaming
            .map(|s| fragments(params, s.fragments))
            .unwrap_or_default(),
        robustness: strategy.robustness(config.aggregator),
        ..CoordinatorConfig::new(params, outer)
    }
}

/// In memory: every site joins at once and the first round opens; its sends.
fn start_in_memory(
    common: &mut Common,
    coordinator: &mut Coordinator,
    step: u64,
) -> Result<Sends, RunError> {
    let now_ms = (common.emulated_seconds() * 1e3) as u64;
    for k in 0..common.config.sites as u32 {
        coordinator.handle(now_ms, Event::SiteJoined { site: k });
    }
    absorb(coordinator.start(now_ms), common, coordinator, step)
}

/// After a round in memory: save the state when due, and stop when asked (`stop_after_rounds`:
/// the state is saved first, so that `--resume` continues from here).
fn after_round(
    persistence: &Persistence,
    rounds_closed: u64,
    step: u64,
    save: impl FnOnce() -> Result<(), RunError>,
    due: bool,
) -> Result<(), RunError> {
    let stop = persistence
        .stop_after_rounds
        .is_some_and(|r| rounds_closed >= r);
    if due || (stop && persistence.state_dir.is_some()) {
        save()?;
    }
    if stop {
        return Err(RunError::Stopped { step });
    }
    Ok(())
}

/// Site k of a round strategy (with its fragments when streaming), as every driver runs it.
pub(crate) fn strategy_site(
    config: &RunConfig,
    strategy: &Strategy,
    initial: &[f32],
    k: usize,
) -> Result<SiteRuntime, RunError> {
    let settings = (
        strategy.compression_for(config.sites),
        strategy.inner_optimizer(config.optimizer),
    );
    let mut site = new_site(config, settings, initial, k)?;
    if let Some(streaming) = strategy.streaming {
        site.site = site
            .site
            .with_fragments(fragments(initial.len(), streaming.fragments))?;
    }
    Ok(site)
}

/// An external model (`[model]`) is trained by its own sites, not by lowband's engine.
pub(crate) fn refuse_external(config: &RunConfig) -> Result<(), RunError> {
    if config.model.is_some() {
        return Err(RunError::InvalidConfig {
            field: "model",
            reason: "this run file describes an external model (a [model] table): its sites are PyTorch processes (the lowband Python package); run `lowband coordinator` with it, or remove [model] to train lowband's own model".into(),
        });
    }
    Ok(())
}

/// Run one strategy on `split` under `config`.
pub fn run(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    config
        .validate()
        .map_err(|(field, reason)| RunError::InvalidConfig { field, reason })?;
    if split.shards.len() != config.sites {
        return Err(RunError::InvalidConfig {
            field: "sites",
            reason: format!("{} shards for {} sites", split.shards.len(), config.sites),
        });
    }
    refuse_external(config)?;
    if !config.faults.is_empty() && !strategy.scheduled() {
        return Err(RunError::InvalidConfig {
            field: "faults",
            reason: format!(
                "{}: a fault schedule applies to the strategies on the emulated clock's schedule (async-diloco, and [quorum=N] on a round strategy; plain diloco under faults is diloco[quorum={}])",
                strategy.name(),
                config.sites
            ),
        });
    }
    let kind = strategy.kind;
    let mut common = Common::new(config, strategy, split)?;
    // Every strategy starts from the seed's initial parameters (the evaluator was built from them).
    let initial = common.initial_params()?;
    common.observe(persistence.observer.clone(), Vec::new(), initial.len());
    match kind {
        StrategyKind::Ddp => ddp::run_ddp(common, initial, persistence, progress),
        StrategyKind::Rounds if common.strategy.scheduled() => {
            scheduled::run_scheduled(common, initial, persistence, progress)
        }
        StrategyKind::Rounds if common.strategy.streaming.is_some() => {
            streaming::run_streaming(common, initial, persistence, progress)
        }
        StrategyKind::Rounds => rounds::run_rounds(common, initial, persistence, progress),
    }
}

/// Packets the coordinator addressed to sites: (site, bytes).
pub(crate) type Sends = Vec<(u32, bytes::Bytes)>;

/// Contiguous, nearly equal ranges of `params` (the layout keeps each block together, so these
/// are groups of layers).
pub(crate) fn fragments(params: usize, count: usize) -> Vec<std::ops::Range<usize>> {
    (0..count)
        .map(|i| i * params / count..(i + 1) * params / count)
        .collect()
}

fn expect_train(actions: Vec<SiteAction>, round: u64) -> Result<(), RunError> {
    match actions.as_slice() {
        [SiteAction::Train { round: r }] if *r == round => Ok(()),
        other => Err(RunError::Protocol(format!(
            "site answered a global message with {other:?}"
        ))),
    }
}

fn expect_send(actions: Vec<SiteAction>) -> Result<Vec<u8>, RunError> {
    match actions.into_iter().next() {
        Some(SiteAction::Send(bytes)) => Ok(bytes),
        other => Err(RunError::Protocol(format!(
            "site answered finished training with {other:?}"
        ))),
    }
}
