//! The run's books, kept the same way by every driver (in memory and over the network): metrics,
//! the ledger, emulated compute and link time, evaluations, and what the protocol's actions mean
//! for them.

use lowband_data::Split;
use lowband_engine::{preset, Gpt, LrSchedule};

use lowband_protocol::{Action, Coordinator};

use super::*;
use crate::observe::{Observer, RunEvent};

/// A sync's largest message each way, in bytes (what the link model times).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SyncBytes {
    pub down: u64,
    pub up: u64,
}

/// Whether a state is saved now: every `every_rounds` closed rounds (0: never), and at the end.
/// The in-memory drivers save every `checkpoint_every_rounds`; a networked coordinator every
/// round (its state is its crash recovery: at most the round in flight is redone).
pub(crate) fn checkpoint_due(every_rounds: u64, rounds_closed: u64, finished: bool) -> bool {
    every_rounds > 0 && (rounds_closed.is_multiple_of(every_rounds) || finished)
}

/// The run: its settings and everything every driver records the same way.
pub(crate) struct Common<'a> {
    pub(crate) config: &'a RunConfig,
    pub(crate) strategy: Strategy,
    /// The corpus split (None: an external model, whose sites hold their own data).
    pub(super) split: Option<&'a Split>,
    pub(crate) context: usize,
    pub(crate) schedule: LrSchedule,
    /// The engine model that evaluates the global parameters on the validation windows (None:
    /// an external model, which the coordinator cannot run).
    pub(super) evaluation: Option<Evaluation>,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) ledger: Ledger,
    pub(crate) compute_seconds: f64,
    pub(crate) communication_seconds: f64,
    pub(crate) next_eval_step: u64,
    /// Largest bytes one site moved (up + down) in one sync so far.
    pub(crate) peak_sync_bytes: u64,
    pub(crate) telemetry_bytes: u64,
    /// The last packets of site 0 as sent, one of each kind ("global", "update"), for
    /// `lowband inspect packet`.
    pub(crate) sample_packets: Vec<(String, bytes::Bytes)>,
    /// The split's fingerprint: saved with the run state, and checked on resume.
    pub(crate) corpus: lowband_data::CorpusFingerprint,
    pub(super) inputs: Vec<u32>,
    pub(super) targets: Vec<u32>,
    /// Who watches the run as it goes (the live view).
    pub(crate) observer: Option<Observer>,
    /// Per site: emulated compute seconds that went into merged updates (goodput's numerator).
    pub(crate) site_busy_seconds: Vec<f64>,
    /// (round, site) of every refused update: its compute is not credited.
    pub(crate) refused: std::collections::BTreeSet<(u64, u32)>,
    /// Tokens the sites have trained so far, where sites train at different rates (a
    /// scheduled strategy); None: steps x sites x tokens per site step.
    pub(crate) tokens_trained: Option<u64>,
}

/// The evaluator of an engine run: the model and the validation windows.
pub(crate) struct Evaluation {
    gpt: Gpt,
    /// Inputs, targets, window count.
    windows: (Vec<u32>, Vec<u32>, usize),
}

impl<'a> Common<'a> {
    pub(crate) fn new(
        config: &'a RunConfig,
        strategy: Strategy,
        split: &'a Split,
    ) -> Result<Self, RunError> {
        let model = preset(&config.preset)?.model;
        let context = model.context_length;
        let evaluation = Evaluation {
            gpt: Gpt::new(model, config.seed)?,
            windows: split.validation_windows(context),
        };
        Ok(Common::build(
            config,
            strategy,
            Some(split),
            Some(evaluation),
            split.fingerprint(),
        ))
    }

    /// The books of an external model's run (a coordinator for PyTorch sites): no corpus, no
    /// evaluator; `fingerprint` stands for the corpus's in a saved state.
    pub(crate) fn external(
        config: &'a RunConfig,
        strategy: Strategy,
        fingerprint: lowband_data::CorpusFingerprint,
    ) -> Self {
        Common::build(config, strategy, None, None, fingerprint)
    }

    fn build(
        config: &'a RunConfig,
        strategy: Strategy,
        split: Option<&'a Split>,
        evaluation: Option<Evaluation>,
        corpus: lowband_data::CorpusFingerprint,
    ) -> Self {
        let context = preset(&config.preset).map_or(0, |p| p.model.context_length);
        Common {
            config,
            strategy,
            split,
            context,
            schedule: LrSchedule::reference(config.optimizer.lr, config.steps),
            evaluation,
            corpus,
            metrics: Vec::new(),
            ledger: Ledger::default(),
            compute_seconds: 0.0,
            communication_seconds: 0.0,
            next_eval_step: config.eval_every_steps.max(1),
            peak_sync_bytes: 0,
            telemetry_bytes: 0,
            sample_packets: Vec::new(),
            inputs: Vec::new(),
            targets: Vec::new(),
            observer: None,
            site_busy_seconds: vec![0.0; config.sites],
            refused: std::collections::BTreeSet::new(),
            tokens_trained: None,
        }
    }

    /// Credit site `site`'s `seconds` of emulated compute for `round`, unless its update of that
    /// round was refused (compute thrown away is not goodput).
    pub(crate) fn credit(&mut self, round: u64, site: u32, seconds: f64) {
        if self.refused.contains(&(round, site)) {
            return;
        }
        if let Some(busy) = self.site_busy_seconds.get_mut(site as usize) {
            *busy += seconds;
        }
    }

    /// Site `site`'s emulated compute for `steps` inner steps (that took `measured` seconds on
    /// this machine): the steps' nominal time (`RunConfig::step_seconds`) over its relative
    /// speed; an external model's measured seconds over its speed.
    pub(crate) fn emulated_compute(&self, site: usize, steps: u64, measured: f64) -> f64 {
        let speed = self.config.site_speed(site);
        match self.config.step_seconds() {
            Some(step_seconds) => steps as f64 * step_seconds / speed,
            None => measured / speed,
        }
    }

    /// Let `observer` watch the run from here on: it learns the run's size and the sites' keys
    /// (hex; none in memory) first.
    pub(crate) fn observe(
        &mut self,
        observer: Option<Observer>,
        site_keys: Vec<String>,
        params: usize,
    ) {
        self.observer = observer;
        let event = RunEvent::Started {
            strategy: self.strategy.name(),
            sites: self.config.sites,
            steps: self.config.steps,
            tokens_per_step: self.tokens_per_site_step() * self.config.sites as u64,
            params,
            price_per_gb: self.config.link.price_per_gb,
            site_keys,
        };
        self.notify(|| event);
    }

    /// Tell the observer, if there is one (`event` is built only then).
    pub(crate) fn notify(&self, event: impl FnOnce() -> RunEvent) {
        if let Some(observer) = &self.observer {
            observer.notify(&event());
        }
    }

    /// Record a metric (and tell the observer).
    pub(crate) fn record_metric(&mut self, metric: Metric) {
        let emulated_seconds = self.emulated_seconds();
        if let Some(observer) = &self.observer {
            observer.notify(&RunEvent::Metric {
                strategy: self.strategy.name(),
                emulated_seconds,
                metric: metric.clone(),
            });
        }
        self.metrics.push(metric);
    }

    /// Count `bytes` on the link `from` → `to` in `round` (and tell the observer).
    pub(crate) fn record_bytes(&mut self, round: u64, from: Endpoint, to: Endpoint, bytes: u64) {
        self.ledger.record(round, from, to, bytes);
        self.notify(|| RunEvent::Traffic {
            strategy: self.strategy.name(),
            round,
            from,
            to,
            bytes,
        });
    }

    /// The parameters every strategy starts from (the seed's initialization).
    pub(crate) fn initial_params(&self) -> Result<Vec<f32>, RunError> {
        match &self.evaluation {
            Some(evaluation) => Ok(evaluation.gpt.params().to_vec()),
            None => Err(RunError::InvalidConfig {
                field: "model",
                reason: "an external model's initial parameters come from model.initial".into(),
            }),
        }
    }

    /// The corpus split: an engine run's (an external model's sites hold their own data).
    pub(super) fn split(&self) -> Result<&'a Split, RunError> {
        self.split.ok_or_else(|| RunError::InvalidConfig {
            field: "model",
            reason:
                "an external model is trained by its own sites (lowband.torch), not by this driver"
                    .into(),
        })
    }

    pub(crate) fn tokens_per_site_step(&self) -> u64 {
        match self.config.model.as_ref().and_then(|m| m.tokens_per_step) {
            Some(tokens) => tokens,
            None => (self.config.site_batch * self.context) as u64,
        }
    }

    /// Validation loss of `params` on the first `windows` windows (all if None); NaN on no
    /// windows for an external model (its sites evaluate it, not the coordinator).
    pub(super) fn evaluate(
        &mut self,
        params: &[f32],
        windows: Option<usize>,
    ) -> Result<(f64, usize), RunError> {
        let Some(evaluation) = self.evaluation.as_mut() else {
            return Ok((f64::NAN, 0));
        };
        let (inputs, targets, count) = &evaluation.windows;
        let count = windows.map_or(*count, |w| w.min(*count));
        evaluation.gpt.params_mut().copy_from_slice(params);
        let loss = evaluation.gpt.mean_loss(
            &inputs[..count * self.context],
            &targets[..count * self.context],
            count,
            32,
        )?;
        Ok((loss, count))
    }

    /// Record an evaluation if `step` reached the next evaluation point.
    pub(super) fn maybe_evaluate(&mut self, step: u64, params: &[f32]) -> Result<(), RunError> {
        if self.config.eval_every_steps == 0
            || self.evaluation.is_none()
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

    /// A run that starts at step 0 evaluates its initial parameters first (every strategy's
    /// curve starts at the same point, and a loss is measured at any time of the run: what the
    /// report's comparison at equal time reads). Nothing for an external model, or for a run
    /// that evaluates only at its end (`eval_every_steps = 0`).
    pub(crate) fn evaluate_initial(&mut self, params: &[f32]) -> Result<(), RunError> {
        if self.evaluation.is_none()
            || self.config.eval_every_steps == 0
            || !self.metrics.is_empty()
        {
            return Ok(());
        }
        let (val_loss, windows) = self.evaluate(params, Some(self.config.eval_windows))?;
        self.push_eval(0, val_loss, windows);
        Ok(())
    }

    pub(super) fn push_eval(&mut self, step: u64, val_loss: f64, windows: usize) {
        self.record_metric(Metric::Eval {
            step,
            tokens: self
                .tokens_trained
                .unwrap_or(step * self.tokens_per_site_step() * self.config.sites as u64),
            inter_site_bytes: self.ledger.total_bytes(),
            emulated_seconds: self.compute_seconds + self.communication_seconds,
            val_loss,
            windows,
        });
    }

    /// Train one site for `steps` inner steps from global step `first`; returns the per-step
    /// losses summed into `losses` and the seconds on the emulated clock (`emulated_compute`).
    pub(super) fn train_site(
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
        let measured = train_steps(
            site,
            &self.split()?.shards[shard],
            batch,
            &self.schedule,
            first,
            losses,
            (&mut self.inputs, &mut self.targets),
        )?;
        Ok(self.emulated_compute(shard, losses.len() as u64, measured))
    }

    pub(super) fn push_steps(&mut self, first: u64, loss_sums: &[f32], sites: usize) {
        for (i, sum) in loss_sums.iter().enumerate() {
            let step = first + i as u64;
            let lr = self.schedule.lr_at(step);
            self.record_metric(Metric::Step {
                step,
                loss: sum / sites as f32,
                lr,
            });
        }
    }

    pub(super) fn finish(mut self, rounds: u64, params: Vec<f32>) -> Result<RunResult, RunError> {
        let (final_val_loss, windows) = self.evaluate(&params, None)?;
        if self.evaluation.is_some() {
            self.push_eval(self.config.steps, final_val_loss, windows);
        }
        let tokens = self
            .tokens_trained
            .unwrap_or(self.config.steps * self.tokens_per_site_step() * self.config.sites as u64);
        let elapsed = self.compute_seconds + self.communication_seconds;
        let site_goodput = self
            .site_busy_seconds
            .iter()
            .map(|busy| {
                if elapsed > 0.0 {
                    (busy / elapsed).min(1.0)
                } else {
                    0.0
                }
            })
            .collect();
        Ok(RunResult {
            site_goodput,
            strategy: self.strategy,
            params: params.len(),
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

impl Common<'_> {
    /// Count one sync on the emulated link: the link profile's time for its largest message
    /// each way, less what `overlap_steps` of the sites' mean step time so far hides (streaming:
    /// the sites train on while the sync travels; 0 for rounds), never below zero; and the peak
    /// bytes one site moved in a sync. Every driver counts a sync through this.
    pub(crate) fn add_sync(&mut self, sync: SyncBytes, overlap_steps: u64, steps_done: u64) {
        let link = &self.config.link;
        let link_seconds = link.transfer_seconds(sync.down) + link.transfer_seconds(sync.up);
        let hidden = if overlap_steps == 0 {
            0.0
        } else {
            overlap_steps as f64 * self.compute_seconds / steps_done.max(1) as f64
        };
        self.communication_seconds += (link_seconds - hidden).max(0.0);
        self.peak_sync_bytes = self.peak_sync_bytes.max(sync.down + sync.up);
    }

    /// Count one step's ring all-reduce (DDP): each site sends `bytes_per_site` to the next in
    /// the ring, and the link time of reducing `bytes` over it.
    pub(crate) fn add_all_reduce(&mut self, step: u64, bytes_per_site: u64, bytes: u64) {
        let sites = self.config.sites;
        for k in 0..sites as u32 {
            let next = (k + 1) % sites as u32;
            if next != k {
                self.record_bytes(
                    step,
                    Endpoint::Site(k),
                    Endpoint::Site(next),
                    bytes_per_site,
                );
            }
        }
        self.communication_seconds += self.config.link.ring_all_reduce_seconds(bytes, sites);
    }

    /// Keep `bytes` as the sample packet of its kind (site 0's latest).
    pub(crate) fn keep_sample(&mut self, kind: &str, bytes: bytes::Bytes) {
        self.sample_packets.retain(|(k, _)| k != kind);
        self.sample_packets.push((kind.into(), bytes));
    }

    pub(super) fn emulated_seconds(&self) -> f64 {
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
                common.record_metric(Metric::Round {
                    round: report.round,
                    step,
                    inter_site_bytes: common.ledger.total_bytes(),
                    delta_norm: report.delta_norm,
                    update_norms: report.update_norms,
                    update_cosines: report.update_cosines,
                    update_staleness: report.update_staleness,
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
            Action::Rejected { from, reason } => {
                common.refused.insert((round_of_refusal, from));
                common.record_metric(Metric::refused(round_of_refusal, from, &reason))
            }
            Action::Excluded { site, reason } => common.record_metric(Metric::Excluded {
                round: round_of_refusal,
                site,
                reason,
            }),
        }
    }
    Ok(sends)
}
