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
pub mod outer;
pub mod site;
pub mod wire;

pub use aggregate::{Aggregator, Mean};
pub use coordinator::{Action, Coordinator, CoordinatorConfig, Event, RoundReport};
pub use outer::{OuterConfig, OuterOptimizer};
pub use site::{Site, SiteAction, SiteEvent};

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
    #[error("invalid protocol config {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}
