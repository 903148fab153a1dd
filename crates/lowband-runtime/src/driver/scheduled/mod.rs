//! Rounds on the emulated clock's schedule: `async-diloco` (no site waits for another) and
//! synchronous rounds closed on a quorum (`[quorum=N]`).
//!
//! Every event (a site begins a step, an update reaches the coordinator, a message reaches a
//! site, a grace window ends) happens at a time computed from the nominal step time
//! (`RunConfig::step_seconds`) over each site's speed and the link profile's transfer time of
//! each packet's size, and events are taken in the order of (time, kind, the order they were
//! scheduled): the schedule, and with it which update goes into which round, is a pure function
//! of the settings and the seed, never of this machine's speed.
//!
//! The sites train here, or over the network (`remote`): there the schedule stays with the
//! coordinator and cues every site step by step, so that a networked run is bitwise this one.
//! Saved and resumed at quiet moments (`persist`), in memory and over the network.

mod faults;
mod persist;
mod queue;
mod remote;
mod site;

pub(crate) use remote::Cues;
pub(crate) use site::CuedSite;

use std::collections::BTreeMap;

use lowband_protocol::cue::Cue;
use lowband_protocol::{Action, AsyncMerge};
use queue::{Happening, Queue, COORDINATOR};
use remote::Remote;
use site::Clocked;

use super::*;

/// The run's schedule: the sites, the coordinator, the events to come and the books' cursors.
struct Schedule<'c, 'a> {
    common: Common<'a>,
    coordinator: Coordinator,
    sites: Vec<Clocked>,
    queue: Queue,
    /// The site whose steps count the run's steps (the fastest; the first of equals).
    pacer: usize,
    /// Asynchronous: the grace window in seconds (None for synchronous rounds), and the time
    /// budget of an update (H steps of the fastest site).
    grace_seconds: Option<f64>,
    mark_seconds: f64,
    /// The run's emulated time for its sites' steps: the fastest site's budget of steps at its
    /// nominal step time.
    deadline: f64,
    last_step_metric: Option<u64>,
    faults: Vec<crate::Fault>,
    /// Synchronous: rounds in the run.
    rounds_total: u64,
    /// Per site: the compute of its updates held by the coordinator, oldest first (credited
    /// once merged; a site's second update arrives while its first is held, and closes it).
    held: BTreeMap<u32, std::collections::VecDeque<f64>>,
    /// When the last round closed (the run's end), and the last step ended.
    last_close: f64,
    compute_end: f64,
    progress: &'c mut dyn FnMut(Progress),
    /// The sites train over the network: the schedule cues them (None: they train here).
    remote: Option<Remote<'c>>,
    /// The round count at which the next save is due (`checkpoint_every_rounds`).
    next_save_round: u64,
    /// The round of the last save committed (networked sites keep their save of it).
    committed_save: Option<u64>,
}

pub(super) fn run_scheduled(
    common: Common,
    initial: Vec<f32>,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    let strategy = common.strategy.clone();
    let mut schedule = Schedule::new(common, initial, progress, None)?;
    match crate::state::load(persistence, &strategy)? {
        Some(saved) => schedule.resume(saved)?,
        None => schedule.start()?,
    }
    run_schedule(schedule, persistence)
}

/// A scheduled run whose sites train elsewhere: `cues` reaches them (site k's `CuedSite` is
/// built as `strategy_site` builds it here, from the same initial parameters). Saved as
/// `persistence` says (each site saves its own state when cued); resumed from `saved`.
pub(crate) fn run_scheduled_remote(
    common: Common,
    initial: Vec<f32>,
    cues: &mut dyn Cues,
    persistence: &Persistence,
    saved: Option<crate::state::RunState>,
) -> Result<RunResult, RunError> {
    let mut progress = |_: Progress| {};
    let sites = common.config.sites;
    let remote = Some(Remote::new(cues, sites));
    let mut schedule = Schedule::new(common, initial, &mut progress, remote)?;
    match saved {
        Some(saved) => {
            schedule.resume(saved)?;
            schedule.restore_sites()?;
        }
        None => schedule.start()?,
    }
    run_schedule(schedule, persistence)
}

fn run_schedule(mut schedule: Schedule, persistence: &Persistence) -> Result<RunResult, RunError> {
    while let Some((at, happening)) = schedule.queue.pop() {
        if schedule.finished() {
            break;
        }
        schedule.common.compute_seconds = at;
        schedule.happen(at, happening)?;
        schedule.maybe_save(persistence)?;
    }
    schedule.finish()
}

impl<'c, 'a> Schedule<'c, 'a> {
    fn new(
        mut common: Common<'a>,
        initial: Vec<f32>,
        progress: &'c mut dyn FnMut(Progress),
        remote: Option<Remote<'c>>,
    ) -> Result<Self, RunError> {
        let config = common.config;
        let strategy = common.strategy.clone();
        let n = initial.len();
        let step_seconds = config
            .step_seconds()
            .ok_or_else(|| RunError::InvalidConfig {
                field: "model",
                reason: "asynchronous rounds need lowband's engine (a nominal step time)".into(),
            })?;
        let (fastest, pacer) = fastest_site(config);
        // The fastest site's step: the unit of the run's steps, budgets and grace window.
        let nominal = step_seconds / fastest;
        let h = strategy.inner_steps.min(config.steps);
        let asynchronous = strategy.asynchronous;
        let sites = clocked_sites(config, &strategy, &initial, step_seconds, remote.is_none())?;
        let mut coordinator_config = coordinator_config(config, &strategy, n, config.sites, 0);
        if let Some(quorum) = strategy.quorum {
            coordinator_config.quorum = quorum;
        }
        let tokens = common.tokens_per_site_step();
        // The coordinator's clock counts milliseconds: a grace window is at least one (updates
        // that arrive in the same millisecond are merged together).
        let grace_ms =
            asynchronous.map(|a| ((a.grace as f64 * h as f64 * nominal * 1e3) as u64).max(1));
        coordinator_config.asynchronous =
            asynchronous.zip(grace_ms).map(|(a, grace_ms)| AsyncMerge {
                site_tokens: sites.iter().map(|s| s.interval * tokens).collect(),
                staleness_max: a.staleness_max,
                grace_ms,
            });
        // The coordinator looks at its clock a millisecond after the window (it counts whole
        // milliseconds).
        let grace_seconds = grace_ms.map(|ms| (ms + 1) as f64 / 1e3);
        let coordinator = Coordinator::new(coordinator_config, initial.clone())?;
        common.evaluate_initial(&initial)?;
        common.tokens_trained = Some(0);
        Ok(Schedule {
            common,
            coordinator,
            sites,
            queue: Queue::default(),
            pacer,
            grace_seconds,
            mark_seconds: h as f64 * nominal,
            deadline: config.steps as f64 * nominal,
            last_step_metric: None,
            faults: config.faults.clone(),
            rounds_total: config.steps.div_ceil(h),
            held: BTreeMap::new(),
            last_close: 0.0,
            compute_end: 0.0,
            progress,
            remote,
            next_save_round: config.checkpoint_every_rounds,
            committed_save: None,
        })
    }

    /// Every site joins; the first round's broadcast goes out at time 0. Synchronous sites
    /// wait for it (as every round's sites do); asynchronous ones never wait: they hold the
    /// seed's parameters, which it carries, and start at once (its bytes are counted alike).
    fn start(&mut self) -> Result<(), RunError> {
        for k in 0..self.sites.len() as u32 {
            self.coordinator.handle(0, Event::SiteJoined { site: k });
        }
        self.schedule_faults();
        let actions = self.coordinator.start(0);
        if self.grace_seconds.is_none() {
            return self.absorb(0.0, actions, None);
        }
        for action in actions {
            let Action::Send { to, bytes } = action else {
                continue;
            };
            let length = self.deliver(to as usize, &bytes);
            self.common
                .record_bytes(0, Endpoint::Coordinator, Endpoint::Site(to), length);
            let site = &mut self.sites[to as usize];
            match (&mut site.body, &mut self.remote) {
                (Some(body), _) => {
                    body.start(&bytes)?;
                }
                (None, Some(remote)) => remote.cue(&mut self.common, to as usize, 0, Cue::Start),
                (None, None) => unreachable!("a site trains here or is cued"),
            }
            let site = &mut self.sites[to as usize];
            site.held_round = Some(0);
            site.idle = false;
            self.queue.push(0.0, Happening::Step(to as usize));
        }
        Ok(())
    }

    /// Asynchronous: every site has trained its budget and every update is merged or
    /// refused. Synchronous: every round closed.
    fn finished(&self) -> bool {
        match self.grace_seconds {
            Some(_) => false,
            None => self.coordinator.round() >= self.rounds_total,
        }
    }

    fn happen(&mut self, at: f64, happening: Happening) -> Result<(), RunError> {
        match happening {
            Happening::Step(k) => self.step(at, k),
            Happening::Fault(i) => self.fault(at, i),
            Happening::Rejoin(k) => self.rejoin(at, k),
            Happening::Message { to, bytes } => {
                let site = &mut self.sites[to];
                if site.down || (site.finished && site.idle) {
                    return Ok(()); // it is down or has finished: not delivered
                }
                let round = self.coordinator.round();
                let length = self.deliver(to, &bytes);
                self.common.record_bytes(
                    round,
                    Endpoint::Coordinator,
                    Endpoint::Site(to as u32),
                    length,
                );
                if to == 0 {
                    self.common.keep_sample("global", bytes.clone());
                }
                let site = &mut self.sites[to];
                site.inbox.push(bytes);
                if site.idle {
                    site.idle = false;
                    self.queue.push(at, Happening::Step(to));
                }
                Ok(())
            }
            Happening::Update {
                from,
                bytes,
                wire_bytes,
            } => self.update_arrives(at, from, bytes, wire_bytes),
            Happening::Tick => {
                let actions = self.coordinator.handle(Self::ms(at), Event::Tick);
                self.absorb(at, actions, None)
            }
        }
    }

    fn ms(at: f64) -> u64 {
        (at * 1e3) as u64
    }

    /// A global message reaches site `to` now: a networked site is sent it (it takes it when
    /// cued). Its size as the ledger counts it (on the wire, over the network).
    fn deliver(&mut self, to: usize, bytes: &[u8]) -> u64 {
        match &mut self.remote {
            Some(remote) => remote.send(to, bytes),
            None => bytes.len() as u64,
        }
    }
}

/// The fastest site's speed, and the first site that fast (the run's steps are its steps).
fn fastest_site(config: &RunConfig) -> (f64, usize) {
    let speeds: Vec<f64> = (0..config.sites).map(|k| config.site_speed(k)).collect();
    let fastest = speeds.iter().copied().fold(0.0, f64::max);
    (
        fastest,
        speeds.iter().position(|s| *s == fastest).unwrap_or(0),
    )
}

/// Every site of a scheduled run, with its step time, interval and step budget.
fn clocked_sites(
    config: &RunConfig,
    strategy: &Strategy,
    initial: &[f32],
    step_seconds: f64,
    train_here: bool,
) -> Result<Vec<Clocked>, RunError> {
    let (fastest, _) = fastest_site(config);
    let h = strategy.inner_steps.min(config.steps);
    let mut sites = Vec::with_capacity(config.sites);
    for k in 0..config.sites {
        let speed = config.site_speed(k);
        let share = speed / fastest;
        let (interval, steps_total) = match strategy.asynchronous {
            // The time budget: H of the fastest site's steps, in this site's own steps on
            // average; the run's steps of the fastest site, in its own.
            Some(_) => (
                ((h as f64 * share).round() as u64).max(1),
                ((config.steps as f64 * share).floor() as u64).max(1),
            ),
            None => (h, config.steps),
        };
        let asynchronous = strategy.asynchronous.is_some();
        let body = match train_here {
            true => Some(CuedSite::new(
                strategy_site(config, strategy, initial, k)?,
                asynchronous,
            )),
            false => None,
        };
        sites.push(Clocked {
            body,
            asynchronous,
            step_seconds: step_seconds / speed,
            interval,
            steps_total,
            steps_done: 0,
            since_send: 0,
            marks_sent: 0,
            inbox: Vec::new(),
            idle: true,
            held_round: None,
            training: None,
            sent_round: None,
            busy_unsent: 0.0,
            in_flight: Default::default(),
            last_loss: None,
            finished: false,
            down: false,
            base_step_seconds: step_seconds / speed,
        });
    }
    Ok(sites)
}

mod step;
