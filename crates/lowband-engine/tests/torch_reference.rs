//! lowband's engine against PyTorch and Hugging Face `transformers` on identical weights (loss,
//! logits, every gradient, parameters after AdamW steps): runs `bench/torch_reference.py`.
//!
//! Needs a Python with torch and transformers: `LOWBAND_PYTHON` names it (default `python3`).
//! Without one the test says SKIPPED and passes; `LOWBAND_REQUIRE_TORCH=1` (set by .ci/run, which
//! installs torch) turns the skip into a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lowband_engine::checkpoint::{tensors_to_safetensors, write_atomic};
use lowband_engine::{hf, Batch, CpuTrainer, Gpt, ModelConfig, OptimizerConfig, Trainer};

fn python() -> String {
    std::env::var("LOWBAND_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn torch_available() -> bool {
    Command::new(python())
        .args(["-c", "import torch, transformers, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/torch_reference.py")
}

/// Write the case for `config` with a (B, T) batch and run the Python check on it.
fn run_case(config: ModelConfig, b: usize, t: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Gpt::new(config, 3).unwrap();
    // Off the init, so LayerNorm weights and biases are not all 1 and 0.
    let mut state = 99u64;
    for p in model.params_mut() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        *p += ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
    }
    hf::export(&dir.path().join("hf"), &config, model.params()).unwrap();
    let (inputs, targets) = common::batch(&config, b, t, 17);
    let optimizer = OptimizerConfig {
        lr: 1e-3,
        ..OptimizerConfig::default()
    };
    let mut trainer = CpuTrainer::new(model, optimizer).unwrap();
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        batch_size: b,
        seq_len: t,
    };
    let loss = trainer.compute_gradients(&batch).unwrap();
    let logits = trainer.model.logits().to_vec();
    let grads = trainer.grads().to_vec();
    let learning_rates = [1e-3f32, 2e-3, 3e-3];
    for (i, &lr) in learning_rates.iter().enumerate() {
        if i > 0 {
            trainer.compute_gradients(&batch).unwrap();
        }
        trainer.apply_gradients(lr).unwrap();
    }
    let tensors = trainer.tensors().to_vec();
    let mut named = vec![(
        "logits".to_string(),
        vec![b, t, config.vocab_size],
        logits.as_slice(),
    )];
    for tensor in &tensors {
        named.push((
            format!("grad.{}", tensor.name),
            tensor.shape.clone(),
            &grads[tensor.range()],
        ));
        named.push((
            format!("after.{}", tensor.name),
            tensor.shape.clone(),
            &trainer.params()[tensor.range()],
        ));
    }
    write_atomic(
        &dir.path().join("expected.safetensors"),
        &tensors_to_safetensors(&named, None).unwrap(),
    )
    .unwrap();
    let case = serde_json::json!({
        "inputs": inputs, "targets": targets, "batch_size": b, "seq_len": t, "loss": loss,
        "optimizer": optimizer, "learning_rates": learning_rates,
    });
    write_atomic(&dir.path().join("case.json"), case.to_string().as_bytes()).unwrap();
    run_check(&script(), dir.path(), "PyTorch reference");
}

/// Run the Python check `script` on the case in `dir`; it must agree.
fn run_check(script: &Path, dir: &Path, what: &str) {
    let output = Command::new(python())
        .arg(script)
        .arg(dir)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "{what} disagrees:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A skipped test leaves `target/tmp/lowband-skipped/NAME` with its reason, so that `.ci/run`
/// (and anyone) can count the skips the test harness reports as "ok".
fn record_skip(name: &str, reason: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lowband-skipped");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(name), reason);
}

/// Without a Python that has torch, transformers and safetensors: say SKIPPED, record it, and
/// return true (a failure when `LOWBAND_REQUIRE_TORCH` is set).
fn skipped_without_torch(name: &str) -> bool {
    if torch_available() {
        return false;
    }
    assert!(
        std::env::var("LOWBAND_REQUIRE_TORCH").is_err(),
        "LOWBAND_REQUIRE_TORCH is set but {} cannot import torch and transformers",
        python()
    );
    let reason = format!(
        "SKIPPED: {} cannot import torch, transformers and safetensors (set LOWBAND_PYTHON)",
        python()
    );
    println!("{reason}");
    record_skip(name, &reason);
    true
}

#[test]
fn engine_matches_pytorch_and_transformers_on_identical_weights() {
    if skipped_without_torch("engine_matches_pytorch_and_transformers_on_identical_weights") {
        return;
    }
    run_case(common::tiny(), 4, 32);
    // The `small` preset's shapes, a short batch: full-width attention over 64 positions.
    run_case(lowband_engine::preset("small").unwrap().model, 2, 64);
}

/// Muon (hidden 2-D weights) with AdamW (the rest) against `torch.optim.Muon` + `AdamW` on the
/// same parameters and gradients, three steps at three learning rates: `bench/torch_muon.py`.
#[test]
fn muon_matches_pytorch() {
    if skipped_without_torch("muon_matches_pytorch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = lowband_engine::preset("small").unwrap().model;
    let model = Gpt::new(config, 5).unwrap();
    let optimizer = OptimizerConfig {
        lr: 3e-3,
        grad_clip: 0.0,
        muon: Some(lowband_engine::MuonConfig::default()),
        ..OptimizerConfig::default()
    };
    let mut trainer = CpuTrainer::new(model, optimizer).unwrap();
    let tensors = trainer.tensors().to_vec();
    let initial = trainer.params().to_vec();
    let learning_rates = [3e-3f32, 1.5e-3, 3e-4];
    let mut saved: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|t| {
            (
                format!("initial.{}", t.name),
                t.shape.clone(),
                initial[t.range()].to_vec(),
            )
        })
        .collect();
    let mut state = 7u64;
    for (step, &lr) in learning_rates.iter().enumerate() {
        let grads: Vec<f32> = (0..initial.len())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
            })
            .collect();
        trainer.grads_mut().copy_from_slice(&grads);
        trainer.apply_gradients(lr).unwrap();
        for t in &tensors {
            saved.push((
                format!("grad.{step}.{}", t.name),
                t.shape.clone(),
                grads[t.range()].to_vec(),
            ));
            saved.push((
                format!("after.{step}.{}", t.name),
                t.shape.clone(),
                trainer.params()[t.range()].to_vec(),
            ));
        }
    }
    let named: Vec<(String, Vec<usize>, &[f32])> = saved
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    write_atomic(
        &dir.path().join("case.safetensors"),
        &tensors_to_safetensors(&named, None).unwrap(),
    )
    .unwrap();
    let described: Vec<serde_json::Value> = tensors
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "muon": lowband_engine::muon::applies_to(t), "decay": t.weight_decay,
            })
        })
        .collect();
    let case = serde_json::json!({
        "tensors": described, "optimizer": optimizer, "learning_rates": learning_rates,
    });
    write_atomic(&dir.path().join("case.json"), case.to_string().as_bytes()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/torch_muon.py");
    run_check(&script, dir.path(), "PyTorch's Muon");
}
