//! What a run tells whoever watches it while it goes (the live view, `lowband-view`): every
//! metric as it is recorded, every byte the ledger counts, and, on a networked coordinator, each
//! site's training report and update as they arrive. The drivers call the observer from their
//! books (`driver::Common`); nothing here knows who listens or how it is shown.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::driver::Metric;
use crate::ledger::Endpoint;

/// One thing that happened in a run, in the order it happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunEvent {
    /// A strategy's run starts: its size, and the sites' public keys when they have any (a
    /// networked run; 64 hex digits each, in site order).
    Started {
        strategy: String,
        sites: usize,
        steps: u64,
        /// Tokens all sites train in one inner step together.
        tokens_per_step: u64,
        params: usize,
        /// Egress price of the run's link profile, dollars per 1e9 bytes.
        price_per_gb: f64,
        site_keys: Vec<String>,
    },
    /// A metric as the run records it, with the run's emulated time then.
    Metric {
        strategy: String,
        emulated_seconds: f64,
        metric: Metric,
    },
    /// Bytes on one directed link in one round (DDP: one step), as the ledger counts them.
    Traffic {
        strategy: String,
        round: u64,
        from: Endpoint,
        to: Endpoint,
        bytes: u64,
    },
    /// Networked: site `site` trained `seconds` for round `round` and is sending its update;
    /// since its last report it received `received_bytes` from the coordinator in
    /// `received_seconds` (each message from its first byte to its last).
    Report {
        strategy: String,
        round: u64,
        site: u32,
        seconds: f64,
        #[serde(default)]
        received_bytes: u64,
        #[serde(default)]
        received_seconds: f64,
    },
    /// Networked: site `site`'s update for round `round` arrived (`bytes` on the wire; refused
    /// or not is the protocol's to say, in a later metric).
    Arrived {
        strategy: String,
        round: u64,
        site: u32,
        bytes: u64,
    },
    /// A strategy's run ended: its rounds and final validation loss (None: an external model's
    /// coordinator cannot measure it).
    Finished {
        strategy: String,
        rounds: u64,
        final_val_loss: Option<f64>,
    },
}

impl RunEvent {
    /// The strategy the event belongs to.
    pub fn strategy(&self) -> &str {
        match self {
            RunEvent::Started { strategy, .. }
            | RunEvent::Metric { strategy, .. }
            | RunEvent::Traffic { strategy, .. }
            | RunEvent::Report { strategy, .. }
            | RunEvent::Arrived { strategy, .. }
            | RunEvent::Finished { strategy, .. } => strategy,
        }
    }
}

/// Who watches a run: called on the run's own thread for every event, so it must be quick (the
/// live view folds the event into its state under a lock and returns).
#[derive(Clone)]
pub struct Observer(Arc<dyn Fn(&RunEvent) + Send + Sync>);

impl Observer {
    pub fn new(f: impl Fn(&RunEvent) + Send + Sync + 'static) -> Observer {
        Observer(Arc::new(f))
    }

    pub fn notify(&self, event: &RunEvent) {
        (self.0)(event)
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}
