//! The binary's file rules: settings files read under a size limit (a device or a pipe cannot be
//! read without end), run names that are one plain path component, and one run at a time per run
//! directory (a lock file, removed when the run ends).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Largest settings file (cluster, plan, compare config, metrics of a run read back).
pub const SETTINGS_BYTES_MAX: u64 = 16 << 20;

/// Largest metrics file `lowband plot` and `plan --from-run` read back.
pub const METRICS_BYTES_MAX: u64 = 1 << 30;

/// A whole text file of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    use lowband_data::DataError;
    let bytes = lowband_data::corpus::read_bounded(path, limit).map_err(|e| match e {
        // (The I/O error names the path once.)
        DataError::TooLarge { .. } => anyhow::anyhow!(
            "{}: more than {limit} bytes: not a settings file",
            path.display()
        ),
        other => anyhow::Error::from(other),
    })?;
    String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8 text", path.display()))
}

/// A TOML error on one line: "FILE: line N: message" (`syntax`: "... line N: not valid TOML:
/// message").
pub fn toml_error(path: &Path, text: &str, error: &toml::de::Error, syntax: bool) -> anyhow::Error {
    let line = error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let kind = if syntax { "not valid TOML: " } else { "" };
    let message = error.message().trim();
    match line {
        Some(line) => anyhow::anyhow!("{}: line {line}: {kind}{message}", path.display()),
        None => anyhow::anyhow!("{}: {kind}{message}", path.display()),
    }
}

/// A run name is one plain path component: not empty, not `.` or `..`, no separator, not
/// absolute, at most 128 characters of letters, digits, `-`, `_`, `.`, `@`, `+` or `=`.
pub fn check_run_name(name: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.@+=".contains(c);
    if name.is_empty() || name == "." || name == ".." || name.len() > 128 {
        bail!("--name {name:?}: a run name is one plain directory name (1 to 128 characters, not . or ..)");
    }
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        bail!("--name {name:?}: {bad:?} is not allowed in a run name (letters, digits and - _ . @ + = are; the run goes under --runs-dir)");
    }
    Ok(())
}

/// Fail now, not after hours of training, if `path` cannot be written: its directory must exist
/// and take a new file (a probe, removed at once; `path` itself is not touched).
pub fn check_writable(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.is_dir() {
        bail!("{} is a directory, not a file to write", path.display());
    }
    let probe = dir.join(format!(".lowband-probe.{}.tmp", std::process::id()));
    std::fs::File::create(&probe).with_context(|| {
        format!(
            "{} cannot be written (its directory {} does not take a new file)",
            path.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Refuse to overwrite the results of another run: a run directory whose `summary.json` lists
/// other strategies than `strategies` (the same run again may replace its own results).
pub fn check_not_another_run(run_dir: &Path, strategies: &[String]) -> Result<()> {
    let path = run_dir.join("summary.json");
    let Ok(text) = read_text(&path, METRICS_BYTES_MAX) else {
        return Ok(());
    };
    let earlier: Vec<String> = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v["strategies"].as_array().map(|rows| {
                rows.iter()
                    .filter_map(|r| r["strategy"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default();
    if earlier != strategies {
        bail!(
            "{} holds the results of another run ({}); give this one its own --name, or pass --force to replace them",
            run_dir.display(),
            if earlier.is_empty() { "unreadable summary".to_string() } else { earlier.join(", ") }
        );
    }
    Ok(())
}

/// Holds a run directory for one process: `RUN_DIR/lock` names this process. A second run on the
/// same directory is refused while the holder lives; a lock left by a process that died (its
/// pid no longer runs) is taken over. Dropped, the lock file is removed.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

const LOCK_FILE: &str = "lock";

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    writeln!(file, "{}", std::process::id())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if process_alive(pid) => bail!(
                            "{} is in use by another lowband run (process {pid}); choose another --name, or wait for it",
                            run_dir.display()
                        ),
                        // Left by a run that died: ours now.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("{} is not writable", run_dir.display()))
                }
            }
        }
        bail!(
            "{}: could not take the run directory's lock",
            path.display()
        )
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether another process with this pid runs (a process takes a run directory once, so a lock
/// naming this very process was left by a dead one whose pid came round again).
fn process_alive(pid: u32) -> bool {
    pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
}

/// Write a command's machine-readable result: `-` is standard output, anything else a file
/// (written atomically). Every `--json PATH` of the CLI goes through this.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if path == Path::new("-") {
        println!("{text}");
        return Ok(());
    }
    lowband_engine::checkpoint::write_atomic(path, format!("{text}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_are_one_plain_component() {
        for good in ["small-k4-1000steps-seed0", "a", "diloco@10", "x.y_z+1=2"] {
            check_run_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "/tmp/x",
            "a/b",
            "..\\x",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(check_run_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_run_directory_is_held_by_one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        // Another live process holds it: refused...
        std::fs::write(dir.path().join(LOCK_FILE), "1\n").unwrap(); // pid 1 (init) is alive
        let error = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(error.contains("in use by another lowband run"), "{error}");
        // A lock naming this very process is a dead one's whose pid came round again.
        std::fs::write(
            dir.path().join(LOCK_FILE),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        drop(RunLock::acquire(dir.path()).unwrap());
        // ...a lock of a process that is gone is taken over.
        std::fs::write(dir.path().join(LOCK_FILE), "4294967295\n").unwrap();
        drop(first);
        let second = RunLock::acquire(dir.path()).unwrap();
        drop(second);
        assert!(!dir.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn settings_files_are_read_under_a_limit_even_without_a_size() {
        let error = read_text(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(
            format!("{error:#}").contains("more than 1024 bytes"),
            "{error:#}"
        );
    }
}
