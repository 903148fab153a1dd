//! Resumable run state: what a run killed mid-way needs to end exactly as an uninterrupted one.
//!
//! ```text
//! STATE_DIR/<strategy>/current.json         {"dir": "state-<step>"}: the commit point
//! STATE_DIR/<strategy>/state-<step>/state.json        step, metrics, ledger, samplers, times
//! STATE_DIR/<strategy>/state-<step>/tensors.safetensors  global θ and outer momentum (rounds) or
//!                                                     the replica's θ (ddp); AdamW m, v per site
//! ```
//! A state directory is written whole (every file atomically) before `current.json` is switched
//! to it; older directories are removed after. A crash at any moment leaves the previous state.

use std::path::{Path, PathBuf};

use lowband_data::Sampler;
use lowband_engine::checkpoint::{read_limited, tensors_from_safetensors};
use lowband_engine::{CpuTrainer, Trainer};
use lowband_protocol::coordinator::CoordinatorState;
use lowband_protocol::{Coordinator, TrustState};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::driver::{Common, Metric, Persistence, SiteRuntime};
use crate::ledger::Ledger;
use crate::strategy::Strategy;
use crate::RunError;

mod cued_site;
mod external_site;
mod files;
mod kinds;
mod scheduled;
mod site;

pub(crate) use cued_site::{restore_cued_site, save_cued_site, CuedRun};
pub use external_site::{restore_external_site, save_external_site};
use files::current_state;
pub use files::{forget_run_states, forget_saved_state};
pub(crate) use scheduled::{ClockedState, PendingEvent, PendingKind, SavedSite, ScheduleState};
pub(crate) use site::{restore_site, save_site, SiteRun};

const FORMAT: &str = "lowband-run-state";
/// 2: the tensors file's size and checksum, and the corpus, are in the manifest.
const VERSION: u32 = 2;
const MANIFEST_BYTES_MAX: u64 = 1 << 28;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    strategy: String,
    /// The settings the state was made with; a resume under other settings is refused.
    config: RunConfig,
    step: u64,
    round: u64,
    params: usize,
    sites: usize,
    samplers: Vec<(u64, u64)>,
    optimizer_steps: Vec<u64>,
    metrics: Vec<Metric>,
    ledger: Ledger,
    compute_seconds: f64,
    communication_seconds: f64,
    next_eval_step: u64,
    /// The coordinator's site scores, exclusions and recent norms (round strategies).
    #[serde(default)]
    trust: Option<TrustState>,
    /// Random streams of the sites' uplink codecs and of the coordinator's downlink codec.
    #[serde(default)]
    site_codec_random: Vec<Option<u64>>,
    #[serde(default)]
    downlink_random: Option<u64>,
    #[serde(default)]
    peak_sync_bytes: u64,
    /// Streaming: the step the in-flight merge is due, and the sum of the slowest sites' step
    /// times so far (how much compute hides a sync).
    #[serde(default)]
    streaming: Option<(u64, f64)>,
    /// Per site: emulated compute seconds that went into merged updates (its goodput's
    /// numerator).
    #[serde(default)]
    site_busy_seconds: Vec<f64>,
    /// A scheduled run: the schedule's account at the quiet moment it was saved.
    #[serde(default)]
    schedule: Option<scheduled::ScheduleState>,
    /// The text the run trained on: a resume on another corpus is refused.
    corpus: lowband_data::CorpusFingerprint,
    /// `tensors.safetensors` as written (set by `save`): a changed byte is refused on load.
    #[serde(default)]
    tensors_file: Option<FileCheck>,
}

/// A file's size and CRC-32, as its manifest recorded them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct FileCheck {
    bytes: u64,
    crc32: u32,
}

impl FileCheck {
    fn of(bytes: &[u8]) -> FileCheck {
        FileCheck {
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }

    /// `bytes` read from `path` are what the manifest recorded.
    fn verify(expected: Option<FileCheck>, path: &Path, bytes: &[u8]) -> Result<(), RunError> {
        let found = FileCheck::of(bytes);
        match expected {
            Some(expected) if expected == found => Ok(()),
            Some(expected) => Err(RunError::State(format!(
                "{}: truncated or altered ({} bytes, crc32 {:08x}; the saved state recorded {} bytes, crc32 {:08x}); rerun without --resume to start over",
                path.display(), found.bytes, found.crc32, expected.bytes, expected.crc32
            ))),
            None => Err(RunError::State(format!(
                "{}: the saved state records no checksum for it",
                path.display()
            ))),
        }
    }
}

/// A saved run, in memory.
pub struct RunState {
    manifest: Manifest,
    /// (name, values): "global", "momentum" or "params"; "site<k>.m", "site<k>.v".
    tensors: Vec<(String, Vec<f32>)>,
    pub step: u64,
}

fn strategy_dir(persistence: &Persistence, strategy: &Strategy) -> Option<PathBuf> {
    persistence
        .state_dir
        .as_ref()
        .map(|d| d.join(strategy.dir_name()))
}

impl RunState {
    fn new(
        common: &Common,
        step: u64,
        round: u64,
        params: usize,
        samplers: Vec<&Sampler>,
        optimizers: Vec<&lowband_engine::AdamW>,
        mut tensors: Vec<(String, Vec<f32>)>,
    ) -> Self {
        for (k, opt) in optimizers.iter().enumerate() {
            tensors.push((format!("site{k}.m"), opt.m.clone()));
            tensors.push((format!("site{k}.v"), opt.v.clone()));
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            strategy: common.strategy.name(),
            config: common.config.comparable(),
            step,
            round,
            params,
            sites: samplers.len(),
            samplers: samplers.iter().map(|s| (s.seed(), s.drawn)).collect(),
            optimizer_steps: optimizers.iter().map(|o| o.step).collect(),
            metrics: common.metrics.clone(),
            ledger: common.ledger.clone(),
            compute_seconds: common.compute_seconds,
            communication_seconds: common.communication_seconds,
            next_eval_step: common.next_eval_step,
            trust: None,
            site_codec_random: Vec::new(),
            downlink_random: None,
            peak_sync_bytes: common.peak_sync_bytes,
            streaming: None,
            site_busy_seconds: common.site_busy_seconds.clone(),
            schedule: None,
            corpus: common.corpus,
            tensors_file: None,
        };
        RunState {
            manifest,
            tensors,
            step,
        }
    }

    pub fn round(&self) -> u64 {
        self.manifest.round
    }

    pub(crate) fn save(
        &self,
        persistence: &Persistence,
        strategy: &Strategy,
    ) -> Result<(), RunError> {
        let Some(dir) = strategy_dir(persistence, strategy) else {
            return Ok(());
        };
        let (name, target) = files::new_state_dir(&dir, self.step)?;
        let named: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, v)| (n.clone(), vec![v.len()], v.as_slice()))
            .collect();
        let (bytes, crc32) = lowband_engine::checkpoint::write_safetensors_atomic(
            &target.join("tensors.safetensors"),
            &named,
        )?;
        let manifest = Manifest {
            tensors_file: Some(FileCheck { bytes, crc32 }),
            ..self.manifest.clone()
        };
        let json = serde_json::to_vec(&manifest).map_err(|e| RunError::State(e.to_string()))?;
        files::commit_state(&dir, &name, &json)
    }

    fn tensor(&mut self, name: &str) -> Result<Vec<f32>, RunError> {
        let i = self
            .tensors
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| RunError::State(format!("saved state lacks {name}")))?;
        Ok(std::mem::take(&mut self.tensors[i].1))
    }

    /// A tensor the state holds only for some runs (None: not saved).
    fn optional_tensor(&mut self, name: &str) -> Result<Option<Vec<f32>>, RunError> {
        match self.tensors.iter().any(|(n, _)| n == name) {
            true => self.tensor(name).map(Some),
            false => Ok(None),
        }
    }

    /// This state's settings, corpus and counters are those of `common`'s run.
    fn check_common(&self, common: &Common) -> Result<(), RunError> {
        if self.manifest.config != common.config.comparable() {
            return Err(RunError::State(
                "the saved state was made with other settings (model, sites, steps, seed, optimizer, data or link); rerun without --resume to start over".into(),
            ));
        }
        if self.manifest.corpus != common.corpus {
            return Err(RunError::State(format!(
                "the saved state was made on another corpus ({}; this run has {}); rerun without --resume to start over, or give the corpus it was made on",
                self.manifest.corpus, common.corpus
            )));
        }
        self.check_ranges(&common.strategy)
    }

    fn restore_common(&self, common: &mut Common) -> Result<(), RunError> {
        self.check_common(common)?;
        common.metrics = self.manifest.metrics.clone();
        common.ledger = self.manifest.ledger.clone();
        common.compute_seconds = self.manifest.compute_seconds;
        common.communication_seconds = self.manifest.communication_seconds;
        common.next_eval_step = self.manifest.next_eval_step;
        common.peak_sync_bytes = self.manifest.peak_sync_bytes;
        if self.manifest.site_busy_seconds.len() == common.site_busy_seconds.len() {
            common.site_busy_seconds = self.manifest.site_busy_seconds.clone();
        }
        Ok(())
    }

    /// Every counter of the manifest within what its run can reach (a state edited or damaged by
    /// hand must not make a run "finished" early, count rounds past its end, or run time
    /// backwards).
    fn check_ranges(&self, strategy: &Strategy) -> Result<(), RunError> {
        let m = &self.manifest;
        let steps = m.config.steps;
        let fragments = strategy.streaming.map_or(0, |s| s.fragments as u64);
        let bad = |what: String| {
            Err(RunError::State(format!(
                "the saved state is out of range: {what}; rerun without --resume to start over"
            )))
        };
        if m.step > steps {
            return bad(format!("step {} of a {steps}-step run", m.step));
        }
        if m.round > steps.saturating_add(fragments) {
            return bad(format!("round {} of a {steps}-step run", m.round));
        }
        if let Some(step) = m.optimizer_steps.iter().find(|s| **s > steps) {
            return bad(format!("an optimizer at step {step} of {steps}"));
        }
        let busy = m.site_busy_seconds.iter().map(|s| ("a site's busy", *s));
        for (name, seconds) in [
            ("compute", m.compute_seconds),
            ("communication", m.communication_seconds),
        ]
        .into_iter()
        .chain(busy)
        {
            if !(seconds.is_finite() && seconds >= 0.0) {
                return bad(format!("{name} time {seconds} s"));
            }
        }
        if let Some((due, seconds)) = m.streaming {
            if due > steps.saturating_add(steps) || !(seconds.is_finite() && seconds >= 0.0) {
                return bad(format!(
                    "streaming merge due at step {due}, step time sum {seconds} s"
                ));
            }
        }
        let eval_every = m.config.eval_every_steps.max(1);
        if m.next_eval_step > steps.saturating_add(eval_every) {
            return bad(format!("next evaluation at step {}", m.next_eval_step));
        }
        Ok(())
    }

    fn check(&self, sites: usize, params: usize) -> Result<(), RunError> {
        let m = &self.manifest;
        let optimizers = self
            .tensors
            .iter()
            .filter(|(n, _)| n.ends_with(".m"))
            .count();
        if m.sites != sites
            || m.params != params
            || m.samplers.len() != sites
            || m.optimizer_steps.len() != optimizers
        {
            return Err(RunError::State(format!(
                "saved state is for {} sites and {} parameters, this run has {sites} and {params}",
                m.sites, m.params
            )));
        }
        if self
            .tensors
            .iter()
            .any(|(n, v)| v.len() != params && !(n == "momentum" && v.is_empty()))
        {
            return Err(RunError::State(
                "a saved tensor has the wrong length".into(),
            ));
        }
        if let Some((name, _)) = self.tensors.iter().find(|(n, v)| {
            v.iter()
                .any(|x| !x.is_finite() || (n.ends_with(".v") && *x < 0.0))
        }) {
            return Err(RunError::State(format!(
                "saved tensor {name} holds a non-finite (or negative second-moment) value"
            )));
        }
        Ok(())
    }
}

/// The saved state of `strategy` under the state directory, if there is one.
pub fn load(persistence: &Persistence, strategy: &Strategy) -> Result<Option<RunState>, RunError> {
    let Some(dir) = strategy_dir(persistence, strategy) else {
        return Ok(None);
    };
    let Some(target) = current_state(&dir)? else {
        return Ok(None);
    };
    let manifest: Manifest = serde_json::from_slice(&read_limited(
        &target.join("state.json"),
        MANIFEST_BYTES_MAX,
    )?)
    .map_err(|e| RunError::State(format!("{}: {e}", target.join("state.json").display())))?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(RunError::State(format!(
            "{}: not a version {VERSION} run state",
            target.display()
        )));
    }
    let path = target.join("tensors.safetensors");
    // global, momentum, shared; per site m, v, an error-feedback residual, a stale update and
    // (streaming, scheduled) its own parameters; scheduled, also the parameters it holds and where
    // its update began.
    let per_site = if manifest.schedule.is_some() { 7 } else { 5 };
    let bytes = read_limited(
        &path,
        (manifest.params as u64)
            .saturating_mul(4)
            .saturating_add(1024)
            .saturating_mul(
                (per_site as u64)
                    .saturating_mul(manifest.sites as u64)
                    .saturating_add(3),
            ),
    )?;
    FileCheck::verify(manifest.tensors_file, &path, &bytes)?;
    let names = safetensors_names(&path, &bytes)?;
    let expected: Vec<(String, Vec<usize>)> = names
        .iter()
        .map(|(n, len)| (n.clone(), vec![*len]))
        .collect();
    let values = tensors_from_safetensors(&path, &bytes, &expected)?;
    let tensors = names.into_iter().map(|(n, _)| n).zip(values).collect();
    Ok(Some(RunState {
        step: manifest.step,
        manifest,
        tensors,
    }))
}

fn safetensors_names(path: &Path, bytes: &[u8]) -> Result<Vec<(String, usize)>, RunError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| RunError::State(format!("{}: {e}", path.display())))?;
    let mut names: Vec<(String, usize)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().iter().product()))
        .collect();
    names.sort();
    Ok(names)
}
