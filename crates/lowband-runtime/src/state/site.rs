//! What a site process keeps across a restart (networked runs).

use std::path::Path;

use lowband_data::Sampler;
use lowband_engine::checkpoint::{
    read_limited, tensors_from_safetensors, tensors_to_safetensors, write_atomic,
};
use serde::{Deserialize, Serialize};

use super::files::{commit_state, current_state, new_state_dir};
use super::{safetensors_names, FileCheck, VERSION};
use lowband_engine::Trainer;

use crate::driver::SiteRuntime;
use crate::RunError;

/// What a site process keeps across a restart (networked runs): its AdamW moments, its place in
/// its data stream, its error-feedback residual and its uplink codec's random stream. The
/// parameters themselves come from the coordinator when it rejoins.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SiteManifest {
    format: String,
    version: u32,
    site: u32,
    /// The last round it sent an update for.
    round: u64,
    params: usize,
    sampler: (u64, u64),
    optimizer_step: u64,
    codec_random: Option<u64>,
    /// The text of the run it belongs to.
    corpus: lowband_data::CorpusFingerprint,
    /// `tensors.safetensors` as written.
    tensors_file: FileCheck,
}

/// What a site's saved state must agree with: the run's text, steps and rounds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SiteRun {
    pub corpus: lowband_data::CorpusFingerprint,
    pub steps: u64,
    pub rounds: u64,
}

const SITE_FORMAT: &str = "lowband-site-state";

/// Save site `site`'s state after `round` under `dir` (a new `state-<round>/`, then the atomic
/// switch of `current.json`; the previous state survives a crash at any moment).
pub(crate) fn save_site(
    dir: &Path,
    site: &SiteRuntime,
    round: u64,
    run: &SiteRun,
) -> Result<(), RunError> {
    let optimizer = site.trainer.optimizer();
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = vec![
        ("m".into(), vec![optimizer.m.len()], &optimizer.m),
        ("v".into(), vec![optimizer.v.len()], &optimizer.v),
    ];
    let residual = site.site.feedback_residual();
    if let Some(r) = &residual {
        tensors.push(("residual".into(), vec![r.len()], r));
    }
    let tensor_bytes = tensors_to_safetensors(&tensors, None)?;
    let manifest = SiteManifest {
        format: SITE_FORMAT.into(),
        version: VERSION,
        site: site.site.id(),
        round,
        params: optimizer.m.len(),
        sampler: (site.sampler.seed(), site.sampler.drawn),
        optimizer_step: optimizer.step,
        codec_random: site.site.codec_random_state(),
        corpus: run.corpus,
        tensors_file: FileCheck::of(&tensor_bytes),
    };
    let (name, target) = new_state_dir(dir, round)?;
    write_atomic(&target.join("tensors.safetensors"), &tensor_bytes)?;
    let manifest = serde_json::to_vec(&manifest).map_err(|e| RunError::State(e.to_string()))?;
    commit_state(dir, &name, &manifest)
}

/// Restore site state saved by [`save_site`] into `site`; returns the round it had reached, or
/// None when there is nothing saved. Every length, the site number and every value is checked.
pub(crate) fn restore_site(
    dir: &Path,
    site: &mut SiteRuntime,
    run: &SiteRun,
) -> Result<Option<u64>, RunError> {
    let Some(target) = current_state(dir)? else {
        return Ok(None);
    };
    let manifest: SiteManifest =
        serde_json::from_slice(&read_limited(&target.join("state.json"), 1 << 16)?).map_err(
            |e| RunError::State(format!("{}: {e}", target.join("state.json").display())),
        )?;
    let params = site.trainer.optimizer().m.len();
    check_site_manifest(&manifest, &target, site.site.id(), params, run)?;
    let mut tensors = read_site_tensors(&target, manifest.tensors_file, params, 3)?;
    let mut take = |name: &str| {
        tensors
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| tensors.swap_remove(i).1)
    };
    let (m, v) = (
        take("m").ok_or_else(|| RunError::State("saved site state lacks m".into()))?,
        take("v").ok_or_else(|| RunError::State("saved site state lacks v".into()))?,
    );
    if let Some(residual) = take("residual") {
        site.site.restore_feedback(&residual)?;
    }
    if let Some(random) = manifest.codec_random {
        site.site.set_codec_random_state(random);
    }
    let optimizer = site.trainer.optimizer_mut();
    (optimizer.m, optimizer.v, optimizer.step) = (m, v, manifest.optimizer_step);
    site.sampler = Sampler::resume(manifest.sampler.0, manifest.sampler.1);
    Ok(Some(manifest.round))
}

/// A site state's manifest must be this version's, this site's, of this parameter count, on this
/// corpus, and within the run's rounds and steps.
fn check_site_manifest(
    manifest: &SiteManifest,
    target: &Path,
    site_id: u32,
    params: usize,
    run: &SiteRun,
) -> Result<(), RunError> {
    if manifest.format != SITE_FORMAT || manifest.version != VERSION {
        return Err(RunError::State(format!(
            "{}: not a version {VERSION} site state",
            target.display()
        )));
    }
    if manifest.site != site_id || manifest.params != params {
        return Err(RunError::State(format!(
            "{}: saved for site {} with {} parameters, this is site {} with {params}",
            target.display(),
            manifest.site,
            manifest.params,
            site_id
        )));
    }
    if manifest.corpus != run.corpus {
        return Err(RunError::State(format!(
            "{}: saved on another corpus ({}; this run has {}); restart the site without --resume",
            target.display(),
            manifest.corpus,
            run.corpus
        )));
    }
    if manifest.round >= run.rounds || manifest.optimizer_step > run.steps {
        return Err(RunError::State(format!(
            "{}: out of range: round {} at optimizer step {} (the run has {} rounds of {} steps); restart the site without --resume",
            target.display(),
            manifest.round,
            manifest.optimizer_step,
            run.rounds,
            run.steps
        )));
    }
    Ok(())
}

/// A site's saved tensors (at most `tensors_max` of them, each of `params` values: m, v, an
/// error-feedback residual, ...), each checked: the file's size and CRC-32 as its manifest
/// recorded them, every length, every value finite (and v non-negative).
pub(super) fn read_site_tensors(
    target: &Path,
    tensors_file: FileCheck,
    params: usize,
    tensors_max: u64,
) -> Result<Vec<(String, Vec<f32>)>, RunError> {
    let path = target.join("tensors.safetensors");
    let bytes = read_limited(
        &path,
        (params as u64)
            .saturating_mul(4)
            .saturating_mul(tensors_max)
            .saturating_add(4096),
    )?;
    FileCheck::verify(Some(tensors_file), &path, &bytes)?;
    let names = safetensors_names(&path, &bytes)?;
    if names.iter().any(|(_, len)| *len != params) {
        return Err(RunError::State(format!(
            "{}: a saved tensor has the wrong length",
            path.display()
        )));
    }
    let expected: Vec<(String, Vec<usize>)> = names
        .iter()
        .map(|(n, len)| (n.clone(), vec![*len]))
        .collect();
    let values = tensors_from_safetensors(&path, &bytes, &expected)?;
    let tensors: Vec<(String, Vec<f32>)> = names.into_iter().map(|(n, _)| n).zip(values).collect();
    if let Some((name, _)) = tensors
        .iter()
        .find(|(n, v)| v.iter().any(|x| !x.is_finite() || (n == "v" && *x < 0.0)))
    {
        return Err(RunError::State(format!(
            "{}: saved tensor {name} holds a non-finite (or negative second-moment) value",
            path.display()
        )));
    }
    Ok(tensors)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::RunConfig;
    use crate::driver::new_site;
    use crate::state::forget_saved_state;

    /// Site k of a 2-site tiny run with top-k and error feedback.
    pub(in crate::state) fn site(k: usize) -> SiteRuntime {
        let config = RunConfig {
            preset: "tiny".into(),
            sites: 2,
            ..RunConfig::default()
        };
        let model = lowband_engine::preset("tiny").unwrap().model;
        let initial = lowband_engine::Gpt::new(model, 0)
            .unwrap()
            .params()
            .to_vec();
        let compression = lowband_protocol::Compression {
            uplink: "topk:k=16,chunk=256,values=q8".parse().unwrap(),
            downlink: lowband_codec::CodecSpec::Fp32,
            feedback_decay: Some(0.9),
        };
        new_site(&config, (compression, config.optimizer), &initial, k).unwrap()
    }

    fn run() -> SiteRun {
        let corpus = lowband_data::CorpusFingerprint {
            train_bytes: 1000,
            shards: 2,
            train_crc32: 1,
            validation_bytes: 50,
            validation_crc32: 2,
        };
        SiteRun {
            corpus,
            steps: 100,
            rounds: 20,
        }
    }

    #[test]
    fn a_site_state_round_trips_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut original = site(1);
        {
            let optimizer = original.trainer.optimizer_mut();
            optimizer
                .m
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = i as f32 * 1e-3);
            optimizer.v.iter_mut().for_each(|x| *x = 0.5);
            optimizer.step = 40;
        }
        original.sampler = Sampler::resume(original.sampler.seed(), 123);
        let residual: Vec<f32> = (0..original.trainer.params().len())
            .map(|i| (i % 7) as f32)
            .collect();
        original.site.restore_feedback(&residual).unwrap();
        save_site(dir.path(), &original, 9, &run()).unwrap();

        let mut restored = site(1);
        assert_eq!(
            restore_site(dir.path(), &mut restored, &run()).unwrap(),
            Some(9)
        );
        assert_eq!(
            restored.trainer.optimizer().m,
            original.trainer.optimizer().m
        );
        assert_eq!(
            restored.trainer.optimizer().v,
            original.trainer.optimizer().v
        );
        assert_eq!(restored.trainer.optimizer().step, 40);
        assert_eq!(restored.sampler.drawn, 123);
        assert_eq!(restored.site.feedback_residual().unwrap(), residual);
        // Nothing saved: nothing restored.
        assert_eq!(
            restore_site(&dir.path().join("none"), &mut site(1), &run()).unwrap(),
            None
        );
        // Another site's state is refused.
        let error = restore_site(dir.path(), &mut site(0), &run())
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("saved for site 1"), "{error}");
        // Another corpus, or a round past the run's end, is refused.
        let other = SiteRun {
            corpus: lowband_data::CorpusFingerprint {
                train_crc32: 7,
                ..run().corpus
            },
            ..run()
        };
        let error = restore_site(dir.path(), &mut site(1), &other)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("another corpus"), "{error}");
        let short = SiteRun { rounds: 9, ..run() };
        let error = restore_site(dir.path(), &mut site(1), &short)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("out of range"), "{error}");
        // One changed value in the tensors (same length, valid safetensors) is refused.
        let tensors = dir.path().join("state-9/tensors.safetensors");
        let mut bytes = std::fs::read(&tensors).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        std::fs::write(&tensors, &bytes).unwrap();
        let error = restore_site(dir.path(), &mut site(1), &run())
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("truncated or altered"), "{error}");
        bytes[last] ^= 0x01;
        std::fs::write(&tensors, &bytes).unwrap();
        // A truncated tensor file is refused, not half-loaded.
        let tensors = dir.path().join("state-9/tensors.safetensors");
        let bytes = std::fs::read(&tensors).unwrap();
        std::fs::write(&tensors, &bytes[..bytes.len() / 2]).unwrap();
        let mut victim = site(1);
        assert!(restore_site(dir.path(), &mut victim, &run()).is_err());
        assert_eq!(
            victim.trainer.optimizer().step,
            0,
            "untouched by a failed restore"
        );
    }

    #[test]
    fn forgetting_a_saved_state_removes_only_lowbands_own_files() {
        // Issue 17: `site --state-dir DIR` without --resume removed DIR and everything in it.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("notes")).unwrap();
        std::fs::write(state.join("site.key"), "secret").unwrap();
        std::fs::write(state.join("notes/todo.txt"), "mine").unwrap();
        std::fs::create_dir_all(state.join("state-other")).unwrap();
        save_site(&state, &site(1), 3, &run()).unwrap();
        save_site(&state, &site(1), 4, &run()).unwrap();
        // A user's file inside one of our state directories keeps that directory.
        std::fs::write(state.join("state-4/mine.txt"), "mine").unwrap();
        forget_saved_state(&state).unwrap();
        assert_eq!(restore_site(&state, &mut site(1), &run()).unwrap(), None);
        let mut left: Vec<String> = walk(&state);
        left.sort();
        assert_eq!(
            left,
            [
                "notes/todo.txt",
                "site.key",
                "state-4/mine.txt",
                "state-other/"
            ],
            "only lowband's files went"
        );
        // The directory the user named is never removed, even when nothing else is in it.
        let empty = dir.path().join("empty");
        save_site(&empty, &site(1), 3, &run()).unwrap();
        forget_saved_state(&empty).unwrap();
        assert!(empty.is_dir() && walk(&empty).is_empty());
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_dir() {
                let inner = walk(&entry.path());
                if inner.is_empty() {
                    found.push(format!("{name}/"));
                }
                found.extend(inner.into_iter().map(|f| format!("{name}/{f}")));
            } else {
                found.push(name);
            }
        }
        found
    }
}
