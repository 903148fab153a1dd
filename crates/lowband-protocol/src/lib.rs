//! lowband's round protocol, sans IO (as quinn-proto is for QUIC).
//!
//! A [`Coordinator`] and one [`Site`] per participant are state machines: the driver feeds them
//! events (a packet arrived, time passed, a site joined or left, local training finished) with the
//! current time as an argument, and carries out the actions they return (send these bytes to that
//! site, train from these parameters, checkpoint). They work on flat `f32` buffers and bytes only:
//! no sockets, no clocks, no tensors, no randomness. The in-memory driver and the network driver
//! are two shells around this same code.
//!
//! One round: the coordinator sends the global parameters θ to every member (a `global` message);
//! each site trains H inner steps from θ and sends δ = θ − θ_site (an `update`); the coordinator
//! closes the round when every member has reported (or, after the deadline, when a quorum has),
//! merges the deltas with its [`Aggregator`], applies its [`OuterOptimizer`] and starts the next.

pub mod aggregate;
pub mod coordinator;
pub mod cue;
pub mod link;
pub mod membership;
pub mod outer;
mod par;
pub mod site;
pub mod trust;
pub mod wire;

pub use aggregate::{Aggregator, AggregatorSpec, Mean};
pub use coordinator::{Action, AsyncMerge, Coordinator, CoordinatorConfig, Event, RoundReport};
pub use link::{LinkDecision, LinkEnd, LinkPolicy, SiteLink};
pub use membership::{MemberAction, Membership};
pub use outer::{OuterConfig, OuterOptimizer};
pub use site::{Site, SiteAction, SiteEvent};
pub use trust::{Robustness, SiteScore, TrustState};

use lowband_codec::CodecSpec;

/// How a strategy compresses its rounds: the codec of the updates (site → coordinator), of the
/// coordinator's broadcast, and the sites' error feedback.
///
/// With an `fp32` downlink the coordinator sends the full global parameters every round. With any
/// other downlink it sends the *change* to the parameters the sites hold, encoded with the
/// downlink codec, and keeps what it did not send for the next round (error feedback on the
/// coordinator's side: the change is always θ − θ_sites). A site that does not hold the
/// parameters yet (it joined later) gets them once in full.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Compression {
    pub uplink: CodecSpec,
    pub downlink: CodecSpec,
    /// Sites keep the residual of what their codec did not send and add it, times this decay, to
    /// the next update. `None`: no error feedback.
    pub feedback_decay: Option<f32>,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            uplink: CodecSpec::Fp32,
            downlink: CodecSpec::Fp32,
            feedback_decay: None,
        }
    }
}

impl Compression {
    pub fn validate(&self) -> Result<(), String> {
        self.uplink.validate().map_err(|e| format!("uplink: {e}"))?;
        self.downlink
            .validate()
            .map_err(|e| format!("downlink: {e}"))?;
        if let Some(decay) = self.feedback_decay {
            if !(0.0..=1.0).contains(&decay) {
                return Err(format!("error-feedback decay {decay} is not in [0, 1]"));
            }
        }
        Ok(())
    }

    /// Whether the coordinator broadcasts changes (compressed) rather than full parameters.
    pub fn sends_changes(&self) -> bool {
        self.downlink != CodecSpec::Fp32
    }
}

/// Streaming (fragment) mode: round r synchronizes `fragments[r % P]` only, and the broadcast
/// that opens round r carries the change of the fragment round r − 1 synchronized. An empty list
/// means one fragment, the whole buffer. Fragments must be non-empty, in order, and cover the
/// buffer exactly.
pub fn validate_fragments(
    fragments: &[std::ops::Range<usize>],
    params: usize,
) -> Result<(), String> {
    let mut next = 0;
    for f in fragments {
        if f.start != next || f.end <= f.start {
            return Err(format!(
                "fragment {f:?} does not continue at {next} or is empty"
            ));
        }
        next = f.end;
    }
    if !fragments.is_empty() && next != params {
        return Err(format!("fragments cover {next} of {params} parameters"));
    }
    Ok(())
}

/// The fragment round `round` synchronizes.
pub fn fragment_of(
    fragments: &[std::ops::Range<usize>],
    params: usize,
    round: u64,
) -> std::ops::Range<usize> {
    if fragments.is_empty() {
        0..params
    } else {
        fragments[(round % fragments.len() as u64) as usize].clone()
    }
}

/// A site's identity inside a cluster (the transport maps it to a public key).
pub type SiteId = u32;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed message: {0}")]
    Wire(#[from] wire::WireError),
    #[error("bad payload: {0}")]
    Codec(#[from] lowband_codec::CodecError),
    #[error("unexpected {0:?} message")]
    WrongKind(wire::MessageKind),
    #[error("message for round {found}, but round {expected} is open")]
    WrongRound { expected: u64, found: u64 },
    #[error("update trained from round {round}'s parameters while round {open} is open: more than {staleness_max} rounds behind, refused (a stale update is not a hostile one: the site's trust is not affected)")]
    TooStale {
        round: u64,
        open: u64,
        staleness_max: u64,
    },
    #[error("no round is open")]
    NoOpenRound,
    #[error("site {0} is not a member of this round")]
    NotInRound(SiteId),
    #[error("site {0} is not in the cluster")]
    UnknownSite(SiteId),
    #[error("message claims site {claimed} but came from site {from}")]
    SiteMismatch { claimed: SiteId, from: SiteId },
    #[error("site {site} already sent its update for round {round}")]
    Duplicate { site: SiteId, round: u64 },
    #[error("cluster is full ({0} sites)")]
    TooManySites(usize),
    #[error("the update holds a non-finite value at index {0}: local training diverged")]
    NonFiniteUpdate(usize),
    #[error("{found} parameters given, but the run's model has {expected}")]
    ParameterCount { expected: usize, found: usize },
    #[error("a change to the global parameters arrived before the parameters themselves")]
    NotSynced,
    #[error("update norm {norm:.4e} is outside [reference / {ratio_max}, reference x {ratio_max}] (reference {reference:.4e}: the median norm of the round, or of recent rounds when it has fewer than 3 updates)")]
    UpdateNorm {
        norm: f32,
        reference: f32,
        ratio_max: f32,
    },
    #[error("update disagrees with the round: cosine {cosine:.3} with the sum of the others, below {ratio_min} x the round's median cosine {reference:.3}")]
    UpdateDirection {
        cosine: f32,
        reference: f32,
        ratio_min: f32,
    },
    #[error("the round's merge would put parameter {parameter} at {merged_value:e} (the limit is ±{limit:e}); this update held {update_value:e} there, the largest of the round: the merge was refused and the parameters kept")]
    MergeOutOfRange {
        parameter: usize,
        merged_value: f32,
        update_value: f32,
        limit: f32,
    },
    #[error("site {0} was excluded for repeated refused updates")]
    Excluded(SiteId),
    #[error("invalid protocol config {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}

impl ProtocolError {
    /// Whether a member's packet refused with this error uses up its turn in the open round: a
    /// malformed, forged, non-finite or out-of-bounds update does; a late, duplicate or
    /// misaddressed one does not (it may be a retransmission).
    pub fn forfeits_round(&self) -> bool {
        matches!(
            self,
            ProtocolError::Wire(_)
                | ProtocolError::Codec(_)
                | ProtocolError::WrongKind(_)
                | ProtocolError::SiteMismatch { .. }
                | ProtocolError::NonFiniteUpdate(_)
                | ProtocolError::UpdateNorm { .. }
                | ProtocolError::UpdateDirection { .. }
                | ProtocolError::MergeOutOfRange { .. }
        )
    }
}
