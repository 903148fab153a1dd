//! The networked coordinator's books: what the network shell (`lowband_net::serve`) reports
//! becomes the run's metrics, ledger, link time and checkpoints (`NetworkBooks`, the shell's
//! `Host`).

use std::collections::BTreeMap;

use bytes::Bytes;
use lowband_net::{Host, Record};
use lowband_protocol::wire::TrainingReport;
use lowband_protocol::Coordinator;

use crate::driver::{absorb, checkpoint_due, Common, Metric, SyncBytes};
use crate::ledger::Endpoint;
use crate::{RunError, RunEvent};

use super::checkpoints::Checkpoints;
use super::RoundSteps;

/// The training reports of the open round, by site (what arrives for a closed round is dropped).
type Reports = BTreeMap<u64, BTreeMap<u32, TrainingReport>>;

/// A closed round's training as its sites reported it: per step, the mean loss of the sites
/// that reported (summed in site order, as the in-memory driver does), and the slowest site's
/// training seconds added to the run's compute time.
/// Returns each reporting site's compute on the emulated clock (its seconds over its speed).
fn push_reported(
    common: &mut Common,
    first_step: u64,
    reported: &BTreeMap<u32, TrainingReport>,
) -> Vec<(u32, f64)> {
    let steps = reported.values().map(|r| r.losses.len()).max().unwrap_or(0);
    for i in 0..steps {
        let (mut sum, mut count) = (0.0f32, 0usize);
        for report in reported.values().filter(|r| r.losses.len() > i) {
            sum += report.losses[i];
            count += 1;
        }
        let step = first_step + i as u64;
        common.record_metric(Metric::Step {
            step,
            loss: sum / count as f32,
            lr: common.schedule.lr_at(step),
        });
    }
    let seconds: Vec<(u32, f64)> = reported
        .iter()
        .map(|(site, r)| {
            (
                *site,
                common.emulated_compute(*site as usize, r.losses.len() as u64, r.seconds),
            )
        })
        .collect();
    common.compute_seconds += seconds.iter().map(|(_, s)| *s).fold(0.0, f64::max);
    seconds
}

/// The protocol's actions into the run: metrics, evaluation at a round's close, and the
/// coordinator's checkpoint. A round closed on a quorum lists its missing members as `Missed`.
fn absorb_network(
    actions: Vec<lowband_protocol::Action>,
    common: &mut Common,
    coordinator: &Coordinator,
    persistence: &crate::Persistence,
    reports: &mut Reports,
    checkpoints: &mut Checkpoints,
) -> Result<crate::driver::Sends, RunError> {
    let rounds = RoundSteps::of(common.config, &common.strategy);
    let mut checkpoint = false;
    let mut step = rounds.first_step(coordinator.round());
    // (Each reporting site's compute, credited once the round's refusals are known.)
    let mut credits = Vec::new();
    let actions: Vec<lowband_protocol::Action> = actions
        .into_iter()
        .filter_map(|action| match action {
            lowband_protocol::Action::RoundClosed(mut report) => {
                step = rounds.end_step(report.round);
                let reported = reports.remove(&report.round).unwrap_or_default();
                reports.retain(|round, _| *round > report.round);
                let computed = push_reported(common, rounds.first_step(report.round), &reported);
                credits.extend(
                    computed
                        .into_iter()
                        .filter(|(site, _)| !report.missing.contains(site))
                        .map(|(site, seconds)| (report.round, site, seconds)),
                );
                for site in std::mem::take(&mut report.missing) {
                    common.record_metric(Metric::Missed {
                        round: report.round,
                        site,
                    });
                }
                Some(lowband_protocol::Action::RoundClosed(report))
            }
            lowband_protocol::Action::Checkpoint { .. } => {
                checkpoint = true;
                None
            }
            other => Some(other),
        })
        .collect();
    let sends = absorb(actions, common, coordinator, step)?;
    for (round, site, seconds) in credits {
        common.credit(round, site, seconds);
    }
    // A networked coordinator's state is its crash recovery: due after every round, written
    // behind the rounds (see `Checkpoints`).
    if checkpoint
        && persistence.state_dir.is_some()
        && checkpoint_due(1, coordinator.round(), false)
    {
        checkpoints.due(common, step, coordinator, persistence)?;
    }
    Ok(sends)
}

/// The run's side of a networked coordinator.
pub(super) struct NetworkBooks<'a> {
    pub common: Common<'a>,
    persistence: crate::Persistence,
    reports: Reports,
    checkpoints: Checkpoints,
    rounds: RoundSteps,
    /// Streaming: the broadcasts of the final syncs are not counted (no site trains after them),
    /// as in memory.
    counted_rounds: u64,
    /// The round whose link time is being counted, and its largest message each way.
    link_round: u64,
    sync: SyncBytes,
}

impl<'a> NetworkBooks<'a> {
    pub fn new(common: Common<'a>, state_dir: Option<std::path::PathBuf>, round: u64) -> Self {
        let rounds = RoundSteps::of(common.config, &common.strategy);
        NetworkBooks {
            common,
            persistence: crate::Persistence {
                observer: None,
                state_dir,
                stop_after_rounds: None,
            },
            reports: Reports::new(),
            checkpoints: Checkpoints::default(),
            rounds,
            counted_rounds: if rounds.fragments == 0 {
                u64::MAX
            } else {
                rounds.syncs_in_run()
            },
            link_round: round,
            sync: SyncBytes::default(),
        }
    }
}

impl NetworkBooks<'_> {
    /// The run is over: the checkpoint under way written, and the last one if it was skipped.
    pub fn finish_checkpoints(&mut self, coordinator: &Coordinator) -> Result<(), RunError> {
        self.checkpoints
            .finish(&self.common, coordinator, &self.persistence)
    }
}

impl Host for NetworkBooks<'_> {
    type Error = RunError;

    fn absorb(
        &mut self,
        actions: Vec<lowband_protocol::Action>,
        coordinator: &Coordinator,
    ) -> Result<lowband_net::Sends, RunError> {
        absorb_network(
            actions,
            &mut self.common,
            coordinator,
            &self.persistence,
            &mut self.reports,
            &mut self.checkpoints,
        )
    }

    fn record(&mut self, record: Record) {
        let metric = match record {
            Record::Joined { round, site } => Metric::Joined { round, site },
            Record::Left {
                round,
                site,
                reason,
            } => Metric::Left {
                round,
                site,
                reason,
            },
            Record::Refused {
                round,
                site,
                reason,
            } => {
                self.common.refused.insert((round, site));
                Metric::Refused {
                    round,
                    site,
                    reason,
                    // The networked coordinator runs no asynchronous rounds.
                    too_stale: false,
                }
            }
        };
        self.common.record_metric(metric);
    }

    fn sent(&mut self, round: u64, to: u32, message: &Bytes, sealed_bytes: usize) {
        if round <= self.counted_rounds {
            self.sync.down = self.sync.down.max(sealed_bytes as u64);
            self.common.record_bytes(
                round,
                Endpoint::Coordinator,
                Endpoint::Site(to),
                sealed_bytes as u64,
            );
        }
        if to == 0 {
            self.common.keep_sample("global", message.clone());
        }
    }

    fn received(&mut self, round: u64, from: u32, packet: &[u8], sealed_bytes: usize) {
        self.common.record_bytes(
            round,
            Endpoint::Site(from),
            Endpoint::Coordinator,
            sealed_bytes as u64,
        );
        // (An empty packet: its signature failed; counted in the ledger only.)
        if packet.is_empty() {
            return;
        }
        self.common.notify(|| RunEvent::Arrived {
            strategy: self.common.strategy.name(),
            round,
            site: from,
            bytes: sealed_bytes as u64,
        });
        self.sync.up = self.sync.up.max(sealed_bytes as u64);
        if from == 0 {
            self.common
                .keep_sample("update", Bytes::copy_from_slice(packet));
        }
    }

    fn report(
        &mut self,
        round: u64,
        from: u32,
        report: Option<TrainingReport>,
        sealed_bytes: usize,
    ) {
        self.common.telemetry_bytes += sealed_bytes as u64;
        if let Some(report) = &report {
            self.common.notify(|| RunEvent::Report {
                strategy: self.common.strategy.name(),
                round,
                site: from,
                seconds: report.seconds,
                received_bytes: report.received_bytes,
                received_seconds: report.received_seconds,
            });
        }
        if let Some(report) = report {
            self.reports.entry(round).or_default().insert(from, report);
        }
    }

    /// A round that changed: its sync on the emulated link, counted as every driver counts one
    /// (`Common::add_sync`; streaming hides up to `overlap_steps` of the sites' mean step time,
    /// and the final syncs' broadcasts are not counted).
    fn turn(&mut self, coordinator: &Coordinator) {
        if coordinator.round() == self.link_round {
            return;
        }
        let overlap_steps = self
            .common
            .strategy
            .streaming
            .map_or(0, |s| s.overlap_steps);
        let (overlap_steps, sync) = if self.rounds.fragments == 0 {
            (0, self.sync)
        } else if self.link_round < self.counted_rounds {
            (overlap_steps, self.sync)
        } else {
            (
                0,
                SyncBytes {
                    down: 0,
                    ..self.sync
                },
            )
        };
        let steps_done = self.rounds.end_step(self.link_round);
        self.common.add_sync(sync, overlap_steps, steps_done);
        (self.link_round, self.sync) = (coordinator.round(), SyncBytes::default());
    }

    fn done(&self, coordinator: &Coordinator) -> bool {
        coordinator.round() >= self.rounds.rounds()
    }
}
