//! One site on the schedule: when it takes the coordinator's messages, trains a step and sends
//! an update. Asynchronous sites never wait (they carry their progress onto each merge);
//! synchronous ones train a round from the global parameters and wait for the next.

use std::collections::VecDeque;

use lowband_protocol::site::carry;
use lowband_protocol::{SiteAction, SiteEvent};

use lowband_engine::Trainer;

use super::super::{RunError, SiteRuntime};

pub(super) struct Clocked {
    pub(super) runtime: SiteRuntime,
    /// Asynchronous: where the current update began (empty for synchronous rounds).
    pub(super) reference: Vec<f32>,
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
    /// Apply every message that has arrived. Asynchronous: the site trains on from each, its
    /// steps since its reference kept for its next update (`carry`). Synchronous: only between rounds, and the site starts from it.
    pub(super) fn take_inbox(&mut self) -> Result<(), RunError> {
        let asynchronous = !self.reference.is_empty();
        if !asynchronous && self.training.is_some() {
            return Ok(());
        }
        for bytes in std::mem::take(&mut self.inbox) {
            let actions = self.runtime.site.handle(SiteEvent::PacketArrived(&bytes))?;
            let round = match actions.as_slice() {
                [SiteAction::Train { round }] => *round,
                other => {
                    return Err(RunError::Protocol(format!(
                        "site answered a global message with {other:?}"
                    )))
                }
            };
            self.held_round = Some(round);
            let global = self.runtime.site.round_start();
            if asynchronous {
                carry(
                    self.runtime.trainer.params_mut(),
                    &mut self.reference,
                    global,
                )?;
            } else {
                self.runtime.trainer.params_mut().copy_from_slice(global);
            }
        }
        Ok(())
    }
}
