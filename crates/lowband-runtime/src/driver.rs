//! The in-memory driver: K sites and the coordinator in one process, deterministic, every packet
//! through the real protocol code and counted in the ledger. Time is emulated: each round costs
//! the slowest site's measured compute time plus the link time of its packets (sites run side by
//! side in reality, one after the other here).

use std::time::Instant;

use lowband_codec::CodecSpec;
use lowband_data::{Sampler, Split};
use lowband_engine::{preset, Batch, CpuTrainer, Gpt, LrSchedule, Trainer};
use lowband_protocol::{
    Action, Compression, Coordinator, CoordinatorConfig, Event, Site, SiteAction, SiteEvent,
    SiteScore,
};
use serde::{Deserialize, Serialize};

use crate::attack::Attacker;
use crate::config::RunConfig;
use crate::ledger::{Endpoint, Ledger};
use crate::state::{self, RunState};
use crate::strategy::{Strategy, StrategyKind};
use crate::RunError;

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
    },
    /// The coordinator refused a site's update (it forfeits the round).
    Refused {
        round: u64,
        site: u32,
        reason: String,
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
}

impl RunResult {
    pub fn emulated_seconds(&self) -> f64 {
        self.compute_seconds + self.communication_seconds
    }

    /// Bits a site sends per token it trains on, averaged over sites.
    pub fn bits_per_token(&self, sites: usize) -> f64 {
        let sent: u64 = (0..sites as u32)
            .map(|k| self.ledger.bytes_sent_by(Endpoint::Site(k)))
            .sum();
        sent as f64 * 8.0 / self.tokens as f64
    }
}

/// Where and how often to save a resumable state, and where to stop early (to test resuming).
#[derive(Clone, Debug, Default)]
pub struct Persistence {
    pub state_dir: Option<std::path::PathBuf>,
    /// Stop after this many rounds as if killed (tests).
    pub stop_after_rounds: Option<u64>,
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
        let Some(attacker) = self.attacker.as_mut() else {
            return expect_send(self.site.handle(SiteEvent::TrainingDone {
                round,
                params: self.trainer.params(),
            })?);
        };
        let start = self.site.round_start().to_vec();
        let sent = attacker.tamper(&start, self.trainer.params(), range.clone(), round);
        let packet = expect_send(self.site.handle(SiteEvent::TrainingDone {
            round,
            params: &sent,
        })?)?;
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

/// Everything both kinds of strategy share.
pub(crate) struct Common<'a> {
    pub(crate) config: &'a RunConfig,
    pub(crate) strategy: Strategy,
    split: &'a Split,
    pub(crate) context: usize,
    pub(crate) schedule: LrSchedule,
    evaluator: Gpt,
    validation: (Vec<u32>, Vec<u32>, usize),
    pub(crate) metrics: Vec<Metric>,
    pub(crate) ledger: Ledger,
    pub(crate) compute_seconds: f64,
    pub(crate) communication_seconds: f64,
    pub(crate) next_eval_step: u64,
    /// Largest bytes one site moved (up + down) in one sync so far.
    pub(crate) peak_sync_bytes: u64,
    pub(crate) telemetry_bytes: u64,
    /// The split's fingerprint: saved with the run state, and checked on resume.
    pub(crate) corpus: lowband_data::CorpusFingerprint,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl<'a> Common<'a> {
    pub(crate) fn new(
        config: &'a RunConfig,
        strategy: Strategy,
        split: &'a Split,
    ) -> Result<Self, RunError> {
        let model = preset(&config.preset)?.model;
        let context = model.context_length;
        Ok(Common {
            config,
            strategy,
            split,
            context,
            schedule: LrSchedule::reference(config.optimizer.lr, config.steps),
            evaluator: Gpt::new(model, config.seed)?,
            validation: split.validation_windows(context),
            corpus: split.fingerprint(),
            metrics: Vec::new(),
            ledger: Ledger::default(),
            compute_seconds: 0.0,
            communication_seconds: 0.0,
            next_eval_step: config.eval_every_steps.max(1),
            peak_sync_bytes: 0,
            telemetry_bytes: 0,
            inputs: Vec::new(),
            targets: Vec::new(),
        })
    }

    /// The parameters every strategy starts from (the seed's initialization).
    pub(crate) fn initial_params(&self) -> Vec<f32> {
        self.evaluator.params().to_vec()
    }

    pub(crate) fn tokens_per_site_step(&self) -> u64 {
        (self.config.site_batch * self.context) as u64
    }

    /// Validation loss of `params` on the first `windows` windows (all if None).
    fn evaluate(
        &mut self,
        params: &[f32],
        windows: Option<usize>,
    ) -> Result<(f64, usize), RunError> {
        let (inputs, targets, count) = &self.validation;
        let count = windows.map_or(*count, |w| w.min(*count));
        self.evaluator.params_mut().copy_from_slice(params);
        let loss = self.evaluator.mean_loss(
            &inputs[..count * self.context],
            &targets[..count * self.context],
            count,
            32,
        )?;
        Ok((loss, count))
    }

    /// Record an evaluation if `step` reached the next evaluation point.
    fn maybe_evaluate(&mut self, step: u64, params: &[f32]) -> Result<(), RunError> {
        if self.config.eval_every_steps == 0
            || step < self.next_eval_step
            || step >= self.config.steps
        {
            return Ok(());
        }
        while self.next_eval_step <= step {
            self.next_eval_step += self.config.eval_every_steps;
        }
        let (val_loss, windows) = self.evaluate(params, Some(self.config.eval_windows))?;
        self.push_eval(step, val_loss, windows);
        Ok(())
    }

    fn push_eval(&mut self, step: u64, val_loss: f64, windows: usize) {
        self.metrics.push(Metric::Eval {
            step,
            tokens: step * self.tokens_per_site_step() * self.config.sites as u64,
            inter_site_bytes: self.ledger.total_bytes(),
            emulated_seconds: self.compute_seconds + self.communication_seconds,
            val_loss,
            windows,
        });
    }

    /// Train one site for `steps` inner steps from global step `first`; returns the per-step
    /// losses summed into `losses` and the measured seconds.
    fn train_site(
        &mut self,
        site: &mut SiteRuntime,
        shard: usize,
        first: u64,
        losses: &mut [f32],
    ) -> Result<f64, RunError> {
        let batch = BatchShape {
            site_batch: self.config.site_batch,
            context: self.context,
        };
        train_steps(
            site,
            &self.split.shards[shard],
            batch,
            &self.schedule,
            first,
            losses,
            (&mut self.inputs, &mut self.targets),
        )
    }

    fn push_steps(&mut self, first: u64, loss_sums: &[f32], sites: usize) {
        for (i, sum) in loss_sums.iter().enumerate() {
            let step = first + i as u64;
            self.metrics.push(Metric::Step {
                step,
                loss: sum / sites as f32,
                lr: self.schedule.lr_at(step),
            });
        }
    }

    fn finish(mut self, rounds: u64, params: Vec<f32>) -> Result<RunResult, RunError> {
        let (final_val_loss, windows) = self.evaluate(&params, None)?;
        self.push_eval(self.config.steps, final_val_loss, windows);
        let model = preset(&self.config.preset)?.model;
        let tokens = self.config.steps * self.tokens_per_site_step() * self.config.sites as u64;
        Ok(RunResult {
            strategy: self.strategy,
            params: model.parameter_count(),
            tokens,
            rounds,
            ledger: self.ledger,
            metrics: self.metrics,
            final_val_loss,
            validation_windows: windows,
            compute_seconds: self.compute_seconds,
            communication_seconds: self.communication_seconds,
            final_params: params,
            sample_packets: Vec::new(),
            peak_sync_bytes_per_site: 0,
            telemetry_bytes: 0,
            site_scores: Vec::new(),
            aggregator: "mean".into(),
        })
    }
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

fn new_trainer(config: &RunConfig, initial: &[f32]) -> Result<CpuTrainer, RunError> {
    let model = preset(&config.preset)?.model;
    Ok(CpuTrainer::new(
        Gpt::from_params(model, initial.to_vec())?,
        config.optimizer,
    )?)
}

pub(crate) fn new_sites(
    config: &RunConfig,
    initial: &[f32],
    compression: Compression,
) -> Result<Vec<SiteRuntime>, RunError> {
    (0..config.sites)
        .map(|k| new_site(config, initial, compression, k))
        .collect()
}

/// Site k of a run: its protocol state, trainer, data stream and (if hostile) attacker.
pub(crate) fn new_site(
    config: &RunConfig,
    initial: &[f32],
    compression: Compression,
    k: usize,
) -> Result<SiteRuntime, RunError> {
    let site = Site::with_initial(k as u32, initial.to_vec(), compression)?;
    Ok(SiteRuntime {
        site,
        trainer: new_trainer(config, initial)?,
        sampler: site_sampler(config, k),
        attacker: attacker_of(config, k),
    })
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
    let kind = strategy.kind;
    let common = Common::new(config, strategy, split)?;
    // Every strategy starts from the seed's initial parameters (the evaluator was built from them).
    let initial = common.evaluator.params().to_vec();
    match kind {
        StrategyKind::Ddp => run_ddp(common, initial, persistence, progress),
        StrategyKind::Rounds if common.strategy.streaming.is_some() => {
            run_streaming(common, initial, persistence, progress)
        }
        StrategyKind::Rounds => run_rounds(common, initial, persistence, progress),
    }
}

fn run_ddp(
    mut common: Common,
    initial: Vec<f32>,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    let (config, split, strategy) = (common.config, common.split, common.strategy.clone());
    // One trainer stands for all sites: in DDP every site holds the same parameters and optimizer
    // state; each site has its own data stream.
    let mut trainer = new_trainer(config, &initial)?;
    let mut samplers: Vec<Sampler> = (0..config.sites).map(|k| site_sampler(config, k)).collect();
    let n = initial.len();
    let k_sites = config.sites as u64;
    let mut first_step = 0;
    if let Some(saved) = state::load(persistence, &strategy)? {
        first_step = saved.step;
        saved.restore_ddp(&mut common, &mut trainer, &mut samplers)?;
    }
    // Ring all-reduce of fp32 gradients: each site sends 2(K − 1)/K x 4 bytes x params per step.
    let bytes_per_site = (2 * (k_sites - 1) * 4 * n as u64) / k_sites;
    let mut sum = vec![0.0f32; n];
    let tokens_total = config.steps * common.tokens_per_site_step() * k_sites;
    for step in first_step..config.steps {
        let (mut slowest, mut loss_sum) = (0.0f64, 0.0f32);
        for (k, sampler) in samplers.iter_mut().enumerate() {
            let start = Instant::now();
            sampler.fill(
                &split.shards[k],
                config.site_batch,
                common.context,
                &mut common.inputs,
                &mut common.targets,
            );
            let batch = Batch {
                inputs: &common.inputs,
                targets: &common.targets,
                batch_size: config.site_batch,
                seq_len: common.context,
            };
            loss_sum += trainer.compute_gradients(&batch)?;
            let grads = trainer.grads();
            if k == 0 {
                sum.copy_from_slice(grads);
            } else {
                sum.iter_mut().zip(grads).for_each(|(s, g)| *s += g);
            }
            slowest = slowest.max(start.elapsed().as_secs_f64());
        }
        let scale = 1.0 / k_sites as f32;
        trainer
            .grads_mut()
            .iter_mut()
            .zip(&sum)
            .for_each(|(g, s)| *g = s * scale);
        let lr = common.schedule.lr_at(step);
        // Every site applies the same AdamW step to its own copy: part of each site's compute.
        let start = Instant::now();
        trainer.apply_gradients(lr)?;
        slowest += start.elapsed().as_secs_f64();
        for k in 0..config.sites as u32 {
            let next = (k + 1) % config.sites as u32;
            if next != k {
                common.ledger.record(
                    step,
                    Endpoint::Site(k),
                    Endpoint::Site(next),
                    bytes_per_site,
                );
            }
        }
        common.compute_seconds += slowest;
        common.communication_seconds += config
            .link
            .ring_all_reduce_seconds(4 * n as u64, config.sites);
        common.metrics.push(Metric::Step {
            step,
            loss: loss_sum / k_sites as f32,
            lr,
        });
        common.maybe_evaluate(step + 1, trainer.params())?;
        progress(Progress {
            tokens: (step + 1) * common.tokens_per_site_step() * k_sites,
            tokens_total,
            loss: loss_sum / k_sites as f32,
        });
        let every = config.checkpoint_every_rounds.max(1) * config.inner_steps;
        if config.checkpoint_every_rounds > 0
            && ((step + 1) % every == 0 || step + 1 == config.steps)
        {
            RunState::of_ddp(&common, step + 1, &trainer, &samplers)
                .save(persistence, &strategy)?;
        }
        if persistence
            .stop_after_rounds
            .is_some_and(|r| step + 1 >= r * config.inner_steps)
        {
            return Err(RunError::Stopped { step: step + 1 });
        }
    }
    let params = trainer.params().to_vec();
    let mut result = common.finish(config.steps, params)?;
    result.peak_sync_bytes_per_site = 2 * bytes_per_site;
    Ok(result)
}

fn run_rounds(
    mut common: Common,
    initial: Vec<f32>,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    let (config, strategy) = (common.config, common.strategy.clone());
    let n = initial.len();
    let outer = strategy.outer.unwrap_or_else(|| config.outer(false));
    let compression = strategy.compression_for(config.sites);
    // Every site derives the initial parameters from the shared seed: no first broadcast.
    let robustness = strategy.robustness(config.aggregator);
    let coordinator_config = CoordinatorConfig {
        quorum: config.sites,
        sites_max: config.sites,
        compression,
        sites_start_synced: true,
        robustness,
        ..CoordinatorConfig::new(n, outer)
    };
    let mut coordinator = Coordinator::new(coordinator_config, initial.clone())?;
    let mut sites = new_sites(config, &initial, compression)?;
    let mut step = 0u64;
    if let Some(saved) = state::load(persistence, &strategy)? {
        step = saved.step;
        saved.restore_rounds(&mut common, &mut coordinator, &mut sites)?;
    }
    let mut now_ms = (common.emulated_seconds() * 1e3) as u64;
    for k in 0..config.sites as u32 {
        coordinator.handle(now_ms, Event::SiteJoined { site: k });
    }
    let mut sends = absorb(coordinator.start(now_ms), &mut common, &coordinator, step)?;
    let tokens_total = config.steps * common.tokens_per_site_step() * config.sites as u64;
    let mut losses = vec![0.0f32; strategy.inner_steps.min(config.steps) as usize];
    let mut sample_packets: Vec<(String, bytes::Bytes)> = Vec::new();
    while step < config.steps {
        let round = coordinator.round();
        let h = strategy.inner_steps.min(config.steps - step);
        if sends.is_empty() {
            return Err(RunError::Protocol("the coordinator opened no round".into()));
        }
        let losses = &mut losses[..h as usize];
        losses.fill(0.0);
        let (mut slowest, mut down_bytes, mut up_bytes) = (0.0f64, 0u64, 0u64);
        let mut updates = Vec::with_capacity(sends.len());
        let trained = sends.len();
        for (to, bytes) in std::mem::take(&mut sends) {
            common.ledger.record(
                round,
                Endpoint::Coordinator,
                Endpoint::Site(to),
                bytes.len() as u64,
            );
            down_bytes = down_bytes.max(bytes.len() as u64);
            if to == 0 {
                sample_packets = vec![("global".into(), bytes.clone())];
            }
            let site = &mut sites[to as usize];
            expect_train(site.site.handle(SiteEvent::PacketArrived(&bytes))?, round)?;
            site.trainer
                .params_mut()
                .copy_from_slice(site.site.round_start());
            slowest = slowest.max(common.train_site(site, to as usize, step, losses)?);
            let update = site.update(round, 0..n, &compression.uplink)?;
            up_bytes = up_bytes.max(update.len() as u64);
            if to == 0 {
                sample_packets.push(("update".into(), bytes::Bytes::copy_from_slice(&update)));
            }
            updates.push((to, update));
            let done = updates.len() as u64;
            progress(Progress {
                tokens: step * common.tokens_per_site_step() * config.sites as u64
                    + h * common.tokens_per_site_step() * done,
                tokens_total,
                loss: losses[h as usize - 1] / done as f32,
            });
        }
        common.push_steps(step, losses, trained);
        step += h;
        common.compute_seconds += slowest;
        common.communication_seconds +=
            config.link.transfer_seconds(down_bytes) + config.link.transfer_seconds(up_bytes);
        common.peak_sync_bytes = common.peak_sync_bytes.max(down_bytes + up_bytes);
        now_ms = (common.emulated_seconds() * 1e3) as u64;
        for (from, bytes) in updates {
            common.ledger.record(
                round,
                Endpoint::Site(from),
                Endpoint::Coordinator,
                bytes.len() as u64,
            );
            let actions = coordinator.handle(
                now_ms,
                Event::PacketArrived {
                    from,
                    bytes: &bytes,
                },
            );
            sends.extend(absorb(actions, &mut common, &coordinator, step)?);
        }
        if config.checkpoint_every_rounds > 0
            && (coordinator.round() % config.checkpoint_every_rounds == 0 || step >= config.steps)
        {
            RunState::of_rounds(&common, step, &coordinator, &sites)
                .save(persistence, &strategy)?;
        }
        if persistence
            .stop_after_rounds
            .is_some_and(|r| coordinator.round() >= r)
        {
            return Err(RunError::Stopped { step });
        }
    }
    finish_rounds(common, &coordinator, sample_packets)
}

/// The result of a round strategy: the coordinator's θ is the global model.
pub(crate) fn finish_rounds(
    common: Common,
    coordinator: &Coordinator,
    sample_packets: Vec<(String, bytes::Bytes)>,
) -> Result<RunResult, RunError> {
    let aggregator = common
        .strategy
        .robustness(common.config.aggregator)
        .aggregator
        .to_string();
    let (peak_sync_bytes, telemetry_bytes) = (common.peak_sync_bytes, common.telemetry_bytes);
    let mut result = common.finish(coordinator.round(), coordinator.global().to_vec())?;
    result.telemetry_bytes = telemetry_bytes;
    result.sample_packets = sample_packets;
    result.peak_sync_bytes_per_site = peak_sync_bytes;
    result.site_scores = coordinator
        .scores()
        .iter()
        .map(|(k, s)| (*k, s.clone()))
        .collect();
    result.aggregator = aggregator;
    Ok(result)
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

/// Streaming DiLoCo: fragment r mod P syncs at step ⌊(r + 1)·H/P⌋; sites keep training and mix the
/// merge in `overlap_steps` later. Every packet still goes through the protocol code; the link time
/// of a sync is hidden up to `overlap_steps` of the sites' compute.
fn run_streaming(
    mut common: Common,
    initial: Vec<f32>,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    let (config, strategy) = (common.config, common.strategy.clone());
    let streaming = strategy
        .streaming
        .expect("run_streaming needs streaming settings");
    let n = initial.len();
    let parts = fragments(n, streaming.fragments);
    let outer = strategy.outer.unwrap_or_else(|| config.outer(false));
    let compression = strategy.compression_for(config.sites);
    let coordinator_config = CoordinatorConfig {
        quorum: config.sites,
        sites_max: config.sites,
        compression,
        sites_start_synced: true,
        fragments: parts.clone(),
        robustness: strategy.robustness(config.aggregator),
        ..CoordinatorConfig::new(n, outer)
    };
    let mut coordinator = Coordinator::new(coordinator_config, initial.clone())?;
    let mut sites = Vec::with_capacity(config.sites);
    for k in 0..config.sites {
        let site = Site::with_initial(k as u32, initial.clone(), compression)?
            .with_fragments(parts.clone())?;
        sites.push(SiteRuntime {
            site,
            trainer: new_trainer(config, &initial)?,
            sampler: site_sampler(config, k),
            attacker: attacker_of(config, k),
        });
    }
    // A saved state is taken right after a sync, with its merge in flight: the restored
    // coordinator sends that merge again, and it arrives at the step it was due.
    let (mut first_step, mut due_step, mut step_seconds_sum) = (0u64, 0u64, 0.0f64);
    if let Some(saved) = state::load(persistence, &strategy)? {
        first_step = saved.step;
        (due_step, step_seconds_sum) =
            saved.restore_streaming(&mut common, &mut coordinator, &mut sites)?;
    }
    let now_ms = (common.emulated_seconds() * 1e3) as u64;
    for k in 0..config.sites as u32 {
        coordinator.handle(now_ms, Event::SiteJoined { site: k });
    }
    let mut in_flight: Option<(u64, Sends)> = Some((
        due_step,
        absorb(
            coordinator.start(now_ms),
            &mut common,
            &coordinator,
            first_step,
        )?,
    ));
    let tokens_total = config.steps * common.tokens_per_site_step() * config.sites as u64;
    let mut sample_packets = Vec::new();
    let mut losses = [0.0f32];
    let p = streaming.fragments as u64;
    for step in first_step..config.steps {
        // A merge due now arrives before this step's training.
        if in_flight.as_ref().is_some_and(|(due, _)| *due <= step) {
            let (_, sends) = in_flight.take().expect("checked");
            deliver(
                &mut common,
                &mut sites,
                sends,
                streaming.mix,
                Some(&mut sample_packets),
            )?;
        }
        losses[0] = 0.0;
        let mut slowest = 0.0f64;
        // An excluded site is out of the run.
        let members = coordinator.members().clone();
        for (k, site) in sites
            .iter_mut()
            .enumerate()
            .filter(|(k, _)| members.contains(&(*k as u32)))
        {
            slowest = slowest.max(common.train_site(site, k, step, &mut losses)?);
        }
        common.compute_seconds += slowest;
        step_seconds_sum += slowest;
        common.push_steps(step, &losses, members.len());
        progress(Progress {
            tokens: (step + 1) * common.tokens_per_site_step() * config.sites as u64,
            tokens_total,
            loss: losses[0] / members.len().max(1) as f32,
        });
        let round = coordinator.round();
        let sync_step = ((round + 1) * strategy.inner_steps / p).max(round + 1);
        if step + 1 != sync_step || step + 1 >= config.steps {
            continue;
        }
        // Fragment `round` syncs: every site's update, then the coordinator's merge goes out.
        if let Some((_, sends)) = in_flight.take() {
            deliver(
                &mut common,
                &mut sites,
                sends,
                streaming.mix,
                Some(&mut sample_packets),
            )?;
        }
        let (sends, up_bytes, down_bytes) = sync_fragment(
            &mut common,
            &mut coordinator,
            &mut sites,
            step + 1,
            &mut sample_packets,
        )?;
        let link_seconds =
            config.link.transfer_seconds(up_bytes) + config.link.transfer_seconds(down_bytes);
        // The sites compute on while the sync travels: `overlap_steps` of their (mean) step time hides it.
        let hidden = streaming.overlap_steps as f64 * step_seconds_sum / (step + 1) as f64;
        common.communication_seconds += (link_seconds - hidden).max(0.0);
        in_flight = Some((step + 1 + streaming.overlap_steps, sends));
        if config.checkpoint_every_rounds > 0
            && coordinator.round() % config.checkpoint_every_rounds == 0
        {
            RunState::of_streaming(
                &common,
                step + 1,
                &coordinator,
                &sites,
                step + 1 + streaming.overlap_steps,
                step_seconds_sum,
            )
            .save(persistence, &strategy)?;
        }
        if persistence
            .stop_after_rounds
            .is_some_and(|r| coordinator.round() >= r)
        {
            return Err(RunError::Stopped { step: step + 1 });
        }
    }
    if let Some((_, sends)) = in_flight.take() {
        deliver(
            &mut common,
            &mut sites,
            sends,
            streaming.mix,
            Some(&mut sample_packets),
        )?;
    }
    // The end: every fragment syncs once more, back to back and without overlap, so that no
    // site's last steps are left out of the global model (DiLoCo's last round does the same).
    // These merges only update the coordinator's model: no site trains after them, so, as after
    // DiLoCo's last round, their broadcasts are not counted (the sites still read them, to move
    // to the next round of the protocol).
    for _ in 0..p {
        let (sends, up_bytes, _) = sync_fragment(
            &mut common,
            &mut coordinator,
            &mut sites,
            config.steps,
            &mut sample_packets,
        )?;
        common.communication_seconds += config.link.transfer_seconds(up_bytes);
        deliver(&mut common, &mut sites, sends, 0.0, None)?;
    }
    // The global model: the coordinator's θ (every fragment as last merged).
    finish_rounds(common, &coordinator, sample_packets)
}

/// One fragment sync: every site's update through the coordinator; returns the coordinator's
/// broadcast (not yet delivered) and the largest update and broadcast message, in bytes.
fn sync_fragment(
    common: &mut Common,
    coordinator: &mut Coordinator,
    sites: &mut [SiteRuntime],
    step: u64,
    samples: &mut Vec<(String, bytes::Bytes)>,
) -> Result<(Sends, u64, u64), RunError> {
    let round = coordinator.round();
    let now_ms = (common.emulated_seconds() * 1e3) as u64;
    let (mut sends, mut up_bytes) = (Vec::new(), 0u64);
    let range = coordinator.fragment(round);
    let uplink = coordinator.uplink();
    let members = coordinator.members().clone();
    for (k, site) in sites
        .iter_mut()
        .enumerate()
        .filter(|(k, _)| members.contains(&(*k as u32)))
    {
        let update = site.update(round, range.clone(), &uplink)?;
        up_bytes = up_bytes.max(update.len() as u64);
        common.ledger.record(
            round,
            Endpoint::Site(k as u32),
            Endpoint::Coordinator,
            update.len() as u64,
        );
        sends.extend(absorb(
            coordinator.handle(
                now_ms,
                Event::PacketArrived {
                    from: k as u32,
                    bytes: &update,
                },
            ),
            common,
            coordinator,
            step,
        )?);
        if k == 0 {
            samples.retain(|(kind, _)| kind != "update");
            samples.push(("update".into(), update.into()));
        }
    }
    let down_bytes = sends.iter().map(|(_, b)| b.len() as u64).max().unwrap_or(0);
    common.peak_sync_bytes = common.peak_sync_bytes.max(up_bytes + down_bytes);
    Ok((sends, up_bytes, down_bytes))
}

/// Streaming: hand a site the coordinator's broadcast and mix the fragment it changed into the
/// site's training parameters (`mix` of its own, the rest the merged value). Returns the round
/// the broadcast opens.
pub(crate) fn mix_in(site: &mut SiteRuntime, bytes: &[u8], mix: f32) -> Result<u64, RunError> {
    let actions = site.site.handle(SiteEvent::PacketArrived(bytes))?;
    let round = match actions.as_slice() {
        [SiteAction::Train { round }] => *round,
        other => {
            return Err(RunError::Protocol(format!(
                "site answered a global message with {other:?}"
            )))
        }
    };
    let range = site.site.changed_by_round(round);
    let (local, global) = (
        &mut site.trainer.params_mut()[range.clone()],
        &site.site.round_start()[range],
    );
    for (l, g) in local.iter_mut().zip(global) {
        *l = mix * *l + (1.0 - mix) * g;
    }
    Ok(round)
}

/// Deliver a broadcast to the sites and mix the fragment it changed into their parameters.
/// With `samples` None the broadcast is not counted in the ledger (the end-of-run syncs).
fn deliver(
    common: &mut Common,
    sites: &mut [SiteRuntime],
    sends: Sends,
    mix: f32,
    mut samples: Option<&mut Vec<(String, bytes::Bytes)>>,
) -> Result<(), RunError> {
    for (to, bytes) in sends {
        let site = sites
            .get_mut(to as usize)
            .ok_or_else(|| RunError::Protocol(format!("a packet for unknown site {to}")))?;
        if samples.is_some() {
            // Counted under the round the broadcast opens (its envelope says which).
            let round = lowband_protocol::wire::decode(&bytes, bytes.len())
                .map(|m| m.round)
                .map_err(|e| {
                    RunError::Protocol(format!("the coordinator sent a malformed broadcast: {e}"))
                })?;
            common.ledger.record(
                round,
                Endpoint::Coordinator,
                Endpoint::Site(to),
                bytes.len() as u64,
            );
        }
        mix_in(site, &bytes, mix)?;
        if let Some(samples) = samples.as_deref_mut().filter(|_| to == 0) {
            samples.retain(|(kind, _)| kind != "global");
            samples.push(("global".into(), bytes));
        }
    }
    Ok(())
}

impl Common<'_> {
    fn emulated_seconds(&self) -> f64 {
        self.compute_seconds + self.communication_seconds
    }
}

/// Carry out the coordinator's actions except sending: returns the sends (the next round's
/// global parameters), which the round loop delivers.
pub(crate) fn absorb(
    actions: Vec<Action>,
    common: &mut Common,
    coordinator: &Coordinator,
    step: u64,
) -> Result<Sends, RunError> {
    let mut sends = Vec::new();
    // Refusals at a round's close come before its report: log them under that round.
    let closing = actions.iter().find_map(|a| {
        if let Action::RoundClosed(r) = a {
            Some(r.round)
        } else {
            None
        }
    });
    let round_of_refusal = closing.unwrap_or_else(|| coordinator.round());
    for action in actions {
        match action {
            Action::Send { to, bytes } => sends.push((to, bytes)),
            Action::RoundClosed(report) => {
                common.metrics.push(Metric::Round {
                    round: report.round,
                    step,
                    inter_site_bytes: common.ledger.total_bytes(),
                    delta_norm: report.delta_norm,
                    update_norms: report.update_norms,
                    update_cosines: report.update_cosines,
                });
                if !report.missing.is_empty() {
                    return Err(RunError::Protocol(format!(
                        "round {} closed without sites {:?}",
                        report.round, report.missing
                    )));
                }
                common.maybe_evaluate(step, coordinator.global())?;
            }
            // The in-memory driver saves its own resumable state (see `checkpoint_every_rounds`).
            Action::Checkpoint { .. } => {}
            // A hostile (or broken) site: logged, scored by the coordinator, the run goes on.
            Action::Rejected { from, reason } => common.metrics.push(Metric::Refused {
                round: round_of_refusal,
                site: from,
                reason: reason.to_string(),
            }),
            Action::Excluded { site, reason } => common.metrics.push(Metric::Excluded {
                round: round_of_refusal,
                site,
                reason,
            }),
        }
    }
    Ok(sends)
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
