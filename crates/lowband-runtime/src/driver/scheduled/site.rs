//! One site on the schedule: when it takes the coordinator's messages, trains a step and sends
//! an update. Asynchronous sites never wait (they carry their progress onto each merge);
//! synchronous ones train a round from the global parameters and wait for the next.
//!
//! `Clocked` is the schedule's account of a site (its clock, its budget, what it holds, what it
//! has in flight); `CuedSite` is the site's model side, what it does when cued. A site trained in
//! this process has both; a networked one has only the account here, and its `CuedSite` runs in
//! the site's process on the cues it is sent (`lowband_protocol::cue`): the same code either way.

use std::collections::VecDeque;

use lowband_codec::CodecSpec;
use lowband_protocol::cue::Revert;
use lowband_protocol::site::carry;
use lowband_protocol::{SiteAction, SiteEvent};

use lowband_engine::Trainer;

use super::super::{RunError, SiteRuntime};

pub(super) struct Clocked {
    /// The site's model, when it trains in this process (None: a networked site).
    pub(super) body: Option<CuedSite>,
    pub(super) asynchronous: bool,
    /// Emulated seconds of one step of this site (the nominal step over its speed).
    pub(super) step_seconds: f64,
    /// Asynchronous: its steps per update on average (the time budget, for the merge's token
    /// weights); synchronous: H.
    pub(super) interval: u64,
    /// Asynchronous: this site's steps in the run.
    pub(super) steps_total: u64,
    pub(super) steps_done: u64,
    pub(super) since_send: u64,
    /// Asynchronous: marks of the time budget its updates have covered.
    pub(super) marks_sent: u64,
    /// Messages that have arrived, taken at the next step's start.
    pub(super) inbox: Vec<bytes::Bytes>,
    /// No step is scheduled: waiting for a message (synchronous), or finished.
    pub(super) idle: bool,
    /// The round of the global parameters it last took (None: none yet).
    pub(super) held_round: Option<u64>,
    /// Synchronous: the round it is training and its step count, and the last round it sent.
    pub(super) training: Option<(u64, u64)>,
    pub(super) sent_round: Option<u64>,
    /// Compute since the last send, and that of each update sent and not yet merged or
    /// refused, oldest first (goodput credits it once merged).
    pub(super) busy_unsent: f64,
    pub(super) in_flight: VecDeque<f64>,
    pub(super) last_loss: Option<f32>,
    /// Asynchronous: its last step is done (the next would end past the run's time).
    pub(super) finished: bool,
    /// Down (a fault): it trains nothing and hears nothing until it comes back.
    pub(super) down: bool,
    /// Its step time at its own speed, before any slowdown.
    pub(super) base_step_seconds: f64,
}

impl Clocked {
    /// Take every message that has arrived (synchronous: only between rounds); returns how
    /// many. A site trained here applies them; a networked one is cued to.
    pub(super) fn take_inbox(&mut self) -> Result<u32, RunError> {
        if !self.asynchronous && self.training.is_some() {
            return Ok(0);
        }
        let inbox = std::mem::take(&mut self.inbox);
        for bytes in &inbox {
            let round = match &mut self.body {
                Some(body) => body.take(bytes)?,
                None => envelope_round(bytes)?,
            };
            self.held_round = Some(round);
        }
        Ok(inbox.len() as u32)
    }

    /// Where a site that goes down goes back to; its round is then over.
    pub(super) fn revert(&mut self) -> Revert {
        if self.asynchronous {
            Revert::Reference
        } else if self.training.take().is_some() {
            Revert::RoundStart
        } else {
            Revert::Nothing
        }
    }
}

/// The round a global message is for (the coordinator made it: only its header is read).
fn envelope_round(bytes: &[u8]) -> Result<u64, RunError> {
    lowband_protocol::wire::decode(bytes, usize::MAX)
        .map(|message| message.round)
        .map_err(|e| RunError::Protocol(format!("a global message the schedule made: {e}")))
}

/// A site's model side on the schedule: the protocol's site, its trainer and, asynchronous,
/// where its current update began.
pub(crate) struct CuedSite {
    pub(crate) runtime: SiteRuntime,
    /// Asynchronous: where the current update began (empty for synchronous rounds).
    reference: Vec<f32>,
}

impl CuedSite {
    pub(crate) fn new(runtime: SiteRuntime, asynchronous: bool) -> CuedSite {
        let reference = if asynchronous {
            runtime.trainer.params().to_vec()
        } else {
            Vec::new()
        };
        CuedSite { runtime, reference }
    }

    /// The run's first message: the parameters it starts from (an asynchronous site holds them
    /// already: the seed's). Returns its round.
    pub(crate) fn start(&mut self, bytes: &[u8]) -> Result<u64, RunError> {
        self.handle(bytes)
    }

    /// Apply a global message. Asynchronous: the site trains on from it, its steps since its
    /// reference kept for its next update (`carry`). Synchronous: the site starts from it.
    /// Returns its round.
    pub(crate) fn take(&mut self, bytes: &[u8]) -> Result<u64, RunError> {
        let round = self.handle(bytes)?;
        let global = self.runtime.site.round_start();
        if self.reference.is_empty() {
            self.runtime.trainer.params_mut().copy_from_slice(global);
        } else {
            carry(
                self.runtime.trainer.params_mut(),
                &mut self.reference,
                global,
            )?;
        }
        Ok(round)
    }

    fn handle(&mut self, bytes: &[u8]) -> Result<u64, RunError> {
        let actions = self.runtime.site.handle(SiteEvent::PacketArrived(bytes))?;
        match actions.as_slice() {
            [SiteAction::Train { round }] => Ok(*round),
            other => Err(RunError::Protocol(format!(
                "site answered a global message with {other:?}"
            ))),
        }
    }

    /// The update for `round`: from the reference (asynchronous, which then moves to here) or
    /// from the round's start.
    pub(crate) fn update(&mut self, round: u64, uplink: &CodecSpec) -> Result<Vec<u8>, RunError> {
        let n = self.runtime.trainer.params().len();
        if self.reference.is_empty() {
            return self.runtime.update(round, 0..n, uplink);
        }
        let bytes = self
            .runtime
            .update_from(round, Some(&self.reference), 0..n, uplink)?;
        self.reference
            .copy_from_slice(self.runtime.trainer.params());
        Ok(bytes)
    }

    /// Asynchronous: where the current update began.
    pub(crate) fn reference(&self) -> Option<&[f32]> {
        (!self.reference.is_empty()).then_some(self.reference.as_slice())
    }

    /// A saved reference back (one exactly when the site is asynchronous).
    pub(crate) fn set_reference(&mut self, saved: Option<Vec<f32>>) -> Result<(), RunError> {
        match saved {
            Some(saved) if saved.len() == self.reference.len() => self.reference = saved,
            None if self.reference.is_empty() => {}
            _ => {
                return Err(RunError::State(
                    "a site's saved reference does not match the strategy".into(),
                ))
            }
        }
        Ok(())
    }

    /// Down: what it trained since `revert`'s point is lost.
    pub(crate) fn down(&mut self, revert: Revert) {
        let params = self.runtime.trainer.params_mut();
        match revert {
            Revert::Reference => params.copy_from_slice(&self.reference),
            Revert::RoundStart => params.copy_from_slice(self.runtime.site.round_start()),
            Revert::Nothing => {}
        }
    }
}
