//! The files of a saved state: which directory `current.json` points to, and forgetting a state
//! by removing lowband's own files only.

use std::path::{Path, PathBuf};

use lowband_engine::checkpoint::read_limited;
use serde::Deserialize;

use crate::RunError;

/// A new state's directory under `dir`, `state-<number>/` (created): its name and path.
pub(super) fn new_state_dir(dir: &Path, number: u64) -> Result<(String, PathBuf), RunError> {
    let name = format!("state-{number}");
    let target = dir.join(&name);
    std::fs::create_dir_all(&target).map_err(|e| RunError::Io {
        path: target.clone(),
        source: e,
    })?;
    Ok((name, target))
}

/// Make the state `name` (its data files already written) the current one: its manifest
/// `state.json`, then the atomic switch of `current.json`, then the older states removed (the
/// previous state survives a crash at any moment).
pub(super) fn commit_state(dir: &Path, name: &str, manifest: &[u8]) -> Result<(), RunError> {
    commit_state_keeping(dir, name, manifest, None)
}

/// `commit_state`, keeping the state `also_keep` too (a scheduled site's last committed save).
pub(super) fn commit_state_keeping(
    dir: &Path,
    name: &str,
    manifest: &[u8],
    also_keep: Option<&str>,
) -> Result<(), RunError> {
    lowband_engine::checkpoint::write_atomic(&dir.join(name).join("state.json"), manifest)?;
    lowband_engine::checkpoint::write_atomic(
        &dir.join("current.json"),
        serde_json::json!({ "dir": name }).to_string().as_bytes(),
    )?;
    remove_other_states(dir, name, also_keep);
    Ok(())
}

fn remove_other_states(dir: &Path, keep: &str, also_keep: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_state_dir_name(&name) && name != keep && Some(name.as_str()) != also_keep {
            let _ = remove_state_dir(&entry.path());
        }
    }
}

/// `state-<digits>`: the directories lowband saves a state in.
fn is_state_dir_name(name: &str) -> bool {
    name.strip_prefix("state-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The files lowband writes in a state directory (and the temp files of an interrupted atomic
/// write of them, `.NAME.<pid>.tmp`).
fn is_our_file(name: &str) -> bool {
    const OURS: [&str; 3] = ["state.json", "tensors.safetensors", "current.json"];
    OURS.contains(&name)
        || name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
            .is_some_and(|(file, pid)| {
                OURS.contains(&file) && pid.bytes().all(|b| b.is_ascii_digit())
            })
}

/// Remove lowband's files in `dir`, then `dir` itself if that left it empty. Anything else in it
/// (a user's file, a subdirectory) stays, and so does the directory.
fn remove_state_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_our_file(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
        other => other,
    }
}

/// Forget the state saved under `dir` (a site's `--state-dir`, or one strategy's directory of a
/// run): its `current.json` first (from then on nothing is resumable), then its `state-<n>/`
/// directories, each emptied of lowband's own files only. Never removes `dir` itself, a file
/// lowband did not write, or a directory that still holds one.
pub fn forget_saved_state(dir: &Path) -> Result<(), RunError> {
    let io = |path: &Path, source| RunError::Io {
        path: path.to_path_buf(),
        source,
    };
    let current = dir.join("current.json");
    match std::fs::remove_file(&current) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&current, e)),
        _ => {}
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) && is_state_dir_name(&name) {
            remove_state_dir(&path).map_err(|e| io(&path, e))?;
        } else if is_our_file(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}

/// Forget every strategy's saved state under a run's state directory (`RUN/state/<strategy>/`):
/// each strategy directory is emptied as [`forget_saved_state`] does, and removed once empty.
pub fn forget_run_states(state_dir: &Path) -> Result<(), RunError> {
    let entries = match std::fs::read_dir(state_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(RunError::Io {
                path: state_dir.to_path_buf(),
                source: e,
            })
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) && path.join("current.json").exists() {
            forget_saved_state(&path)?;
            let _ = std::fs::remove_dir(&path);
        }
    }
    let _ = std::fs::remove_dir(state_dir);
    Ok(())
}

/// The directory `current.json` in `dir` points to (the committed state), if there is one.
pub(super) fn current_state(dir: &Path) -> Result<Option<PathBuf>, RunError> {
    // (A file in its place would read as "nothing saved", and the first save would fail.)
    if dir.exists() && !dir.is_dir() {
        return Err(RunError::State(format!(
            "{}: not a directory (a state directory must be one)",
            dir.display()
        )));
    }
    let current = dir.join("current.json");
    if !current.exists() {
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct Current {
        dir: String,
    }
    let pointer: Current = serde_json::from_slice(&read_limited(&current, 4096)?)
        .map_err(|e| RunError::State(format!("{}: {e}", current.display())))?;
    if pointer.dir.contains('/') || !pointer.dir.starts_with("state-") {
        return Err(RunError::State(format!(
            "{}: bad state directory name",
            current.display()
        )));
    }
    Ok(Some(dir.join(&pointer.dir)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_where_the_state_directory_should_be_is_an_error_not_nothing_saved() {
        let dir = tempfile::tempdir().unwrap();
        assert!(current_state(&dir.path().join("absent")).unwrap().is_none());
        assert!(current_state(dir.path()).unwrap().is_none());
        let file = dir.path().join("state");
        std::fs::write(&file, b"a file").unwrap();
        let error = current_state(&file).unwrap_err().to_string();
        assert!(error.contains("not a directory"), "{error}");
    }
}
