//! A model lowband does not compute: a PyTorch site's (the Python package, `crates/lowband-py`).
//! The coordinator knows it only as a flat f32 buffer: its parameter count, optionally its
//! tensors' names and shapes (so a site with another model is refused naming both), and the
//! initial parameters, a safetensors file the Python side writes (one f32 tensor `params` of
//! shape `[params]`). The run file says so in a `[model]` table:
//! ```toml
//! strategies = ["diloco@50"]
//! steps = 1000
//! [model]
//! params = 838272
//! initial = "initial.safetensors"   # relative to the run file; only the coordinator reads it
//! tokens_per_step = 512             # per site and inner step, for the report's token axis
//! ```
//! The sites start unsynced: the coordinator sends every site the initial parameters in full
//! (fp32) when the run starts, so every site starts from the same θ₀ wherever it runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RunError;

/// Name of the one tensor of an initial-parameters file.
pub const INITIAL_TENSOR: &str = "params";

/// Largest external model: 4 billion parameters (a 16 GB fp32 buffer, which the coordinator
/// holds a few times over: θ, its outer momentum and the round's merge).
pub const EXTERNAL_PARAMS_MAX: usize = 1 << 32;

/// One named tensor of an external model, in the order of the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorShape {
    pub name: String,
    pub shape: Vec<usize>,
}

/// A model that is not lowband's engine (see the module's documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalModel {
    /// Length of the flat f32 parameter buffer.
    pub params: usize,
    /// The initial parameters (safetensors, one f32 tensor `params`); the coordinator reads it,
    /// the sites are sent its values. A relative path is relative to the run file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<PathBuf>,
    /// Tokens one site trains on per inner step, for the report's token axis (None: site_batch
    /// x the preset's context length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_step: Option<u64>,
    /// The tensors in the flat buffer's order (optional): a site whose model has other names or
    /// shapes is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tensors: Vec<TensorShape>,
}

impl ExternalModel {
    /// Check every field; the error names it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.params == 0 || self.params > EXTERNAL_PARAMS_MAX {
            return Err((
                "model.params",
                format!(
                    "{} is outside 1 ..= {EXTERNAL_PARAMS_MAX} parameters",
                    self.params
                ),
            ));
        }
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut names = BTreeSet::new();
        let mut total: usize = 0;
        for tensor in &self.tensors {
            if tensor.name.is_empty() || !names.insert(tensor.name.as_str()) {
                return Err((
                    "model.tensors",
                    format!(
                        "{:?}: every tensor has its own, non-empty name",
                        tensor.name
                    ),
                ));
            }
            let count = tensor
                .shape
                .iter()
                .try_fold(1usize, |n, d| n.checked_mul(*d))
                .unwrap_or(usize::MAX);
            total = total.saturating_add(count);
        }
        if total != self.params {
            return Err((
                "model.tensors",
                format!(
                    "the tensors hold {total} parameters, model.params says {}",
                    self.params
                ),
            ));
        }
        Ok(())
    }

    /// What the coordinator and a site compare for the tensors: their count and a CRC-32 of
    /// every name and shape in order (the list itself can be long).
    pub fn tensors_digest(&self) -> String {
        if self.tensors.is_empty() {
            return "not given".into();
        }
        let mut hasher = crc32fast::Hasher::new();
        for tensor in &self.tensors {
            hasher.update(tensor.name.as_bytes());
            hasher.update(format!("{:?};", tensor.shape).as_bytes());
        }
        format!(
            "{} tensors, CRC-32 {:08x}",
            self.tensors.len(),
            hasher.finalize()
        )
    }

    /// Where the first difference from `other`'s tensors is, for an error a person can act on.
    pub fn first_tensor_difference(&self, other: &ExternalModel) -> Option<String> {
        let (ours, theirs) = (&self.tensors, &other.tensors);
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            if a != b {
                return Some(format!(
                    "tensor {i}: {} {:?} here, {} {:?} there",
                    a.name, a.shape, b.name, b.shape
                ));
            }
        }
        (ours.len() != theirs.len())
            .then(|| format!("{} tensors here, {} there", ours.len(), theirs.len()))
    }
}

/// Read an initial-parameters file: one f32 tensor `params` of `params` finite values.
pub fn read_initial(path: &Path, params: usize) -> Result<Vec<f32>, RunError> {
    let bytes = std::fs::read(path).map_err(|source| RunError::Io {
        path: path.into(),
        source,
    })?;
    let bad = |reason: String| RunError::InvalidConfig {
        field: "model.initial",
        reason: format!("{}: {reason}", path.display()),
    };
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let tensor = tensors.tensor(INITIAL_TENSOR).map_err(|_| {
        bad(format!(
            "no tensor {INITIAL_TENSOR:?} (an initial-parameters file holds one f32 tensor {INITIAL_TENSOR:?}; lowband.torch writes it)"
        ))
    })?;
    if tensor.dtype() != safetensors::Dtype::F32 {
        return Err(bad(format!(
            "tensor {INITIAL_TENSOR:?} is {:?}, not F32",
            tensor.dtype()
        )));
    }
    let count: usize = tensor.shape().iter().product();
    if count != params {
        return Err(bad(format!(
            "it holds {count} parameters, the run's model.params is {params}"
        )));
    }
    let values: Vec<f32> = tensor
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("parameter {i} is {}", values[i])));
    }
    Ok(values)
}

/// Write an initial-parameters file atomically (temp, fsync, rename).
pub fn write_initial(path: &Path, params: &[f32]) -> Result<(), RunError> {
    let data: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![params.len()], &data)
            .map_err(|e| RunError::State(e.to_string()))?;
    let bytes = safetensors::serialize([(INITIAL_TENSOR, view)], None)
        .map_err(|e| RunError::State(e.to_string()))?;
    write_file_atomic(path, &bytes)
}

/// Write `bytes` to `path` atomically (temp, fsync, rename: the engine's checkpoint rule).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    lowband_engine::checkpoint::write_atomic(path, bytes).map_err(|e| RunError::Io {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// A fingerprint of an external run's initial parameters, saved with the coordinator's state
/// in place of a corpus's (a resume with other initial parameters is refused).
pub fn initial_fingerprint(params: &[f32], sites: usize) -> lowband_data::CorpusFingerprint {
    let mut hasher = crc32fast::Hasher::new();
    for v in params {
        hasher.update(&v.to_le_bytes());
    }
    lowband_data::CorpusFingerprint {
        train_bytes: 4 * params.len() as u64,
        shards: sites,
        train_crc32: hasher.finalize(),
        validation_bytes: 0,
        validation_crc32: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(tensors: &[(&str, &[usize])]) -> ExternalModel {
        let tensors: Vec<TensorShape> = tensors
            .iter()
            .map(|(name, shape)| TensorShape {
                name: name.to_string(),
                shape: shape.to_vec(),
            })
            .collect();
        ExternalModel {
            params: tensors
                .iter()
                .map(|t| t.shape.iter().product::<usize>())
                .sum(),
            initial: None,
            tokens_per_step: None,
            tensors,
        }
    }

    #[test]
    fn tensors_must_add_up_and_differences_are_named() {
        let ours = model(&[("wte", &[256, 8]), ("ln.weight", &[8])]);
        ours.validate().unwrap();
        let wrong = ExternalModel {
            params: 5,
            ..ours.clone()
        };
        assert!(wrong.validate().unwrap_err().1.contains("2056"));
        let theirs = model(&[("wte", &[256, 8]), ("ln.weight", &[9])]);
        assert_ne!(ours.tensors_digest(), theirs.tensors_digest());
        let difference = ours.first_tensor_difference(&theirs).unwrap();
        assert!(
            difference.contains("tensor 1: ln.weight [8]"),
            "{difference}"
        );
        assert_eq!(ours.first_tensor_difference(&ours), None);
        let twice = model(&[("a", &[1]), ("a", &[1])]);
        assert!(twice.validate().is_err());
    }

    #[test]
    fn initial_parameters_round_trip_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initial.safetensors");
        write_initial(&path, &[1.0, -2.5, 3.0]).unwrap();
        assert_eq!(read_initial(&path, 3).unwrap(), vec![1.0, -2.5, 3.0]);
        let error = read_initial(&path, 4).unwrap_err().to_string();
        assert!(
            error.contains("holds 3 parameters") && error.contains("is 4"),
            "{error}"
        );
        write_initial(&path, &[f32::NAN]).unwrap();
        assert!(read_initial(&path, 1)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(read_initial(&path, 1)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors file"));
        let missing = read_initial(&dir.path().join("none"), 1).unwrap_err();
        assert!(matches!(missing, RunError::Io { .. }));
    }
}
