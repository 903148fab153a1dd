//! A scheduled run whose sites train elsewhere (over the network): the schedule stays here and
//! cues each site step by step (`lowband_protocol::cue`); each cued step is answered with its
//! loss (a one-step training report) and, when cued to, the update. The schedule waits only for
//! an update it needs (its size sets its arrival time); the step losses, which the run's step
//! metrics need, are collected on the way and the metrics recorded once every site's loss of that
//! moment is in, in the same order and with the same values as in memory.

use std::collections::VecDeque;

use lowband_protocol::cue::Cue;
use lowband_protocol::wire::{self, MessageKind, TrainingReport};

use super::super::{Common, Metric, RunError};

/// The network under a scheduled run, the coordinator's side.
pub(crate) trait Cues {
    /// Hand site `to` a message (a global, or a cue); its size on the wire.
    fn send(&mut self, to: u32, message: &[u8]) -> usize;
    /// The next message site `from` sent (opened), and its size on the wire.
    fn next_from(&mut self, from: u32) -> Result<(Vec<u8>, usize), RunError>;
}

/// A step metric waiting for the losses it averages: (site, its step index), in site order.
struct PendingStep {
    step: u64,
    lr: f32,
    wanted: Vec<(usize, u64)>,
}

pub(super) struct Remote<'c> {
    cues: &'c mut dyn Cues,
    /// Per site, the loss of each step it was cued, as reported so far.
    losses: Vec<Vec<f32>>,
    /// Per site, the steps it was cued.
    cued: Vec<u64>,
    pending: VecDeque<PendingStep>,
    /// Per site: it sent something else where a step report was due (its losses stop there).
    silent: Vec<bool>,
    /// The latest recorded step loss (for the progress bar).
    pub(super) last_mean: f32,
}

impl<'c> Remote<'c> {
    pub(super) fn new(cues: &'c mut dyn Cues, sites: usize) -> Remote<'c> {
        Remote {
            cues,
            losses: vec![Vec::new(); sites],
            cued: vec![0; sites],
            pending: VecDeque::new(),
            silent: vec![false; sites],
            last_mean: f32::NAN,
        }
    }

    /// Send site `to` a global message or a cue; its size on the wire.
    pub(super) fn send(&mut self, to: usize, message: &[u8]) -> u64 {
        self.cues.send(to as u32, message) as u64
    }

    /// Cue site `to`: a step (counted: its loss will come) or anything else. The cue's bytes
    /// are telemetry.
    pub(super) fn cue(&mut self, common: &mut Common, to: usize, round: u64, cue: Cue) {
        if matches!(cue, Cue::Step { .. }) {
            self.cued[to] += 1;
        }
        let bytes = cue.encode(round, to as u32);
        common.telemetry_bytes += self.send(to, &bytes);
    }

    /// The run's step `step` at learning rate `lr`: the mean of the latest loss of every site
    /// that has stepped (`steps_done` each), recorded once they are all in.
    pub(super) fn step_metric(&mut self, common: &mut Common, step: u64, lr: f32, done: &[u64]) {
        let wanted = (done.iter().enumerate())
            .filter(|(_, d)| **d > 0)
            .map(|(k, d)| (k, d - 1))
            .collect();
        self.pending.push_back(PendingStep { step, lr, wanted });
        self.record_ready(common);
    }

    /// Site `from`'s update, after the step reports sent before it: (packet, size on the wire).
    pub(super) fn update_from(
        &mut self,
        common: &mut Common,
        from: usize,
    ) -> Result<(Vec<u8>, u64), RunError> {
        loop {
            let (packet, sealed) = self.cues.next_from(from as u32)?;
            if !self.report(common, from, &packet, sealed) {
                // The update, or what stands for it: garbage too goes to the protocol, which
                // refuses it and scores the site (as in memory), so that it cannot stall the run.
                return Ok((packet, sealed as u64));
            }
        }
    }

    /// Site `from`'s answer to the save or restore cued for `round`, after the step reports sent
    /// before it: whether it did it. Anything else where the answer is due counts as not done.
    pub(super) fn answer_from(
        &mut self,
        common: &mut Common,
        from: usize,
        round: u64,
    ) -> Result<bool, RunError> {
        loop {
            let (packet, sealed) = self.cues.next_from(from as u32)?;
            if self.report(common, from, &packet, sealed) {
                continue;
            }
            common.telemetry_bytes += sealed as u64;
            let answer = wire::decode(&packet, Cue::PAYLOAD_BYTES_MAX)
                .ok()
                .filter(|m| m.kind == MessageKind::Cue && m.site as usize == from)
                .filter(|m| m.round == round)
                .and_then(|m| Cue::decode(m.payload).ok());
            return Ok(match answer {
                Some(Cue::Answer(done)) => done,
                _ => {
                    tracing::warn!("site {from} sent something other than its answer to a save or restore: taken as not done");
                    false
                }
            });
        }
    }

    /// Site k's latest reported step loss.
    pub(super) fn latest_loss(&self, k: usize) -> Option<f32> {
        self.losses[k].last().copied()
    }

    /// Resumed: every site had trained `done` steps (its last loss `last`), all reported.
    pub(super) fn resume_at(&mut self, done: &[u64], last: &[Option<f32>]) {
        for (k, (&done, last)) in done.iter().zip(last).enumerate() {
            // (Only the last loss is ever read again: a step metric's site that has not stepped
            // since takes it, as in memory.)
            self.losses[k] = vec![last.unwrap_or(f32::NAN); done as usize];
            self.cued[k] = done;
        }
    }

    /// Every cued step's loss in (the run's end), and every step metric recorded.
    pub(super) fn collect_all(&mut self, common: &mut Common) -> Result<(), RunError> {
        for k in 0..self.losses.len() {
            while !self.silent[k] && (self.losses[k].len() as u64) < self.cued[k] {
                let (packet, sealed) = self.cues.next_from(k as u32)?;
                if !self.report(common, k, &packet, sealed) {
                    tracing::warn!(
                        "site {k} sent something other than the step report due: its remaining step losses are left out of the step metrics"
                    );
                    common.telemetry_bytes += sealed as u64;
                    self.silent[k] = true;
                }
            }
        }
        self.record_ready(common);
        Ok(())
    }

    /// Whether `packet` is site `from`'s report of the next step it was cued (then recorded).
    fn report(&mut self, common: &mut Common, from: usize, packet: &[u8], sealed: usize) -> bool {
        let Ok(message) = wire::decode(packet, TrainingReport::payload_bytes_max(1)) else {
            return false;
        };
        let loss = match TrainingReport::decode(message.payload, 1) {
            Ok(report) if report.losses.len() == 1 => report.losses[0],
            _ => return false,
        };
        let due = (self.losses[from].len() as u64) < self.cued[from];
        if message.kind != MessageKind::Report || message.site as usize != from || !due {
            return false;
        }
        self.losses[from].push(loss);
        common.telemetry_bytes += sealed as u64;
        self.record_ready(common);
        true
    }

    fn record_ready(&mut self, common: &mut Common) {
        while let Some(pending) = self.pending.front() {
            // (A site that stopped reporting is left out.)
            let losses: Option<Vec<f32>> = (pending.wanted.iter())
                .filter(|(k, i)| !self.silent[*k] || (*i as usize) < self.losses[*k].len())
                .map(|(k, i)| self.losses[*k].get(*i as usize).copied())
                .collect();
            let Some(losses) = losses else {
                return;
            };
            let mean = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
            self.last_mean = mean;
            common.record_metric(Metric::Step {
                step: pending.step,
                loss: mean,
                lr: pending.lr,
            });
            self.pending.pop_front();
        }
    }
}
