//! A scheduled run's state (`async-diloco`, `[quorum=N]`): saved only at a moment when nothing is
//! in flight (no update or message on a link, none held by the open round, every message taken),
//! so that the coordinator is what it is after a round's close and every site is its own model,
//! optimizer, data position and place on the clock. The schedule's own account (the sites'
//! clocks and the events to come) goes in the manifest; the sites' parameters, where their
//! current updates began and the global parameters each holds go in the tensors file.

use serde::{Deserialize, Serialize};

use super::*;

/// An event still to come, with its time and place in the schedule's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PendingEvent {
    pub at: f64,
    pub order: u64,
    pub what: PendingKind,
}

/// What happens (nothing on a link: a scheduled run is saved only when nothing is).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum PendingKind {
    Step(usize),
    Tick,
    Fault(usize),
    Rejoin(usize),
}

/// One site's place on the schedule (see `driver::scheduled::site::Clocked`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClockedState {
    pub step_seconds: f64,
    pub steps_done: u64,
    pub since_send: u64,
    pub marks_sent: u64,
    pub idle: bool,
    pub held_round: Option<u64>,
    pub training: Option<(u64, u64)>,
    pub sent_round: Option<u64>,
    pub busy_unsent: f64,
    pub last_loss: Option<f32>,
    pub finished: bool,
    pub down: bool,
    /// The round of the global parameters its protocol site holds.
    pub site_round: Option<u64>,
}

/// The schedule's account at a quiet moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ScheduleState {
    pub sites: Vec<ClockedState>,
    pub events: Vec<PendingEvent>,
    /// The queue's order counter and each link's latest arrival ((from, to), seconds).
    pub order: u64,
    pub link_arrivals: Vec<((u32, u32), f64)>,
    pub last_step_metric: Option<u64>,
    pub last_close: f64,
    pub compute_end: f64,
    /// The coordinator's members, and the sites holding its compressed downlink's parameters.
    pub members: Vec<u32>,
    pub synced: Vec<u32>,
    pub tokens_trained: Option<u64>,
    pub refused: Vec<(u64, u32)>,
}

impl ScheduleState {
    /// Every count and time within what a run of `steps` steps and `sites` sites can reach: a
    /// state edited or damaged by hand must not overflow the schedule's arithmetic, stop its
    /// clock (a step of 0 s) or name a site that is not there.
    fn check(&self, steps: u64, sites: usize) -> Result<(), RunError> {
        let bad = |what: String| {
            Err(RunError::State(format!(
                "the saved schedule is out of range: {what}; rerun without --resume to start over"
            )))
        };
        // (A slowed or resumed site may pass its nominal budget by a little, never twice over.)
        let count_max = steps.saturating_mul(2);
        for (k, site) in self.sites.iter().enumerate() {
            let counts = [site.steps_done, site.since_send, site.marks_sent]
                .into_iter()
                .chain(
                    [site.held_round, site.sent_round, site.site_round]
                        .into_iter()
                        .flatten(),
                )
                .chain(site.training.into_iter().flat_map(|(round, h)| [round, h]));
            if let Some(count) = counts.into_iter().find(|c| *c > count_max) {
                return bad(format!(
                    "site {k}: a count of {count} in a {steps}-step run"
                ));
            }
            let step_ok = site.step_seconds.is_finite() && site.step_seconds > 0.0;
            let busy_ok = site.busy_unsent.is_finite() && site.busy_unsent >= 0.0;
            if !(step_ok && busy_ok) {
                return bad(format!(
                    "site {k}: a step of {} s, {} s unsent",
                    site.step_seconds, site.busy_unsent
                ));
            }
        }
        let times = [self.last_close, self.compute_end];
        if !times.iter().all(|t| t.is_finite() && *t >= 0.0) {
            return bad(format!("times {times:?}"));
        }
        let named = self.members.iter().chain(&self.synced);
        if let Some(site) = named.into_iter().find(|s| **s as usize >= sites) {
            return bad(format!("site {site} of {sites}"));
        }
        Ok(())
    }
}

/// A site's model side as the state saves it: its runtime, and (asynchronous) where its
/// current update began.
pub(crate) struct SavedSite<'s> {
    pub runtime: &'s SiteRuntime,
    pub reference: Option<&'s [f32]>,
}

/// Per site, where its current update began (asynchronous sites).
pub(crate) type References = Vec<Option<Vec<f32>>>;

impl RunState {
    /// A scheduled run at a quiet moment: the round strategies' state, and the schedule's.
    pub(crate) fn of_scheduled(
        common: &Common,
        step: u64,
        coordinator: &Coordinator,
        sites: &[SavedSite],
        schedule: ScheduleState,
    ) -> Self {
        let runtimes: Vec<&SiteRuntime> = sites.iter().map(|s| s.runtime).collect();
        let mut saved = RunState::of_round_sites(common, step, coordinator, &runtimes);
        for (k, site) in sites.iter().enumerate() {
            let params = site.runtime.trainer.params().to_vec();
            saved.tensors.push((format!("site{k}.params"), params));
            let start = site.runtime.site.round_start().to_vec();
            saved.tensors.push((format!("site{k}.start"), start));
            if let Some(reference) = site.reference {
                saved
                    .tensors
                    .push((format!("site{k}.reference"), reference.to_vec()));
            }
        }
        saved.manifest.schedule = Some(schedule);
        saved
    }

    /// Back into a fresh coordinator (its saved members joined, the open round's broadcast made
    /// again and dropped: the sites took it before the save) and fresh sites (none: they train
    /// elsewhere); returns the schedule's account of its `clocked` sites and, per site, where
    /// its current update began (asynchronous; None for a site trained elsewhere).
    /// Whether this state can resume `common`'s scheduled run: `sites` trained here (0: a
    /// networked run), `params` parameters, `clocked` sites on the schedule. Everything
    /// `restore_scheduled` checks, without changing anything, so that a networked coordinator
    /// refuses a state before its sites are admitted, not after.
    pub(crate) fn check_scheduled(
        &self,
        common: &Common,
        sites: usize,
        params: usize,
        clocked: usize,
    ) -> Result<(), RunError> {
        // (A networked run's sites save their own state: its state holds none of theirs.)
        match (sites == 0, self.manifest.sites == 0) {
            (true, false) => return Err(RunError::State("the saved state is an in-memory run's: a networked run resumes only from its own (its sites save theirs); rerun without --resume to start over".into())),
            (false, true) => return Err(RunError::State("the saved state is a networked run's (its sites saved their own state): resume it over the network, or rerun without --resume to start over".into())),
            _ => {}
        }
        self.check(sites, params)?;
        let Some(schedule) = &self.manifest.schedule else {
            return Err(RunError::State(
                "the saved state is not a scheduled run's; rerun without --resume to start over"
                    .into(),
            ));
        };
        if schedule.sites.len() != clocked {
            return Err(RunError::State(format!(
                "the saved schedule has {} sites for {clocked}",
                schedule.sites.len(),
            )));
        }
        schedule.check(common.config.steps, clocked)?;
        self.check_common(common)
    }

    pub(crate) fn restore_scheduled(
        mut self,
        common: &mut Common,
        coordinator: &mut Coordinator,
        sites: &mut [&mut SiteRuntime],
        clocked: usize,
    ) -> Result<(ScheduleState, References), RunError> {
        let n = coordinator.global().len();
        self.check_scheduled(common, sites.len(), n, clocked)?;
        let schedule = self.manifest.schedule.take().expect("checked above");
        self.restore_common(common)?;
        for site in &schedule.members {
            coordinator.handle(0, lowband_protocol::Event::SiteJoined { site: *site });
        }
        let shared = self.optional_tensor("shared")?.unwrap_or_default();
        let state = CoordinatorState {
            round: self.manifest.round,
            global: self.tensor("global")?,
            momentum_buffer: self.tensor("momentum")?,
            shared,
            synced: schedule.synced.clone(),
            trust: self.manifest.trust.take().unwrap_or_default(),
            downlink_random: self.manifest.downlink_random,
        };
        coordinator.restore(state)?;
        let _broadcast_taken_before_the_save =
            coordinator.start((schedule.last_close * 1e3) as u64);
        let mut references = vec![None; clocked];
        for (k, site) in sites.iter_mut().enumerate() {
            self.restore_site_of_schedule(k, site)?;
            references[k] = self.optional_tensor(&format!("site{k}.reference"))?;
        }
        self.restore_samplers(sites.iter_mut().map(|s| &mut s.sampler));
        Ok((schedule, references))
    }

    /// Site k's optimizer, codec stream, residual (`restore_site_parts`), held parameters and own
    /// parameters.
    fn restore_site_of_schedule(
        &mut self,
        k: usize,
        site: &mut SiteRuntime,
    ) -> Result<(), RunError> {
        let residual = self.restore_site_parts(k, site)?;
        let start = self.tensor(&format!("site{k}.start"))?;
        site.site.restore(&start, residual.as_deref())?;
        let params = self.tensor(&format!("site{k}.params"))?;
        if params.len() != start.len() {
            return Err(RunError::State(format!(
                "site {k}'s saved parameters have another length"
            )));
        }
        site.trainer.params_mut().copy_from_slice(&params);
        Ok(())
    }
}
