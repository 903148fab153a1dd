//! The coordinator's side of a round: membership, deadlines, aggregation, the outer step.

use std::collections::{BTreeMap, BTreeSet};

use lowband_codec::{build, Codec, Fp32};

mod arrive;
mod asynchronous;
mod close;
mod downlink;

pub use asynchronous::AsyncMerge;

use downlink::Downlink;

use crate::aggregate::{self, Aggregator};
use crate::outer::{OuterConfig, OuterOptimizer};
use crate::trust::{Robustness, SiteScore, TrustState};
use crate::wire::{self, MessageKind};
use crate::{Compression, ProtocolError, SiteId};

/// Limits and settings; every limit has a unit-suffixed name and a default.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordinatorConfig {
    /// Length of the flat parameter buffer.
    pub params: usize,
    pub outer: OuterConfig,
    /// Updates that suffice to close a round once its deadline has passed (a round with every
    /// member's update closes at once). At least 1.
    pub quorum: usize,
    /// Time after a round's start at which it may close on a quorum.
    pub round_deadline_ms: u64,
    pub sites_max: usize,
    pub compression: Compression,
    /// Members present when the run starts already hold the initial parameters (derived from the
    /// shared seed), so the first round sends them no parameters. Sites joining later get them.
    pub sites_start_synced: bool,
    /// Streaming: the fragments rounds synchronize in turn (see [`crate::validate_fragments`]).
    pub fragments: Vec<std::ops::Range<usize>>,
    /// The aggregator, the norm and direction checks and the exclusion rule (see [`crate::trust`]).
    pub robustness: Robustness,
    /// The global parameters never leave [-parameter_abs_max, parameter_abs_max]: a merge that
    /// would put one outside (or make it non-finite) is refused, θ and the outer momentum are
    /// kept, and the update that held the largest value there is refused (it counts towards
    /// excluding its site). Finite values this large already overflow a forward pass in f32
    /// (a sum of squares passes 3.4e38), so no honest run gets near it.
    pub parameter_abs_max: f32,
    /// Asynchronous rounds (see [`AsyncMerge`]); None: synchronous rounds.
    pub asynchronous: Option<AsyncMerge>,
}

/// Default time after a round opens at which it may close on a quorum (10 minutes).
pub const ROUND_DEADLINE_MS_DEFAULT: u64 = 600_000;

/// Default bound on every global parameter's magnitude (see `parameter_abs_max`).
pub const PARAMETER_ABS_MAX_DEFAULT: f32 = 1e6;

impl CoordinatorConfig {
    pub fn new(params: usize, outer: OuterConfig) -> Self {
        CoordinatorConfig {
            params,
            outer,
            quorum: 1,
            round_deadline_ms: ROUND_DEADLINE_MS_DEFAULT,
            sites_max: 1024,
            compression: Compression::default(),
            sites_start_synced: false,
            fragments: Vec::new(),
            robustness: Robustness::default(),
            parameter_abs_max: PARAMETER_ABS_MAX_DEFAULT,
            asynchronous: None,
        }
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |field, reason: &str| {
            Err(ProtocolError::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.params == 0 {
            return invalid("params", "must be at least 1");
        }
        if self.quorum == 0 {
            return invalid("quorum", "must be at least 1");
        }
        if self.sites_max == 0 {
            return invalid("sites_max", "must be at least 1");
        }
        if !(self.parameter_abs_max.is_finite() && self.parameter_abs_max > 0.0) {
            return invalid("parameter_abs_max", "must be a positive finite number");
        }
        self.compression
            .validate()
            .map_err(|reason| ProtocolError::InvalidConfig {
                field: "compression",
                reason,
            })?;
        self.robustness
            .validate()
            .map_err(|reason| ProtocolError::InvalidConfig {
                field: "robustness",
                reason,
            })?;
        if let Some(rule) = &self.asynchronous {
            rule.validate()
                .map_err(|reason| ProtocolError::InvalidConfig {
                    field: "asynchronous",
                    reason,
                })?;
        }
        crate::validate_fragments(&self.fragments, self.params).map_err(|reason| {
            ProtocolError::InvalidConfig {
                field: "fragments",
                reason,
            }
        })?;
        self.outer
            .validate()
            .map_err(|reason| ProtocolError::InvalidConfig {
                field: "outer",
                reason,
            })
    }

    /// Whether the broadcast carries changes (a compressed downlink, or fragments).
    pub fn sends_changes(&self) -> bool {
        self.compression.sends_changes() || !self.fragments.is_empty()
    }

    /// Largest payload a site may send: exactly its uplink codec's payload for the parameters.
    pub fn payload_bytes_max(&self) -> usize {
        self.compression.uplink.payload_bytes(self.params)
    }
}

/// Inputs to the coordinator.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    SiteJoined {
        site: SiteId,
    },
    SiteLeft {
        site: SiteId,
    },
    /// `from` is the sender as the transport authenticated it.
    PacketArrived {
        from: SiteId,
        bytes: &'a [u8],
    },
    /// Time passed (deadlines are checked against `now_ms`).
    Tick,
}

/// What a closed round did.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    pub round: u64,
    pub contributors: Vec<SiteId>,
    /// Members that had not reported when the round closed on a quorum.
    pub missing: Vec<SiteId>,
    /// Updates refused when the round closed (by the norm or the direction check); packets
    /// refused on arrival are reported as [`Action::Rejected`] at once.
    pub refused: Vec<SiteId>,
    /// Accepted updates whose influence the aggregator cut hard.
    pub downweighted: Vec<SiteId>,
    /// L2 norm of every received update, in site order (accepted or not).
    pub update_norms: Vec<(SiteId, f32)>,
    /// Cosine of every received update with the sum of the others (its agreement with the
    /// round), in site order.
    pub update_cosines: Vec<(SiteId, f32)>,
    /// Asynchronous rounds: every received update's staleness (rounds behind the open one), in
    /// site order; empty in synchronous rounds.
    pub update_staleness: Vec<(SiteId, u64)>,
    /// L2 norm of the merged delta (0 when nothing was applied).
    pub delta_norm: f32,
    /// Whether the outer step ran: false when every update was refused, or when the merge was
    /// not finite (then θ is left as it was).
    pub applied: bool,
}

/// Outputs of the coordinator, to be carried out by the driver in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Bytes for one site. A message every member receives alike is one envelope addressed to
    /// `wire::EVERY_SITE`, shared (not copied) by the sends to each member.
    Send {
        to: SiteId,
        bytes: bytes::Bytes,
    },
    RoundClosed(RoundReport),
    /// The global state changed (a round closed): save `Coordinator::state` now.
    Checkpoint {
        round: u64,
    },
    /// A packet was refused and dropped; the reason is for the log and the site's score. A
    /// member's refused update forfeits its round (the round does not wait for it).
    Rejected {
        from: SiteId,
        reason: ProtocolError,
    },
    /// A site was refused too often and is no longer a member; it cannot join again.
    Excluded {
        site: SiteId,
        reason: String,
    },
}

struct OpenRound {
    round: u64,
    started_ms: u64,
    expected: BTreeSet<SiteId>,
    /// Each update, checked by a decode when it arrived.
    received: BTreeMap<SiteId, Held>,
    /// Asynchronous rounds: each held update's staleness, and when the first arrived.
    staleness: BTreeMap<SiteId, u64>,
    first_arrival_ms: Option<u64>,
}

/// How the coordinator holds an update until its round closes. The plain mean keeps the codec
/// payload (with a compressed uplink a site's update costs its packet size, not 4 bytes per
/// parameter) and decodes it again, one at a time, when the round closes; robust aggregators and
/// the direction check need every update at once, so they keep the decoded delta.
enum Held {
    Payload(Vec<u8>),
    Decoded(Vec<f32>),
}

/// The coordinator state machine.
pub struct Coordinator {
    config: CoordinatorConfig,
    global: Vec<f32>,
    outer: OuterOptimizer,
    aggregator: Box<dyn Aggregator>,
    uplink: Box<dyn Codec>,
    /// What the sites hold and what the broadcast sends them (see `Downlink`).
    downlink: Downlink,
    members: BTreeSet<SiteId>,
    /// The next round to run (the open one, if any).
    round: u64,
    open: Option<OpenRound>,
    started: bool,
    /// Buffers of closed rounds, reused so that steady state allocates nothing new.
    spare_payloads: Vec<Vec<u8>>,
    spare_deltas: Vec<Vec<f32>>,
    /// One decoded update at a time (the mean, merged one update at a time).
    scratch: Vec<f32>,
    merged: Vec<f32>,
    trust: TrustState,
}

/// What a coordinator must persist to resume: the round, θ and the outer momentum.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorState {
    pub round: u64,
    pub global: Vec<f32>,
    pub momentum_buffer: Vec<f32>,
    /// With a compressed downlink: the parameters the sites hold (empty otherwise).
    pub shared: Vec<f32>,
    pub synced: Vec<SiteId>,
    /// Site scores, exclusions and recent update norms.
    pub trust: TrustState,
    /// The downlink codec's pseudo-random stream as it was before the open round's broadcast.
    pub downlink_random: Option<u64>,
}

impl Coordinator {
    pub fn new(config: CoordinatorConfig, initial: Vec<f32>) -> Result<Self, ProtocolError> {
        config.validate()?;
        if initial.len() != config.params {
            return Err(ProtocolError::InvalidConfig {
                field: "params",
                reason: format!(
                    "{} initial values for {} params",
                    initial.len(),
                    config.params
                ),
            });
        }
        let outer = OuterOptimizer::new(config.outer, config.params);
        let merged = vec![0.0; config.params];
        Ok(Coordinator {
            aggregator: aggregate::build(config.robustness.aggregator),
            uplink: build(&config.compression.uplink)?,
            downlink: Downlink::new(&config, &initial)?,
            config,
            global: initial,
            outer,
            members: BTreeSet::new(),
            round: 0,
            open: None,
            started: false,
            spare_payloads: Vec::new(),
            spare_deltas: Vec::new(),
            scratch: Vec::new(),
            merged,
            trust: TrustState::default(),
        })
    }

    /// Continue from a saved state (the round in flight when it was saved is run again).
    pub fn restore(&mut self, state: CoordinatorState) -> Result<(), ProtocolError> {
        let ok = state.global.len() == self.config.params
            && (state.momentum_buffer.len() == self.outer.momentum_buffer.len())
            && state.shared.len() == self.downlink.shared.len();
        if !ok {
            return Err(ProtocolError::InvalidConfig {
                field: "state",
                reason: "saved state does not match the parameter count".into(),
            });
        }
        self.round = state.round;
        self.global = state.global;
        self.outer.momentum_buffer = state.momentum_buffer;
        self.downlink
            .restore(state.shared, state.synced, state.downlink_random);
        self.members.retain(|s| !state.trust.is_excluded(*s));
        self.trust = state.trust;
        self.open = None;
        Ok(())
    }

    pub fn state(&self) -> CoordinatorState {
        CoordinatorState {
            round: self.round,
            global: self.global.clone(),
            momentum_buffer: self.outer.momentum_buffer.clone(),
            shared: self.downlink.shared_before.clone(),
            synced: self.downlink.synced_before.iter().copied().collect(),
            trust: self.trust.clone(),
            downlink_random: self.downlink.random_before,
        }
    }

    pub fn global(&self) -> &[f32] {
        &self.global
    }
    /// Whether the open round holds an update (a scheduled run is saved only when none is).
    pub fn holds_updates(&self) -> bool {
        self.open.as_ref().is_some_and(|o| !o.received.is_empty())
    }
    pub fn round(&self) -> u64 {
        self.round
    }
    pub fn members(&self) -> &BTreeSet<SiteId> {
        &self.members
    }
    /// The fragment round `round` synchronizes (all of θ without fragments).
    pub fn fragment(&self, round: u64) -> std::ops::Range<usize> {
        crate::fragment_of(&self.config.fragments, self.config.params, round)
    }
    pub fn uplink(&self) -> lowband_codec::CodecSpec {
        self.config.compression.uplink
    }
    /// Every site's score so far (sites that never sent anything are absent).
    pub fn scores(&self) -> &std::collections::BTreeMap<SiteId, SiteScore> {
        &self.trust.scores
    }

    /// Begin the first round with the sites that have joined so far.
    pub fn start(&mut self, now_ms: u64) -> Vec<Action> {
        if self.config.sites_start_synced && !self.started && self.round == 0 {
            self.downlink.synced.extend(self.members.iter().copied());
        }
        self.started = true;
        let mut actions = Vec::new();
        self.open_round(now_ms, &mut actions);
        actions
    }

    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::SiteJoined { site } => self.on_join(now_ms, site, &mut actions),
            Event::SiteLeft { site } => {
                self.remove_member(site);
                self.maybe_close(now_ms, &mut actions);
            }
            Event::PacketArrived { from, bytes } => {
                match self.accept(now_ms, from, bytes, &mut actions) {
                    Ok(()) => self.maybe_close(now_ms, &mut actions),
                    Err(reason) => {
                        let forfeits = reason.forfeits_round()
                            && self.open.as_ref().is_some_and(|o| {
                                o.expected.contains(&from) && !o.received.contains_key(&from)
                            });
                        if forfeits {
                            if let Some(open) = &mut self.open {
                                open.expected.remove(&from);
                            }
                            self.refuse(from, reason, &mut actions);
                            self.maybe_close(now_ms, &mut actions);
                        } else {
                            actions.push(Action::Rejected { from, reason });
                        }
                    }
                }
            }
            Event::Tick => self.maybe_close(now_ms, &mut actions),
        }
        actions
    }

    fn remove_member(&mut self, site: SiteId) {
        self.members.remove(&site);
        self.downlink.synced.remove(&site);
        if let Some(open) = &mut self.open {
            open.expected.remove(&site);
        }
    }

    /// Report a refused update, score it, and exclude the site if it was refused too often.
    fn refuse(&mut self, site: SiteId, reason: ProtocolError, actions: &mut Vec<Action>) {
        let excluded =
            self.trust
                .record_refusal(site, &reason.to_string(), &self.config.robustness);
        actions.push(Action::Rejected { from: site, reason });
        if let Some(reason) = excluded {
            self.remove_member(site);
            actions.push(Action::Excluded { site, reason });
        }
    }

    /// A new member takes part from the next round that opens (join at round boundaries).
    fn on_join(&mut self, now_ms: u64, site: SiteId, actions: &mut Vec<Action>) {
        if site == wire::EVERY_SITE {
            actions.push(Action::Rejected {
                from: site,
                reason: ProtocolError::UnknownSite(site),
            });
            return;
        }
        if self.trust.is_excluded(site) {
            actions.push(Action::Rejected {
                from: site,
                reason: ProtocolError::Excluded(site),
            });
            return;
        }
        if !self.members.contains(&site) && self.members.len() >= self.config.sites_max {
            actions.push(Action::Rejected {
                from: site,
                reason: ProtocolError::TooManySites(self.config.sites_max),
            });
            return;
        }
        self.members.insert(site);
        if self.started && self.open.is_none() {
            self.open_round(now_ms, actions);
        }
    }

    fn open_round(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        debug_assert!(self.open.is_none());
        if self.members.is_empty() {
            return;
        }
        if self.config.sends_changes() {
            let range = self.changed_fragment();
            self.downlink
                .broadcast_change(&self.global, range, self.round, &self.members, actions);
        } else {
            let capacity = Fp32.payload_bytes(self.global.len());
            let global = &self.global;
            let bytes = bytes::Bytes::from(wire::encode_with(
                MessageKind::Global,
                self.round,
                wire::EVERY_SITE,
                capacity,
                |out| Fp32.encode(global, out),
            ));
            for &site in &self.members {
                actions.push(Action::Send {
                    to: site,
                    bytes: bytes.clone(),
                });
            }
        }
        self.open = Some(OpenRound {
            round: self.round,
            started_ms: now_ms,
            expected: self.members.clone(),
            received: BTreeMap::new(),
            staleness: BTreeMap::new(),
            first_arrival_ms: None,
        });
        debug_assert!(
            !self.config.sends_changes() || self.members.is_subset(&self.downlink.synced),
            "after a broadcast every member holds θ_sites"
        );
    }

    /// The fragment the last closed round changed (all of θ without fragments); none before
    /// the first round.
    fn changed_fragment(&self) -> std::ops::Range<usize> {
        if self.round == 0 && !self.config.fragments.is_empty() {
            0..0
        } else {
            crate::fragment_of(
                &self.config.fragments,
                self.config.params,
                self.round.saturating_sub(1),
            )
        }
    }
}
