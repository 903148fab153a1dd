//! `lowband._native.Site`: one PyTorch site's connection to its coordinator. Parameters cross as
//! one flat float32 buffer by address (the Python side passes a contiguous CPU tensor's or numpy
//! array's data pointer and keeps it alive for the call), so nothing is copied on the way in
//! or out; the GIL is released while Rust encodes, sends, waits and decodes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lowband_net::{ClientError, Message, Next, SiteClient};
use lowband_protocol::wire::{self, MessageKind, TrainingReport};
use lowband_protocol::{Site as ProtocolSite, SiteAction, SiteEvent};
use lowband_runtime::external::{ExternalModel, TensorShape};
use lowband_runtime::network::{ExternalSite, RoundSteps};
use lowband_runtime::run_file::Cluster;
use lowband_runtime::strategy::Streaming;
use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::{ExcludedError, RefusedError};

/// How often a wait for the coordinator hands back to Python to check for Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// A flat float32 buffer owned by the Python caller, by address. Sent across the GIL release:
/// the caller holds the object alive and does not touch it for the duration of the call.
#[derive(Clone, Copy)]
struct Buffer {
    address: usize,
    len: usize,
}

impl Buffer {
    fn new(address: usize, len: usize, expected: usize) -> PyResult<Buffer> {
        if len != expected {
            return Err(PyValueError::new_err(format!(
                "the buffer holds {len} values, the model has {expected} parameters"
            )));
        }
        if address == 0 || !address.is_multiple_of(std::mem::align_of::<f32>()) {
            return Err(PyValueError::new_err(format!(
                "not the address of a float32 buffer: {address:#x}"
            )));
        }
        Ok(Buffer { address, len })
    }

    /// # Safety
    /// `address` points to `len` float32 values the caller keeps alive and unaliased for the call
    /// (the Python wrapper passes a contiguous float32 tensor it holds).
    unsafe fn slice(&self) -> &[f32] {
        std::slice::from_raw_parts(self.address as *const f32, self.len)
    }

    /// # Safety
    /// As `slice`, and nothing else reads or writes it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.address as *mut f32, self.len)
    }
}

fn client_error(e: ClientError) -> PyErr {
    match e {
        ClientError::Refused(reason) => RefusedError::new_err(reason),
        ClientError::Unreachable { .. } => PyConnectionError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

fn run_error(e: lowband_runtime::RunError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// One site of a run: joins the coordinator (key, cluster file, address), receives the global
/// parameters, sends its updates through the run's codec with error feedback, and leaves.
#[pyclass(module = "lowband._native")]
pub struct Site {
    /// (A mutex only to be `Sync`, as a Python object must be: methods take `&mut self`, so it
    /// is reached with `get_mut`, never locked.)
    inner: std::sync::Mutex<Inner>,
    index: u32,
    rounds: u64,
    round_steps: RoundSteps,
    inner_steps: u64,
    steps: u64,
    /// Streaming DiLoCo's fragments, delay and mix (None: whole-model rounds).
    streaming: Option<Streaming>,
    params: usize,
    strategy: String,
    settings_json: String,
    address: String,
    /// Where this site keeps its state across restarts (error feedback, codec stream), and the
    /// run it belongs to; the round it had sent when it was restored from there.
    state_dir: Option<PathBuf>,
    run_fingerprint: u32,
    restored_round: Option<u64>,
}

/// The connection and the protocol state.
struct Inner {
    client: Option<SiteClient>,
    site: ProtocolSite,
}

#[pymethods]
impl Site {
    /// Connect to the coordinator at `coordinator` (host:port) as the site whose key is `key`,
    /// for the run in `cluster` (a run file with a `[model]` and a `[cluster]` table), with a
    /// model of `params` parameters (and its `tensors`: (name, shape) in the flat buffer's
    /// order). Retries for the run's `network.reconnect_ms` (or `reconnect_ms`) and raises
    /// ConnectionError naming the address if the coordinator cannot be reached by then.
    #[new]
    #[pyo3(signature = (cluster, key, coordinator, params, tensors = None, reconnect_ms = None, state_dir = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        cluster: PathBuf,
        key: PathBuf,
        coordinator: String,
        params: usize,
        tensors: Option<Vec<(String, Vec<usize>)>>,
        reconnect_ms: Option<u64>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Site> {
        let mut cluster =
            Cluster::read(&cluster).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if let Some(ms) = reconnect_ms {
            cluster.config.network.reconnect_ms = ms;
        }
        let identity = Arc::new(
            lowband_net::Identity::load(&key).map_err(|e| PyValueError::new_err(e.to_string()))?,
        );
        let address = resolve(&coordinator)?;
        let model = ExternalModel {
            params,
            initial: None,
            tokens_per_step: None,
            tensors: tensors
                .unwrap_or_default()
                .into_iter()
                .map(|(name, shape)| TensorShape { name, shape })
                .collect(),
        };
        let external = lowband_runtime::network::external_site(&cluster, identity, address, &model)
            .map_err(run_error)?;
        let run_fingerprint = external.run_fingerprint();
        let ExternalSite {
            index,
            client,
            mut site,
            rounds,
            round_steps,
            inner_steps,
            steps,
            streaming,
        } = external;
        let restored_round = match &state_dir {
            Some(dir) => {
                lowband_runtime::state::restore_external_site(dir, &mut site, run_fingerprint)
                    .map_err(run_error)?
            }
            None => None,
        };
        let settings_json = serde_json::to_string(&cluster.config)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let client = py
            .detach(|| SiteClient::connect(client))
            .map_err(client_error)?;
        Ok(Site {
            inner: std::sync::Mutex::new(Inner {
                client: Some(client),
                site,
            }),
            index,
            rounds,
            round_steps,
            inner_steps,
            steps,
            streaming,
            params,
            strategy: cluster.strategy.name(),
            settings_json,
            address: coordinator,
            state_dir,
            run_fingerprint,
            restored_round,
        })
    }

    /// The round whose update this site had sent when its state was restored (None: it starts
    /// afresh, or keeps no state).
    #[getter]
    fn restored_round(&self) -> Option<u64> {
        self.restored_round
    }

    /// This site's number in the run (its key is the cluster's k-th).
    #[getter]
    fn index(&self) -> u32 {
        self.index
    }
    /// Rounds in the run.
    #[getter]
    fn rounds(&self) -> u64 {
        self.rounds
    }
    /// Inner steps per round (H).
    #[getter]
    fn inner_steps(&self) -> u64 {
        self.inner_steps
    }
    /// Inner steps in the run (T).
    #[getter]
    fn steps(&self) -> u64 {
        self.steps
    }
    #[getter]
    fn params(&self) -> usize {
        self.params
    }
    /// Streaming DiLoCo's fragments (P; 0 for whole-model rounds).
    #[getter]
    fn fragments(&self) -> usize {
        self.streaming.map_or(0, |s| s.fragments)
    }
    /// Streaming: inner steps between a fragment's sync and the step its merge is mixed in (τ).
    #[getter]
    fn overlap_steps(&self) -> u64 {
        self.streaming.map_or(0, |s| s.overlap_steps)
    }
    /// Streaming: the weight of the local fragment when its merge is mixed in (α).
    #[getter]
    fn mix(&self) -> f32 {
        self.streaming.map_or(0.0, |s| s.mix)
    }
    /// The step after which round `round`'s update is sent (streaming: fragment syncs during
    /// training are the rounds whose end step is before `steps`; the P final syncs end at it).
    fn end_step(&self, round: u64) -> u64 {
        self.round_steps.end_step(round)
    }
    /// The first step round `round` trains.
    fn first_step(&self, round: u64) -> u64 {
        self.round_steps.first_step(round)
    }
    /// The strategy's canonical name.
    #[getter]
    fn strategy(&self) -> String {
        self.strategy.clone()
    }
    /// The run's settings (the run file's, as JSON).
    fn settings_json(&self) -> String {
        self.settings_json.clone()
    }

    /// Wait for the next round's global parameters and write them into the buffer at `address`
    /// (`len` float32 values). Returns the round to train; a round equal to `rounds` carries
    /// the final parameters. None: this site's part is over without them (the coordinator
    /// stopped waiting for it). A lost connection is retried within the reconnect budget (the
    /// coordinator then sends the current parameters in full). Ctrl-C leaves the run and raises
    /// KeyboardInterrupt.
    fn next_round(&mut self, py: Python<'_>, address: usize, len: usize) -> PyResult<Option<u64>> {
        let buffer = Buffer::new(address, len, self.params)?;
        loop {
            let inner = self.inner();
            let client = inner.client.as_mut().ok_or_else(gone)?;
            let site = &mut inner.site;
            let waited = py.detach(|| -> Result<Option<Next>, ClientError> {
                match client.next_round_within(site, SIGNAL_CHECK)? {
                    Some(Next::Lost) => {
                        client.reconnect()?;
                        Ok(None)
                    }
                    other => Ok(other),
                }
            });
            match waited.map_err(client_error)? {
                None => {
                    if let Err(e) = py.check_signals() {
                        self.leave_now(py);
                        return Err(e);
                    }
                }
                Some(Next::Train { round }) => {
                    // SAFETY: see `Buffer`; the wrapper passes a tensor it holds for the call.
                    unsafe { buffer.slice_mut() }.copy_from_slice(self.inner().site.round_start());
                    return Ok(Some(round));
                }
                Some(end) => return self.ended(py, end).map(|()| None),
            }
        }
    }

    /// Send round `round`'s update: the trained parameters at `address` (`len` float32 values)
    /// against the round's start, through the run's codec and error feedback, after a training
    /// report (`seconds` of compute, the inner steps' `losses`; none with `report` false: a
    /// streaming site's final syncs, whose steps were reported with the first). False if the
    /// connection was lost (the next `next_round` reconnects; this round's work is lost).
    /// Streaming: the update of round `round`'s fragment.
    #[pyo3(signature = (round, address, len, seconds = 0.0, losses = Vec::new(), report = true))]
    #[allow(clippy::too_many_arguments)]
    fn send_update(
        &mut self,
        py: Python<'_>,
        round: u64,
        address: usize,
        len: usize,
        seconds: f64,
        losses: Vec<f32>,
        report: bool,
    ) -> PyResult<bool> {
        let buffer = Buffer::new(address, len, self.params)?;
        if losses.len() as u64 > self.inner_steps {
            return Err(PyValueError::new_err(format!(
                "{} losses for a round of {} inner steps",
                losses.len(),
                self.inner_steps
            )));
        }
        let index = self.index;
        let (state_dir, run_fingerprint) = (self.state_dir.clone(), self.run_fingerprint);
        let inner = self.inner();
        let site = &mut inner.site;
        let client = inner.client.as_mut().ok_or_else(gone)?;
        py.detach(|| -> Result<bool, PyErr> {
            // SAFETY: see `Buffer`.
            let trained = unsafe { buffer.slice() };
            let actions = site
                .handle(SiteEvent::TrainingDone {
                    round,
                    params: trained,
                })
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            let update = match <[SiteAction; 1]>::try_from(actions) {
                Ok([SiteAction::Send(bytes)]) => bytes,
                other => {
                    return Err(PyRuntimeError::new_err(format!(
                        "the site answered its training with {other:?}"
                    )))
                }
            };
            let report = report.then(|| {
                let received = client.take_download();
                TrainingReport {
                    seconds: seconds.max(0.0),
                    losses,
                    received_bytes: received.bytes,
                    received_seconds: received.seconds,
                }
                .encode(round, index)
            });
            for message in report.into_iter().chain([update]) {
                if client.send(message).map_err(client_error)?.is_some() {
                    return Ok(false);
                }
            }
            // Sent: what its codec kept back is saved while the coordinator merges.
            if let Some(dir) = &state_dir {
                lowband_runtime::state::save_external_site(dir, site, round, run_fingerprint)
                    .map_err(run_error)?;
            }
            Ok(true)
        })
    }

    /// Streaming: wait for the coordinator's next broadcast (one, never more: each merge is mixed
    /// in at its own step) and mix it into the trained parameters at `address` (`len` float32
    /// values): over the fragment it changed, `mix`·local + (1 − `mix`)·global. Returns (the
    /// round it opens, whether the parameters were replaced in full): in full when they came in
    /// full (after a reconnect or a rejoin: train on from the first step of that round) and at the
    /// run's end (round `rounds`: the final parameters). None: the run ended without them reaching
    /// this site. A lost connection is retried within the reconnect budget; Ctrl-C leaves the run
    /// and raises KeyboardInterrupt.
    fn next_merge(
        &mut self,
        py: Python<'_>,
        address: usize,
        len: usize,
        mix: f32,
    ) -> PyResult<Option<(u64, bool)>> {
        let buffer = Buffer::new(address, len, self.params)?;
        if !(0.0..=1.0).contains(&mix) {
            return Err(PyValueError::new_err(format!("mix {mix} is not in [0, 1]")));
        }
        let rounds = self.rounds;
        loop {
            let inner = self.inner();
            let client = inner.client.as_mut().ok_or_else(gone)?;
            let site = &mut inner.site;
            let waited = py.detach(|| receive_merge(client, site, buffer, mix, rounds))?;
            match waited {
                Waited::Nothing => {
                    if let Err(e) = py.check_signals() {
                        self.leave_now(py);
                        return Err(e);
                    }
                }
                Waited::Merged { round, full } => return Ok(Some((round, full))),
                Waited::Ended(end) => return self.ended(py, end).map(|()| None),
            }
        }
    }

    /// Leave the run: the coordinator learns it at once.
    fn leave(&mut self, py: Python<'_>) {
        self.leave_now(py);
    }

    /// Whether the site is still connected (not left, not finished).
    #[getter]
    fn connected(&mut self) -> bool {
        self.inner().client.is_some()
    }
}

impl Site {
    /// The connection ended while this site waited for the coordinator: Ok when the run is over
    /// for it, an exception otherwise. (A lost connection is retried where it is found; Ctrl-C
    /// is Python's, checked there.)
    fn ended(&mut self, py: Python<'_>, end: Next) -> PyResult<()> {
        match end {
            Next::Finished { excluded: true } => {
                self.inner().client = None;
                Err(ExcludedError::new_err(format!(
                    "the coordinator at {} excluded site {} (its updates were refused too often; see the coordinator's report)",
                    self.address, self.index
                )))
            }
            Next::Finished { excluded: false } => {
                self.inner().client = None;
                Ok(())
            }
            other => {
                self.leave_now(py);
                Err(PyRuntimeError::new_err(format!(
                    "the connection to {} ended unexpectedly ({other:?})",
                    self.address
                )))
            }
        }
    }

    fn inner(&mut self) -> &mut Inner {
        // (Never poisoned: nothing panics while holding it, and it is never locked.)
        self.inner.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    fn leave_now(&mut self, py: Python<'_>) {
        if let Some(client) = self.inner().client.take() {
            py.detach(|| client.leave());
        }
    }
}

/// What one wait for a streaming site's next merge came to.
enum Waited {
    /// Nothing yet (or a reconnect under way): check for Ctrl-C and wait again.
    Nothing,
    /// The merge opening `round` is in the buffer: mixed in, or the parameters in `full`.
    Merged {
        round: u64,
        full: bool,
    },
    Ended(Next),
}

/// Wait up to `SIGNAL_CHECK` for the coordinator's next message and put it into `buffer`: a
/// merge mixed in with `mix`, or the parameters in full (after a rejoin, or round `rounds`: the
/// final ones). A lost connection, or a change to parameters this site does not hold, reconnects
/// (the coordinator then sends them in full).
fn receive_merge(
    client: &mut SiteClient,
    site: &mut ProtocolSite,
    buffer: Buffer,
    mix: f32,
    rounds: u64,
) -> PyResult<Waited> {
    let Some(message) = client
        .next_message_within(SIGNAL_CHECK)
        .map_err(client_error)?
    else {
        return Ok(Waited::Nothing);
    };
    let packet = match message {
        Message::Packet(packet) => packet,
        Message::Ended(Next::Lost) => {
            client.reconnect().map_err(client_error)?;
            return Ok(Waited::Nothing);
        }
        Message::Ended(end) => return Ok(Waited::Ended(end)),
    };
    let full = wire::peek_kind(&packet) == Some(MessageKind::Global);
    match client.apply(site, &packet).map_err(client_error)? {
        Next::Train { round } => {
            // SAFETY: see `Buffer`; the wrapper passes a tensor it holds for the call.
            let local = unsafe { buffer.slice_mut() };
            let full = full || round >= rounds;
            if full {
                local.copy_from_slice(site.round_start());
            } else {
                site.mix_changed(round, local, mix)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
            }
            Ok(Waited::Merged { round, full })
        }
        // A change to parameters it does not hold: it rejoins for them in full.
        Next::Lost => {
            client.reconnect().map_err(client_error)?;
            Ok(Waited::Nothing)
        }
        other => Ok(Waited::Ended(other)),
    }
}

fn gone() -> PyErr {
    PyRuntimeError::new_err("this site has left the run (or its run is over)")
}

/// `host:port` to an address (a name is resolved; the first address wins).
fn resolve(address: &str) -> PyResult<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut all| all.next())
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "{address:?} is not an address (host:port) that resolves"
            ))
        })
}
