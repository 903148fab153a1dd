//! `lowband plan` through the binary: the table, the JSON, the plot, the published checks, and bad
//! input (a clear error naming the field, exit code 3; 2 for what clap refuses).

use std::process::{Command, Output};

fn lowband(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowband"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    // 2: the command line does not parse (clap); 3: a value, file or setting refused.
    let expected = if stderr.contains("try '--help'") {
        2
    } else {
        3
    };
    assert_eq!(output.status.code(), Some(expected), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[test]
fn plans_every_baseline_and_strategy_with_json_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let o = lowband(
        &[
            "plan",
            "--params",
            "10B",
            "--sites",
            "4",
            "--json",
            "plan.json",
            "--plot",
            "cost.svg",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for row in [
        "| centralized |",
        "| decentralized ddp |",
        "| ship the data |",
        "| sparseloco (top-k 2-bit, H=30) |",
    ] {
        assert!(stdout.contains(row), "{row} missing: {stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("plan.json")).unwrap()).unwrap();
    assert_eq!(report["plans"].as_array().unwrap().len(), 6);
    assert_eq!(report["break_even"].as_array().unwrap().len(), 3);
    assert_eq!(
        report["scenario"]["tokens"].as_f64().unwrap(),
        2e11,
        "D defaults to 20 N"
    );
    for plan in report["plans"].as_array().unwrap() {
        for field in [
            "wall_seconds",
            "utilization",
            "wan_bytes",
            "egress_dollars",
            "compute_dollars",
            "total_dollars",
        ] {
            assert!(
                plan[field]
                    .as_f64()
                    .is_some_and(|x| x.is_finite() && x >= 0.0),
                "{field} in {plan}"
            );
        }
    }
    assert!(std::fs::read_to_string(dir.path().join("cost.svg"))
        .unwrap()
        .contains("<svg"));
}

#[test]
fn a_plan_file_sets_sites_prices_and_strategies() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plan.toml"),
        r#"
params = 1e9
sites = 2
hardware = "a100"
accelerators_per_site = 8
[[site]]
link = "metro"
[[site]]
bandwidth_gbit_per_second = 0.5
hardware = { dollars_per_accelerator_hour = 0.9 }
[[strategy]]
name = "mine"
inner_steps = 50
bits_per_param_up = 0.5
pattern = "all-gather"
loss_gap = 0.01
"#,
    )
    .unwrap();
    let o = lowband(
        &["plan", "--config", "plan.toml", "--json", "plan.json"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("plan.json")).unwrap()).unwrap();
    let sites = report["scenario"]["sites"].as_array().unwrap();
    assert_eq!(sites[0]["link"]["bandwidth_gbit_per_second"], 10.0);
    assert_eq!(sites[1]["link"]["bandwidth_gbit_per_second"], 0.5);
    assert_eq!(sites[1]["hardware"]["dollars_per_accelerator_hour"], 0.9);
    assert_eq!(sites[0]["hardware"]["peak_flops_per_second"], 312e12);
    let plans = report["plans"].as_array().unwrap();
    assert_eq!(
        plans.len(),
        4,
        "the file's strategy replaces the published ones"
    );
    assert!(
        plans[3]["token_factor"].as_f64().unwrap() > 1.0,
        "a 1% gap costs tokens"
    );
}

#[test]
fn published_checks_reproduce_intellect_1_within_two_points() {
    let o = lowband(&["plan", "--published"], std::path::Path::new("."));
    assert!(o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    for (setting, published) in [("| USA |", 95.7), ("| global |", 83.0)] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(setting))
            .unwrap_or_else(|| panic!("{setting} missing: {stdout}"));
        let planner: f64 = row
            .split('|')
            .nth(5)
            .unwrap()
            .trim()
            .trim_end_matches('%')
            .parse()
            .unwrap();
        assert!((planner - published).abs() <= 2.0, "{row}");
    }
    assert!(
        stdout.contains("| 1e10 | 0.8 s | Streaming DiLoCo w/ overlapped FP4 com. |"),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_refused_with_the_field_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| lowband(args, dir.path());
    refused(&run(&["plan", "--params", "0", "--sites", "4"]), "--params");
    refused(&run(&["plan", "--params=-5B", "--sites", "4"]), "--params");
    refused(&run(&["plan", "--params", "1B", "--sites", "0"]), "sites");
    refused(
        &run(&[
            "plan",
            "--params",
            "1B",
            "--sites",
            "2",
            "--link",
            "carrier-pigeon",
        ]),
        "unknown link class",
    );
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("unknown.toml", "params = 1e9\nsites = 2\negress = 3\n");
    refused(
        &run(&["plan", "--config", "unknown.toml"]),
        "unknown field `egress`",
    );
    write(
        "negative.toml",
        "params = 1e9\nsites = 2\n[[site]]\nbandwidth_gbit_per_second = -1\n",
    );
    refused(
        &run(&["plan", "--config", "negative.toml"]),
        "sites[0].link.bandwidth_gbit_per_second",
    );
    write(
        "price.toml",
        "params = 1e9\nsites = 2\n[central]\ndollars_per_accelerator_hour = -2\n",
    );
    refused(
        &run(&["plan", "--config", "price.toml"]),
        "central.dollars_per_accelerator_hour",
    );
    write("zero.toml", "params = 0.0\nsites = 2\n");
    refused(&run(&["plan", "--config", "zero.toml"]), "params");
    write("strategy.toml", "params = 1e9\nsites = 2\n[[strategy]]\nname = \"x\"\ninner_steps = 0\nbits_per_param_up = 1\npattern = \"relay\"\n");
    refused(
        &run(&["plan", "--config", "strategy.toml"]),
        "strategy x: inner_steps",
    );
    std::fs::create_dir(dir.path().join("empty-run")).unwrap();
    refused(
        &run(&["plan", "--params", "1B", "--from-run", "empty-run"]),
        "summary.json",
    );
    // A run without DDP has no gap to price.
    std::fs::create_dir(dir.path().join("no-ddp")).unwrap();
    write(
        "no-ddp/summary.json",
        r#"{"name": "no-ddp", "corpus": "x", "config": {"sites": 2, "steps": 10, "link": {"bandwidth_gbit_per_s": 1.0, "latency_ms": 40.0, "price_per_gb": 0.05}},
            "strategies": [{"strategy": "diloco@5", "inner_steps": 5, "final_val_loss": 2.0, "loss_gap_vs_ddp": null, "bytes_ratio_vs_ddp": null, "tokens": 1000,
              "rounds": 2, "bits_per_token": 8.0, "bits_per_param_per_round": 32.0, "bits_per_param_per_step": 12.8, "inter_site_bytes": 1000, "params": 100,
              "emulated_seconds": 1.0, "compute_seconds": 1.0, "communication_seconds": 0.0, "egress_dollars": 0.0}]}"#,
    );
    refused(
        &run(&["plan", "--params", "1B", "--from-run", "no-ddp"]),
        "no ddp run",
    );
}
