//! A cluster of real processes on loopback: `lowband coordinator` and two `lowband site`s, keys
//! from `lowband keygen`; the result is the in-memory `compare`'s, and strangers are refused.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn lowband(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lowband"));
    command.current_dir(dir).env("RAYON_NUM_THREADS", "1");
    command
}

fn keygen(dir: &Path, name: &str) -> String {
    let o = lowband(dir).args(["keygen", "--out", name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().strip_prefix("public ").unwrap().to_string()
}

/// Kill the child if the test fails before it ends.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn wait(child: &mut Guard, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < limit, "a node did not finish in {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Write a cluster file for `sites` and start its coordinator on a free loopback port; returns
/// the running coordinator and its address.
fn start_coordinator(dir: &Path, coordinator: &str, sites: &[String], cluster: &str, extra: &[&str]) -> (Guard, String) {
    let keys: Vec<String> = sites.iter().map(|k| format!("\"{k}\"")).collect();
    std::fs::write(dir.join("cluster.toml"), format!("coordinator = \"{coordinator}\"\nsites = [{}]\n{cluster}", keys.join(", "))).unwrap();
    let mut args = vec!["coordinator", "--config", "cluster.toml", "--key", "coordinator.key", "--listen", "127.0.0.1:0", "--address-file", "address", "--json", "out.json"];
    args.extend_from_slice(extra);
    // Output is not read: a full pipe must not block the node.
    let process = Guard(lowband(dir).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let started = Instant::now();
    while !dir.join("address").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "the coordinator never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    (process, std::fs::read_to_string(dir.join("address")).unwrap())
}

#[test]
fn a_coordinator_and_two_site_processes_train_the_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites = vec![keygen(dir.path(), "site0.key"), keygen(dir.path(), "site1.key")];
    let _stranger = keygen(dir.path(), "stranger.key");
    let cluster = "strategy = \"diloco@4\"\ncorpus_bytes = 60000\n[run]\npreset = \"tiny\"\nsteps = 24\ninner_steps = 4\nsite_batch = 2\neval_every_steps = 0\n";
    let (mut coordinator_process, address) = start_coordinator(dir.path(), &coordinator, &sites, cluster, &["--name", "net"]);
    // A key the cluster does not list cannot take part.
    let o = lowband(dir.path()).args(["site", "--config", "cluster.toml", "--key", "stranger.key", "--join", &address]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not one of the cluster's sites"));
    let mut site_processes: Vec<Guard> = (0..2)
        .map(|k| Guard(lowband(dir.path()).args(["site", "--config", "cluster.toml", "--key", &format!("site{k}.key"), "--join", &address]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()))
        .collect();
    for site in &mut site_processes {
        assert!(wait(site, Duration::from_secs(120)).success(), "a site failed");
    }
    assert!(wait(&mut coordinator_process, Duration::from_secs(120)).success(), "the coordinator failed");
    let networked: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    // The same run in memory.
    let o = lowband(dir.path())
        .args(["compare", "--preset", "tiny", "--steps", "24", "--inner-steps", "4", "--site-batch", "2", "--sites", "2", "--corpus-bytes", "60000", "--strategies", "diloco@4", "--json", "memory.json", "--name", "memory"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let memory: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("memory.json")).unwrap()).unwrap();
    assert_eq!(networked["strategies"][0]["final_val_loss"], memory["strategies"][0]["final_val_loss"], "bitwise the same model");
    let packets = 2 * 6 + 2 * 6; // 6 rounds: 2 broadcasts and 2 updates each
    let extra = networked["strategies"][0]["inter_site_bytes"].as_u64().unwrap() - memory["strategies"][0]["inter_site_bytes"].as_u64().unwrap();
    assert_eq!(extra, 64 * packets, "each packet carries its 64-byte signature");
}

#[test]
fn a_site_killed_mid_run_is_dropped_and_the_run_finishes_with_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites: Vec<String> = (0..3).map(|k| keygen(dir.path(), &format!("site{k}.key"))).collect();
    let cluster = "strategy = \"diloco@10\"\ncorpus_bytes = 200000\n[run]\npreset = \"tiny\"\nsteps = 600\ninner_steps = 10\nsite_batch = 4\neval_every_steps = 0\n";
    let (mut coordinator_process, address) = start_coordinator(dir.path(), &coordinator, &sites, cluster, &["--idle-timeout-ms", "1500"]);
    let mut site_processes: Vec<Guard> = (0..3)
        .map(|k| Guard(lowband(dir.path()).args(["site", "--config", "cluster.toml", "--key", &format!("site{k}.key"), "--join", &address, "--idle-timeout-ms", "1500"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap()))
        .collect();
    // kill -9 site 1 once it has joined and the run is going.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(site_processes[1].0.stdout.take().unwrap()));
    assert!(lines.any(|l| l.unwrap().contains("connected")), "site 1 never connected");
    std::thread::sleep(Duration::from_millis(300));
    site_processes[1].0.kill().unwrap();
    for k in [0, 2] {
        assert!(wait(&mut site_processes[k], Duration::from_secs(120)).success(), "site {k} failed");
    }
    assert!(wait(&mut coordinator_process, Duration::from_secs(120)).success(), "the coordinator failed");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    let strategy = &summary["strategies"][0];
    assert_eq!(strategy["rounds"], 60, "every round ran");
    let scores = strategy["site_scores"].as_array().unwrap();
    let accepted = |k: usize| scores.iter().find(|s| s["site"] == k).map_or(0, |s| s["accepted"].as_u64().unwrap());
    assert_eq!((accepted(0), accepted(2)), (60, 60));
    assert!(accepted(1) < 60, "the killed site stopped contributing");
    // The model trained: far below the uniform-byte loss ln 256 = 5.55.
    assert!(strategy["final_val_loss"].as_f64().unwrap() < 4.0, "{strategy}");
}
