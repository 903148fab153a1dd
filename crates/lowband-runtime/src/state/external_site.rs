//! What a PyTorch site keeps across a restart: its error-feedback residual (what its codec has
//! not sent yet) and its uplink codec's random stream. Its optimizer and data are its own
//! program's; its parameters come from the coordinator when it rejoins. Saved after every
//! update it sends, like an engine site's state (a new `state-<round>/`, then the atomic switch
//! of `current.json`; the previous state survives a crash at any moment).

use std::path::Path;

use lowband_engine::checkpoint::{read_limited, write_safetensors_atomic};
use lowband_protocol::Site;
use serde::{Deserialize, Serialize};

use super::files::{commit_state, current_state, new_state_dir};
use super::{FileCheck, VERSION};
use crate::RunError;

const FORMAT: &str = "lowband-external-site-state";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    site: u32,
    /// The last round it sent an update for.
    round: u64,
    params: usize,
    codec_random: Option<u64>,
    /// The run it belongs to: the CRC-32 of its join request (every run setting, the strategy,
    /// the model).
    run: u32,
    /// `tensors.safetensors` as written (None: no error feedback to keep).
    tensors_file: Option<FileCheck>,
}

/// Save `site`'s state after it sent round `round`'s update, under `dir`.
pub fn save_external_site(dir: &Path, site: &Site, round: u64, run: u32) -> Result<(), RunError> {
    let (name, target) = new_state_dir(dir, round)?;
    let residual = site.feedback_residual();
    let tensors_file = match &residual {
        Some(r) => {
            let named = [("residual".to_string(), vec![r.len()], r.as_slice())];
            let (bytes, crc32) =
                write_safetensors_atomic(&target.join("tensors.safetensors"), &named)?;
            Some(FileCheck { bytes, crc32 })
        }
        None => None,
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        site: site.id(),
        round,
        params: site.round_start().len(),
        codec_random: site.codec_random_state(),
        run,
        tensors_file,
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|e| RunError::State(e.to_string()))?;
    commit_state(dir, &name, &manifest)
}

/// Restore what [`save_external_site`] saved under `dir` into `site`: the round it had sent, or
/// None when nothing is saved. A state of another run, site or size is refused, naming it; the
/// residual is checked (size, CRC-32, length, every value finite) before it is used.
pub fn restore_external_site(
    dir: &Path,
    site: &mut Site,
    run: u32,
) -> Result<Option<u64>, RunError> {
    let Some(target) = current_state(dir)? else {
        return Ok(None);
    };
    let manifest_path = target.join("state.json");
    let manifest: Manifest = serde_json::from_slice(&read_limited(&manifest_path, 1 << 16)?)
        .map_err(|e| RunError::State(format!("{}: {e}", manifest_path.display())))?;
    let params = site.round_start().len();
    let refuse = |what: String| {
        Err(RunError::State(format!(
            "{}: {what}; remove the directory (or give another state directory) to start this site afresh",
            target.display()
        )))
    };
    if manifest.format != FORMAT || manifest.version != VERSION {
        return refuse(format!("not a version {VERSION} PyTorch site state"));
    }
    if manifest.site != site.id() || manifest.params != params {
        return refuse(format!(
            "saved for site {} with {} parameters, this is site {} with {params}",
            manifest.site,
            manifest.params,
            site.id()
        ));
    }
    if manifest.run != run {
        return refuse(format!(
            "saved in another run (its settings' CRC-32 {:08x}, this run's {run:08x})",
            manifest.run
        ));
    }
    match (manifest.tensors_file, site.feedback_residual().is_some()) {
        (Some(check), true) => {
            let path = target.join("tensors.safetensors");
            let bytes = read_limited(
                &path,
                (params as u64).saturating_mul(4).saturating_add(4096),
            )?;
            FileCheck::verify(Some(check), &path, &bytes)?;
            let expected = [("residual".to_string(), vec![params])];
            let residual =
                lowband_engine::checkpoint::tensors_from_safetensors(&path, &bytes, &expected)?
                    .pop()
                    .expect("one tensor asked for");
            if residual.iter().any(|v| !v.is_finite()) {
                return refuse("the saved residual holds a non-finite value".into());
            }
            site.restore_feedback(&residual)?;
        }
        (None, false) => {}
        _ => return refuse("saved with another strategy (error feedback or not)".into()),
    }
    if let Some(random) = manifest.codec_random {
        site.set_codec_random_state(random);
    }
    Ok(Some(manifest.round))
}
