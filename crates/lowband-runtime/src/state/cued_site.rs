//! What a networked site of a scheduled run saves when its coordinator cues it to
//! (`Cue::Save`, at a quiet moment of the schedule): everything its model side is then, since
//! in such a run a site's parameters are its own between merges. The same per-site parts as an
//! in-memory scheduled run's state (`state::scheduled`): its parameters, the global parameters it
//! holds and their round, where its current update began (asynchronous), its AdamW (or Muon)
//! state, data position, codec stream and error-feedback residual.
//!
//! ```text
//! STATE_DIR/state-<round>/state.json            the manifest below (written last)
//! STATE_DIR/state-<round>/tensors.safetensors   m, v, params, start; residual, reference, stale
//! ```
//! A save is named by the coordinator's round; the site keeps it and the last save the
//! coordinator committed (two-phase: see `lowband_protocol::cue`), and removes its other saves.

use std::path::Path;

use lowband_data::Sampler;
use lowband_engine::checkpoint::{read_limited, write_safetensors_atomic};
use lowband_engine::Trainer;
use serde::{Deserialize, Serialize};

use super::files::{commit_state_keeping, new_state_dir};
use super::site::read_site_tensors;
use super::{FileCheck, VERSION};
use crate::driver::CuedSite;
use crate::RunError;

const FORMAT: &str = "lowband-scheduled-site-state";
/// m, v, params, start, residual, reference, stale.
const TENSORS_MAX: u64 = 7;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    site: u32,
    /// The coordinator's round when it cued the save (the save's name).
    round: u64,
    params: usize,
    sampler: (u64, u64),
    optimizer_step: u64,
    codec_random: Option<u64>,
    /// The round of the global parameters its protocol site holds.
    site_round: Option<u64>,
    /// The run it belongs to: the CRC-32 of its join request (every run setting, the strategy,
    /// the corpus).
    run: u32,
    tensors_file: FileCheck,
}

/// The run a scheduled site's save belongs to: its join request's CRC-32, and its steps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CuedRun {
    pub join_crc32: u32,
    pub steps: u64,
}

/// Save `cued` as the save of `round` under `dir`; keep the save of round `keep` too, remove the
/// others (lowband's own files only).
pub(crate) fn save_cued_site(
    dir: &Path,
    cued: &CuedSite,
    round: u64,
    keep: Option<u64>,
    run: CuedRun,
) -> Result<(), RunError> {
    let runtime = &cued.runtime;
    let optimizer = runtime.trainer.optimizer();
    let n = optimizer.m.len();
    let residual = runtime.site.feedback_residual();
    let stale = runtime.attacker.as_ref().and_then(|a| a.stale.as_deref());
    let mut tensors: Vec<(&str, &[f32])> = vec![
        ("m", &optimizer.m),
        ("v", &optimizer.v),
        ("params", runtime.trainer.params()),
        ("start", runtime.site.round_start()),
    ];
    let optional = [
        ("residual", residual.as_deref()),
        ("reference", cued.reference()),
        ("stale", stale),
    ];
    tensors.extend(optional.into_iter().filter_map(|(n, t)| t.map(|t| (n, t))));
    let named: Vec<(String, Vec<usize>, &[f32])> = (tensors.iter())
        .map(|(name, values)| (name.to_string(), vec![values.len()], *values))
        .collect();
    let (name, target) = new_state_dir(dir, round)?;
    let (bytes, crc32) = write_safetensors_atomic(&target.join("tensors.safetensors"), &named)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        site: runtime.site.id(),
        round,
        params: n,
        sampler: (runtime.sampler.seed(), runtime.sampler.drawn),
        optimizer_step: optimizer.step,
        codec_random: runtime.site.codec_random_state(),
        site_round: runtime.site.round(),
        run: run.join_crc32,
        tensors_file: FileCheck { bytes, crc32 },
    };
    let json = serde_json::to_vec(&manifest).map_err(|e| RunError::State(e.to_string()))?;
    let keep = keep.map(|round| format!("state-{round}"));
    commit_state_keeping(dir, &name, &json, keep.as_deref())
}

/// Continue `cued` from its save of `round` under `dir`. Every length, value, the site, the run
/// and the round are checked before anything is changed.
pub(crate) fn restore_cued_site(
    dir: &Path,
    cued: &mut CuedSite,
    round: u64,
    run: CuedRun,
) -> Result<(), RunError> {
    let target = dir.join(format!("state-{round}"));
    let manifest_path = target.join("state.json");
    if !manifest_path.exists() {
        return Err(RunError::State(format!(
            "{}: no save of round {round} here (was the site started without --resume, or with another --state-dir?)",
            target.display()
        )));
    }
    let manifest: Manifest = serde_json::from_slice(&read_limited(&manifest_path, 1 << 16)?)
        .map_err(|e| RunError::State(format!("{}: {e}", manifest_path.display())))?;
    let params = cued.runtime.trainer.params().len();
    check(
        &manifest,
        &target,
        cued.runtime.site.id(),
        params,
        round,
        run,
    )?;
    let tensors = read_site_tensors(&target, manifest.tensors_file, params, TENSORS_MAX)?;
    let mut tensors: std::collections::BTreeMap<String, Vec<f32>> = tensors.into_iter().collect();
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .ok_or_else(|| RunError::State(format!("{}: lacks {name}", target.display())))
    };
    let (m, v, params, start) = (take("m")?, take("v")?, take("params")?, take("start")?);
    let (residual, reference, stale) = (
        tensors.remove("residual"),
        tensors.remove("reference"),
        tensors.remove("stale"),
    );
    // (The two checks that can fail come first: nothing is changed by a save that does not fit.)
    if residual.is_some() != cued.runtime.site.feedback_residual().is_some()
        || reference.is_some() != cued.reference().is_some()
    {
        return Err(RunError::State(format!(
            "{}: saved for another strategy (error feedback or asynchronous rounds differ)",
            target.display()
        )));
    }
    cued.set_reference(reference)?;
    let runtime = &mut cued.runtime;
    runtime.site.restore(&start, residual.as_deref())?;
    runtime.site.restore_round(manifest.site_round);
    if let Some(random) = manifest.codec_random {
        runtime.site.set_codec_random_state(random);
    }
    if let Some(attacker) = runtime.attacker.as_mut() {
        attacker.stale = stale.or(attacker.stale.take());
    }
    runtime.trainer.params_mut().copy_from_slice(&params);
    let optimizer = runtime.trainer.optimizer_mut();
    (optimizer.m, optimizer.v, optimizer.step) = (m, v, manifest.optimizer_step);
    runtime.sampler = Sampler::resume(manifest.sampler.0, manifest.sampler.1);
    Ok(())
}

/// The manifest is this version's, this site's, this run's, of this round and in range.
fn check(
    manifest: &Manifest,
    target: &Path,
    site: u32,
    params: usize,
    round: u64,
    run: CuedRun,
) -> Result<(), RunError> {
    let bad = |what: String| Err(RunError::State(format!("{}: {what}", target.display())));
    if manifest.format != FORMAT || manifest.version != VERSION {
        return bad(format!("not a version {VERSION} scheduled site's state"));
    }
    if manifest.site != site || manifest.params != params {
        return bad(format!(
            "saved for site {} with {} parameters, this is site {site} with {params}",
            manifest.site, manifest.params
        ));
    }
    if manifest.run != run.join_crc32 {
        return bad("saved for another run (its settings, strategy or corpus differ)".into());
    }
    let limit = run.steps.saturating_mul(2);
    let rounds = [Some(manifest.round), manifest.site_round];
    if manifest.round != round
        || manifest.optimizer_step > limit
        || rounds.into_iter().flatten().any(|r| r > limit)
    {
        return bad(format!(
            "out of range: save of round {} (asked: {round}), optimizer step {}, holding round {:?}",
            manifest.round, manifest.optimizer_step, manifest.site_round
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cued(k: usize) -> CuedSite {
        CuedSite::new(super::super::site::tests::site(k), true)
    }

    const RUN: CuedRun = CuedRun {
        join_crc32: 11,
        steps: 100,
    };

    /// A site's every part, changed from a fresh site's.
    fn trained(k: usize) -> CuedSite {
        let mut site = cued(k);
        let n = site.runtime.trainer.params().len();
        let ramp = |scale: f32| (0..n).map(|i| i as f32 * scale).collect::<Vec<f32>>();
        site.runtime
            .trainer
            .params_mut()
            .copy_from_slice(&ramp(1e-4));
        let optimizer = site.runtime.trainer.optimizer_mut();
        (optimizer.m, optimizer.v, optimizer.step) = (ramp(1e-3), ramp(2e-3), 40);
        site.runtime.sampler = Sampler::resume(site.runtime.sampler.seed(), 123);
        site.runtime
            .site
            .restore(&ramp(3e-4), Some(&ramp(5e-3)))
            .unwrap();
        site.runtime.site.restore_round(Some(6));
        site.runtime.site.set_codec_random_state(99);
        site.set_reference(Some(ramp(7e-4))).unwrap();
        site
    }

    fn parts(site: &CuedSite) -> Vec<Vec<f32>> {
        let r = &site.runtime;
        let o = r.trainer.optimizer();
        let scalars = [
            o.step as f32,
            r.sampler.drawn as f32,
            r.site.round().map_or(-1.0, |x| x as f32),
            r.site.codec_random_state().map_or(-1.0, |x| x as f32),
        ];
        vec![
            r.trainer.params().to_vec(),
            o.m.clone(),
            o.v.clone(),
            r.site.round_start().to_vec(),
            r.site.feedback_residual().unwrap(),
            site.reference().unwrap().to_vec(),
            scalars.to_vec(),
        ]
    }

    #[test]
    fn a_scheduled_sites_save_round_trips_keeps_the_committed_one_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let original = trained(1);
        save_cued_site(dir.path(), &original, 5, None, RUN).unwrap();
        save_cued_site(dir.path(), &original, 7, Some(5), RUN).unwrap();
        save_cued_site(dir.path(), &original, 9, Some(7), RUN).unwrap();
        // The new save and the committed one stay; the older one went.
        let names = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(dir.path()), ["current.json", "state-7", "state-9"]);
        let mut restored = cued(1);
        restore_cued_site(dir.path(), &mut restored, 7, RUN).unwrap();
        assert_eq!(parts(&restored), parts(&original));
        let error = |site: &mut CuedSite, round: u64, run: CuedRun| {
            restore_cued_site(dir.path(), site, round, run)
                .unwrap_err()
                .to_string()
        };
        assert!(error(&mut cued(1), 5, RUN).contains("no save of round 5"));
        assert!(error(&mut cued(0), 9, RUN).contains("saved for site 1"));
        let other = CuedRun {
            join_crc32: 12,
            ..RUN
        };
        assert!(error(&mut cued(1), 9, other).contains("another run"));
        // A synchronous site (no reference) does not take an asynchronous one's save.
        let mut synchronous = CuedSite::new(cued(1).runtime, false);
        assert!(error(&mut synchronous, 9, RUN).contains("another strategy"));
        // One changed byte in the tensors is refused, and the site is left as it was.
        let tensors = dir.path().join("state-9/tensors.safetensors");
        let mut bytes = std::fs::read(&tensors).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        std::fs::write(&tensors, &bytes).unwrap();
        let mut victim = cued(1);
        let before = parts_without_residual(&victim);
        assert!(error(&mut victim, 9, RUN).contains("truncated or altered"));
        assert_eq!(parts_without_residual(&victim), before);
    }

    fn parts_without_residual(site: &CuedSite) -> Vec<f32> {
        let r = &site.runtime;
        (r.trainer.params().iter())
            .chain(&r.trainer.optimizer().m)
            .chain(r.site.round_start())
            .copied()
            .collect()
    }
}
