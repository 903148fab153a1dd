//! A site's side of a round: hold the global parameters, report the (compressed) delta.

use lowband_codec::{build, Codec, CodecError, ErrorFeedback, Fp32};
use rayon::prelude::*;

use crate::wire::{self, MessageKind};
use crate::{Compression, ProtocolError, SiteId};

/// Values per parallel task of the element-wise passes (256 KB of each stream).
const VALUES_PER_TASK: usize = 1 << 16;

/// Inputs to a site.
#[derive(Debug, Clone, Copy)]
pub enum SiteEvent<'a> {
    /// Bytes from the coordinator.
    PacketArrived(&'a [u8]),
    /// Local training for `round` finished with these parameters.
    TrainingDone { round: u64, params: &'a [f32] },
}

#[derive(Debug, Clone, PartialEq)]
pub enum SiteAction {
    /// Set the trainer's parameters to `Site::round_start` and run the round's inner steps.
    Train { round: u64 },
    /// Send these bytes to the coordinator.
    Send(Vec<u8>),
}

pub struct Site {
    id: SiteId,
    round: Option<u64>,
    /// The global parameters as this site holds them (what every round starts from).
    start: Vec<f32>,
    /// Whether `start` holds the cluster's parameters (from the shared seed or a full global).
    synced: bool,
    /// `start` is the shared seed's parameters and nothing has been received or restored yet:
    /// they are the cluster's only before round 1 (a site restarted mid-run must not apply a
    /// change to them).
    seed_only: bool,
    /// δ without error feedback (with it, the feedback forms δ in its own buffer); empty until
    /// first used.
    delta: Vec<f32>,
    /// A decoded change, for a downlink codec that cannot add its payload in place (dense ones,
    /// `dct`); empty until first used.
    change: Vec<f32>,
    uplink: Box<dyn Codec>,
    downlink: Box<dyn Codec>,
    /// Whether the coordinator sends changes (a compressed downlink, or fragments).
    sends_changes: bool,
    /// One error-feedback state per fragment (one in all without fragments).
    feedback: Vec<ErrorFeedback>,
    fragments: Vec<std::ops::Range<usize>>,
}

impl Site {
    /// A site that holds nothing yet: the coordinator sends it the parameters in full (fp32).
    pub fn new(id: SiteId, params: usize) -> Self {
        Site::build(id, vec![0.0; params], false, Compression::default())
            .expect("fp32 is always valid")
    }

    /// A site that holds nothing yet and sends its updates through `compression`: the
    /// coordinator sends it the parameters in full (fp32) first (a site whose model is not
    /// derived from a shared seed: an external model's).
    pub fn unsynced(
        id: SiteId,
        params: usize,
        compression: Compression,
    ) -> Result<Self, ProtocolError> {
        Site::build(id, vec![0.0; params], false, compression)
    }

    /// A site that starts from `initial`, the parameters every member derives from the shared
    /// seed (so the first round needs no broadcast).
    pub fn with_initial(
        id: SiteId,
        initial: Vec<f32>,
        compression: Compression,
    ) -> Result<Self, ProtocolError> {
        Site::build(id, initial, true, compression)
    }

    fn build(
        id: SiteId,
        start: Vec<f32>,
        synced: bool,
        compression: Compression,
    ) -> Result<Self, ProtocolError> {
        compression
            .validate()
            .map_err(|reason| ProtocolError::InvalidConfig {
                field: "compression",
                reason,
            })?;
        let n = start.len();
        let feedback = compression
            .feedback_decay
            .map(|decay| ErrorFeedback::new(n, decay))
            .into_iter()
            .collect();
        Ok(Site {
            id,
            round: None,
            start,
            synced,
            seed_only: synced,
            delta: Vec::new(),
            change: Vec::new(),
            uplink: build(&compression.uplink)?,
            downlink: build(&compression.downlink)?,
            sends_changes: compression.sends_changes(),
            feedback,
            fragments: Vec::new(),
        })
    }

    /// Streaming: synchronize these fragments in turn (the coordinator must use the same list).
    /// Round r sends the delta of fragment r mod P; the broadcast opening round r changes the
    /// fragment of round r − 1 ([`Site::changed_by_round`]).
    pub fn with_fragments(
        mut self,
        fragments: Vec<std::ops::Range<usize>>,
    ) -> Result<Self, ProtocolError> {
        crate::validate_fragments(&fragments, self.start.len()).map_err(|reason| {
            ProtocolError::InvalidConfig {
                field: "fragments",
                reason,
            }
        })?;
        let decay = self.feedback.first().map(|f| f.decay());
        self.feedback = match decay {
            Some(decay) => fragments
                .iter()
                .map(|f| ErrorFeedback::new(f.len(), decay))
                .collect(),
            None => Vec::new(),
        };
        self.fragments = fragments;
        self.sends_changes = true;
        Ok(self)
    }

    /// The parameters the broadcast opening `round` changed: a fragment in streaming mode
    /// (none for round 0), all of them otherwise.
    pub fn changed_by_round(&self, round: u64) -> std::ops::Range<usize> {
        let n = self.start.len();
        if self.fragments.is_empty() {
            0..n
        } else if round == 0 {
            0..0
        } else {
            crate::fragment_of(&self.fragments, n, round - 1)
        }
    }

    /// Streaming DiLoCo's mix, once the broadcast opening `round` is in: over the parameters it
    /// changed, `local ← mix·local + (1 − mix)·global` (value by value: the same bits on any
    /// thread count). The one formula lowband's sites and PyTorch sites use.
    pub fn mix_changed(
        &self,
        round: u64,
        local: &mut [f32],
        mix: f32,
    ) -> Result<(), ProtocolError> {
        if local.len() != self.start.len() {
            return Err(ProtocolError::ParameterCount {
                expected: self.start.len(),
                found: local.len(),
            });
        }
        let range = self.changed_by_round(round);
        crate::par::zip_apply(&mut local[range.clone()], &self.start[range], |l, g| {
            *l = mix * *l + (1.0 - mix) * g
        });
        Ok(())
    }

    /// The parameters round `round` sends the delta of: a fragment in streaming mode, all of them
    /// otherwise.
    pub fn fragment(&self, round: u64) -> std::ops::Range<usize> {
        crate::fragment_of(&self.fragments, self.start.len(), round)
    }

    pub fn id(&self) -> SiteId {
        self.id
    }

    /// The global parameters the current round started from.
    pub fn round_start(&self) -> &[f32] {
        &self.start
    }

    /// Whether this site holds the parameters a change for `round` applies to.
    fn holds_base_of(&self, round: u64) -> bool {
        self.synced && !(self.seed_only && round > 0)
    }

    /// Whether `packet` is a change this site cannot apply (it holds only the seed's parameters
    /// or none, or it is for a round this site has moved past): `handle` would refuse it with `NotSynced`, and the site should rejoin to get the
    /// parameters in full. False for anything else (malformed packets included: `handle` says why).
    pub fn needs_full_parameters(&self, packet: &[u8]) -> bool {
        wire::decode(packet, self.payload_bytes_max()).is_ok_and(|message| {
            message.kind == MessageKind::GlobalDelta
                && (!self.holds_base_of(message.round) || self.is_behind(message.round))
        })
    }

    /// Whether a message for `round` comes from a coordinator behind this site's round.
    fn is_behind(&self, round: u64) -> bool {
        self.round.is_some_and(|current| round < current)
    }

    pub fn round(&self) -> Option<u64> {
        self.round
    }

    /// The error-feedback residual (what this site's codec has not sent yet), if it keeps one.
    pub fn feedback_residual(&self) -> Option<Vec<f32>> {
        (!self.feedback.is_empty()).then(|| {
            self.feedback
                .iter()
                .flat_map(|f| f.residual().iter().copied())
                .collect()
        })
    }

    /// Where the uplink codec's pseudo-random stream stands (see `Codec::random_state`).
    pub fn codec_random_state(&self) -> Option<u64> {
        self.uplink.random_state()
    }

    pub fn set_codec_random_state(&mut self, state: u64) {
        self.uplink.set_random_state(state);
    }

    /// Continue from a saved state: the parameters the site held and its residual.
    pub fn restore(
        &mut self,
        start: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<(), ProtocolError> {
        let bad = |reason: &str| {
            Err(ProtocolError::InvalidConfig {
                field: "site state",
                reason: reason.into(),
            })
        };
        if start.len() != self.start.len() {
            return bad("saved parameters have another length");
        }
        match residual {
            Some(r) if !self.feedback.is_empty() && r.len() == start.len() => {
                let mut at = 0;
                for f in &mut self.feedback {
                    let len = f.residual().len();
                    f.set_residual(&r[at..at + len]);
                    at += len;
                }
            }
            None if self.feedback.is_empty() => {}
            _ => return bad("saved error-feedback residual does not match this site's settings"),
        }
        self.start.copy_from_slice(start);
        self.synced = true;
        self.seed_only = false;
        Ok(())
    }

    /// Continue from a saved state: the round of the parameters it holds (set by `restore`'s
    /// caller after `restore`, which does not know it).
    pub fn restore_round(&mut self, round: Option<u64>) {
        self.round = round;
    }

    /// Continue the error feedback from a saved residual, without claiming to hold the cluster's
    /// parameters (a restarted site gets them from the coordinator when it rejoins).
    pub fn restore_feedback(&mut self, residual: &[f32]) -> Result<(), ProtocolError> {
        if self.feedback.is_empty() || residual.len() != self.start.len() {
            return Err(ProtocolError::InvalidConfig {
                field: "site state",
                reason: "saved error-feedback residual does not match this site's settings".into(),
            });
        }
        let mut at = 0;
        for f in &mut self.feedback {
            let len = f.residual().len();
            f.set_residual(&residual[at..at + len]);
            at += len;
        }
        Ok(())
    }

    /// Add the coordinator's change (a checked payload) to the held parameters over `range`:
    /// in place where the codec can (sparse), through a decoded buffer otherwise. A bad payload
    /// leaves them untouched either way.
    fn apply_change(
        &mut self,
        payload: &[u8],
        range: std::ops::Range<usize>,
    ) -> Result<(), ProtocolError> {
        let start = &mut self.start[range.clone()];
        if self.downlink.decode_add(payload, start, 1.0)? {
            return Ok(());
        }
        self.change.resize(self.start.len(), 0.0);
        let change = &mut self.change[range.clone()];
        self.downlink.decode(payload, change)?;
        self.start[range]
            .par_chunks_mut(VALUES_PER_TASK)
            .zip(change.par_chunks(VALUES_PER_TASK))
            .for_each(|(start, change)| {
                for (s, c) in start.iter_mut().zip(change) {
                    *s += c;
                }
            });
        Ok(())
    }

    fn payload_bytes_max(&self) -> usize {
        Fp32.payload_bytes(self.start.len())
            .max(self.downlink.payload_bytes(self.start.len()))
    }

    pub fn handle(&mut self, event: SiteEvent) -> Result<Vec<SiteAction>, ProtocolError> {
        match event {
            SiteEvent::PacketArrived(bytes) => self.on_packet(bytes),
            SiteEvent::TrainingDone { round, params } => self.on_trained(round, params),
        }
    }

    /// A message from the coordinator: the parameters in full, or a change to them.
    fn on_packet(&mut self, bytes: &[u8]) -> Result<Vec<SiteAction>, ProtocolError> {
        let message = wire::decode(bytes, self.payload_bytes_max())?;
        if matches!(
            message.kind,
            MessageKind::Update | MessageKind::Report | MessageKind::Join | MessageKind::Cue
        ) {
            return Err(ProtocolError::WrongKind(message.kind));
        }
        if message.site != self.id && message.site != wire::EVERY_SITE {
            return Err(ProtocolError::SiteMismatch {
                claimed: message.site,
                from: self.id,
            });
        }
        if self.is_behind(message.round) && message.kind == MessageKind::GlobalDelta {
            // A change to the parameters of a round this site has moved past (the coordinator
            // resumed from a checkpoint older than the rounds this site trained): it cannot
            // apply it; it rejoins for the parameters in full, which it takes (below).
            return Err(ProtocolError::NotSynced);
        }
        if message.kind == MessageKind::Global {
            // The parameters in full are the cluster's, whatever round this site was at: a
            // coordinator that resumed from an older checkpoint sends an older round.
            // Check first: a bad packet must not touch the held parameters.
            Fp32.check(message.payload, self.start.len())?;
            Fp32.decode(message.payload, &mut self.start)?;
            self.synced = true;
        } else {
            // A change applies to the parameters of the round before: a site that holds only
            // the seed's (it restarted mid-run) must get them in full first. Refusing is
            // loud; applying would silently diverge from the cluster.
            if !self.holds_base_of(message.round) {
                return Err(ProtocolError::NotSynced);
            }
            // The change of the round this site already holds, sent again (a coordinator
            // restored from the state it saved before that broadcast re-sends it,
            // byte for byte): it was applied once and must not be applied twice.
            let repeated = self.round == Some(message.round);
            if !message.payload.is_empty() && !repeated {
                let range = self.changed_by_round(message.round);
                if !self.sends_changes || range.is_empty() {
                    return Err(ProtocolError::WrongKind(message.kind));
                }
                self.apply_change(message.payload, range)?;
            }
        }
        self.round = Some(message.round);
        self.seed_only = false;
        Ok(vec![SiteAction::Train {
            round: message.round,
        }])
    }

    /// Local training of `round` ended with `params`: the update, through the codec and its
    /// error feedback.
    fn on_trained(&mut self, round: u64, params: &[f32]) -> Result<Vec<SiteAction>, ProtocolError> {
        let envelope = self.encode_update(round, None, params)?;
        Ok(vec![SiteAction::Send(envelope)])
    }

    /// An asynchronous round's update: δ = `reference` − `params` (the site's parameters when it
    /// began this update: the global ones it took, or where its previous update ended), tagged
    /// with the round of the global parameters it last took (`round`), through the codec and
    /// its error feedback. See [`carry`] for how a site takes a merge while it trains.
    pub fn update_from(
        &mut self,
        round: u64,
        reference: &[f32],
        params: &[f32],
    ) -> Result<Vec<u8>, ProtocolError> {
        if reference.len() != self.start.len() {
            return Err(ProtocolError::ParameterCount {
                expected: self.start.len(),
                found: reference.len(),
            });
        }
        self.encode_update(round, Some(reference), params)
    }

    /// δ = start − `params` (start: `reference`, or the global parameters held) into an update
    /// envelope.
    fn encode_update(
        &mut self,
        round: u64,
        reference: Option<&[f32]>,
        params: &[f32],
    ) -> Result<Vec<u8>, ProtocolError> {
        let current = self.round.ok_or(ProtocolError::NoOpenRound)?;
        if round != current {
            return Err(ProtocolError::WrongRound {
                expected: current,
                found: round,
            });
        }
        if params.len() != self.start.len() {
            return Err(ProtocolError::ParameterCount {
                expected: self.start.len(),
                found: params.len(),
            });
        }
        let range = crate::fragment_of(&self.fragments, self.start.len(), round);
        let fragment = if self.fragments.is_empty() {
            0
        } else {
            (round % self.fragments.len() as u64) as usize
        };
        let start = &reference.unwrap_or(&self.start)[range.clone()];
        let trained = &params[range.clone()];
        let non_finite = |index| ProtocolError::NonFiniteUpdate(range.start + index);
        let uplink = self.uplink.as_mut();
        let capacity = uplink.payload_bytes(range.len());
        let mut outcome = Ok(());
        // The payload is written into the envelope in place (no copy of a 4 GB fp32 update).
        let envelope = match self.feedback.get_mut(fragment) {
            Some(feedback) => {
                wire::encode_with(MessageKind::Update, round, self.id, capacity, |out| {
                    outcome = feedback
                        .encode_difference(uplink, start, trained, out)
                        .map_err(|e| match e {
                            CodecError::NonFinite { index } => non_finite(index),
                            e => e.into(),
                        });
                })
            }
            None => {
                self.delta.resize(self.start.len(), 0.0);
                let delta = &mut self.delta[range.clone()];
                if let Some(index) = difference(delta, start, trained) {
                    return Err(non_finite(index));
                }
                wire::encode_with(MessageKind::Update, round, self.id, capacity, |out| {
                    uplink.encode(delta, out)
                })
            }
        };
        outcome?;
        Ok(envelope)
    }
}

/// How an asynchronous site takes a merge while it trains: it trains on from the merge
/// (`local ← global`, as a synchronous site starts each round), and the steps it took since
/// `reference` (where its current update began) stay in its next update: `reference ← global +
/// (reference − local)`, so that the update it sends next, reference − trained, is those steps
/// plus the ones it trains from the merge. No step is lost or sent twice, and no site drifts
/// toward its own data between merges. Value by value: the same bits on any thread count (and a
/// site that took no step since its reference gets exactly the global parameters twice).
pub fn carry(
    local: &mut [f32],
    reference: &mut [f32],
    global: &[f32],
) -> Result<(), ProtocolError> {
    if local.len() != global.len() || reference.len() != global.len() {
        return Err(ProtocolError::ParameterCount {
            expected: global.len(),
            found: local.len().min(reference.len()),
        });
    }
    local
        .par_chunks_mut(VALUES_PER_TASK)
        .zip(reference.par_chunks_mut(VALUES_PER_TASK))
        .zip(global.par_chunks(VALUES_PER_TASK))
        .for_each(|((local, reference), global)| {
            for ((l, r), g) in local.iter_mut().zip(reference.iter_mut()).zip(global) {
                *r = g + (*r - *l);
                *l = *g;
            }
        });
    Ok(())
}

/// `delta = start − trained` on all threads; the index of the first non-finite value, if any.
fn difference(delta: &mut [f32], start: &[f32], trained: &[f32]) -> Option<usize> {
    delta
        .par_chunks_mut(VALUES_PER_TASK)
        .zip(start.par_chunks(VALUES_PER_TASK))
        .zip(trained.par_chunks(VALUES_PER_TASK))
        .enumerate()
        .filter_map(|(t, ((delta, start), trained))| {
            for ((d, s), p) in delta.iter_mut().zip(start).zip(trained) {
                *d = s - p;
            }
            let i = delta.iter().position(|v| !v.is_finite())?;
            Some(t * VALUES_PER_TASK + i)
        })
        .min()
}
