//! Careless and hostile use of the node processes (issue 17): what lowband deletes, who gets
//! into a run, and what a coordinator does when every site is gone. Loopback only.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A tiny 2-site run (seconds).
const CLUSTER: &str = "strategies = [\"diloco@4\"]\ncorpus_bytes = 60000\npreset = \"tiny\"\nsteps = 24\ninner_steps = 4\nsite_batch = 2\neval_every_steps = 0\n";

fn keys(dir: &Path) -> (String, Vec<String>) {
    let coordinator = keygen(dir, "coordinator.key");
    let sites = vec![keygen(dir, "site0.key"), keygen(dir, "site1.key")];
    (coordinator, sites)
}

fn cluster_file(dir: &Path, name: &str, coordinator: &str, sites: &[String], body: &str) {
    let keys: Vec<String> = sites.iter().map(|k| format!("\"{k}\"")).collect();
    std::fs::write(
        dir.join(name),
        format!(
            "{body}\n[cluster]\ncoordinator = \"{coordinator}\"\nsites = [{}]\n",
            keys.join(", ")
        ),
    )
    .unwrap();
}

fn stderr_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
}

#[test]
fn a_site_state_dir_keeps_every_file_lowband_did_not_make() {
    // `site --state-dir DIR` without --resume used to remove DIR and everything in it, the key
    // the site was started with included; `--state-dir .` took the working directory.
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, sites) = keys(dir.path());
    cluster_file(dir.path(), "cluster.toml", &coordinator, &sites, CLUSTER);
    std::fs::create_dir_all(dir.path().join("mine/sub")).unwrap();
    std::fs::write(dir.path().join("mine/notes.txt"), "keep me").unwrap();
    std::fs::write(dir.path().join("mine/sub/more.txt"), "and me").unwrap();
    std::fs::copy(
        dir.path().join("site0.key"),
        dir.path().join("mine/site0.key"),
    )
    .unwrap();
    for state_dir in ["mine", "."] {
        // Nobody listens on this port: the site gives up after its reconnect budget.
        let o = lowband(dir.path())
            .args([
                "site",
                "--config",
                "cluster.toml",
                "--key",
                "mine/site0.key",
            ])
            .args([
                "--join",
                "127.0.0.1:9",
                "--reconnect-ms",
                "300",
                "--state-dir",
                state_dir,
            ])
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "the run failed (no coordinator): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        for kept in [
            "mine/notes.txt",
            "mine/sub/more.txt",
            "mine/site0.key",
            "cluster.toml",
            "site1.key",
        ] {
            assert!(
                dir.path().join(kept).exists(),
                "--state-dir {state_dir} removed {kept}"
            );
        }
    }
}

#[test]
fn a_site_with_other_run_settings_or_an_unlisted_key_is_refused_by_name_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, sites) = keys(dir.path());
    let (mut coordinator_process, address) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        CLUSTER,
        &[
            "--quorum",
            "1",
            "--join-timeout-ms",
            "4000",
            "--name",
            "run",
        ],
    );
    // Site 1's file differs in H, the seed and the corpus size: it must never be merged.
    let other = CLUSTER
        .replace("diloco@4", "diloco@2")
        .replace("corpus_bytes = 60000", "corpus_bytes = 70000")
        .replace("corpus_bytes = 70000", "corpus_bytes = 70000\nseed = 7");
    cluster_file(dir.path(), "other.toml", &coordinator, &sites, &other);
    // A stranger whose own file lists it, but the coordinator's does not.
    let stranger = keygen(dir.path(), "stranger.key");
    cluster_file(
        dir.path(),
        "stranger.toml",
        &coordinator,
        &[stranger],
        CLUSTER,
    );

    let mut honest = start_site(dir.path(), 0, &address, &[]);
    let started = Instant::now();
    let mismatched = lowband(dir.path())
        .args([
            "site",
            "--config",
            "other.toml",
            "--key",
            "site1.key",
            "--join",
            &address,
        ])
        .output()
        .unwrap();
    let unlisted = lowband(dir.path())
        .args([
            "site",
            "--config",
            "stranger.toml",
            "--key",
            "stranger.key",
            "--join",
            &address,
        ])
        .args(["--reconnect-ms", "60000"])
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refusals are final, not retried"
    );
    let error = String::from_utf8_lossy(&mismatched.stderr);
    assert_eq!(mismatched.status.code(), Some(3), "refused input: {error}");
    for field in [
        "strategy (coordinator diloco@4, site diloco@2)",
        "run.seed (coordinator 0, site 7)",
        "corpus (coordinator",
    ] {
        assert!(
            error.contains(field),
            "the site's error names {field:?}: {error}"
        );
    }
    let error = String::from_utf8_lossy(&unlisted.stderr);
    assert_eq!(unlisted.status.code(), Some(3), "refused input: {error}");
    assert!(error.contains("does not list your key"), "{error}");
    let stdout = String::from_utf8_lossy(&unlisted.stdout);
    assert!(
        stdout.matches("connected").count() <= 1,
        "no reconnect loop: {stdout}"
    );

    assert!(
        wait(&mut honest, Duration::from_secs(120)).success(),
        "{}",
        error_logs(dir.path())
    );
    assert!(
        wait(&mut coordinator_process, Duration::from_secs(120)).success(),
        "{}",
        error_logs(dir.path())
    );
    let log = stderr_of(dir.path(), "coordinator");
    assert!(
        log.contains("refused site 1")
            && log.contains("strategy (coordinator diloco@4, site diloco@2)"),
        "{log}"
    );
    assert!(log.lines().count() < 20, "refusals are rate-limited: {log}");
    // The report says the run went on without site 1, and why.
    let report = std::fs::read_to_string(dir.path().join("runs/run/report.md")).unwrap();
    assert!(
        report.contains("site 1: join refused")
            && report.contains("run.seed (coordinator 0, site 7)"),
        "{report}"
    );
}

#[test]
fn a_coordinator_whose_sites_are_all_gone_stops_after_its_join_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, sites) = keys(dir.path());
    let long = CLUSTER.replace("steps = 24", "steps = 100000");
    let (mut coordinator_process, address) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        &long,
        &[
            "--idle-timeout-ms",
            "1000",
            "--join-timeout-ms",
            "3000",
            "--name",
            "run",
        ],
    );
    let mut site_processes: Vec<Guard> = (0..2)
        .map(|k| {
            start_site(
                dir.path(),
                k,
                &address,
                &["--idle-timeout-ms", "1000", "--reconnect-ms", "0"],
            )
        })
        .collect();
    // Both sites die mid-run and never come back.
    until_saved_at_step(dir.path(), 4);
    for site in &mut site_processes {
        site.0.kill().unwrap();
        site.0.wait().unwrap();
    }
    let status = wait(&mut coordinator_process, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "the run failed");
    let log = stderr_of(dir.path(), "coordinator");
    assert!(
        log.contains("every site is gone") && log.contains("none came back within 3 s"),
        "{log}"
    );
}

/// The child processes of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        found.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    found
}

/// The first file named `name` under `dir` (one level of subdirectories deep).
fn find_under(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path().join(name))
        .find(|p| p.exists())
}

#[test]
fn a_cluster_whose_site_process_is_killed_finishes_restarts_it_and_says_so() {
    // `lowband cluster` used to end with "site processes [1] failed" and no summary, report or
    // metrics when one site process died.
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Guard(
        lowband(dir.path())
            .args([
                "cluster",
                "--sites",
                "3",
                "--preset",
                "tiny",
                "--steps",
                "1500",
                "--inner-steps",
                "10",
            ])
            .args([
                "--site-batch",
                "2",
                "--corpus-bytes",
                "60000",
                "--strategies",
                "diloco@10",
            ])
            .args(["--restart-sites", "--name", "c", "--json", "out.json"])
            .stdout(error_log(dir.path(), "cluster-out"))
            .stderr(error_log(dir.path(), "cluster"))
            .spawn()
            .unwrap(),
    );
    let nodes = dir.path().join("runs/c/nodes");
    let started = Instant::now();
    // Once site 1 has saved its state after a round, kill -9 its process.
    let saved = loop {
        if let Some(path) = std::fs::read_dir(&nodes)
            .ok()
            .and_then(|_| find_under(&nodes, "site1-state/current.json"))
        {
            break path;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "site 1 never saved its state\n{}",
            error_logs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(saved.exists());
    let victim = children_of(cluster.0.id())
        .into_iter()
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("/site1.key")
        })
        .expect("site 1's process");
    assert!(std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap()
        .success());
    assert!(
        wait(&mut cluster, Duration::from_secs(180)).success(),
        "{}",
        error_logs(dir.path())
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    assert!(summary["strategies"][0]["final_val_loss"]
        .as_f64()
        .unwrap()
        .is_finite());
    let report = std::fs::read_to_string(dir.path().join("runs/c/report.md")).unwrap();
    assert!(
        report.contains("site 1's process died")
            && report.contains("restarted with its saved state"),
        "the report says what happened:\n{report}"
    );
}

#[test]
fn cluster_files_and_keys_that_cannot_be_right_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, sites) = keys(dir.path());
    let cases = [
        (
            "repeated.toml",
            vec![sites[0].clone(), sites[0].clone()],
            "repeats cluster.sites[0]",
        ),
        (
            "coordinator_as_site.toml",
            vec![sites[0].clone(), coordinator.clone()],
            "is the coordinator's key",
        ),
    ];
    for (file, listed, fragment) in cases {
        cluster_file(dir.path(), file, &coordinator, &listed, CLUSTER);
        for command in [
            vec![
                "coordinator",
                "--config",
                file,
                "--key",
                "coordinator.key",
                "--listen",
                "127.0.0.1:0",
            ],
            vec![
                "site",
                "--config",
                file,
                "--key",
                "site0.key",
                "--join",
                "127.0.0.1:9",
            ],
        ] {
            let o = lowband(dir.path()).args(&command).output().unwrap();
            let error = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(3), "{command:?}: {error}");
            assert!(error.contains(fragment), "{command:?}: {error}");
        }
    }
    // A cluster file in the old format (before compare --config and cluster files were one
    // format) is refused with what changed.
    std::fs::write(
        dir.path().join("old.toml"),
        format!("strategy = \"diloco@4\"\ncoordinator = \"{coordinator}\"\nsites = [\"{}\"]\n[run]\nsteps = 4\n", sites[0]),
    )
    .unwrap();
    site_refused(
        dir.path(),
        "old.toml",
        "site0.key",
        "old cluster file format",
    );
    // A key file that is a device is read no further than a key's size.
    cluster_file(dir.path(), "cluster.toml", &coordinator, &sites, CLUSTER);
    site_refused(dir.path(), "cluster.toml", "/dev/zero", "is not a key file");
}

/// `lowband site` with this cluster file and key is refused before it runs: exit 3, the error
/// naming `fragment`.
fn site_refused(dir: &Path, cluster: &str, key: &str, fragment: &str) {
    let o = lowband(dir)
        .args([
            "site",
            "--config",
            cluster,
            "--key",
            key,
            "--join",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{error}");
    assert!(error.contains(fragment), "{error}");
}

#[test]
fn eval_of_a_checkpoint_whose_weights_overflow_is_an_error_not_a_nan() {
    let dir = tempfile::tempdir().unwrap();
    let o = lowband(dir.path())
        .args(["init", "--preset", "tiny", "--out", "model"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Finite weights far too large for a forward pass in f32.
    let checkpoint = lowband_engine::checkpoint::load(&dir.path().join("model")).unwrap();
    let huge: Vec<f32> = checkpoint.params.iter().map(|p| p * 1e15).collect();
    assert!(huge.iter().all(|p| p.is_finite()));
    lowband_engine::checkpoint::save(
        &dir.path().join("model"),
        &checkpoint.config,
        &huge,
        None,
        serde_json::Value::Null,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("text.txt"),
        "some text to evaluate on, long enough for a window. ".repeat(40),
    )
    .unwrap();
    let o = lowband(dir.path())
        .args(["eval", "--checkpoint", "model", "--data", "text.txt"])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{error} / {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(error.contains("overflow"), "{error}");
}

#[test]
fn killing_a_cluster_ends_its_site_processes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Guard(
        lowband(dir.path())
            .args([
                "cluster",
                "--sites",
                "2",
                "--preset",
                "tiny",
                "--steps",
                "100000",
                "--inner-steps",
                "10",
            ])
            .args([
                "--site-batch",
                "2",
                "--corpus-bytes",
                "60000",
                "--strategies",
                "diloco@10",
                "--name",
                "c",
            ])
            .stdout(error_log(dir.path(), "cluster-out"))
            .stderr(error_log(dir.path(), "cluster"))
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let sites = loop {
        let sites = children_of(cluster.0.id());
        if sites.len() == 2 {
            break sites;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the sites never started\n{}",
            error_logs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    cluster.0.kill().unwrap();
    cluster.0.wait().unwrap();
    let started = Instant::now();
    while sites.iter().any(|pid| {
        // (A zombie waiting for init to reap it counts as gone.)
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "site processes outlived their cluster"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_live_process_with_a_sites_key_is_refused_not_swapped_in() {
    // Issue 17: a second process with a key already connected replaced the first silently.
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, sites) = keys(dir.path());
    let long = CLUSTER.replace("steps = 24", "steps = 1600");
    let fast = ["--idle-timeout-ms", "1500"];
    let (mut coordinator_process, address) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        &long,
        &[&fast[..], &["--name", "run"]].concat(),
    );
    let mut site_processes: Vec<Guard> = (0..2)
        .map(|k| start_site(dir.path(), k, &address, &fast))
        .collect();
    for site in &mut site_processes {
        until_connected(site);
    }
    let second = lowband(dir.path())
        .args([
            "site",
            "--config",
            "cluster.toml",
            "--key",
            "site1.key",
            "--join",
            &address,
        ])
        .args(fast)
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(3), "{error}");
    assert!(
        error.contains("another process with this site's key is connected"),
        "{error}"
    );
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut coordinator_process,
        Duration::from_secs(120),
    );
    let report = std::fs::read_to_string(dir.path().join("runs/run/report.md")).unwrap();
    assert!(
        !report.contains("replaced the old one"),
        "the first process kept its place:\n{report}"
    );
}

#[test]
fn a_cluster_whose_site_processes_all_die_stops_at_once_and_says_why() {
    // It used to wait for them until the join timeout (120 s), then said they had not joined;
    // with --restart-sites it restarted them for ever. Every site's state directory is taken by
    // a file, so each site process fails at start (and again when restarted).
    for (strategy, dir_name, restart) in [
        ("diloco@10", "diloco-h10", false),
        ("async-diloco@10", "async-diloco-h10", false),
        ("diloco@10", "diloco-h10", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let nodes = dir.path().join("runs/c/nodes").join(dir_name);
        std::fs::create_dir_all(&nodes).unwrap();
        for k in 0..3 {
            std::fs::write(nodes.join(format!("site{k}-state")), b"not a directory").unwrap();
        }
        let started = Instant::now();
        let mut cluster = Guard(
            lowband(dir.path())
                .args([
                    "cluster", "--sites", "3", "--preset", "tiny", "--steps", "100",
                ])
                .args([
                    "--inner-steps",
                    "10",
                    "--site-batch",
                    "2",
                    "--corpus-bytes",
                    "60000",
                ])
                .args(["--strategies", strategy, "--name", "c"])
                .args(restart.then_some("--restart-sites"))
                .stdout(error_log(dir.path(), "cluster-out"))
                .stderr(error_log(dir.path(), "cluster"))
                .spawn()
                .unwrap(),
        );
        let status = wait(&mut cluster, Duration::from_secs(100));
        assert!(!status.success(), "{strategy}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{strategy}: stopped after {:?}, not at once",
            started.elapsed()
        );
        let stderr = stderr_of(dir.path(), "cluster");
        assert!(
            stderr.contains("every site process died") && stderr.contains("site 2: exit status: "),
            "{strategy}: says why:\n{stderr}"
        );
        let stdout = stderr_of(dir.path(), "cluster-out");
        assert!(
            stdout.contains("no site process was left running"),
            "{strategy}: the events say the run stopped:\n{stdout}"
        );
        if restart {
            assert!(
                stdout.contains("restarted with its saved state")
                    && stdout.contains("not restarted: it died 3 times within 60 s"),
                "restarted, then given up:\n{stdout}"
            );
        }
    }
}
