//! Saving a scheduled run and resuming it. A scheduled run is saved only at a quiet moment:
//! no update or message on a link, none held by the open round, every message taken. Then the
//! coordinator is as it was after the last round's close, and each site is its own model,
//! optimizer, data position and place on the clock: the events to come, with their times and
//! order, are all that is left of the schedule (`state::ScheduleState`). Such moments come once a
//! round when the link's round trip is shorter than the time budget of an update; a save that is
//! due waits for the next one.
//!
//! Over the network the sites' model sides live in their processes: at the quiet moment each is
//! cued to save its own (`Cue::Save`), and once every one has answered that it did, the
//! coordinator writes its state, whose commit is the save's (two phases; a site keeps its new save
//! and the last committed one). Resumed, the coordinator cues every site to restore its save of
//! that round before the schedule goes on.

use super::*;
use crate::state::{ClockedState, PendingEvent, PendingKind, RunState, SavedSite, ScheduleState};

impl Schedule<'_, '_> {
    /// Nothing in flight: no update or message on a link, nothing held, every message taken.
    fn quiet(&self) -> bool {
        !self.coordinator.holds_updates()
            && self.held.values().all(|held| held.is_empty())
            && (self.sites.iter()).all(|s| s.inbox.is_empty() && s.in_flight.is_empty())
            && self.queue.nothing_on_links()
    }

    /// After an event: save when a save is due (every `checkpoint_every_rounds` closed rounds, or
    /// the stop asked for) at the first quiet moment; then stop, if asked.
    pub(super) fn maybe_save(&mut self, persistence: &Persistence) -> Result<(), RunError> {
        let rounds = self.coordinator.round();
        let every = self.common.config.checkpoint_every_rounds;
        let stop = persistence.stop_after_rounds.is_some_and(|r| rounds >= r);
        let saving = persistence.state_dir.is_some();
        let due = saving && every > 0 && rounds >= self.next_save_round;
        if !(due || stop) || !self.quiet() {
            return Ok(());
        }
        if saving {
            if self.sites_saved(rounds)? {
                let strategy = self.common.strategy.clone();
                self.snapshot().save(persistence, &strategy)?;
                self.committed_save = Some(rounds);
            }
            self.next_save_round = next_due(rounds, every);
        }
        if stop {
            return Err(RunError::Stopped {
                step: self.sites[self.pacer].steps_done,
            });
        }
        Ok(())
    }

    /// Networked sites: cue each to save as round `round`'s; whether every one did (the first
    /// phase). Sites trained here are saved with the coordinator's state.
    fn sites_saved(&mut self, round: u64) -> Result<bool, RunError> {
        let Some(remote) = &mut self.remote else {
            return Ok(true);
        };
        let keep = self.committed_save;
        for k in 0..self.sites.len() {
            remote.cue(&mut self.common, k, round, Cue::Save { keep });
        }
        let mut unsaved = Vec::new();
        for k in 0..self.sites.len() {
            if !remote.answer_from(&mut self.common, k, round)? {
                unsaved.push(k.to_string());
            }
        }
        // (The schedule keeps no losses of sites trained elsewhere: a save keeps their latest,
        // which the step metrics after a resume average until those sites step again.)
        for (k, site) in self.sites.iter_mut().enumerate() {
            site.last_loss = remote.latest_loss(k);
        }
        if !unsaved.is_empty() {
            tracing::warn!(
                "{}: not saved at round {round}: site(s) {} did not save their state (their logs say why); the last save stays the one to resume from",
                self.common.strategy.name(),
                unsaved.join(", ")
            );
        }
        Ok(unsaved.is_empty())
    }

    /// Networked sites, resumed: cue each to restore its save of the coordinator's round.
    pub(super) fn restore_sites(&mut self) -> Result<(), RunError> {
        let Some(remote) = &mut self.remote else {
            return Ok(());
        };
        let round = self.coordinator.round();
        for k in 0..self.sites.len() {
            remote.cue(&mut self.common, k, round, Cue::Restore);
        }
        for k in 0..self.sites.len() {
            if !remote.answer_from(&mut self.common, k, round)? {
                return Err(RunError::State(format!(
                    "site {k} cannot resume from its save of round {round} (its log says why): start it with --resume and the --state-dir it saved in, or start the run over without --resume"
                )));
            }
        }
        let done: Vec<u64> = self.sites.iter().map(|s| s.steps_done).collect();
        let last: Vec<Option<f32>> = self.sites.iter().map(|s| s.last_loss).collect();
        remote.resume_at(&done, &last);
        self.committed_save = Some(round);
        Ok(())
    }

    fn snapshot(&self) -> RunState {
        let sites: Vec<SavedSite> = (self.sites.iter())
            .filter_map(|s| s.body.as_ref())
            .map(|body| SavedSite {
                runtime: &body.runtime,
                reference: body.reference(),
            })
            .collect();
        let state = self.coordinator.state();
        let schedule = ScheduleState {
            sites: self.sites.iter().map(Clocked::state).collect(),
            events: self.queue.pending(),
            order: self.queue.order(),
            link_arrivals: self.queue.link_arrivals(),
            last_step_metric: self.last_step_metric,
            last_close: self.last_close,
            compute_end: self.compute_end,
            members: self.coordinator.members().iter().copied().collect(),
            synced: state.synced,
            tokens_trained: self.common.tokens_trained,
            refused: self.common.refused.iter().copied().collect(),
        };
        let step = self.sites[self.pacer].steps_done;
        RunState::of_scheduled(&self.common, step, &self.coordinator, &sites, schedule)
    }

    /// Continue from `saved` instead of starting.
    pub(super) fn resume(&mut self, saved: RunState) -> Result<(), RunError> {
        let clocked = self.sites.len();
        let mut runtimes: Vec<&mut SiteRuntime> = (self.sites.iter_mut())
            .filter_map(|s| s.body.as_mut())
            .map(|body| &mut body.runtime)
            .collect();
        let (state, references) = saved.restore_scheduled(
            &mut self.common,
            &mut self.coordinator,
            &mut runtimes,
            clocked,
        )?;
        for ((site, clocked), reference) in self.sites.iter_mut().zip(&state.sites).zip(references)
        {
            site.restore(clocked, reference)?;
        }
        let events = state.events.iter().map(|event| {
            let what = match event.what {
                PendingKind::Step(k) => Happening::Step(k),
                PendingKind::Tick => Happening::Tick,
                PendingKind::Fault(i) => Happening::Fault(i),
                PendingKind::Rejoin(k) => Happening::Rejoin(k),
            };
            (event.at, event.order, what)
        });
        self.queue.restore(
            events,
            state.order,
            &state.link_arrivals,
            self.sites.len(),
            self.faults.len(),
        )?;
        self.last_step_metric = state.last_step_metric;
        self.last_close = state.last_close;
        self.compute_end = state.compute_end;
        self.common.tokens_trained = state.tokens_trained;
        self.common.refused = state.refused.into_iter().collect();
        let every = self.common.config.checkpoint_every_rounds;
        self.next_save_round = next_due(self.coordinator.round(), every);
        Ok(())
    }
}

/// The next round count at which a save is due, every `every` rounds after `rounds` (never: 0).
fn next_due(rounds: u64, every: u64) -> u64 {
    rounds
        .checked_div(every)
        .map_or(u64::MAX, |done| (done + 1).saturating_mul(every))
}

impl Clocked {
    fn state(&self) -> ClockedState {
        ClockedState {
            step_seconds: self.step_seconds,
            steps_done: self.steps_done,
            since_send: self.since_send,
            marks_sent: self.marks_sent,
            idle: self.idle,
            held_round: self.held_round,
            training: self.training,
            sent_round: self.sent_round,
            busy_unsent: self.busy_unsent,
            last_loss: self.last_loss,
            finished: self.finished,
            down: self.down,
            site_round: self.body.as_ref().and_then(|b| b.runtime.site.round()),
        }
    }

    fn restore(
        &mut self,
        saved: &ClockedState,
        reference: Option<Vec<f32>>,
    ) -> Result<(), RunError> {
        // (Its ranges were checked with the state: `ScheduleState::check`.)
        if let Some(body) = &mut self.body {
            body.set_reference(reference)?;
            body.runtime.site.restore_round(saved.site_round);
        }
        self.step_seconds = saved.step_seconds;
        self.steps_done = saved.steps_done;
        self.since_send = saved.since_send;
        self.marks_sent = saved.marks_sent;
        self.idle = saved.idle;
        self.held_round = saved.held_round;
        self.training = saved.training;
        self.sent_round = saved.sent_round;
        self.busy_unsent = saved.busy_unsent;
        self.last_loss = saved.last_loss;
        self.finished = saved.finished;
        self.down = saved.down;
        Ok(())
    }
}

impl PendingEvent {
    pub(super) fn of(at: f64, order: u64, what: &Happening) -> Option<PendingEvent> {
        let what = match what {
            Happening::Step(k) => PendingKind::Step(*k),
            Happening::Tick => PendingKind::Tick,
            Happening::Fault(i) => PendingKind::Fault(*i),
            Happening::Rejoin(k) => PendingKind::Rejoin(*k),
            Happening::Update { .. } | Happening::Message { .. } => return None,
        };
        Some(PendingEvent { at, order, what })
    }
}
