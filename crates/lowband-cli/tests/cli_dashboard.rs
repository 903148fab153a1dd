//! The live view (`--dashboard`): its JSON and Prometheus text grow while a run goes, bad
//! requests get a 4xx and the run goes on, a killed site shows as gone and then back, a real
//! browser renders one row per site and a chart, and `lowband view` serves a finished run again.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::faults::{long_cluster, record_skip};
use common::*;

/// What the run prints to stdout goes to `NAME.out`; the dashboard's address is read from there.
fn spawn_with_output(dir: &Path, name: &str, args: &[&str]) -> Guard {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    Guard(
        lowband(dir)
            .args(args)
            .stdout(out)
            .stderr(error_log(dir, name))
            .spawn()
            .unwrap(),
    )
}

/// The address a node printed after `prefix` ("dashboard: http://" or "view: http://").
fn printed_address(dir: &Path, name: &str, prefix: &str) -> String {
    let mut address = String::new();
    wait_until(
        Duration::from_secs(60),
        &format!("{name} never printed {prefix}\n{}", error_logs(dir)),
        || {
            let text = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap_or_default();
            match text.lines().find_map(|l| l.strip_prefix(prefix)) {
                Some(rest) => {
                    address = rest
                        .trim_end_matches(['/', ' '])
                        .split('/')
                        .next()
                        .unwrap()
                        .into();
                    true
                }
                None => false,
            }
        },
    );
    address
}

/// One raw HTTP/1.1 exchange: (status code, body).
fn exchange(address: &str, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:.200}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn get(address: &str, path: &str) -> (u16, String) {
    exchange(
        address,
        format!("GET {path} HTTP/1.1\r\nHost: lowband\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn state(address: &str) -> serde_json::Value {
    let (status, body) = get(address, "/api/state");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// (rounds, inter-site bytes) of the run's last strategy, as /api/state says.
fn progress(state: &serde_json::Value) -> (u64, u64) {
    let strategy = state["strategies"].as_array().unwrap().last().cloned();
    strategy.map_or((0, 0), |s| {
        (s["rounds"].as_u64().unwrap(), s["bytes"].as_u64().unwrap())
    })
}

/// The sum of a Prometheus family's samples.
fn sampled(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const COMPARE: &[&str] = &[
    "compare",
    "--preset",
    "tiny",
    "--steps",
    "1500",
    "--inner-steps",
    "10",
    "--corpus-bytes",
    "200000",
    "--strategies",
    "diloco@10",
    "--dashboard",
    "127.0.0.1:0",
    "--name",
    "live",
];

#[test]
fn the_dashboard_grows_with_the_run_refuses_bad_requests_and_a_finished_run_is_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = spawn_with_output(dir.path(), "compare", COMPARE);
    let address = printed_address(dir.path(), "compare", "dashboard: http://");
    let mut first = (0, 0);
    wait_until(Duration::from_secs(60), "no round closed", || {
        first = progress(&state(&address));
        first.0 >= 1
    });
    let (status, metrics) = get(&address, "/metrics");
    assert_eq!(status, 200);
    let rounds_then = sampled(&metrics, "lowband_rounds_total");
    let bytes_then = sampled(&metrics, "lowband_bytes_total");
    assert!(rounds_then >= 1.0 && bytes_then > 0.0, "{metrics}");
    // Bad requests get a 4xx; the run goes on.
    assert_eq!(exchange(&address, b"GARBAGE\r\n\r\n").0, 400);
    let mut huge = b"GET / HTTP/1.1\r\nHost: lowband\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 600_000));
    huge.extend(b"\r\n\r\n");
    assert_eq!(exchange(&address, &huge).0, 431);
    let post = b"POST /api/state HTTP/1.1\r\nHost: lowband\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
    assert_eq!(exchange(&address, post).0, 405);
    assert_eq!(get(&address, "/nothing-here").0, 404);
    let mut later = first;
    wait_until(Duration::from_secs(120), "the run stopped growing", || {
        later = progress(&state(&address));
        later.0 > first.0 && later.1 > first.1
    });
    let (_, metrics) = get(&address, "/metrics");
    assert!(sampled(&metrics, "lowband_rounds_total") > rounds_then);
    assert!(sampled(&metrics, "lowband_bytes_total") > bytes_then);
    assert!(
        wait(&mut run, Duration::from_secs(240)).success(),
        "{}",
        error_logs(dir.path())
    );
    // The finished run, served again from its events.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("runs/live/summary.json")).unwrap())
            .unwrap();
    let mut view = spawn_with_output(
        dir.path(),
        "view",
        &["view", "runs/live", "--listen", "127.0.0.1:0"],
    );
    let address = printed_address(dir.path(), "view", "view: http://");
    let replayed = state(&address);
    assert_eq!(replayed["live"], false);
    let strategy = &replayed["strategies"][0];
    assert_eq!(strategy["rounds"], summary["strategies"][0]["rounds"]);
    assert_eq!(
        strategy["bytes"],
        summary["strategies"][0]["inter_site_bytes"]
    );
    assert_eq!(strategy["finished"], true);
    assert_eq!(strategy["train"].as_array().unwrap().len(), 1500);
    let _ = view.0.kill();
}

/// The state of site `site` in the last strategy, and its history of states.
fn site_states(state: &serde_json::Value, site: usize) -> (String, Vec<String>) {
    let view = &state["strategies"][0]["site_views"][site];
    let history = view["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|c| c[1].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    (view["state"].as_str().unwrap_or("").to_string(), history)
}

#[test]
fn a_killed_site_shows_as_gone_then_back_on_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = keygen(dir.path(), "coordinator.key");
    let sites: Vec<String> = (0..3)
        .map(|k| keygen(dir.path(), &format!("site{k}.key")))
        .collect();
    let keys: Vec<String> = sites.iter().map(|k| format!("\"{k}\"")).collect();
    std::fs::write(
        dir.path().join("cluster.toml"),
        format!(
            "{}\n[network]\nquorum = 2\nround_deadline_ms = 1000\n[cluster]\ncoordinator = \"{coordinator}\"\nsites = [{}]\n",
            long_cluster(),
            keys.join(", ")
        ),
    )
    .unwrap();
    let mut coordinator_process = spawn_with_output(
        dir.path(),
        "coordinator",
        &[
            "coordinator",
            "--config",
            "cluster.toml",
            "--key",
            "coordinator.key",
            "--listen",
            "127.0.0.1:0",
            "--address-file",
            "address",
            "--idle-timeout-ms",
            "1500",
            "--dashboard",
            "127.0.0.1:0",
        ],
    );
    let dashboard = printed_address(dir.path(), "coordinator", "dashboard: http://");
    wait_for_file(
        &dir.path().join("address"),
        "the coordinator never listened",
    );
    let address = std::fs::read_to_string(dir.path().join("address")).unwrap();
    let mut site_processes: Vec<Guard> = (0..3)
        .map(|k| start_site(dir.path(), k, &address, &["--idle-timeout-ms", "1500"]))
        .collect();
    // Every site's public key is on the page (its first 16 hex digits), none of its secrets.
    wait_until(Duration::from_secs(60), "no round closed", || {
        progress(&state(&dashboard)).0 >= 2
    });
    let shown = state(&dashboard);
    for (k, key) in sites.iter().enumerate() {
        assert_eq!(shown["strategies"][0]["site_views"][k]["key"], key[..16]);
    }
    // Each site's measured rates both ways and its merged updates, once its reports say so.
    wait_until(
        Duration::from_secs(60),
        "no site measured both ways",
        || {
            let shown = state(&dashboard);
            let site = &shown["strategies"][0]["site_views"][0];
            site["up_mbit_per_s"].as_f64().is_some_and(|r| r > 0.0)
                && site["down_mbit_per_s"].as_f64().is_some_and(|r| r > 0.0)
                && site["accepted"].as_u64().is_some_and(|n| n >= 1)
        },
    );
    site_processes[1].0.kill().unwrap();
    let _ = site_processes[1].0.wait();
    wait_until(
        Duration::from_secs(30),
        "site 1 never showed as gone",
        || site_states(&state(&dashboard), 1).0 == "gone",
    );
    site_processes[1] = start_site(dir.path(), 1, &address, &["--idle-timeout-ms", "1500"]);
    wait_until(
        Duration::from_secs(60),
        "site 1 never showed as back",
        || {
            let (now, history) = site_states(&state(&dashboard), 1);
            let gone = history.iter().rposition(|s| s == "gone");
            now != "gone"
                && gone.is_some_and(|at| history[at + 1..].iter().any(|s| s == "training"))
        },
    );
    for site in &mut site_processes {
        let _ = site.0.kill();
    }
    let _ = coordinator_process.0.kill();
}

/// The chromium binary Debian installs (CI installs it), if any.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            std::process::Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

#[test]
fn a_real_browser_renders_a_row_per_site_and_a_chart() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("LOWBAND_REQUIRE_BROWSER").is_none(),
            "LOWBAND_REQUIRE_BROWSER is set but there is no chromium"
        );
        let reason =
            "SKIPPED: no chromium to render the dashboard (.ci/run installs Debian's chromium)";
        eprintln!("{reason}");
        record_skip("a_real_browser_renders_a_row_per_site_and_a_chart", reason);
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut run = spawn_with_output(dir.path(), "compare", COMPARE);
    let address = printed_address(dir.path(), "compare", "dashboard: http://");
    wait_until(Duration::from_secs(60), "no round closed", || {
        progress(&state(&address)).0 >= 2
    });
    let profile = dir.path().join("browser-profile");
    let output = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=4000",
            "--dump-dom",
            &format!("http://{address}/"),
        ])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout);
    let rows = dom.matches("<tr class=\"site\"").count();
    assert_eq!(
        rows,
        4,
        "{dom:.3000}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let drawn = dom
        .split("<polyline points=\"")
        .skip(1)
        .filter(|rest| {
            rest.split('"')
                .next()
                .is_some_and(|p| p.split(' ').count() >= 2)
        })
        .count();
    assert!(drawn >= 1, "no chart line drawn: {dom:.3000}");
    let _ = run.0.kill();
}
