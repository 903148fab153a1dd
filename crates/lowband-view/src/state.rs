//! The view's state: a fold over the run's events (`RunEvent`), each stamped with the wall-clock
//! second it happened at (since the view began). The live page, `/api/state`, `/metrics` and
//! `lowband view` (a finished run's `events.jsonl` folded again) all read this one state.

use std::collections::VecDeque;

use lowband_runtime::ledger::Endpoint;
use lowband_runtime::{Metric, RunEvent};
use serde::Serialize;

/// Rounds the timeline keeps (the newest).
pub const TIMELINE_ROUNDS: usize = 40;
/// State changes each site's history keeps (the newest).
pub const HISTORY_CHANGES: usize = 32;

/// What a site is doing, as the coordinator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteState {
    /// Not connected yet (a networked run before its join).
    Joining,
    Training,
    /// Its training report is in; its update is on the way.
    Sending,
    /// Its update is in; it waits for the round to close.
    Waiting,
    /// Excluded for repeated refusals: out of the run.
    Excluded,
    /// Its connection ended (left, lost, asked to rejoin).
    Gone,
}

/// One point of a loss curve: where the run was when the loss was measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Point {
    pub step: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub emulated_seconds: f64,
    pub wall_seconds: f64,
    pub loss: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteView {
    pub site: u32,
    /// The first 16 hex digits of its public key (None: an in-memory run has no keys).
    pub key: Option<String>,
    pub state: SiteState,
    pub round: Option<u64>,
    pub last_seen_wall_seconds: Option<f64>,
    /// Seconds it reported training (networked runs).
    pub compute_seconds: f64,
    /// Seconds from its report to its update's arrival: the upload.
    pub sending_seconds: f64,
    /// Seconds from its update's arrival to the next broadcast to it.
    pub waiting_seconds: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Its last update's bytes over its upload time (networked runs).
    pub up_mbit_per_s: Option<f64>,
    /// What it received since its previous report over the time that took, as it measured
    /// (each message from its first byte to its last; networked runs).
    pub down_mbit_per_s: Option<f64>,
    /// Its updates merged, and refused (the trust checks), and its last update's L2 norm and
    /// cosine with the sum of the others' (what those checks look at).
    pub accepted: u64,
    pub refused: u64,
    pub norm: Option<f32>,
    pub cosine: Option<f32>,
    pub last_reason: Option<String>,
    /// (wall second, state) of its latest state changes, oldest first.
    pub history: VecDeque<(f64, SiteState)>,
    #[serde(skip)]
    reported_at: Option<f64>,
    #[serde(skip)]
    arrived_at: Option<f64>,
}

impl SiteView {
    fn new(site: u32, key: Option<String>, state: SiteState, wall: f64) -> SiteView {
        SiteView {
            site,
            key,
            state,
            round: None,
            last_seen_wall_seconds: None,
            compute_seconds: 0.0,
            sending_seconds: 0.0,
            waiting_seconds: 0.0,
            bytes_up: 0,
            bytes_down: 0,
            up_mbit_per_s: None,
            down_mbit_per_s: None,
            accepted: 0,
            refused: 0,
            norm: None,
            cosine: None,
            last_reason: None,
            history: VecDeque::from([(wall, state)]),
            reported_at: None,
            arrived_at: None,
        }
    }

    fn set_state(&mut self, state: SiteState, wall: f64) {
        // An excluded site stays excluded whatever its connection does.
        if self.state == state || self.state == SiteState::Excluded {
            return;
        }
        self.state = state;
        self.history.push_back((wall, state));
        if self.history.len() > HISTORY_CHANGES {
            self.history.pop_front();
        }
    }

    fn seen(&mut self, wall: f64) {
        self.last_seen_wall_seconds = Some(wall);
    }
}

/// What became of one update in a round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arrival {
    pub site: u32,
    pub wall_seconds: Option<f64>,
    /// "arrived" (round still open), "merged", "refused", "missed" (closed without it).
    pub status: &'static str,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundView {
    pub round: u64,
    pub closed_wall_seconds: Option<f64>,
    pub arrivals: Vec<Arrival>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StrategyView {
    pub name: String,
    pub sites: usize,
    pub steps: u64,
    pub tokens_per_step: u64,
    pub params: usize,
    pub price_per_gb: f64,
    pub finished: bool,
    /// Inner steps done.
    pub step: u64,
    pub rounds: u64,
    pub bytes: u64,
    pub egress_dollars: f64,
    pub started_wall_seconds: f64,
    pub wall_seconds: f64,
    pub emulated_seconds: f64,
    /// Seconds to this strategy's end at its rate so far.
    pub eta_seconds: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// Training loss per step and validation loss per evaluation (sent apart, as the points
    /// a client does not have yet: `ViewState::to_json`).
    #[serde(skip)]
    pub train: Vec<Point>,
    #[serde(skip)]
    pub val: Vec<Point>,
    pub site_views: Vec<SiteView>,
    pub timeline: VecDeque<RoundView>,
    /// (round, site, reason) of every exclusion.
    pub exclusions: Vec<(u64, u32, String)>,
}

impl StrategyView {
    fn site(&mut self, site: u32) -> Option<&mut SiteView> {
        self.site_views.get_mut(site as usize)
    }

    fn round_view(&mut self, round: u64) -> &mut RoundView {
        if let Some(i) = self.timeline.iter().position(|r| r.round == round) {
            return &mut self.timeline[i];
        }
        self.timeline.push_back(RoundView {
            round,
            closed_wall_seconds: None,
            arrivals: Vec::new(),
        });
        if self.timeline.len() > TIMELINE_ROUNDS {
            self.timeline.pop_front();
        }
        self.timeline.back_mut().expect("just pushed")
    }

    fn arrival(&mut self, round: u64, site: u32) -> &mut Arrival {
        let view = self.round_view(round);
        if let Some(i) = view.arrivals.iter().position(|a| a.site == site) {
            return &mut view.arrivals[i];
        }
        view.arrivals.push(Arrival {
            site,
            wall_seconds: None,
            status: "arrived",
            reason: None,
        });
        view.arrivals.last_mut().expect("just pushed")
    }

    fn point(&self, step: u64, emulated_seconds: f64, wall: f64, loss: f64) -> Point {
        Point {
            step,
            tokens: step * self.tokens_per_step,
            bytes: self.bytes,
            emulated_seconds,
            wall_seconds: wall,
            loss,
        }
    }
}

/// The whole view: the run and every strategy it ran or runs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ViewState {
    /// The run's name (its directory under runs/).
    pub run: String,
    /// Strategies the run will run, in order (those not started yet included).
    pub planned: Vec<String>,
    /// Whether the run is going on (false: a finished run, shown by `lowband view`).
    pub live: bool,
    pub strategies: Vec<StrategyView>,
    /// Bumped by every event: what the page's pushes follow.
    pub version: u64,
}

impl ViewState {
    pub fn new(run: &str, planned: Vec<String>, live: bool) -> ViewState {
        ViewState {
            run: run.into(),
            planned,
            live,
            ..ViewState::default()
        }
    }

    /// Seconds to the end of the run: the running strategy's rest, and every planned strategy
    /// not started yet at the same rate per step.
    pub fn eta_seconds(&self) -> Option<f64> {
        let current = self.strategies.iter().rev().find(|s| !s.finished)?;
        let per_step = (current.wall_seconds - current.started_wall_seconds) / current.step as f64;
        let rest = current.eta_seconds?;
        let later: u64 = self
            .planned
            .iter()
            .filter(|name| !self.strategies.iter().any(|s| &s.name == *name))
            .map(|_| current.steps)
            .sum();
        Some(rest + later as f64 * per_step)
    }

    /// The state as JSON, each strategy with the curve points past `cursors` (its (train, val)
    /// points a client already holds, by strategy; advanced to what it holds after this). With
    /// empty cursors: everything.
    pub fn to_json(&self, cursors: &mut Vec<(usize, usize)>) -> serde_json::Value {
        cursors.resize(self.strategies.len(), (0, 0));
        let strategies: Vec<serde_json::Value> = self
            .strategies
            .iter()
            .zip(cursors.iter_mut())
            .map(|(view, cursor)| {
                // (A strategy started again under the same name starts its curves again.)
                if cursor.0 > view.train.len() || cursor.1 > view.val.len() {
                    *cursor = (0, 0);
                }
                let mut value = serde_json::to_value(view).unwrap_or_default();
                value["train_from"] = cursor.0.into();
                value["train"] = serde_json::to_value(&view.train[cursor.0..]).unwrap_or_default();
                value["val_from"] = cursor.1.into();
                value["val"] = serde_json::to_value(&view.val[cursor.1..]).unwrap_or_default();
                *cursor = (view.train.len(), view.val.len());
                value
            })
            .collect();
        serde_json::json!({
            "run": self.run,
            "planned": self.planned,
            "live": self.live,
            "version": self.version,
            "eta_seconds": self.eta_seconds(),
            "strategies": strategies,
        })
    }

    /// Fold one event in, at wall-clock second `wall`.
    pub fn apply(&mut self, event: &RunEvent, wall: f64) {
        self.version += 1;
        if let RunEvent::Started {
            strategy,
            sites,
            steps,
            tokens_per_step,
            params,
            price_per_gb,
            site_keys,
        } = event
        {
            self.strategies.retain(|s| &s.name != strategy);
            let networked = !site_keys.is_empty();
            let state = if networked {
                SiteState::Joining
            } else {
                SiteState::Training
            };
            self.strategies.push(StrategyView {
                name: strategy.clone(),
                sites: *sites,
                steps: *steps,
                tokens_per_step: *tokens_per_step,
                params: *params,
                price_per_gb: *price_per_gb,
                finished: false,
                step: 0,
                rounds: 0,
                bytes: 0,
                egress_dollars: 0.0,
                started_wall_seconds: wall,
                wall_seconds: wall,
                emulated_seconds: 0.0,
                eta_seconds: None,
                final_val_loss: None,
                train: Vec::new(),
                val: Vec::new(),
                site_views: (0..*sites as u32)
                    .map(|k| {
                        let key = site_keys
                            .get(k as usize)
                            .map(|k| k.chars().take(16).collect());
                        SiteView::new(k, key, state, wall)
                    })
                    .collect(),
                timeline: VecDeque::new(),
                exclusions: Vec::new(),
            });
            return;
        }
        let Some(view) = self
            .strategies
            .iter_mut()
            .rev()
            .find(|s| s.name == event.strategy())
        else {
            return;
        };
        view.wall_seconds = wall;
        apply_to(view, event, wall);
        if view.step > 0 && !view.finished {
            let per_step = (wall - view.started_wall_seconds) / view.step as f64;
            view.eta_seconds = Some(view.steps.saturating_sub(view.step) as f64 * per_step);
        }
    }
}

fn apply_to(view: &mut StrategyView, event: &RunEvent, wall: f64) {
    match event {
        RunEvent::Started { .. } => {}
        RunEvent::Metric {
            emulated_seconds,
            metric,
            ..
        } => {
            view.emulated_seconds = *emulated_seconds;
            apply_metric(view, metric, *emulated_seconds, wall);
        }
        RunEvent::Traffic {
            round,
            from,
            to,
            bytes,
            ..
        } => {
            view.bytes += bytes;
            view.egress_dollars = view.bytes as f64 / 1e9 * view.price_per_gb;
            traffic(view, *round, *from, *to, *bytes, wall);
        }
        RunEvent::Report {
            round,
            site,
            seconds,
            received_bytes,
            received_seconds,
            ..
        } => {
            if let Some(s) = view.site(*site) {
                if *received_bytes > 0 && *received_seconds > 0.0 {
                    s.down_mbit_per_s = Some(*received_bytes as f64 * 8.0 / received_seconds / 1e6);
                }
                s.compute_seconds += seconds;
                s.round = Some(*round);
                s.reported_at = Some(wall);
                s.seen(wall);
                s.set_state(SiteState::Sending, wall);
            }
        }
        RunEvent::Arrived {
            round, site, bytes, ..
        } => {
            if let Some(s) = view.site(*site) {
                if let Some(at) = s.reported_at.take() {
                    let upload = wall - at;
                    s.sending_seconds += upload;
                    if upload > 0.0 {
                        s.up_mbit_per_s = Some(*bytes as f64 * 8.0 / upload / 1e6);
                    }
                }
                s.arrived_at = Some(wall);
                s.round = Some(*round);
                s.seen(wall);
                s.set_state(SiteState::Waiting, wall);
            }
        }
        RunEvent::Finished {
            rounds,
            final_val_loss,
            ..
        } => {
            view.finished = true;
            view.rounds = *rounds;
            view.final_val_loss = *final_val_loss;
            view.eta_seconds = Some(0.0);
        }
    }
}

/// Bytes on a link: the sites' counters, and an update's arrival on the timeline.
fn traffic(
    view: &mut StrategyView,
    round: u64,
    from: Endpoint,
    to: Endpoint,
    bytes: u64,
    wall: f64,
) {
    if let Endpoint::Site(k) = from {
        if let Some(s) = view.site(k) {
            s.bytes_up += bytes;
            s.seen(wall);
        }
        if to == Endpoint::Coordinator {
            let arrival = view.arrival(round, k);
            arrival.wall_seconds = Some(wall);
        }
    }
    if let Endpoint::Site(k) = to {
        if let Some(s) = view.site(k) {
            s.bytes_down += bytes;
            if let Some(at) = s.arrived_at.take() {
                s.waiting_seconds += wall - at;
            }
            if from == Endpoint::Coordinator {
                s.round = Some(round);
                if matches!(s.state, SiteState::Waiting | SiteState::Joining) {
                    s.set_state(SiteState::Training, wall);
                }
            }
        }
    }
}

fn apply_metric(view: &mut StrategyView, metric: &Metric, emulated: f64, wall: f64) {
    match metric {
        Metric::Step { step, loss, .. } => {
            view.step = step + 1;
            let point = view.point(step + 1, emulated, wall, *loss as f64);
            view.train.push(point);
        }
        Metric::Eval {
            step,
            tokens,
            inter_site_bytes,
            emulated_seconds,
            val_loss,
            ..
        } => view.val.push(Point {
            step: *step,
            tokens: *tokens,
            bytes: *inter_site_bytes,
            emulated_seconds: *emulated_seconds,
            wall_seconds: wall,
            loss: *val_loss,
        }),
        Metric::Round {
            round,
            update_norms,
            update_cosines,
            ..
        } => round_closed(view, *round, (update_norms, update_cosines), wall),
        Metric::Refused {
            round,
            site,
            reason,
            ..
        } => {
            let arrival = view.arrival(*round, *site);
            arrival.status = "refused";
            arrival.reason = Some(reason.clone());
            if let Some(s) = view.site(*site) {
                s.refused += 1;
                s.last_reason = Some(reason.clone());
            }
        }
        Metric::Excluded {
            round,
            site,
            reason,
        } => {
            view.exclusions.push((*round, *site, reason.clone()));
            if let Some(s) = view.site(*site) {
                s.set_state(SiteState::Excluded, wall);
                s.last_reason = Some(reason.clone());
            }
        }
        Metric::Joined { round, site } => {
            if let Some(s) = view.site(*site) {
                s.round = Some(*round);
                s.seen(wall);
                s.set_state(SiteState::Training, wall);
            }
        }
        Metric::Left { site, reason, .. } => {
            if let Some(s) = view.site(*site) {
                s.last_reason = Some(reason.clone());
                s.set_state(SiteState::Gone, wall);
            }
        }
        Metric::Missed { round, site } => {
            view.arrival(*round, *site).status = "missed";
        }
    }
}

/// (site, value) pairs of a round's report.
type PerSite = [(u32, f32)];

/// Round `round` closed: what arrived was merged; each site's last norm and cosine.
fn round_closed(
    view: &mut StrategyView,
    round: u64,
    (norms, cosines): (&PerSite, &PerSite),
    wall: f64,
) {
    view.rounds = round + 1;
    let closed = view.round_view(round);
    closed.closed_wall_seconds = Some(wall);
    let mut merged = Vec::new();
    for arrival in &mut closed.arrivals {
        if arrival.status == "arrived" {
            arrival.status = "merged";
            merged.push(arrival.site);
        }
    }
    for site in merged {
        if let Some(s) = view.site(site) {
            s.accepted += 1;
        }
    }
    for (site, norm) in norms {
        if let Some(s) = view.site(*site) {
            s.norm = Some(*norm);
        }
    }
    for (site, cosine) in cosines {
        if let Some(s) = view.site(*site) {
            s.cosine = Some(*cosine);
        }
    }
}
