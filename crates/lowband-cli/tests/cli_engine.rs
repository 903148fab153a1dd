//! The engine's commands end to end through the binary, and bad input: one line, exit code 3 (2 for what clap refuses).

use std::path::Path;
use std::process::{Command, Output};

fn lowband(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowband"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_refused(args: &[&str], fragment: &str) {
    let o = lowband(args);
    let err = String::from_utf8_lossy(&o.stderr);
    // 2: the command line does not parse (clap); 3: a value, file or setting refused.
    let expected = if err.contains("try '--help'") { 2 } else { 3 };
    assert_eq!(
        o.status.code(),
        Some(expected),
        "{args:?} should exit {expected}; stderr: {err}"
    );
    assert!(
        err.contains(fragment),
        "{args:?}: stderr {err:?} should mention {fragment:?}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn init_export_import_eval_and_sample_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let text: String =
        "In the beginning was the word, and the word was with the bytes. ".repeat(20);
    std::fs::write(p("text.txt"), &text).unwrap();
    assert!(lowband(&[
        "init",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--out",
        &p("ckpt")
    ])
    .status
    .success());
    assert!(lowband(&[
        "export",
        "hf",
        "--checkpoint",
        &p("ckpt"),
        "--out",
        &p("hf")
    ])
    .status
    .success());
    assert!(Path::new(&p("hf")).join("config.json").exists());
    assert!(
        lowband(&["import", "hf", "--from", &p("hf"), "--out", &p("back")])
            .status
            .success()
    );
    let eval = |ckpt: &str| {
        let o = lowband(&[
            "eval",
            "--checkpoint",
            ckpt,
            "--data",
            &p("text.txt"),
            "--json",
            "-",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (original, round_tripped) = (eval(&p("ckpt")), eval(&p("back")));
    assert_eq!(original, round_tripped, "export + import changes nothing");
    assert!(
        (original - 256f64.ln()).abs() < 0.1,
        "a fresh model is near uniform: {original}"
    );
    let sample = |seed: &str| {
        stdout(&lowband(&[
            "sample",
            "--checkpoint",
            &p("ckpt"),
            "--prompt",
            "In the",
            "--tokens",
            "20",
            "--seed",
            seed,
        ]))
    };
    assert_eq!(sample("1"), sample("1"), "sampling is seeded");
    assert!(sample("1").starts_with("In the"));
}

#[test]
fn bad_input_is_one_clear_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    std::fs::write(p("short.txt"), "tiny").unwrap();
    std::fs::write(p("garbage"), [0u8, 159, 146, 150]).unwrap();
    assert_refused(
        &["init", "--preset", "huge", "--out", &p("x")],
        "unknown preset",
    );
    assert_refused(
        &[
            "eval",
            "--checkpoint",
            &p("missing"),
            "--data",
            &p("short.txt"),
        ],
        "not a lowband checkpoint",
    );
    assert!(lowband(&["init", "--preset", "tiny", "--out", &p("ckpt")])
        .status
        .success());
    assert_refused(
        &["eval", "--checkpoint", &p("ckpt"), "--data", &p("nope.txt")],
        "nope.txt",
    );
    assert_refused(
        &[
            "eval",
            "--checkpoint",
            &p("ckpt"),
            "--data",
            &p("short.txt"),
        ],
        "shorter than one window",
    );
    assert_refused(
        &["import", "hf", "--from", &p("ckpt"), "--out", &p("y")],
        "config.json",
    );
    assert_refused(
        &["train", "--corpus", &p("short.txt"), "--steps", "1"],
        "too short",
    );
    assert_refused(&["train", "--steps", "0"], "steps");
    std::fs::write(p("negative_lr.toml"), "[optimizer]\nlr = -1.0\n").unwrap();
    assert_refused(&["train", "--config", &p("negative_lr.toml")], "lr");
    assert_refused(&["train", "--strategy", "gossip"], "unknown strategy");
    assert_refused(&["bench", "engine", "--steps", "0"], "--steps");
    assert_refused(&["eval", "--bogus-flag"], "--bogus-flag");
}

#[test]
fn keygen_writes_a_key_once_and_prints_its_public_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lowband"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let first = run(&["keygen", "--out", "node.key"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let public = String::from_utf8_lossy(&first.stdout).trim().to_string();
    assert!(
        public.starts_with("public ") && public.len() == 7 + 64,
        "{public}"
    );
    assert!(std::fs::read_to_string(dir.path().join("node.key"))
        .unwrap()
        .contains(&public));
    let again = run(&["keygen", "--out", "node.key"]);
    assert_eq!(again.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = run(&["keygen", "--out", "node.key", "--force"]);
    assert!(forced.status.success());
    assert_ne!(
        String::from_utf8_lossy(&forced.stdout).trim(),
        public,
        "a new identity"
    );
}
