//! The live view of a lowband run (`--dashboard ADDR` on `compare`, `cluster` and
//! `coordinator`; `lowband view runs/NAME` for a finished run): the run's events
//! (`lowband_runtime::RunEvent`) folded into one state (`state`), as JSON (`to_json`), in the
//! Prometheus text format (`metrics`), and the page that shows it (`PAGE`: HTML, script and
//! styles embedded in the binary). It shows public keys only: nothing secret ever reaches it.
//!
//! The run calls the observer (`Live::observer`) on its own thread; `lowband_net::http` serves
//! the view on a thread of its own (no async code here), so a slow or hostile client never holds
//! up a round.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lowband_runtime::{Observer, RunEvent};
use serde::{Deserialize, Serialize};

pub mod metrics;
pub mod state;

pub use state::ViewState;

/// The page: (HTML, script, styles).
pub const PAGE: (&str, &str, &str) = (
    include_str!("page/index.html"),
    include_str!("page/app.js"),
    include_str!("page/app.css"),
);

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{path}: {detail}")]
    Events { path: String, detail: String },
}

/// One line of `events.jsonl`: an event and the wall-clock second (since the run began) it
/// happened at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoggedEvent {
    pub wall_seconds: f64,
    pub event: RunEvent,
}

/// A run's view: its state and the events it was folded from (what `events.jsonl` keeps).
pub struct Live {
    inner: Mutex<Inner>,
    began: Instant,
}

struct Inner {
    state: ViewState,
    log: Vec<LoggedEvent>,
}

impl Live {
    /// A live run named `run` that will run `planned` strategies.
    pub fn new(run: &str, planned: Vec<String>) -> Arc<Live> {
        Live::with_state(ViewState::new(run, planned, true))
    }

    fn with_state(state: ViewState) -> Arc<Live> {
        Arc::new(Live {
            inner: Mutex::new(Inner {
                state,
                log: Vec::new(),
            }),
            began: Instant::now(),
        })
    }

    /// A finished run's view, from its `events.jsonl`.
    pub fn replay(run: &str, path: &Path) -> Result<Arc<Live>, ViewError> {
        let bad = |detail: String| ViewError::Events {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut state = ViewState::new(run, Vec::new(), false);
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let logged: LoggedEvent =
                serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
            state.apply(&logged.event, logged.wall_seconds);
        }
        state.planned = state.strategies.iter().map(|s| s.name.clone()).collect();
        Ok(Live::with_state(state))
    }

    /// The observer a run calls with its events.
    pub fn observer(self: &Arc<Live>) -> Observer {
        let live = self.clone();
        Observer::new(move |event| live.record(event.clone()))
    }

    /// Fold `event` in now and keep it for `events.jsonl`.
    pub fn record(&self, event: RunEvent) {
        let wall_seconds = self.began.elapsed().as_secs_f64();
        let mut inner = self.lock();
        inner.state.apply(&event, wall_seconds);
        inner.log.push(LoggedEvent {
            wall_seconds,
            event,
        });
    }

    /// The run is over: the page says so.
    pub fn finish(&self) {
        let mut inner = self.lock();
        inner.state.live = false;
        inner.state.version += 1;
    }

    /// Bumped by every change (what the page's pushes follow).
    pub fn version(&self) -> u64 {
        self.lock().state.version
    }

    /// `events.jsonl`: one `LoggedEvent` per line, in order.
    pub fn events_jsonl(&self) -> Vec<u8> {
        let inner = self.lock();
        let mut out = Vec::new();
        for logged in &inner.log {
            if let Ok(line) = serde_json::to_vec(logged) {
                out.extend(line);
                out.push(b'\n');
            }
        }
        out
    }

    /// The state as JSON (see `ViewState::to_json`).
    pub fn to_json(&self, cursors: &mut Vec<(usize, usize)>) -> String {
        self.lock().state.to_json(cursors).to_string()
    }

    /// `/metrics`.
    pub fn prometheus(&self) -> String {
        metrics::prometheus(&self.lock().state)
    }

    /// A copy of the state (tests, the CLI's end-of-run lines).
    pub fn state(&self) -> ViewState {
        self.lock().state.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // (Nothing panics while holding it; a poisoned lock still holds a whole state.)
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
