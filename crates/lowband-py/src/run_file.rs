//! Writing what a coordinator reads: the cluster file (lowband's run file format, written by the
//! runtime's own `RunFile`, so the binary reads back exactly these settings) and the initial
//! parameters.

use std::path::PathBuf;

use lowband_runtime::external::{ExternalModel, TensorShape};
use lowband_runtime::run_file::{ClusterKeys, RunFile};
use lowband_runtime::RunConfig;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Write a cluster file for an external model to `path` and return its text: the settings of
/// `base` (a run file such as configs/reference.toml; None: the defaults) with `overrides` (a
/// JSON object of run-file fields, tables merged field by field: {"steps": 100, "optimizer":
/// {"lr": 0.002}}), the strategy, the model (`params`, `tensors`, `initial`, `tokens_per_step`)
/// and the keys. Every setting is checked as the binary checks it; errors name the field.
#[pyfunction]
#[pyo3(signature = (path, strategy, coordinator_key, site_keys, params, initial, tensors = None, tokens_per_step = None, base = None, overrides = None))]
#[allow(clippy::too_many_arguments)]
pub fn cluster_file(
    path: PathBuf,
    strategy: String,
    coordinator_key: String,
    site_keys: Vec<String>,
    params: usize,
    initial: PathBuf,
    tensors: Option<Vec<(String, Vec<usize>)>>,
    tokens_per_step: Option<u64>,
    base: Option<PathBuf>,
    overrides: Option<String>,
) -> PyResult<String> {
    let base_file = match &base {
        Some(base) => RunFile::read(base).map_err(value_error)?,
        None => RunFile::default(),
    };
    let mut run = serde_json::to_value(&base_file.run).map_err(value_error)?;
    if let Some(overrides) = overrides {
        let overrides: serde_json::Value = serde_json::from_str(&overrides).map_err(value_error)?;
        merge(&mut run, overrides);
    }
    let mut run: RunConfig =
        serde_json::from_value(run).map_err(|e| value_error(format!("run settings: {e}")))?;
    run.sites = site_keys.len();
    run.model = Some(ExternalModel {
        params,
        initial: Some(initial),
        tokens_per_step,
        tensors: tensors
            .unwrap_or_default()
            .into_iter()
            .map(|(name, shape)| TensorShape { name, shape })
            .collect(),
    });
    let file = RunFile {
        run,
        strategies: Some(vec![strategy]),
        cluster: Some(ClusterKeys {
            coordinator: coordinator_key,
            sites: site_keys,
        }),
    };
    let text = file.to_toml().map_err(value_error)?;
    write_atomically(&path, text.as_bytes())?;
    // Read back as every node will: the same checks, the same errors.
    lowband_runtime::run_file::Cluster::read(&path).map_err(value_error)?;
    Ok(text)
}

/// Merge `overrides` into `base`: objects field by field, anything else replaced.
fn merge(base: &mut serde_json::Value, overrides: serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// Write `bytes` to `path` atomically (temp, fsync, rename).
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> PyResult<()> {
    lowband_runtime::external::write_file_atomic(path, bytes)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Write the initial parameters (`len` float32 values at `address`, a contiguous buffer the
/// caller holds) to `path` as the coordinator reads them (safetensors, one f32 tensor
/// "params"), atomically.
#[pyfunction]
pub fn write_initial(py: Python<'_>, path: PathBuf, address: usize, len: usize) -> PyResult<()> {
    if address == 0 || !address.is_multiple_of(4) || len == 0 {
        return Err(value_error(format!(
            "not a float32 buffer: address {address:#x}, {len} values"
        )));
    }
    let address_len = (address, len);
    py.detach(move || {
        // SAFETY: the wrapper passes a contiguous float32 tensor it holds for the call.
        let params =
            unsafe { std::slice::from_raw_parts(address_len.0 as *const f32, address_len.1) };
        lowband_runtime::external::write_initial(&path, params)
    })
    .map_err(value_error)
}
