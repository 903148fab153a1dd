//! Helpers shared by the process tests: start `lowband` nodes in a test directory, wait for
//! them, collect what they wrote to stderr.
#![allow(dead_code)]

pub mod faults;
pub mod namespace;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn lowband(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lowband"));
    command.current_dir(dir).env("RAYON_NUM_THREADS", "1");
    command
}

pub fn keygen(dir: &Path, name: &str) -> String {
    let o = lowband(dir)
        .args(["keygen", "--out", name])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .strip_prefix("public ")
        .unwrap()
        .to_string()
}

/// Kill the child if the test fails before it ends.
pub struct Guard(pub Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

pub fn wait(child: &mut Guard, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "a node did not finish in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Write a cluster file for `sites` and start its coordinator on a free loopback port; returns
/// the running coordinator and its address.
pub fn start_coordinator(
    dir: &Path,
    coordinator: &str,
    sites: &[String],
    cluster: &str,
    extra: &[&str],
) -> (Guard, String) {
    let keys: Vec<String> = sites.iter().map(|k| format!("\"{k}\"")).collect();
    std::fs::write(
        dir.join("cluster.toml"),
        format!(
            "{cluster}\n[cluster]\ncoordinator = \"{coordinator}\"\nsites = [{}]\n",
            keys.join(", ")
        ),
    )
    .unwrap();
    launch_coordinator(dir, extra)
}

/// A loopback address with a free port, fixed so that sites find a restarted coordinator where
/// they left it.
pub fn fixed_loopback_address() -> String {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// Start `lowband coordinator` on the cluster file already in `dir` (a restart); its address.
pub fn launch_coordinator(dir: &Path, extra: &[&str]) -> (Guard, String) {
    let mut args = vec![
        "coordinator",
        "--config",
        "cluster.toml",
        "--key",
        "coordinator.key",
        "--address-file",
        "address",
        "--json",
        "out.json",
    ];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    // Output is not read: a full pipe must not block the node.
    let process = Guard(
        lowband(dir)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(error_log(dir, "coordinator"))
            .spawn()
            .unwrap(),
    );
    wait_for_file(&dir.join("address"), "the coordinator never listened");
    (
        process,
        std::fs::read_to_string(dir.join("address")).unwrap(),
    )
}

/// Block until `condition` holds (checked every 20 ms), at most `limit`; then fail saying `what`.
/// Tests wait on what the nodes do, never on a fixed sleep.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether node `name`'s stderr log (`NAME.err`) has a line containing `text`.
pub fn log_has(dir: &Path, name: &str, text: &str) -> bool {
    std::fs::read_to_string(dir.join(format!("{name}.err"))).is_ok_and(|log| log.contains(text))
}

/// The step of the coordinator's newest saved state (`state-STEP`) under
/// `runs/*/coordinator-state/`, if it saved one.
pub fn coordinator_saved(dir: &Path) -> Option<u64> {
    let runs = std::fs::read_dir(dir.join("runs")).ok()?;
    runs.flatten()
        .filter_map(|run| std::fs::read_dir(run.path().join("coordinator-state")).ok())
        .flat_map(|strategies| strategies.flatten())
        .filter_map(|strategy| saved_number(&strategy.path().join("current.json")))
        .max()
}

/// The N of the `state-N` a `current.json` points at (the step it was saved at).
pub fn saved_number(current: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(current).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["dir"].as_str()?.strip_prefix("state-")?.parse().ok()
}

/// Block until the coordinator has saved its state at step `step` or later (rounds closed: the
/// run is going).
pub fn until_saved_at_step(dir: &Path, step: u64) {
    wait_until(
        Duration::from_secs(120),
        &format!(
            "the coordinator never saved its state at step {step}\n{}",
            error_logs(dir)
        ),
        || coordinator_saved(dir).is_some_and(|n| n >= step),
    );
}

/// Block until `path` exists (a node writes it once it is up).
pub fn wait_for_file(path: &Path, what: &str) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every site, then the coordinator, must exit successfully within `limit`.
pub fn all_finish(dir: &Path, sites: &mut [Guard], coordinator: &mut Guard, limit: Duration) {
    for (k, site) in sites.iter_mut().enumerate() {
        assert!(
            wait(site, limit).success(),
            "site {k} failed\n{}",
            error_logs(dir)
        );
    }
    assert!(
        wait(coordinator, limit).success(),
        "the coordinator failed\n{}",
        error_logs(dir)
    );
}

pub fn start_site(dir: &Path, k: usize, address: &str, extra: &[&str]) -> Guard {
    let key = format!("site{k}.key");
    let mut args = vec![
        "site",
        "--config",
        "cluster.toml",
        "--key",
        key.as_str(),
        "--join",
        address,
    ];
    args.extend_from_slice(extra);
    Guard(
        lowband(dir)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(error_log(dir, &format!("site{k}")))
            .spawn()
            .unwrap(),
    )
}

/// A node's stderr, appended to `NAME.err` in the test directory (shown when it fails).
pub fn error_log(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.err")))
        .unwrap()
}

/// What the nodes of a test wrote to stderr.
pub fn error_logs(dir: &Path) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "err"))
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| {
            format!(
                "--- {}:\n{}",
                p.file_name().unwrap().to_string_lossy(),
                std::fs::read_to_string(p).unwrap_or_default()
            )
        })
        .collect()
}

/// Block until the site prints that it is connected; returns what it printed until then.
pub fn until_connected(site: &mut Guard) -> Vec<String> {
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(site.0.stdout.take().unwrap()));
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("a site never connected").unwrap();
        seen.push(line);
        if seen.last().unwrap().contains("connected") {
            break;
        }
    }
    // Keep draining so that a full pipe never blocks the site.
    std::thread::spawn(move || for _ in lines {});
    seen
}
