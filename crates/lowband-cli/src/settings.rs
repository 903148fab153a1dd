//! The run file (`lowband_runtime::run_file`, where the binary and the Python package read it),
//! and the binary's one addition: absolute corpus paths for the files `cluster` writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
pub use lowband_runtime::run_file::{ClusterKeys, RunFile};

/// An absolute form of a corpus path, for a file other processes read from elsewhere.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))
}
