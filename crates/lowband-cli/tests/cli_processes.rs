//! A cluster of real processes on loopback: `lowband coordinator` and two `lowband site`s, keys
//! from `lowband keygen`; the result is the in-memory `compare`'s, and strangers are refused.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The run every fault test uses: 3 sites, 1,000 steps, 100 rounds of the tiny model, with an
/// outer step of 0.5 and an inner peak rate of 1e-3. The reference's 0.7 and 3e-3 make this tiny
/// run erratic (a loss spike to 8.9 at step 200 under one seed, a plateau until step 400 under
/// another: final losses 2.05-2.42 over seeds 0-7), which would hide what a fault does; these
/// settings end within 2.14-2.19 over seeds 0-5 with smooth curves.
const LONG_RUN: &str = "preset = \"tiny\"\nsteps = 1000\ninner_steps = 10\nsite_batch = 4\neval_every_steps = 0\nlr_outer = 0.5\n";
const LONG_OPTIMIZER: &str = "lr = 1e-3\n";
fn long_cluster() -> String {
    format!("strategies = [\"diloco@10\"]\ncorpus_bytes = 200000\n{LONG_RUN}[optimizer]\n{LONG_OPTIMIZER}")
}

fn signal(child: &Guard, name: &str) {
    assert!(Command::new("kill")
        .args([name, &child.0.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// The fault-free band: the final validation loss of the same run in memory under seeds 0-4
/// (computed once per test binary). On this run the seed alone moves it by about ±1.2%
/// (2.14-2.19 nats/byte), and a fault that redoes a round with other data should move it no more
/// than another seed would; a stalled run stays near the unigram plateau (2.88 nats/byte) and a
/// diverged one lands far outside (the uniform-byte loss is 5.55).
fn fault_free_band() -> (f64, f64) {
    static BAND: std::sync::OnceLock<(f64, f64)> = std::sync::OnceLock::new();
    *BAND.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let losses: Vec<f64> = (0..5)
            .map(|seed| {
                let json = format!("memory{seed}.json");
                std::fs::write(dir.path().join("run.toml"), format!("strategies = [\"diloco@10\"]\nsites = 3\n{LONG_RUN}[optimizer]\n{LONG_OPTIMIZER}")).unwrap();
                let o = lowband(dir.path())
                    .args(["compare", "--config", "run.toml", "--corpus-bytes", "200000"])
                    .args(["--seed", &seed.to_string(), "--json", &json, "--name", &format!("memory{seed}")])
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let memory: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(&json)).unwrap()).unwrap();
                memory["strategies"][0]["final_val_loss"].as_f64().unwrap()
            })
            .collect();
        (losses.iter().cloned().fold(f64::INFINITY, f64::min), losses.iter().cloned().fold(0.0, f64::max))
    })
}

/// A faulty run ends as close to the fault-free one as another seed would: inside the band,
/// widened by 3%.
fn assert_close_to_fault_free(loss: f64) {
    let (low, high) = fault_free_band();
    eprintln!("final validation loss {loss}; fault-free runs {low}..{high}");
    assert!(
        loss >= low * (1.0 - TOLERANCE) && loss <= high * (1.0 + TOLERANCE),
        "{loss} outside the fault-free band {low}..{high} (± {TOLERANCE})"
    );
}

fn summary(dir: &Path) -> serde_json::Value {
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out.json")).unwrap()).unwrap();
    summary["strategies"][0].clone()
}

fn accepted(strategy: &serde_json::Value, site: usize) -> u64 {
    strategy["site_scores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == site)
        .map_or(0, |s| s["accepted"].as_u64().unwrap())
}

/// Metrics of the run in `runs/cluster/metrics.jsonl` of one kind.
fn metrics(dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("runs/cluster/metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["kind"] == kind)
        .collect()
}

/// `site` joined again after round 0 and its update is in the run's last round.
fn assert_rejoined_and_contributes(dir: &Path, site: u64) {
    let joined: Vec<u64> = metrics(dir, "joined")
        .iter()
        .filter(|m| m["site"] == site)
        .map(|m| m["round"].as_u64().unwrap())
        .collect();
    assert!(
        joined.iter().any(|r| *r > 0),
        "site {site} rejoined mid-run: joined at rounds {joined:?}"
    );
    let rounds = metrics(dir, "round");
    let last = rounds.last().unwrap();
    assert!(
        last["update_norms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n[0] == site),
        "site {site} contributes again: {last}"
    );
}

/// A 1,000-step run of 3 sites over 100 rounds on the tiny model; a faulty run must end inside
/// the fault-free band (`fault_free_band`) widened by this fraction.
const TOLERANCE: f64 = 0.03;

#[test]
fn a_site_killed_mid_run_restarts_rejoins_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites: Vec<String> = (0..3)
        .map(|k| keygen(dir.path(), &format!("site{k}.key")))
        .collect();
    let (mut coordinator_process, address) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        &long_cluster(),
        &["--idle-timeout-ms", "1500"],
    );
    // Site 1 saves its own state (optimizer moments, data position) after every update.
    let mut site_processes: Vec<Guard> = (0..3)
        .map(|k| {
            start_site(
                dir.path(),
                k,
                &address,
                &[
                    "--idle-timeout-ms",
                    "1500",
                    "--state-dir",
                    &format!("site{k}-state"),
                ],
            )
        })
        .collect();
    until_connected(&mut site_processes[1]);
    // Restarted with the same key and its saved state: it gets the current parameters from the
    // coordinator and trains from there with its own optimizer state.
    kill_and_resume_site_1(dir.path(), &mut site_processes, &address, 1);
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut coordinator_process,
        Duration::from_secs(180),
    );
    let strategy = summary(dir.path());
    assert_eq!(strategy["rounds"], 100, "every round ran");
    assert_eq!((accepted(&strategy, 0), accepted(&strategy, 2)), (100, 100));
    assert!(
        accepted(&strategy, 1) < 100,
        "site 1 missed the rounds it was down"
    );
    assert_rejoined_and_contributes(dir.path(), 1);
    let loss = strategy["final_val_loss"].as_f64().unwrap();
    assert_close_to_fault_free(loss);
}

/// Once site 1 (run with `--state-dir site1-state`) has saved its state `saves` times: `kill -9`
/// it, and once the coordinator has dropped it (its 1.5 s idle timeout) start it again with
/// `--resume`; it must say it resumed from its saved state.
fn kill_and_resume_site_1(dir: &Path, site_processes: &mut [Guard], address: &str, saves: u64) {
    let current = dir.join("site1-state/current.json");
    wait_for_file(&current, "site 1 saved no state");
    let first = saved_number(&current).unwrap_or(0);
    wait_until(Duration::from_secs(60), "site 1 stopped saving", || {
        saved_number(&current).is_some_and(|n| n >= first + saves - 1)
    });
    site_processes[1].0.kill().unwrap();
    let _ = site_processes[1].0.wait();
    wait_until(
        Duration::from_secs(30),
        "the coordinator never dropped the killed site 1",
        || log_has(dir, "coordinator", "site 1 left"),
    );
    site_processes[1] = start_site(
        dir,
        1,
        address,
        &[
            "--idle-timeout-ms",
            "1500",
            "--state-dir",
            "site1-state",
            "--resume",
        ],
    );
    until_connected(&mut site_processes[1]);
    // (The runtime's messages go to stderr through `tracing`.)
    let logged = std::fs::read_to_string(dir.join("site1.err")).unwrap_or_default();
    assert!(
        logged.contains("resuming from its saved state after round"),
        "{logged}"
    );
}

/// Run `cluster` (3 sites), `kill -9` the coordinator once it has checkpointed a few rounds of
/// `strategy_dir`, start it again with `--resume` on the same port; every process must finish.
/// Returns the test directory and the run's summary.
/// `signal`: `-KILL` (a crash) or `-INT` (Ctrl-C: the coordinator tells the sites it stopped,
/// and they keep trying to reconnect).
fn kill_and_resume_the_coordinator(
    cluster: &str,
    strategy_dir: &str,
    signal_name: &str,
) -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites: Vec<String> = (0..3)
        .map(|k| keygen(dir.path(), &format!("site{k}.key")))
        .collect();
    // A fixed port, so that the sites find the restarted coordinator where they left it.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let flags = ["--idle-timeout-ms", "1500", "--listen", listen.as_str()];
    let (mut first, address) = start_coordinator(dir.path(), &coordinator, &sites, cluster, &flags);
    let mut site_processes: Vec<Guard> = (0..3)
        .map(|k| {
            start_site(
                dir.path(),
                k,
                &address,
                &["--idle-timeout-ms", "1500", "--reconnect-ms", "60000"],
            )
        })
        .collect();
    for site in &mut site_processes {
        until_connected(site);
    }
    // kill -9 once a few rounds are checkpointed.
    let state = dir.path().join(format!(
        "runs/cluster/coordinator-state/{strategy_dir}/current.json"
    ));
    let started = Instant::now();
    while !state.exists()
        || std::fs::read_to_string(&state)
            .unwrap()
            .contains("\"state-10\"")
    {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&first, signal_name);
    let status = wait(&mut first, Duration::from_secs(30));
    if signal_name == "-INT" {
        assert_eq!(status.code(), Some(1), "{}", error_logs(dir.path()));
        assert!(error_logs(dir.path()).contains("interrupted (Ctrl-C)"));
        // Told at once, the sites wait for it to come back rather than ending.
        wait_until(
            Duration::from_secs(10),
            "the sites were not told the coordinator stopped",
            || (0..3).all(|k| log_has(dir.path(), &format!("site{k}"), "lost the coordinator")),
        );
        for site in &mut site_processes {
            assert!(
                site.0.try_wait().unwrap().is_none(),
                "a site gave up on a stopped coordinator"
            );
        }
    }
    assert!(
        !dir.path().join("out.json").exists(),
        "killed mid-run, not after the end"
    );
    std::fs::remove_file(dir.path().join("address")).unwrap();
    let mut resumed_flags = flags.to_vec();
    resumed_flags.push("--resume");
    let (mut second, _) =
        start_coordinator(dir.path(), &coordinator, &sites, cluster, &resumed_flags);
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut second,
        Duration::from_secs(180),
    );
    let strategy = summary(dir.path());
    (dir, strategy)
}

#[test]
fn a_coordinator_killed_mid_run_resumes_from_its_checkpoint_and_the_sites_reconnect() {
    let (_dir, strategy) = kill_and_resume_the_coordinator(&long_cluster(), "diloco-h10", "-KILL");
    assert_eq!(
        strategy["rounds"], 100,
        "every round ran once in the report"
    );
    let loss = strategy["final_val_loss"].as_f64().unwrap();
    assert_close_to_fault_free(loss);
}

#[test]
fn a_coordinator_interrupted_with_ctrl_c_tells_the_sites_and_resumes() {
    // Issue 17: a coordinator that stopped did not close its connections; the sites learned it
    // only after their idle timeout plus their reconnect budget.
    let (_dir, strategy) = kill_and_resume_the_coordinator(&long_cluster(), "diloco-h10", "-INT");
    assert_eq!(
        strategy["rounds"], 100,
        "every round ran once in the report"
    );
    assert_close_to_fault_free(strategy["final_val_loss"].as_f64().unwrap());
}

#[test]
fn a_hung_site_does_not_stall_the_rounds_and_rejoins_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites: Vec<String> = (0..3)
        .map(|k| keygen(dir.path(), &format!("site{k}.key")))
        .collect();
    // A long idle timeout: the frozen site stays connected, so only the deadline can help.
    let flags = [
        "--idle-timeout-ms",
        "30000",
        "--quorum",
        "2",
        "--round-deadline-ms",
        "500",
    ];
    let (mut coordinator_process, address) =
        start_coordinator(dir.path(), &coordinator, &sites, &long_cluster(), &flags);
    let mut site_processes: Vec<Guard> = (0..3)
        .map(|k| start_site(dir.path(), k, &address, &["--idle-timeout-ms", "30000"]))
        .collect();
    for site in &mut site_processes {
        until_connected(site);
    }
    until_saved_at_step(dir.path(), 10);
    signal(&site_processes[2], "-STOP");
    // Frozen while 8 rounds close without it (the coordinator's checkpoints tell which step it is
    // at): its unread queue passes 4 copies of the parameters. Woken then, with most of the run
    // still to go (once it is asked to rejoin the other two run at full speed, and a fixed
    // freeze could outlast the whole run).
    let frozen_at = checkpointed_step(dir.path(), "diloco-h10");
    let started = Instant::now();
    while checkpointed_step(dir.path(), "diloco-h10") < frozen_at + 80 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "rounds stalled behind the frozen site"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&site_processes[2], "-CONT");
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut coordinator_process,
        Duration::from_secs(180),
    );
    let strategy = summary(dir.path());
    assert_eq!(strategy["rounds"], 100, "every round ran");
    let missed: Vec<u64> = metrics(dir.path(), "missed")
        .iter()
        .filter(|m| m["site"] == 2)
        .map(|m| m["round"].as_u64().unwrap())
        .collect();
    // A coordinator that waited on its send to the frozen site would have closed at most one or
    // two rounds (and the loop above would have timed out).
    assert!(
        missed.len() >= 4,
        "the rounds went on while site 2 was frozen: missed {missed:?}"
    );
    // What it could not read piled up past the budget (4 copies of the parameters, so from the
    // fifth round it missed): it was asked to rejoin, and did.
    let left = metrics(dir.path(), "left");
    assert!(
        left.iter()
            .any(|m| m["site"] == 2 && m["reason"].as_str().unwrap().contains("asked to rejoin")),
        "{left:?}"
    );
    let site2: Vec<_> = ["left", "joined", "missed"]
        .iter()
        .flat_map(|kind| metrics(dir.path(), kind))
        .filter(|m| m["site"] == 2)
        .collect();
    assert!(
        metrics(dir.path(), "joined").iter().any(|m| m["site"] == 2),
        "site 2 rejoined: {site2:?}\n{}",
        error_logs(dir.path())
    );
    let last_missed = *missed.last().unwrap();
    let rounds = metrics(dir.path(), "round");
    assert!(
        rounds
            .iter()
            .any(|r| r["round"].as_u64().unwrap() > last_missed
                && r["update_norms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n[0] == 2)),
        "site 2 took part again after it woke"
    );
    let loss = strategy["final_val_loss"].as_f64().unwrap();
    assert_close_to_fault_free(loss);
}

/// A network namespace with a veth pair to the host, removed on drop. Needs root and `ip`.
struct Namespace {
    name: String,
    host_side: String,
}

impl Namespace {
    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `10.<a>.<b>.1` on the host side, `.2` inside; None when namespaces are not available.
    fn create(tag: u32) -> Option<(Namespace, String, String)> {
        let (name, host_side, inside) = (
            format!("lowband-t{tag}"),
            format!("lbh{tag}"),
            format!("lbn{tag}"),
        );
        let (a, b) = (200 + (tag % 50), (tag / 50) % 250);
        let (host_ip, site_ip) = (format!("10.{a}.{b}.1"), format!("10.{a}.{b}.2"));
        if !Namespace::ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Namespace {
            name: name.clone(),
            host_side: host_side.clone(),
        };
        let ok = Namespace::ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &inside,
        ]) && Namespace::ip(&["link", "set", &inside, "netns", &name])
            && Namespace::ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_side])
            && Namespace::ip(&["link", "set", &host_side, "up"])
            && Namespace::ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{site_ip}/24"),
                "dev",
                &inside,
            ])
            && Namespace::ip(&["-n", &name, "link", "set", &inside, "up"])
            && Namespace::ip(&["-n", &name, "link", "set", "lo", "up"]);
        ok.then_some((ns, host_ip, site_ip))
    }

    fn link(&self, up: bool) {
        assert!(
            Namespace::ip(&[
                "link",
                "set",
                &self.host_side,
                if up { "up" } else { "down" }
            ]),
            "ip link set {} failed",
            self.host_side
        );
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        Namespace::ip(&["link", "del", &self.host_side]);
        Namespace::ip(&["netns", "del", &self.name]);
    }
}

/// A site on another host: inside its own network namespace, joined to the coordinator over a
/// veth pair rate-limited by `tc tbf` (100 Mbit/s). Its link goes down for 4 s mid-run (longer
/// than the idle timeout, so both ends drop the connection): the run goes on with the other two
/// sites, and the cut-off site reconnects and rejoins when the link comes back.
#[test]
fn a_site_on_another_host_is_cut_off_and_rejoins_when_its_link_returns() {
    let tag = std::process::id() % 10_000;
    let Some((namespace, host_ip, _site_ip)) = Namespace::create(tag) else {
        // Not root, or no `ip netns` here: say so rather than pass silently.
        let reason = "SKIPPED: network namespaces are not available (needs root and iproute2)";
        eprintln!("{reason}");
        record_skip(
            "a_site_on_another_host_is_cut_off_and_rejoins_when_its_link_returns",
            reason,
        );
        assert!(
            std::env::var("LOWBAND_REQUIRE_NETNS").is_err(),
            "LOWBAND_REQUIRE_NETNS is set but namespaces are not available"
        );
        return;
    };
    assert!(
        Command::new("tc")
            .args([
                "qdisc",
                "add",
                "dev",
                &namespace.host_side,
                "root",
                "tbf",
                "rate",
                "100mbit",
                "burst",
                "64kb",
                "latency",
                "50ms"
            ])
            .status()
            .unwrap()
            .success(),
        "tc tbf"
    );
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites: Vec<String> = (0..3)
        .map(|k| keygen(dir.path(), &format!("site{k}.key")))
        .collect();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("0.0.0.0:{port}");
    let (mut coordinator_process, _) = start_coordinator(
        dir.path(),
        &coordinator,
        &sites,
        &long_cluster(),
        &["--idle-timeout-ms", "1500", "--listen", &listen],
    );
    let local = format!("127.0.0.1:{port}");
    let remote = format!("{host_ip}:{port}");
    let site_flags = ["--idle-timeout-ms", "1500", "--reconnect-ms", "60000"];
    let mut site_processes = vec![
        start_site(dir.path(), 0, &local, &site_flags),
        start_site(dir.path(), 1, &local, &site_flags),
    ];
    let mut args = vec![
        "netns",
        "exec",
        namespace.name.as_str(),
        env!("CARGO_BIN_EXE_lowband"),
        "site",
        "--config",
        "cluster.toml",
        "--key",
        "site2.key",
        "--join",
        remote.as_str(),
    ];
    args.extend_from_slice(&site_flags);
    site_processes.push(Guard(
        Command::new("ip")
            .args(&args)
            .current_dir(dir.path())
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(error_log(dir.path(), "site2"))
            .spawn()
            .unwrap(),
    ));
    for site in &mut site_processes {
        until_connected(site);
    }
    until_saved_at_step(dir.path(), 10);
    namespace.link(false);
    // Down until both ends have noticed (their idle timeouts): the site is cut off for real.
    wait_until(Duration::from_secs(60), "the cut was never noticed", || {
        log_has(dir.path(), "coordinator", "site 2 left")
            && log_has(dir.path(), "site2", "lost the coordinator")
    });
    namespace.link(true);
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut coordinator_process,
        Duration::from_secs(180),
    );
    let strategy = summary(dir.path());
    assert_eq!(strategy["rounds"], 100, "every round ran");
    assert_eq!((accepted(&strategy, 0), accepted(&strategy, 1)), (100, 100));
    assert!(
        accepted(&strategy, 2) < 100,
        "the cut-off site missed rounds"
    );
    assert_rejoined_and_contributes(dir.path(), 2);
    let loss = strategy["final_val_loss"].as_f64().unwrap();
    assert_close_to_fault_free(loss);
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

/// The step of the coordinator's last checkpoint of `strategy_dir` (0 before the first).
fn checkpointed_step(dir: &Path, strategy_dir: &str) -> u64 {
    let current = std::fs::read_to_string(dir.join(format!(
        "runs/cluster/coordinator-state/{strategy_dir}/current.json"
    )))
    .unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&current).unwrap_or_default();
    value["dir"]
        .as_str()
        .and_then(|d| d.strip_prefix("state-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Keys, a coordinator running `cluster` and 3 site processes, every site connected. `{k}` in a
/// site flag becomes the site's number.
fn start_cluster(
    dir: &Path,
    cluster: &str,
    coordinator_flags: &[&str],
    site_flags: &[&str],
) -> (Guard, Vec<Guard>) {
    let coordinator = keygen(dir, "coordinator.key");
    let sites: Vec<String> = (0..3)
        .map(|k| keygen(dir, &format!("site{k}.key")))
        .collect();
    let (coordinator_process, address) =
        start_coordinator(dir, &coordinator, &sites, cluster, coordinator_flags);
    let mut site_processes: Vec<Guard> = (0..3)
        .map(|k| {
            let flags: Vec<String> = site_flags
                .iter()
                .map(|f| f.replace("{k}", &k.to_string()))
                .collect();
            start_site(
                dir,
                k,
                &address,
                &flags.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
            )
        })
        .collect();
    for site in &mut site_processes {
        until_connected(site);
    }
    (coordinator_process, site_processes)
}

/// Ctrl-C on a site is a graceful leave: the coordinator learns it at once, so the round does not
/// wait for the (here 120 s) idle timeout, and the site exits cleanly.
#[test]
fn a_site_interrupted_with_ctrl_c_leaves_at_once() {
    // A round site and a streaming one (which trains on while its merges travel).
    for cluster in [long_cluster(), streaming_cluster()] {
        let dir = tempfile::tempdir().unwrap();
        let (mut coordinator_process, mut site_processes) = start_cluster(
            dir.path(),
            &cluster,
            &["--idle-timeout-ms", "120000"],
            &["--idle-timeout-ms", "120000"],
        );
        until_saved_at_step(dir.path(), 10);
        signal(&site_processes[1], "-INT");
        assert!(
            wait(&mut site_processes[1], Duration::from_secs(60)).success(),
            "the interrupted site exits cleanly\n{}",
            error_logs(dir.path())
        );
        for k in [0, 2] {
            assert!(
                wait(&mut site_processes[k], Duration::from_secs(60)).success(),
                "site {k} failed\n{}",
                error_logs(dir.path())
            );
        }
        // Well inside the idle timeout: nobody waited for it.
        assert!(
            wait(&mut coordinator_process, Duration::from_secs(60)).success(),
            "the coordinator failed\n{}",
            error_logs(dir.path())
        );
        let strategy = summary(dir.path());
        assert!(
            accepted(&strategy, 1) < accepted(&strategy, 0),
            "site 1 stopped contributing"
        );
        let left = metrics(dir.path(), "left")
            .iter()
            .any(|m| m["site"] == 1 && m["reason"].as_str().unwrap().contains("leaving"));
        assert!(left, "the coordinator logged the leave");
    }
}

/// Streaming DiLoCo over processes (4 fragments, a merge due 5 steps after its sync, a sync
/// every 10 steps): site 1 (saving its own state after every sync) is killed with `kill -9` and
/// started again with `--resume`; it reconnects, gets the cluster's parameters in full and trains
/// on from the first step of their round with its own optimizer state and data position.
#[test]
fn a_streaming_site_killed_mid_run_restarts_and_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coordinator_process, mut site_processes) = start_cluster(
        dir.path(),
        &streaming_cluster(),
        &["--idle-timeout-ms", "1500"],
        &["--idle-timeout-ms", "1500", "--state-dir", "site{k}-state"],
    );
    let address = std::fs::read_to_string(dir.path().join("address")).unwrap();
    kill_and_resume_site_1(dir.path(), &mut site_processes, &address, 3);
    all_finish(
        dir.path(),
        &mut site_processes,
        &mut coordinator_process,
        Duration::from_secs(180),
    );
    let strategy = summary(dir.path());
    let memory = streaming_in_memory(dir.path());
    assert_eq!(
        strategy["rounds"], memory["strategies"][0]["rounds"],
        "every sync ran"
    );
    assert!(
        accepted(&strategy, 1) < accepted(&strategy, 0),
        "site 1 missed the syncs it was down"
    );
    assert_rejoined_and_contributes(dir.path(), 1);
    assert_close_to_streaming(&strategy, &memory);
}

/// The streaming run of these tests (4 fragments, delay 5, a sync every 10 steps).
fn streaming_cluster() -> String {
    format!("strategies = [\"streaming@40\"]\ncorpus_bytes = 200000\n{LONG_RUN}[optimizer]\n{LONG_OPTIMIZER}")
}

/// The same streaming run in memory, fault-free.
fn streaming_in_memory(dir: &Path) -> serde_json::Value {
    std::fs::write(
        dir.join("memory.toml"),
        format!(
            "strategies = [\"streaming@40\"]\nsites = 3\n{LONG_RUN}[optimizer]\n{LONG_OPTIMIZER}"
        ),
    )
    .unwrap();
    let o = lowband(dir)
        .args([
            "compare",
            "--config",
            "memory.toml",
            "--corpus-bytes",
            "200000",
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

/// Within 5% of the fault-free streaming run (the fault-free band of the round strategy is
/// ±1.2% over seeds and a fault has moved it by up to 1.5%; a stalled run stays near 2.88).
fn assert_close_to_streaming(strategy: &serde_json::Value, memory: &serde_json::Value) {
    let (loss, reference) = (
        strategy["final_val_loss"].as_f64().unwrap(),
        memory["strategies"][0]["final_val_loss"].as_f64().unwrap(),
    );
    eprintln!("streaming: final validation loss {loss}; fault-free in memory {reference}");
    assert!(
        (loss / reference - 1.0).abs() < 0.05,
        "{loss} vs {reference}"
    );
}

/// Streaming, coordinator `kill -9` and `--resume`: the sites reconnect, get the parameters in
/// full and train on from the first step of the round the restored coordinator opens.
#[test]
fn a_streaming_cluster_survives_a_coordinator_crash() {
    let (dir, strategy) =
        kill_and_resume_the_coordinator(&streaming_cluster(), "streaming-h40", "-KILL");
    let memory = streaming_in_memory(dir.path());
    assert_eq!(
        strategy["rounds"], memory["strategies"][0]["rounds"],
        "every sync ran once in the report"
    );
    assert_close_to_streaming(&strategy, &memory);
}

/// A skipped test leaves `target/tmp/lowband-skipped/NAME` with its reason, so that `.ci/run`
/// (and anyone) can count the skips the test harness reports as "ok".
fn record_skip(name: &str, reason: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lowband-skipped");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(name), reason);
}
