//! The coordinator's side of a round: membership, deadlines, aggregation, the outer step.

use std::collections::{BTreeMap, BTreeSet};

use lowband_codec::{build, Codec, Fp32};

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
}

/// Default bound on every global parameter's magnitude (see `parameter_abs_max`).
pub const PARAMETER_ABS_MAX_DEFAULT: f32 = 1e6;

impl CoordinatorConfig {
    pub fn new(params: usize, outer: OuterConfig) -> Self {
        CoordinatorConfig {
            params,
            outer,
            quorum: 1,
            round_deadline_ms: 600_000,
            sites_max: 1024,
            compression: Compression::default(),
            sites_start_synced: false,
            fragments: Vec::new(),
            robustness: Robustness::default(),
            parameter_abs_max: PARAMETER_ABS_MAX_DEFAULT,
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
    downlink: Box<dyn Codec>,
    /// With a compressed downlink: the parameters as the sites hold them (θ minus what has not
    /// been sent yet), and who holds them.
    shared: Vec<f32>,
    synced: BTreeSet<SiteId>,
    change: Vec<f32>,
    change_payload: Vec<u8>,
    /// θ_sites and its holders as they were before the open round's broadcast: what a saved
    /// state records, so that a restored coordinator sends that broadcast again.
    shared_before: Vec<f32>,
    synced_before: BTreeSet<SiteId>,
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
    /// The downlink codec's random state before the open round's broadcast (saved with θ_sites).
    downlink_random_before: Option<u64>,
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
        let changes = config.sends_changes();
        Ok(Coordinator {
            aggregator: aggregate::build(config.robustness.aggregator),
            uplink: build(&config.compression.uplink)?,
            downlink: build(&config.compression.downlink)?,
            shared: if changes { initial.clone() } else { Vec::new() },
            synced: BTreeSet::new(),
            change: if changes {
                vec![0.0; config.params]
            } else {
                Vec::new()
            },
            change_payload: Vec::new(),
            shared_before: if changes { initial.clone() } else { Vec::new() },
            synced_before: BTreeSet::new(),
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
            downlink_random_before: None,
        })
    }

    /// Continue from a saved state (the round in flight when it was saved is run again).
    pub fn restore(&mut self, state: CoordinatorState) -> Result<(), ProtocolError> {
        let ok = state.global.len() == self.config.params
            && (state.momentum_buffer.len() == self.outer.momentum_buffer.len())
            && state.shared.len() == self.shared.len();
        if !ok {
            return Err(ProtocolError::InvalidConfig {
                field: "state",
                reason: "saved state does not match the parameter count".into(),
            });
        }
        self.round = state.round;
        self.global = state.global;
        self.outer.momentum_buffer = state.momentum_buffer;
        self.shared_before.clone_from(&state.shared);
        self.shared = state.shared;
        self.synced = state.synced.into_iter().collect();
        self.synced_before = self.synced.clone();
        self.members.retain(|s| !state.trust.is_excluded(*s));
        if let Some(random) = state.downlink_random {
            self.downlink.set_random_state(random);
        }
        self.downlink_random_before = state.downlink_random;
        self.trust = state.trust;
        self.open = None;
        Ok(())
    }

    pub fn state(&self) -> CoordinatorState {
        CoordinatorState {
            round: self.round,
            global: self.global.clone(),
            momentum_buffer: self.outer.momentum_buffer.clone(),
            shared: self.shared_before.clone(),
            synced: self.synced_before.iter().copied().collect(),
            trust: self.trust.clone(),
            downlink_random: self.downlink_random_before,
        }
    }

    pub fn global(&self) -> &[f32] {
        &self.global
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
            self.synced.extend(self.members.iter().copied());
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
            Event::PacketArrived { from, bytes } => match self.accept_update(from, bytes) {
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
            },
            Event::Tick => self.maybe_close(now_ms, &mut actions),
        }
        actions
    }

    fn remove_member(&mut self, site: SiteId) {
        self.members.remove(&site);
        self.synced.remove(&site);
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
            self.broadcast_change(actions);
        } else {
            let mut payload = Vec::with_capacity(Fp32.payload_bytes(self.global.len()));
            Fp32.encode(&self.global, &mut payload);
            let bytes = bytes::Bytes::from(wire::encode(
                MessageKind::Global,
                self.round,
                wire::EVERY_SITE,
                &payload,
            ));
            drop(payload);
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
        });
    }

    /// Compressed downlink: encode θ − θ_sites, apply what the sites will decode to θ_sites, send it
    /// to the members that hold θ_sites and θ_sites in full to those that do not.
    fn broadcast_change(&mut self, actions: &mut Vec<Action>) {
        self.shared_before.copy_from_slice(&self.shared);
        self.synced_before.clone_from(&self.synced);
        self.downlink_random_before = self.downlink.random_state();
        // The fragment the last closed round changed (all of θ without fragments); none before
        // the first round.
        let range = if self.round == 0 && !self.config.fragments.is_empty() {
            0..0
        } else {
            crate::fragment_of(
                &self.config.fragments,
                self.config.params,
                self.round.saturating_sub(1),
            )
        };
        let change = &mut self.change[range.clone()];
        for ((c, g), s) in change
            .iter_mut()
            .zip(&self.global[range.clone()])
            .zip(&self.shared[range.clone()])
        {
            *c = g - s;
        }
        self.change_payload.clear();
        if change.iter().any(|c| *c != 0.0) {
            self.downlink.encode(change, &mut self.change_payload);
            // What every synced site will add; our own encoding decodes (checked by the tests).
            if self.downlink.decode(&self.change_payload, change).is_ok() {
                for (s, c) in self.shared[range].iter_mut().zip(change.iter()) {
                    *s += c;
                }
            } else {
                self.change_payload.clear();
            }
        }
        // Two envelopes at most, each shared by the members it goes to.
        let (mut change, mut full): (Option<bytes::Bytes>, Option<bytes::Bytes>) = (None, None);
        for &site in &self.members {
            let bytes = if self.synced.contains(&site) {
                change
                    .get_or_insert_with(|| {
                        wire::encode(
                            MessageKind::GlobalDelta,
                            self.round,
                            wire::EVERY_SITE,
                            &self.change_payload,
                        )
                        .into()
                    })
                    .clone()
            } else {
                full.get_or_insert_with(|| {
                    let mut payload = Vec::with_capacity(Fp32.payload_bytes(self.shared.len()));
                    Fp32.encode(&self.shared, &mut payload);
                    wire::encode(MessageKind::Global, self.round, wire::EVERY_SITE, &payload).into()
                })
                .clone()
            };
            actions.push(Action::Send { to: site, bytes });
        }
        self.synced.extend(self.members.iter().copied());
    }

    /// The plain mean without a direction check merges one decoded update at a time (memory
    /// independent of K); robust aggregators and the direction check need every update at once.
    fn merges_one_at_a_time(&self) -> bool {
        self.aggregator.spec() == crate::AggregatorSpec::Mean
            && self.config.robustness.cosine_ratio_min.is_none()
    }

    fn accept_update(&mut self, from: SiteId, bytes: &[u8]) -> Result<(), ProtocolError> {
        let message = wire::decode(bytes, self.config.payload_bytes_max())?;
        if message.kind != MessageKind::Update {
            return Err(ProtocolError::WrongKind(message.kind));
        }
        if message.site != from {
            return Err(ProtocolError::SiteMismatch {
                claimed: message.site,
                from,
            });
        }
        if !self.members.contains(&from) {
            return Err(ProtocolError::UnknownSite(from));
        }
        let one_at_a_time = self.merges_one_at_a_time();
        let open = self.open.as_mut().ok_or(ProtocolError::NoOpenRound)?;
        if message.round != open.round {
            return Err(ProtocolError::WrongRound {
                expected: open.round,
                found: message.round,
            });
        }
        if !open.expected.contains(&from) {
            return Err(ProtocolError::NotInRound(from));
        }
        if open.received.contains_key(&from) {
            return Err(ProtocolError::Duplicate {
                site: from,
                round: open.round,
            });
        }
        let length =
            crate::fragment_of(&self.config.fragments, self.config.params, open.round).len();
        let held = if one_at_a_time {
            self.scratch.resize(length, 0.0);
            self.uplink.decode(message.payload, &mut self.scratch)?;
            let mut payload = self.spare_payloads.pop().unwrap_or_default();
            payload.clear();
            payload.extend_from_slice(message.payload);
            Held::Payload(payload)
        } else {
            let mut delta = self.spare_deltas.pop().unwrap_or_default();
            delta.resize(length, 0.0);
            if let Err(e) = self.uplink.decode(message.payload, &mut delta) {
                self.spare_deltas.push(delta);
                return Err(e.into());
            }
            Held::Decoded(delta)
        };
        open.received.insert(from, held);
        Ok(())
    }

    fn maybe_close(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(open) = &self.open else { return };
        let everyone = !open.received.is_empty()
            && open.expected.iter().all(|s| open.received.contains_key(s));
        let deadline_passed = now_ms
            >= open
                .started_ms
                .saturating_add(self.config.round_deadline_ms);
        let quorum = open.received.len() >= self.config.quorum.min(open.expected.len().max(1));
        if everyone || (deadline_passed && quorum && !open.received.is_empty()) {
            self.close_round(now_ms, actions);
        } else if open.expected.is_empty() {
            // Every member left: start again with whoever is there.
            self.open = None;
            self.open_round(now_ms, actions);
        }
    }

    fn close_round(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let open = self.open.take().expect("close_round needs an open round");
        let range = crate::fragment_of(&self.config.fragments, self.config.params, open.round);
        let fragment = if self.config.fragments.is_empty() {
            0
        } else {
            (open.round % self.config.fragments.len() as u64) as usize
        };
        let robustness = self.config.robustness;
        // The plain mean without a direction check merges one decoded update at a time (memory
        // independent of K); robust aggregators and the direction check need every update at once.
        let sites: Vec<SiteId> = open.received.keys().copied().collect();
        let missing = open
            .expected
            .iter()
            .filter(|s| !open.received.contains_key(s))
            .copied()
            .collect();
        // Payloads (decoded again in each pass) or decoded deltas; see `Held`.
        let (mut payloads, mut dense): (Vec<Vec<u8>>, Vec<Vec<f32>>) = (Vec::new(), Vec::new());
        for (_, held) in open.received {
            match held {
                Held::Payload(payload) => payloads.push(payload),
                Held::Decoded(delta) => dense.push(delta),
            }
        }
        let one_at_a_time = dense.is_empty();
        // Every update's norm, and (for the per-update cosine report) their sum.
        self.scratch.resize(range.len(), 0.0);
        let mut norms = Vec::with_capacity(sites.len());
        let mut sum = vec![0.0f64; range.len()];
        for i in 0..sites.len() {
            let delta = held_update(
                self.uplink.as_mut(),
                &mut self.scratch,
                &payloads,
                &dense,
                i,
            );
            norms.push(
                delta
                    .iter()
                    .map(|v| (*v as f64) * (*v as f64))
                    .sum::<f64>()
                    .sqrt() as f32,
            );
            for (s, v) in sum.iter_mut().zip(delta) {
                *s += *v as f64;
            }
        }
        // The norm check, against this round's median norm (recent rounds' when it has fewer
        // than 3 updates).
        let reference = self.trust.reference_norm(fragment, &norms);
        let mut accepted: Vec<(usize, f32)> = Vec::with_capacity(norms.len());
        let mut refused = Vec::new();
        for (i, norm) in norms.iter().enumerate() {
            if TrustState::norm_ok(*norm, reference, robustness.norm_ratio_max) {
                accepted.push((i, *norm));
            } else {
                refused.push((
                    sites[i],
                    ProtocolError::UpdateNorm {
                        norm: *norm,
                        reference,
                        ratio_max: robustness.norm_ratio_max.unwrap_or(f32::INFINITY),
                    },
                ));
            }
        }
        // The direction check, among the updates the norm check kept.
        if let Some(ratio_min) = robustness.cosine_ratio_min {
            let deltas: Vec<&[f32]> = accepted.iter().map(|(i, _)| dense[*i].as_slice()).collect();
            let cosines = crate::trust::leave_one_out_cosines(&deltas);
            if let Some(reference) = TrustState::cosine_reference(&cosines) {
                let mut kept = Vec::with_capacity(accepted.len());
                for (update, cosine) in accepted.into_iter().zip(cosines) {
                    if cosine >= ratio_min * reference {
                        kept.push(update);
                    } else {
                        refused.push((
                            sites[update.0],
                            ProtocolError::UpdateDirection {
                                cosine,
                                reference,
                                ratio_min,
                            },
                        ));
                    }
                }
                accepted = kept;
                refused.sort_by_key(|(site, _)| *site);
            }
        }
        // The cosine of every update with the sum of the others (reported, accepted or not), and
        // the mean of the accepted ones merged one at a time, in site order as `aggregate::Mean` sums.
        let mut cosines = Vec::with_capacity(sites.len());
        self.merged.resize(range.len(), 0.0);
        let mut merged_count = 0usize;
        for i in 0..sites.len() {
            let delta = held_update(
                self.uplink.as_mut(),
                &mut self.scratch,
                &payloads,
                &dense,
                i,
            );
            cosines.push(crate::trust::cosine_with_rest(delta, &sum));
            if one_at_a_time && accepted.iter().any(|(a, _)| *a == i) {
                if merged_count == 0 {
                    self.merged.copy_from_slice(delta);
                } else {
                    for (m, v) in self.merged.iter_mut().zip(delta) {
                        *m += v;
                    }
                }
                merged_count += 1;
            }
        }
        drop(sum);
        let mut applied = false;
        let mut downweighted = Vec::new();
        if !accepted.is_empty() {
            let flags = if one_at_a_time {
                let scale = 1.0 / merged_count as f32;
                for m in self.merged.iter_mut() {
                    *m *= scale;
                }
                vec![false; accepted.len()]
            } else {
                let deltas: Vec<&[f32]> =
                    accepted.iter().map(|(i, _)| dense[*i].as_slice()).collect();
                self.aggregator.aggregate(&deltas, &mut self.merged)
            };
            // A merge of finite values can still overflow, or carry θ where no forward pass
            // survives; never let it into θ (nor into the outer momentum). The update that held
            // the largest value there is refused (and neither scored as accepted nor kept in the
            // norm history).
            let culprit = self
                .outer
                .first_out_of_range(
                    &self.global,
                    &self.merged,
                    range.clone(),
                    self.config.parameter_abs_max,
                )
                .map(|(parameter, merged_value)| {
                    let (i, update_value) =
                        self.largest_at(&accepted, &payloads, &dense, parameter - range.start);
                    (i, parameter, merged_value, update_value)
                });
            for ((i, _), flag) in accepted.iter().zip(&flags) {
                if culprit.is_some_and(|c| c.0 == *i) {
                    continue;
                }
                self.trust.record_accepted(sites[*i], *flag, &robustness);
                if *flag {
                    downweighted.push(sites[*i]);
                }
            }
            let norms = accepted
                .iter()
                .filter(|(i, _)| culprit.is_none_or(|c| c.0 != *i))
                .map(|(_, n)| *n)
                .collect();
            self.trust
                .record_norms(fragment, norms, robustness.norm_history_rounds);
            applied = culprit.is_none();
            if let Some((i, parameter, merged_value, update_value)) = culprit {
                accepted.retain(|(a, _)| *a != i);
                refused.push((
                    sites[i],
                    ProtocolError::MergeOutOfRange {
                        parameter,
                        merged_value,
                        update_value,
                        limit: self.config.parameter_abs_max,
                    },
                ));
            } else {
                self.outer.step_range(&mut self.global, &self.merged, range);
            }
        }
        self.spare_deltas.extend(dense);
        let delta_norm = if applied {
            self.merged
                .iter()
                .map(|v| (*v as f64) * (*v as f64))
                .sum::<f64>()
                .sqrt() as f32
        } else {
            0.0
        };
        let contributors: Vec<SiteId> = accepted.iter().map(|(i, _)| sites[*i]).collect();
        let refused_sites: Vec<SiteId> = refused.iter().map(|(s, _)| *s).collect();
        let update_norms = sites.iter().copied().zip(norms.iter().copied()).collect();
        let update_cosines = sites.iter().copied().zip(cosines).collect();
        self.spare_payloads.extend(payloads);
        for (site, reason) in refused {
            self.refuse(site, reason, actions);
        }
        actions.push(Action::RoundClosed(RoundReport {
            round: open.round,
            contributors,
            missing,
            refused: refused_sites,
            downweighted,
            update_norms,
            update_cosines,
            delta_norm,
            applied,
        }));
        self.round = open.round + 1;
        actions.push(Action::Checkpoint { round: self.round });
        self.open_round(now_ms, actions);
    }
}

impl Coordinator {
    /// Among the accepted updates (index into the round's sites), the one with the largest
    /// magnitude at `offset` of the fragment, and its value there: the update that caused a
    /// refused merge.
    fn largest_at(
        &mut self,
        accepted: &[(usize, f32)],
        payloads: &[Vec<u8>],
        dense: &[Vec<f32>],
        offset: usize,
    ) -> (usize, f32) {
        debug_assert!(!accepted.is_empty(), "a merge has at least one update");
        let mut largest = (accepted[0].0, 0.0f32);
        for &(i, _) in accepted {
            let delta = held_update(self.uplink.as_mut(), &mut self.scratch, payloads, dense, i);
            let value = delta[offset];
            // A NaN counts as the largest.
            if value.is_nan() || value.abs() > largest.1.abs() {
                largest = (i, value);
            }
        }
        largest
    }
}

/// Update `i` of a closing round: decoded again from its payload into `scratch` (the mean held
/// payloads) or as held (decoded on arrival).
fn held_update<'a>(
    uplink: &mut dyn Codec,
    scratch: &'a mut [f32],
    payloads: &[Vec<u8>],
    dense: &'a [Vec<f32>],
    i: usize,
) -> &'a [f32] {
    if dense.is_empty() {
        uplink
            .decode(&payloads[i], scratch)
            .expect("decoded once when it arrived");
        scratch
    } else {
        &dense[i]
    }
}
