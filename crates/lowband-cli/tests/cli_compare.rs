//! `lowband compare` through the binary: the report files, the JSON schema, resuming, bad input.

use std::process::{Command, Output};

fn lowband(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowband"))
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

const SMALL_RUN: [&str; 9] = [
    "compare",
    "--preset",
    "tiny",
    "--steps",
    "12",
    "--inner-steps",
    "4",
    "--corpus-bytes",
    "60000",
];

#[test]
fn compare_writes_the_report_and_a_json_summary_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend([
        "--strategies",
        "ddp,diloco,fedavg@3",
        "--sites",
        "2",
        "--json",
        "out.json",
        "--name",
        "t",
    ]);
    let o = lowband(&args, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| diloco@4 |") && stdout.contains("| fedavg@3 |"),
        "{stdout}"
    );
    let run = dir.path().join("runs/t");
    for file in [
        "report.md",
        "summary.json",
        "metrics.jsonl",
        "loss_vs_tokens.svg",
        "loss_vs_bytes.svg",
    ] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    let strategies = summary["strategies"].as_array().unwrap();
    assert_eq!(strategies.len(), 3);
    for s in strategies {
        for field in [
            "final_val_loss",
            "inter_site_bytes",
            "tokens",
            "rounds",
            "emulated_seconds",
            "bits_per_token",
        ] {
            assert!(s[field].is_number(), "{field} missing in {s}");
        }
    }
    assert_eq!(
        strategies[0]["tokens"], strategies[1]["tokens"],
        "equal tokens"
    );
    assert_eq!(strategies[1]["rounds"], 3);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    assert!(metrics.contains("\"kind\":\"eval\"") && metrics.contains("\"kind\":\"round\""));
    // The report ends with the planner on this run's own figures (the gap priced: the published
    // size-aware one, +0.16% at 1e10, not this toy run's), and `plan --from-run` reads it.
    assert!(
        stdout.contains("What this run's strategies would cost at scale")
            && stdout.contains("DiLoCo's published size-aware gap")
            && stdout.contains("| 1e10 | +0.16% | diloco@4 |"),
        "{stdout}"
    );
    let plan = lowband(
        &[
            "plan",
            "--from-run",
            "runs/t",
            "--params",
            "1B",
            "--json",
            "plan.json",
        ],
        dir.path(),
    );
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plans: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("plan.json")).unwrap()).unwrap();
    let names: Vec<&str> = plans["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "centralized",
            "decentralized ddp",
            "ship the data",
            "diloco@4",
            "fedavg@3"
        ]
    );
    // The measured gap is what the plan prices in.
    let gap = strategies[1]["loss_gap_vs_ddp"].as_f64().unwrap();
    assert!((plans["plans"][3]["loss_gap"].as_f64().unwrap() - gap).abs() < 1e-12);
}

#[test]
fn a_compare_stopped_midway_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    // Also a multi-line array, as people write them.
    std::fs::write(
        dir.path().join("every_round.toml"),
        "strategies = [\n  \"ddp\",\n  \"diloco\",\n]\ncheckpoint_every_rounds = 1\n",
    )
    .unwrap();
    let with = |extra: &[&str]| {
        let mut args = SMALL_RUN.to_vec();
        args.extend(["--config", "every_round.toml"]);
        args.extend(extra);
        lowband(&args, dir.path())
    };
    assert!(with(&["--name", "straight", "--json", "straight.json"])
        .status
        .success());
    let stopped = with(&["--name", "r", "--stop-after-rounds", "2"]);
    assert_eq!(
        stopped.status.code(),
        Some(1),
        "stopped on request: the run did not finish"
    );
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("--resume"));
    let resumed = with(&["--name", "r", "--json", "resumed.json", "--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(
        String::from_utf8_lossy(&resumed.stdout)
            .contains("resuming ddp from its saved state at step 8"),
        "{}",
        String::from_utf8_lossy(&resumed.stdout)
    );
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join(f)).unwrap()).unwrap()
    };
    let (a, b) = (read("straight.json"), read("resumed.json"));
    for i in 0..2 {
        for field in [
            "final_val_loss",
            "inter_site_bytes",
            "rounds",
            "tokens",
            "bits_per_token",
        ] {
            assert_eq!(
                a["strategies"][i][field], b["strategies"][i][field],
                "strategy {i}: {field}"
            );
        }
    }
}

#[test]
fn tuning_holds_out_the_end_of_the_training_split_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend([
        "--strategies",
        "diloco",
        "--sites",
        "2",
        "--json",
        "out.json",
    ]);
    let plain = lowband(&args, dir.path());
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert!(String::from_utf8_lossy(&plain.stdout).contains("57000 bytes train, 3000 held out"));
    args.push("--tuning");
    let tuning = lowband(&args, dir.path());
    assert!(
        tuning.status.success(),
        "{}",
        String::from_utf8_lossy(&tuning.stderr)
    );
    // Its own run directory by default, so neither run can resume the other.
    assert!(
        dir.path().join("runs/tiny-k2-12steps-seed0").is_dir()
            && dir
                .path()
                .join("runs/tiny-k2-12steps-seed0-tuning")
                .is_dir()
    );
    // 60,000 bytes: the validation split (the last 3,000) is set aside, and the run holds out
    // the last 5% of the 57,000 training bytes instead.
    let stdout = String::from_utf8_lossy(&tuning.stdout);
    assert!(
        stdout.contains("54150 bytes train, 2850 held out"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    assert!(
        summary["corpus"]
            .as_str()
            .unwrap()
            .contains("--tuning sets the validation split aside"),
        "{summary}"
    );
}

#[test]
fn bad_settings_are_one_clear_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short.txt"), "only a few bytes").unwrap();
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    std::fs::write(dir.path().join("wrong_type.toml"), "sites = \"four\"\n").unwrap();
    std::fs::write(dir.path().join("unknown.toml"), "sitez = 4\n").unwrap();
    std::fs::write(
        dir.path().join("nested.toml"),
        "strategies = [\"ddp\"]\n[optimizer]\nlr = \"fast\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("bad.toml"), "sites = [\n").unwrap();
    std::fs::write(
        dir.path().join("link_bad.toml"),
        "[link]\nlatency_ms = 1e300\n",
    )
    .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["compare", "--corpus", "empty.txt"], "empty"),
        (&["compare", "--corpus", "short.txt"], "too short"),
        (&["compare", "--sites", "0"], "sites"),
        (&["compare", "--inner-steps", "0"], "inner_steps"),
        (&["compare", "--strategies", "gossip"], "unknown strategy"),
        (&["compare", "--config", "wrong_type.toml"], "sites"),
        (&["compare", "--config", "unknown.toml"], "sitez"),
        (&["compare", "--config", "nested.toml"], "optimizer.lr"),
        (&["compare", "--config", "bad.toml"], "TOML"),
        (&["compare", "--config", "missing.toml"], "missing.toml"),
        (&["compare", "--tokens", "5"], "--tokens"),
        (
            &["compare", "--inner-steps", "1000000000000"],
            "inner_steps",
        ),
        (&["compare", "--site-batch", "100000000"], "site_batch"),
        (&["compare", "--sites", "1000", "--preset", "ref"], "GiB"),
        (&["compare", "--attacks", "9:zeros"], "only sites 0 to 3"),
        (&["compare", "--attacks", "1:bogus"], "unknown attack mode"),
        (
            &["compare", "--attacks", "1:scale=inf"],
            "not a finite number",
        ),
        (&["compare", "--aggregator", "avg"], "unknown aggregator"),
        (
            &["compare", "--strategies", "diloco[agg=median;norm=0.5]"],
            "above 1",
        ),
        // Issue 17: each of these used to be accepted, hang, panic or misbehave.
        (&["compare", "--corpus", "/dev/zero"], "exceed the limit"),
        (&["compare", "--config", "/dev/zero"], "not a settings file"),
        (&["compare", "--name", ".."], "one plain directory name"),
        (&["compare", "--name", ""], "one plain directory name"),
        (&["compare", "--name", "/tmp/elsewhere"], "not allowed in a run name"),
        (&["compare", "--json", "no/such/dir/out.json"], "cannot be written"),
        (&["--threads", "100000", "compare"], "--threads"),
        (&["compare", "--strategies", "ddp,ddp"], "listed twice"),
        (&["compare", "--strategies", "diloco[up=fp32;up=int8]"], "given twice"),
        (&["compare", "--strategies", "diloco[up=topk:chunk=0]"], "chunk must be"),
        (&["compare", "--strategies", "diloco[decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9;decay=0.9]"], "at most 160"),
        (&["compare", "--steps", "18446744073709551615"], "steps"),
        (&["compare", "--corpus-bytes", "100000000000"], "--corpus-bytes"),
        (&["shape", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--latency-ms", "1e300"], "latency"),
        (&["shape", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--bandwidth-mbit", "1e-300"], "bandwidth"),
        (&["plan", "--params", "1e9", "--sites", "1000000000"], "sites"),
        (&["plan", "--params", "1e300", "--sites", "4"], "params"),
        (&["keygen", "--out", ".", "--force"], "is a directory"),
        (&["compare", "--config", "link_bad.toml"], "link.latency_ms"),
    ];
    for (args, fragment) in cases {
        let o = lowband(args, dir.path());
        let err = String::from_utf8_lossy(&o.stderr);
        // 2: the command line does not parse (clap); 3: a value, file or setting refused.
        let expected = if err.contains("try '--help'") { 2 } else { 3 };
        assert_eq!(o.status.code(), Some(expected), "{args:?}: {err}");
        assert!(
            err.contains(fragment),
            "{args:?}: {err:?} should mention {fragment:?}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // (clap's usage errors add a line pointing at --help.)
        let lines = err
            .trim_end()
            .lines()
            .filter(|l| !l.is_empty() && !l.contains("try '--help'"));
        assert_eq!(lines.count(), 1, "{args:?}: one line: {err}");
    }
    // A `[link]` table may set one field (the others keep their defaults).
    std::fs::write(
        dir.path().join("link_one.toml"),
        "[link]\nlatency_ms = 10\n",
    )
    .unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend(["--config", "link_one.toml", "--strategies", "diloco"]);
    let o = lowband(&args, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!dir.path().join(".lowband-probe.tmp").exists());
}

#[test]
fn a_resume_refuses_altered_state_out_of_range_counters_and_another_corpus() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("every_round.toml"),
        "checkpoint_every_rounds = 1\n",
    )
    .unwrap();
    let with = |extra: &[&str]| {
        let mut args = SMALL_RUN.to_vec();
        args.extend([
            "--config",
            "every_round.toml",
            "--strategies",
            "diloco",
            "--name",
            "r",
        ]);
        args.extend(extra);
        lowband(&args, dir.path())
    };
    assert_eq!(with(&["--stop-after-rounds", "1"]).status.code(), Some(1));
    let strategy_dir = dir.path().join("runs/r/state/diloco-h4");
    let current: serde_json::Value =
        serde_json::from_slice(&std::fs::read(strategy_dir.join("current.json")).unwrap()).unwrap();
    let state_dir = strategy_dir.join(current["dir"].as_str().unwrap());
    let refused = |extra: &[&str], fragment: &str| {
        let o = with(extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{extra:?}: {err}");
        assert!(
            err.contains(fragment),
            "{extra:?}: {err:?} should mention {fragment:?}"
        );
    };
    // One changed value in the tensors.
    let tensors = state_dir.join("tensors.safetensors");
    let original = std::fs::read(&tensors).unwrap();
    let mut altered = original.clone();
    let last = altered.len() - 1;
    altered[last] ^= 0x40;
    std::fs::write(&tensors, &altered).unwrap();
    refused(&["--resume"], "truncated or altered");
    std::fs::write(&tensors, &original).unwrap();
    // A step past the run's end, or a negative time.
    let manifest_path = state_dir.join("state.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    value["step"] = 25.into();
    std::fs::write(&manifest_path, value.to_string()).unwrap();
    refused(&["--resume"], "out of range");
    let mut value: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    value["compute_seconds"] = (-5.0).into();
    std::fs::write(&manifest_path, value.to_string()).unwrap();
    refused(&["--resume"], "out of range");
    std::fs::write(&manifest_path, &manifest).unwrap();
    // Another corpus under the same run name.
    std::fs::write(
        dir.path().join("other.txt"),
        "a different text, repeated. ".repeat(3000),
    )
    .unwrap();
    refused(&["--resume", "--corpus", "other.txt"], "another corpus");
    // Untouched, it resumes.
    let o = with(&["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn train_runs_one_strategy_and_saves_a_checkpoint_that_eval_reads() {
    let dir = tempfile::tempdir().unwrap();
    let o = lowband(
        &[
            "train",
            "--preset",
            "tiny",
            "--sites",
            "1",
            "--strategy",
            "ddp",
            "--steps",
            "10",
            "--corpus-bytes",
            "60000",
            "--name",
            "one",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sample: "));
    std::fs::write(dir.path().join("text.txt"), "sa ke lo mi ".repeat(50)).unwrap();
    let eval = lowband(
        &[
            "eval",
            "--checkpoint",
            "runs/one/checkpoint",
            "--data",
            "text.txt",
            "--json",
            "-",
        ],
        dir.path(),
    );
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let o = lowband(
        &["train", "--preset", "tiny", "--strategies", "ddp,diloco"],
        dir.path(),
    );
    // (A usage error now: train has no --strategies flag at all.)
    assert_eq!(o.status.code(), Some(2), "train takes one strategy");
}

/// Compressed strategies run side by side, write their packets, and `inspect packet` reads them
/// back (and refuses a corrupted one with exit code 3).
#[test]
fn compressed_strategies_write_packets_that_inspect_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend([
        "--strategies",
        "ddp,sparseloco[up=topk:k=16,chunk=1024,values=q2;down=topk:k=32,chunk=1024],diloco-int8",
        "--sites",
        "2",
        "--name",
        "c",
    ]);
    let o = lowband(&args, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| sparseloco@4[") && stdout.contains("| diloco-int8@4 |"),
        "{stdout}"
    );
    let packets = dir.path().join("runs/c/packets");
    let update = std::fs::read_dir(&packets)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.to_string_lossy().contains("sparseloco")
                && p.to_string_lossy().ends_with(".update.bin")
        })
        .unwrap();
    let o = lowband(&["inspect", "packet", update.to_str().unwrap()], dir.path());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("kind Update")
            && text.contains("codec: topk:k=16,chunk=1024,values=q2")
            && text.contains("checksum ok"),
        "{text}"
    );
    // 16 of 1,024 in Elias-Fano: 6 low bits + 1 unary + 15/16 of the upper vector's zeros per
    // entry, 2-bit values, two f32 scales per chunk (64 / 16 = 4 bits per entry; the last,
    // partial chunk pays a little more).
    assert!(
        text.contains("bits per kept entry (positions 7.94, value 2.00, chunk scales 4.0"),
        "{text}"
    );
    let mut bytes = std::fs::read(&update).unwrap();
    let last = bytes.len() - 6;
    bytes[last] ^= 0xff;
    std::fs::write(&update, &bytes).unwrap();
    let o = lowband(&["inspect", "packet", update.to_str().unwrap()], dir.path());
    assert_eq!(o.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn an_attacked_compare_reports_every_site_and_the_exclusion() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args[4] = "40";
    args.extend([
        "--strategies",
        "diloco@4,diloco@4[agg=median]",
        "--attacks",
        "1:scale=-10",
        "--json",
        "out.json",
        "--name",
        "t",
    ]);
    let o = lowband(&args, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("Untrusted sites: attacks 1:scale=-10"),
        "{stdout}"
    );
    assert!(stdout.contains("site 1 excluded: refused in 3"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    let strategies = summary["strategies"].as_array().unwrap();
    assert_eq!(strategies[0]["aggregator"], "mean");
    assert_eq!(strategies[1]["aggregator"], "median");
    let scores = strategies[1]["site_scores"].as_array().unwrap();
    assert_eq!(scores.len(), 4);
    assert!(
        scores[1]["excluded"].is_string() && scores[0]["excluded"].is_null(),
        "{scores:?}"
    );
    assert!(
        strategies[1]["final_val_loss"].as_f64().unwrap()
            < strategies[0]["final_val_loss"].as_f64().unwrap(),
        "the median beats the attacked mean"
    );
    assert_eq!(summary["config"]["attacks"][0], "1:scale=-10");
}

#[test]
fn cluster_runs_the_round_and_streaming_strategies_over_quic_with_the_same_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args[0] = "cluster";
    args[4] = "24";
    args.extend([
        "--sites",
        "3",
        "--strategies",
        "diloco@4,diloco@4[agg=trimmed-mean],streaming@8[fragments=2;overlap=1]",
        "--attacks",
        "2:garbage",
        "--json",
        "out.json",
        "--name",
        "c",
    ]);
    let o = lowband(&args, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("loopback QUIC"), "{stdout}");
    assert!(stdout.contains("site 2 excluded"), "{stdout}");
    assert!(
        dir.path().join("runs/c/nodes").exists(),
        "keys, cluster files and site logs are kept"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.json")).unwrap()).unwrap();
    assert_eq!(summary["strategies"].as_array().unwrap().len(), 3);
    // The same settings in one process, and in memory: the same models.
    let mut in_process = args.clone();
    in_process.extend(["--in-process"]);
    *in_process.iter_mut().find(|a| **a == "out.json").unwrap() = "in_process.json";
    let o = lowband(&in_process, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut memory = args.clone();
    memory[0] = "compare";
    *memory.iter_mut().find(|a| **a == "out.json").unwrap() = "memory.json";
    let o = lowband(&memory, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for other in ["in_process.json", "memory.json"] {
        let other: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(other)).unwrap()).unwrap();
        for i in 0..3 {
            assert_eq!(
                summary["strategies"][i]["final_val_loss"],
                other["strategies"][i]["final_val_loss"],
                "{}",
                summary["strategies"][i]["strategy"]
            );
        }
    }
    // cluster has no --resume (the coordinator's and the sites' own --resume do it): the
    // parser refuses it, rather than accepting it and refusing the run.
    let mut resume = SMALL_RUN.to_vec();
    resume[0] = "cluster";
    resume.extend(["--strategies", "diloco@4", "--resume"]);
    let o = lowband(&resume, dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unexpected argument '--resume'"));
}

/// Strategies run as separate commands go on one chart with `lowband plot`; a strategy in two
/// runs is told apart by its run; a directory without metrics is a clear error.
#[test]
fn plot_puts_several_runs_on_one_chart() {
    let dir = tempfile::tempdir().unwrap();
    for (name, strategies) in [("first", "ddp,diloco"), ("second", "ddp,sparseloco")] {
        let mut args = SMALL_RUN.to_vec();
        args.extend(["--strategies", strategies, "--sites", "2", "--name", name]);
        let o = lowband(&args, dir.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = lowband(
        &["plot", "runs/first", "runs/second", "--out", "charts"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("ddp (first):")
            && stdout.contains("ddp (second):")
            && stdout.contains("diloco@4:")
            && stdout.contains("sparseloco@4:"),
        "{stdout}"
    );
    for chart in ["loss_vs_tokens.svg", "loss_vs_bytes.svg"] {
        let svg = std::fs::read_to_string(dir.path().join("charts").join(chart)).unwrap();
        assert!(
            svg.contains("ddp (second)")
                && svg.contains("sparseloco@4")
                && svg.contains("diloco@4"),
            "{chart}"
        );
    }
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let o = lowband(&["plot", "empty", "--out", "charts"], dir.path());
    assert_eq!(o.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is it a run directory?"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_run_never_replaces_another_runs_results_without_force() {
    // Issue 18 (and 17's "nothing lost"): `compare` and then `compare --strategies diloco` wrote
    // the same run directory, and the second silently replaced the first's report.
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut args = SMALL_RUN.to_vec();
        args.extend(["--name", "same"]);
        args.extend(extra);
        lowband(&args, dir.path())
    };
    assert!(run(&[]).status.success());
    let summary = || std::fs::read_to_string(dir.path().join("runs/same/summary.json")).unwrap();
    let first = summary();
    let o = run(&["--strategies", "diloco"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(summary(), first, "untouched");
    assert!(
        run(&[]).status.success(),
        "the same run again may replace its own results"
    );
    assert!(run(&["--strategies", "diloco", "--force"]).status.success());
    assert!(!summary().contains("\"ddp\""));
}
