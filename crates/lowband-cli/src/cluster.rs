//! `lowband cluster`'s site processes: this process coordinates, K `lowband site` processes
//! train, each with its own key, cluster file entry and state directory. A supervisor thread
//! watches them: a site process that dies is reported (which, when, how), and with
//! `--restart-sites` it is started again with `--resume` (it keeps its optimizer state, data
//! position and error feedback, and rejoins with the current parameters). A dead site never
//! loses the run: the coordinator goes on with the others (a round waits for a lost site at most
//! the idle timeout). A site process that dies 3 times within a minute is not restarted again.
//! When every site process has died and none is left running, the supervisor stops the
//! coordinator at once with their exit statuses (`lowband_net::Abort`) instead of letting it
//! wait for them until its join timeout. Site processes end with this process (they get SIGTERM
//! when it dies).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lowband_data::Split;
use lowband_runtime::{RunConfig, RunError, RunResult, Strategy};

/// Where `lowband site` processes find what they need.
pub(crate) struct SiteLaunch {
    /// Keys, cluster files, site logs and site states.
    pub dir: PathBuf,
    /// Start a site process that died again (with its saved state).
    pub restart: bool,
}

/// How long the site processes may take to end after the coordinator is done.
const SITES_EXIT_MS: u64 = 30_000;

/// Run `strategy` with this process as the coordinator; returns the result and what happened to
/// the site processes (one line per death or restart, for the report).
pub(crate) fn run_site_processes(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    launch: &SiteLaunch,
    observer: lowband_runtime::Observer,
) -> Result<(RunResult, Vec<String>)> {
    let dir = launch.dir.join(strategy.dir_name());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let coordinator = Arc::new(lowband_net::Identity::generate()?);
    let mut site_keys = Vec::new();
    for k in 0..config.sites {
        let identity = lowband_net::Identity::generate()?;
        identity.save(&dir.join(format!("site{k}.key")))?;
        site_keys.push(identity.public_key());
    }
    let cluster_file = write_cluster_file(config, &strategy, &dir, &coordinator, &site_keys)?;
    let started = Instant::now();
    let mut supervisor: Option<Supervisor> = None;
    // The supervisor stops the coordinator when every site process has died, rather than let
    // it wait for them until its join timeout.
    let abort = lowband_net::Abort::new();
    let result = lowband_runtime::network::serve_coordinator(
        config,
        strategy.clone(),
        split,
        coordinator,
        site_keys,
        "127.0.0.1:0".parse()?,
        lowband_runtime::network::NetworkOptions {
            observer: Some(observer),
            abort: Some(abort.clone()),
            ..lowband_runtime::network::NetworkOptions::of(config, crate::nodes::limits(config))
        },
        |address| {
            let launcher = Launcher {
                executable: std::env::current_exe().map_err(|e| RunError::Io {
                    path: "lowband executable".into(),
                    source: e,
                })?,
                cluster_file,
                dir: dir.clone(),
                address: address.to_string(),
            };
            let children = (0..config.sites)
                .map(|k| launcher.spawn(k, false))
                .collect::<Result<Vec<_>, _>>()?;
            supervisor = Some(Supervisor::start(
                launcher,
                children,
                (launch.restart, abort),
                started,
            ));
            Ok(())
        },
    );
    let events = match supervisor {
        Some(supervisor) => supervisor.finish(result.is_err()),
        None => Vec::new(),
    };
    for event in &events {
        println!("cluster: {event}");
    }
    let result = result.with_context(|| {
        format!(
            "{} over site processes (their logs: {})",
            strategy.name(),
            dir.display()
        )
    })?;
    Ok((result, events))
}

/// The sites' run file: this run's settings (the corpus as an absolute path), its strategy and
/// the keys, in the one format (`crate::settings`).
fn write_cluster_file(
    config: &RunConfig,
    strategy: &Strategy,
    dir: &Path,
    coordinator: &lowband_net::Identity,
    site_keys: &[lowband_net::PublicKey],
) -> Result<PathBuf> {
    let mut run = config.clone();
    if let Some(corpus) = &run.corpus {
        run.corpus = Some(crate::settings::absolute(corpus)?);
    }
    let file = crate::settings::RunFile {
        run,
        strategies: Some(vec![strategy.name()]),
        cluster: Some(crate::settings::ClusterKeys {
            coordinator: coordinator.public_key().to_string(),
            sites: site_keys.iter().map(|k| k.to_string()).collect(),
        }),
    };
    let cluster_file = dir.join("cluster.toml");
    lowband_engine::checkpoint::write_atomic(&cluster_file, file.to_toml()?.as_bytes())?;
    Ok(cluster_file)
}

/// Starts site k's process.
struct Launcher {
    executable: PathBuf,
    cluster_file: PathBuf,
    dir: PathBuf,
    address: String,
}

impl Launcher {
    fn spawn(&self, k: usize, resume: bool) -> Result<Child, RunError> {
        let log_path = self.dir.join(format!("site{k}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| RunError::Io {
                path: log_path.clone(),
                source: e,
            })?;
        let mut command = Command::new(&self.executable);
        command
            .args(["site", "--config"])
            .arg(&self.cluster_file)
            .arg("--key")
            .arg(self.dir.join(format!("site{k}.key")))
            .args(["--join", &self.address])
            // The engine's results depend on its thread count: the sites use this process's,
            // so that the cluster's model is bitwise the in-memory one.
            .args(["--threads", &rayon::current_num_threads().to_string()])
            .arg("--state-dir")
            .arg(self.dir.join(format!("site{k}-state")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if resume {
            command.arg("--resume");
        }
        end_with_parent(&mut command);
        command.spawn().map_err(|e| RunError::Io {
            path: self.executable.clone(),
            source: e,
        })
    }
}

/// The child gets SIGTERM when this thread's process dies (Linux), so that killing `lowband
/// cluster` does not leave its sites running.
#[cfg(target_os = "linux")]
fn end_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn end_with_parent(_command: &mut Command) {}

/// Watches the site processes from a thread of its own (the thread that starts restarted sites
/// lives until they are waited for: their parent-death signal is tied to it).
struct Supervisor {
    done: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    events: Arc<Mutex<Vec<String>>>,
}

impl Supervisor {
    /// Watch `children`; with `restart`, start a dead one again; `abort` the run once every
    /// one of them has died (none left running, none ended well).
    fn start(
        launcher: Launcher,
        mut children: Vec<Child>,
        (restart, abort): (bool, lowband_net::Abort),
        started: Instant,
    ) -> Supervisor {
        let done = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (done_flag, failed_flag, log) = (done.clone(), failed.clone(), events.clone());
        let thread = std::thread::spawn(move || {
            let note = |line: String| log.lock().expect("events lock").push(line);
            let mut sites = Watched::new(children.len());
            let mut aborted = false;
            while !done_flag.load(Ordering::Acquire) {
                if let Some(reason) = all_died(&sites.running, &sites.deaths) {
                    if !std::mem::replace(&mut aborted, true) {
                        let at = started.elapsed().as_secs_f64();
                        note(format!("no site process was left running {at:.1} s into the run: the coordinator stopped"));
                    }
                    abort.abort(reason);
                }
                for (k, child) in children.iter_mut().enumerate() {
                    if !sites.running[k] {
                        continue;
                    }
                    let Ok(Some(status)) = child.try_wait() else {
                        continue;
                    };
                    sites.running[k] = false;
                    if status.success() {
                        sites.deaths[k] = None;
                        continue;
                    }
                    if done_flag.load(Ordering::Acquire) {
                        continue;
                    }
                    let at = started.elapsed().as_secs_f64();
                    let died = format!("site {k}'s process died ({status}) {at:.1} s into the run");
                    if let Some(again) = sites.died(k, status, restart, &launcher, died, &note) {
                        *child = again;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            end_sites(
                &mut children,
                &sites.running,
                failed_flag.load(Ordering::Acquire),
                &note,
            );
        });
        Supervisor {
            done,
            failed,
            thread,
            events,
        }
    }

    /// Stop watching (the coordinator is done); wait for the site processes; what happened.
    fn finish(self, run_failed: bool) -> Vec<String> {
        self.failed.store(run_failed, Ordering::Release);
        self.done.store(true, Ordering::Release);
        let _ = self.thread.join();
        std::mem::take(&mut *self.events.lock().expect("events lock"))
    }
}

/// A site process that dies this many times within `DEATHS_WINDOW_SECS` is not started again
/// (it would fail the same way for ever: a bad setting, a full disk).
const DEATHS_MAX: usize = 3;
const DEATHS_WINDOW_SECS: u64 = 60;

/// The supervisor's account of the site processes.
struct Watched {
    running: Vec<bool>,
    /// How each one that is not running died (None: it ended well, or is running).
    deaths: Vec<Option<String>>,
    /// When each died within the last `DEATHS_WINDOW_SECS`.
    recent_deaths: Vec<Vec<Instant>>,
}

impl Watched {
    fn new(sites: usize) -> Watched {
        Watched {
            running: vec![true; sites],
            deaths: vec![None; sites],
            recent_deaths: vec![Vec::new(); sites],
        }
    }

    /// Site k's process died (`died` says how and when): with `restart`, start it again unless
    /// it keeps dying at start. What happened goes to `note`.
    fn died(
        &mut self,
        k: usize,
        status: std::process::ExitStatus,
        restart: bool,
        launcher: &Launcher,
        died: String,
        note: &dyn Fn(String),
    ) -> Option<Child> {
        self.deaths[k] = Some(status.to_string());
        let log = launcher.dir.join(format!("site{k}.log"));
        if !restart {
            note(format!(
                "{died}; the run went on without it (see {})",
                log.display()
            ));
            return None;
        }
        let recent = &mut self.recent_deaths[k];
        recent.retain(|at| at.elapsed() < Duration::from_secs(DEATHS_WINDOW_SECS));
        recent.push(Instant::now());
        if recent.len() >= DEATHS_MAX {
            note(format!("{died}; not restarted: it died {DEATHS_MAX} times within {DEATHS_WINDOW_SECS} s (see {})", log.display()));
            return None;
        }
        match launcher.spawn(k, true) {
            Ok(again) => {
                note(format!(
                    "{died}; restarted with its saved state (--restart-sites)"
                ));
                self.running[k] = true;
                Some(again)
            }
            Err(e) => {
                note(format!("{died}; restarting it failed: {e}"));
                None
            }
        }
    }
}

/// Why the run must stop, when no site process is left running and each one died (a site that
/// ended well means the run is ending).
fn all_died(running: &[bool], deaths: &[Option<String>]) -> Option<String> {
    if running.iter().any(|&r| r) || deaths.iter().any(Option::is_none) {
        return None;
    }
    let how: Vec<String> = (deaths.iter().enumerate())
        .map(|(k, death)| format!("site {k}: {}", death.as_deref().unwrap_or("?")))
        .collect();
    Some(format!(
        "every site process died and none is left to train ({}; why: site<k>.log)",
        how.join(", ")
    ))
}

/// The run is over (or failed): the sites end by themselves once told; a site that does not
/// within the limit, or any site of a failed run, is killed. What happened goes to `note`.
fn end_sites(children: &mut [Child], running: &[bool], failed: bool, note: &dyn Fn(String)) {
    let limit = Instant::now() + Duration::from_millis(SITES_EXIT_MS);
    for (k, child) in children.iter_mut().enumerate() {
        if failed {
            let _ = child.kill();
        }
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if running[k] && !status.success() && !failed {
                        note(format!(
                            "site {k}'s process ended with {status} after the run"
                        ));
                    }
                    break;
                }
                Ok(None) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    note(format!(
                        "site {k}'s process did not end within {} s of the run's end: killed",
                        SITES_EXIT_MS / 1000
                    ));
                    break;
                }
            }
        }
    }
}
