//! lowband's runtime: drivers that wire the engine, the data, the codecs and the protocol.
//!
//! The in-memory driver ([`driver::run`]) runs K sites and the coordinator in one process,
//! deterministically, with a [`Ledger`] of every packet's bytes and [`LinkProfile`]s that turn
//! the ledger into emulated network time and money. The networked driver ([`network`]: QUIC,
//! one process per node or every node in one process) drives the same protocol code, and a
//! fault-free run is bitwise the in-memory one.

pub mod attack;
pub mod config;
pub mod driver;
pub mod external;
pub mod faults;
pub mod ledger;
pub mod link;
pub mod network;
pub mod observe;
pub mod run_file;
pub mod state;
pub mod strategy;

pub use attack::{Attack, AttackMode};
pub use config::RunConfig;
pub use driver::{run, Metric, Persistence, Progress, RunResult};
pub use faults::Fault;
pub use ledger::{Endpoint, Ledger};
pub use link::LinkProfile;
pub use observe::{Observer, RunEvent};
pub use strategy::{Strategy, StrategyKind};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid config {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error(transparent)]
    Engine(#[from] lowband_engine::EngineError),
    #[error(transparent)]
    Data(#[from] lowband_data::DataError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run state: {0}")]
    State(String),
    /// The run stopped on request after `step` inner steps (it can be resumed from its state).
    #[error("stopped after {step} steps as requested")]
    Stopped { step: u64 },
}

impl From<lowband_protocol::ProtocolError> for RunError {
    fn from(e: lowband_protocol::ProtocolError) -> Self {
        RunError::Protocol(e.to_string())
    }
}
