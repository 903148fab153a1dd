//! The `lowband._native` module: lowband's Rust core for Python. Every error becomes a Python
//! exception with the same one-line message the `lowband` binary prints.

use std::path::PathBuf;

use pyo3::exceptions::{PyException, PyFileExistsError, PyValueError};
use pyo3::prelude::*;

mod run_file;
mod site;

pyo3::create_exception!(
    _native,
    RefusedError,
    PyException,
    "The coordinator refused this site (its key is not listed, or its run settings or model differ from the cluster's): final, retrying cannot help."
);
pyo3::create_exception!(
    _native,
    ExcludedError,
    PyException,
    "The coordinator excluded this site (its updates were refused too often)."
);

/// Make a node key (ed25519) at `path` (written atomically, mode 0600) and return its public key
/// (64 hex digits: the line a cluster file lists). An existing file is kept unless `force`: a
/// node's key is its identity.
#[pyfunction]
#[pyo3(signature = (path, force = false))]
fn keygen(path: PathBuf, force: bool) -> PyResult<String> {
    if path.exists() && !force {
        return Err(PyFileExistsError::new_err(format!(
            "{} exists: a node's key is its identity; pass force=True to replace it",
            path.display()
        )));
    }
    let identity =
        lowband_net::Identity::generate().map_err(|e| PyValueError::new_err(e.to_string()))?;
    identity
        .save(&path)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(identity.public_key().to_string())
}

/// The public key (64 hex digits) of the node key file at `path`.
#[pyfunction]
fn public_key(path: PathBuf) -> PyResult<String> {
    let identity =
        lowband_net::Identity::load(&path).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(identity.public_key().to_string())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("RefusedError", m.py().get_type::<RefusedError>())?;
    m.add("ExcludedError", m.py().get_type::<ExcludedError>())?;
    m.add_function(wrap_pyfunction!(keygen, m)?)?;
    m.add_function(wrap_pyfunction!(public_key, m)?)?;
    m.add_function(wrap_pyfunction!(run_file::cluster_file, m)?)?;
    m.add_function(wrap_pyfunction!(run_file::write_initial, m)?)?;
    m.add_class::<site::Site>()?;
    Ok(())
}
