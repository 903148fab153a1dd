//! A cluster of real processes on loopback: `lowband coordinator` and two `lowband site`s, keys
//! from `lowband keygen`; the result is the in-memory `compare`'s (over loopback and over a
//! lossy shaped WAN), and a site that dies is dropped while the others finish. The faults the
//! run recovers from are `cli_faults.rs` (round strategies) and `cli_streaming_faults.rs`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// The small 2-site run of `SMALL_CLUSTER` in memory: its summary.
fn small_run_in_memory(dir: &Path) -> serde_json::Value {
    let o = lowband(dir)
        .args([
            "compare",
            "--preset",
            "tiny",
            "--steps",
            "24",
            "--inner-steps",
            "4",
            "--site-batch",
            "2",
            "--sites",
            "2",
            "--corpus-bytes",
            "60000",
            "--strategies",
            "diloco@4",
            "--json",
            "memory.json",
            "--name",
            "memory",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&std::fs::read(dir.join("memory.json")).unwrap()).unwrap()
}

const SMALL_CLUSTER: &str = "strategies = [\"diloco@4\"]\ncorpus_bytes = 60000\npreset = \"tiny\"\nsteps = 24\ninner_steps = 4\nsite_batch = 2\neval_every_steps = 0\n";

#[test]
fn a_coordinator_and_two_site_processes_train_the_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites = vec![
        keygen(dir.path(), "site0.key"),
        keygen(dir.path(), "site1.key"),
    ];
    let _stranger = keygen(dir.path(), "stranger.key");
    let (mut coordinator_process, address) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        SMALL_CLUSTER,
        &["--name", "net"],
    );
    // A key the cluster does not list cannot take part.
    let o = lowband(dir.path())
        .args([
            "site",
            "--config",
            "cluster.toml",
            "--key",
            "stranger.key",
            "--join",
            &address,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not one of the cluster's sites"));
    let mut site_processes: Vec<Guard> = (0..2)
        .map(|k| {
            Guard(
                lowband(dir.path())
                    .args([
                        "site",
                        "--config",
                        "cluster.toml",
                        "--key",
                        &format!("site{k}.key"),
                        "--join",
                        &address,
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut coordinator_process,
        Duration::from_secs(120),
    );
    let networked: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    // The same run in memory.
    let memory = small_run_in_memory(dir.path());
    assert_eq!(
        networked["strategies"][0]["final_val_loss"], memory["strategies"][0]["final_val_loss"],
        "bitwise the same model"
    );
    let packets = 2 * 6 + 2 * 6; // 6 rounds: 2 broadcasts and 2 updates each
    let extra = networked["strategies"][0]["inter_site_bytes"]
        .as_u64()
        .unwrap()
        - memory["strategies"][0]["inter_site_bytes"]
            .as_u64()
            .unwrap();
    assert_eq!(
        extra,
        64 * packets,
        "each packet carries its 64-byte signature"
    );
}

#[test]
fn a_site_killed_mid_run_is_dropped_and_the_run_finishes_with_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites: Vec<String> = (0..3)
        .map(|k| keygen(dir.path(), &format!("site{k}.key")))
        .collect();
    let cluster = "strategies = [\"diloco@10\"]\ncorpus_bytes = 200000\npreset = \"tiny\"\nsteps = 600\ninner_steps = 10\nsite_batch = 4\neval_every_steps = 0\n";
    let (mut coordinator_process, address) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        cluster,
        &["--idle-timeout-ms", "1500"],
    );
    let mut site_processes: Vec<Guard> = (0..3)
        .map(|k| {
            Guard(
                lowband(dir.path())
                    .args([
                        "site",
                        "--config",
                        "cluster.toml",
                        "--key",
                        &format!("site{k}.key"),
                        "--join",
                        &address,
                        "--idle-timeout-ms",
                        "1500",
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    // kill -9 site 1 once it has joined and the run is going.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        site_processes[1].0.stdout.take().unwrap(),
    ));
    assert!(
        lines.any(|l| l.unwrap().contains("connected")),
        "site 1 never connected"
    );
    until_saved_at_step(dir.path(), 10);
    site_processes[1].0.kill().unwrap();
    for k in [0, 2] {
        assert!(
            wait(&mut site_processes[k], Duration::from_secs(120)).success(),
            "site {k} failed"
        );
    }
    assert!(
        wait(&mut coordinator_process, Duration::from_secs(120)).success(),
        "the coordinator failed"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    let strategy = &summary["strategies"][0];
    assert_eq!(strategy["rounds"], 60, "every round ran");
    let scores = strategy["site_scores"].as_array().unwrap();
    let accepted = |k: usize| {
        scores
            .iter()
            .find(|s| s["site"] == k)
            .map_or(0, |s| s["accepted"].as_u64().unwrap())
    };
    assert_eq!((accepted(0), accepted(2)), (60, 60));
    assert!(accepted(1) < 60, "the killed site stopped contributing");
    // The model trained: far below the uniform-byte loss ln 256 = 5.55.
    assert!(
        strategy["final_val_loss"].as_f64().unwrap() < 4.0,
        "{strategy}"
    );
}

/// Both sites reach the coordinator through `lowband shape` processes (20 Mbit/s, 15 ± 5 ms one
/// way, 3% loss each way): QUIC recovers every loss, so the model is bitwise the in-memory one.
#[test]
fn over_a_lossy_shaped_wan_the_cluster_trains_the_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites = vec![
        keygen(dir.path(), "site0.key"),
        keygen(dir.path(), "site1.key"),
    ];
    let (mut coordinator_process, address) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        SMALL_CLUSTER,
        &["--name", "net"],
    );
    let mut shapers = Vec::new();
    let mut site_processes = Vec::new();
    for k in 0..2 {
        let file = format!("shaper{k}");
        let seed = k.to_string();
        let args = [
            "shape",
            "--listen",
            "127.0.0.1:0",
            "--to",
            &address,
            "--bandwidth-mbit",
            "20",
            "--latency-ms",
            "15",
            "--jitter-ms",
            "5",
            "--loss",
            "0.03",
            "--seed",
            &seed,
            "--address-file",
            &file,
        ];
        shapers.push(Guard(
            lowband(dir.path())
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        wait_for_file(&dir.path().join(&file), "a shaper never listened");
        let through = std::fs::read_to_string(dir.path().join(&file)).unwrap();
        site_processes.push(start_site(dir.path(), k, &through, &[]));
    }
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut coordinator_process,
        Duration::from_secs(120),
    );
    let networked: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    let memory = small_run_in_memory(dir.path());
    assert_eq!(
        networked["strategies"][0]["final_val_loss"], memory["strategies"][0]["final_val_loss"],
        "bitwise the same model across the shaped links"
    );
}

/// `cluster` runs the strategies on the emulated clock's schedule (async-diloco, a quorum) over
/// `lowband site` processes, with sites of different speeds and an emulated fault schedule: the
/// same models, goodput and refusals as `compare` in memory.
#[test]
fn cluster_runs_scheduled_strategies_across_processes_as_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let run = |command: &str, json: &str| {
        let o = lowband(dir.path())
            .args([
                command,
                "--preset",
                "tiny",
                "--steps",
                "32",
                "--inner-steps",
                "8",
                "--site-batch",
                "2",
                "--corpus-bytes",
                "60000",
                "--site-speeds",
                "1,1,0.7,0.4",
                "--faults",
                "down:1@0.3-0.5,slow:2@0.4=0.5",
                "--site-gflop-per-second",
                "0.1",
                "--strategies",
                "async-diloco,diloco[quorum=3]",
                "--json",
                json,
                "--name",
                command,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(json)).unwrap()).unwrap();
        summary
    };
    let cluster = run("cluster", "cluster.json");
    let memory = run("compare", "memory.json");
    for i in 0..2 {
        let (c, m) = (&cluster["strategies"][i], &memory["strategies"][i]);
        for field in [
            "strategy",
            "final_val_loss",
            "goodput",
            "site_goodput",
            "rounds",
        ] {
            assert_eq!(c[field], m[field], "{}: {field}", m["strategy"]);
        }
        assert!(
            c["telemetry_bytes"].as_u64().unwrap() > 0,
            "{}",
            m["strategy"]
        );
    }
}

/// The scheduled run of the resume tests: 3 sites of different speeds, one down for a while,
/// saved every 2 rounds.
const SCHEDULED_RUN: &str = "strategies = [\"async-diloco@8\"]\ncorpus_bytes = 60000\npreset = \"tiny\"\nsites = 3\nsteps = 600\ninner_steps = 8\nsite_batch = 2\neval_every_steps = 0\ncheckpoint_every_rounds = 2\nsite_speeds = [1.0, 0.7, 0.4]\nsite_gflop_per_second = 0.1\nfaults = [\"down:1@0.3-0.4\"]\n";

/// A resumed run's summary is the uninterrupted run's in memory, bitwise; every site restored
/// its save.
fn assert_resumed_as_in_memory(dir: &Path, resumed: &serde_json::Value) {
    for k in 0..3 {
        assert!(
            log_has(dir, &format!("site{k}"), "resumed from its save of round"),
            "site {k} did not restore its save\n{}",
            error_logs(dir)
        );
    }
    std::fs::write(dir.join("run.toml"), SCHEDULED_RUN).unwrap();
    let o = lowband(dir)
        .args(["compare", "--config", "run.toml", "--json", "memory.json"])
        .args(["--name", "memory"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let memory: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("memory.json")).unwrap()).unwrap();
    let memory = &memory["strategies"][0];
    for field in [
        "strategy",
        "final_val_loss",
        "goodput",
        "site_goodput",
        "rounds",
    ] {
        assert_eq!(resumed[field], memory[field], "{field}");
    }
    // Every step's loss too (the ones before the save come from the saved state, the first ones
    // after it average the saved latest loss of the sites that have not stepped again yet).
    let steps = |run: &str| -> Vec<(u64, f64)> {
        let text = std::fs::read_to_string(dir.join(format!("runs/{run}/metrics.jsonl"))).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|m| m["kind"] == "step")
            .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
            .collect()
    };
    let (network, in_memory) = (steps("cluster"), steps("memory"));
    assert_eq!(network.len(), in_memory.len());
    assert_eq!(network, in_memory, "the per-step losses");
}

/// A scheduled run over site processes whose coordinator is killed (`kill -9`) mid-run and
/// started again with `--resume` goes on from its last save (every site, still running,
/// reconnects and restores its own save of that moment when cued) and ends bitwise as the same
/// run uninterrupted in memory: the same final loss, goodput and rounds.
#[test]
fn a_scheduled_run_whose_coordinator_is_killed_resumes_and_ends_as_in_memory() {
    let (dir, resumed) = common::faults::kill_and_resume_the_coordinator(
        SCHEDULED_RUN,
        "async-diloco-h8",
        "-KILL",
        &["--state-dir", "site{k}-state"],
    );
    assert_resumed_as_in_memory(dir.path(), &resumed);
}

/// The same with Ctrl-C: the interrupted coordinator tells the sites it stopped, they wait for
/// it to come back, and the resumed run ends bitwise as in memory.
#[test]
fn a_scheduled_run_whose_coordinator_is_interrupted_resumes_and_ends_as_in_memory() {
    let (dir, resumed) = common::faults::kill_and_resume_the_coordinator(
        SCHEDULED_RUN,
        "async-diloco-h8",
        "-INT",
        &["--state-dir", "site{k}-state"],
    );
    assert_resumed_as_in_memory(dir.path(), &resumed);
}

/// A site process killed mid-run stops a scheduled run (it needs every site); the coordinator
/// and that site started again with `--resume` go on from the last save, bitwise as in memory.
#[test]
fn a_scheduled_run_stopped_by_a_dead_site_resumes_and_ends_as_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let listen = fixed_loopback_address();
    let coordinator_flags = ["--idle-timeout-ms", "1500", "--listen", listen.as_str()];
    let site_flags = [
        "--idle-timeout-ms",
        "1500",
        "--reconnect-ms",
        "60000",
        "--state-dir",
        "site{k}-state",
    ];
    let (mut first, mut sites) =
        common::faults::start_cluster(dir.path(), SCHEDULED_RUN, &coordinator_flags, &site_flags);
    let saved = dir
        .path()
        .join("runs/cluster/coordinator-state/async-diloco-h8/current.json");
    wait_until(Duration::from_secs(60), "no save", || saved.exists());
    sites[1].0.kill().unwrap();
    let _ = sites[1].0.wait();
    // The coordinator stops (a scheduled run needs every site) and says why.
    assert_eq!(wait(&mut first, Duration::from_secs(30)).code(), Some(1));
    assert!(
        log_has(dir.path(), "coordinator", "connection ended mid-run"),
        "{}",
        error_logs(dir.path())
    );
    assert!(!dir.path().join("out.json").exists(), "stopped mid-run");
    std::fs::remove_file(dir.path().join("address")).unwrap();
    let mut resumed_flags = coordinator_flags.to_vec();
    resumed_flags.push("--resume");
    let (mut second, address) = launch_coordinator(dir.path(), &resumed_flags);
    let own: Vec<String> = (site_flags.iter())
        .map(|f| f.replace("{k}", "1"))
        .chain(["--resume".to_string()])
        .collect();
    sites[1] = start_site(
        dir.path(),
        1,
        &address,
        &own.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
    );
    all_finish(
        dir.path(),
        &mut sites,
        &mut second,
        Duration::from_secs(180),
    );
    assert_resumed_as_in_memory(dir.path(), &common::faults::summary(dir.path()));
}
