//! Checkpoints and the Hugging Face layout: round trips, and every kind of bad file refused with
//! a clear error (never a panic, never a silently wrong model).

mod common;

use std::fs;
use std::path::Path;

use lowband_engine::checkpoint::{self, MANIFEST_FILE};
use lowband_engine::{hf, Batch, CpuTrainer, EngineError, Gpt, OptimizerConfig, Trainer};

fn trained_trainer() -> CpuTrainer {
    let mut trainer = CpuTrainer::new(common::tiny_model(1), OptimizerConfig::default()).unwrap();
    let (inputs, targets) = common::batch(&common::tiny(), 2, 16, 4);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        batch_size: 2,
        seq_len: 16,
    };
    for _ in 0..3 {
        trainer.step(&batch, 1e-3).unwrap();
    }
    trainer
}

fn data_file(dir: &Path, prefix: &str) -> std::path::PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .unwrap()
}

#[test]
fn checkpoint_round_trips_parameters_and_optimizer_state_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = trained_trainer();
    let extra = serde_json::json!({ "round": 7 });
    checkpoint::save(
        dir.path(),
        &common::tiny(),
        trainer.params(),
        Some(trainer.optimizer()),
        extra.clone(),
    )
    .unwrap();
    let loaded = checkpoint::load(dir.path()).unwrap();
    assert_eq!(loaded.config, common::tiny());
    assert_eq!(loaded.params, trainer.params());
    let opt = loaded.optimizer.unwrap();
    assert_eq!(
        (opt.m.as_slice(), opt.v.as_slice(), opt.step),
        (
            trainer.optimizer().m.as_slice(),
            trainer.optimizer().v.as_slice(),
            3
        )
    );
    assert_eq!(loaded.extra, extra);
}

#[test]
fn saving_again_replaces_the_checkpoint_and_removes_stale_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(1);
    checkpoint::save(
        dir.path(),
        &common::tiny(),
        model.params(),
        None,
        serde_json::Value::Null,
    )
    .unwrap();
    let other = common::tiny_model(2);
    checkpoint::save(
        dir.path(),
        &common::tiny(),
        other.params(),
        None,
        serde_json::Value::Null,
    )
    .unwrap();
    assert_eq!(checkpoint::load(dir.path()).unwrap().params, other.params());
    let files: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 2, "manifest + one model file, got {files:?}");
}

fn expect_bad(dir: &Path, fragment: &str) {
    match checkpoint::load(dir) {
        Err(
            e @ (EngineError::BadCheckpoint { .. }
            | EngineError::NonFinite { .. }
            | EngineError::Io { .. }),
        ) => {
            assert!(
                e.to_string().contains(fragment),
                "error {e:?} should mention {fragment:?}"
            )
        }
        other => panic!("expected a bad-checkpoint error mentioning {fragment:?}, got {other:?}"),
    }
}

fn saved(dir: &Path) {
    checkpoint::save(
        dir,
        &common::tiny(),
        common::tiny_model(1).params(),
        None,
        serde_json::Value::Null,
    )
    .unwrap();
}

#[test]
fn truncated_or_altered_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let file = data_file(dir.path(), "model-");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    expect_bad(dir.path(), "truncated");
    let mut flipped = bytes.clone();
    flipped[bytes.len() - 5] ^= 0x40;
    fs::write(&file, &flipped).unwrap();
    expect_bad(dir.path(), "checksum");
}

#[test]
fn missing_foreign_or_future_manifests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    expect_bad(dir.path(), "not a lowband checkpoint");
    saved(dir.path());
    let manifest = dir.path().join(MANIFEST_FILE);
    let text = fs::read_to_string(&manifest).unwrap();
    fs::write(
        &manifest,
        text.replace("\"format_version\": 1", "\"format_version\": 9"),
    )
    .unwrap();
    expect_bad(dir.path(), "this build reads version 1");
    fs::write(&manifest, "{\"hello\": 1}").unwrap();
    expect_bad(dir.path(), "format");
    fs::write(&manifest, [0xffu8, 0, 1, 2]).unwrap();
    expect_bad(dir.path(), "not a lowband manifest");
    fs::write(&manifest, text.replace("\"heads\": 2", "\"heads\": 0")).unwrap();
    assert!(matches!(
        checkpoint::load(dir.path()),
        Err(EngineError::InvalidConfig { field: "heads", .. })
    ));
}

#[test]
#[allow(clippy::type_complexity)]
fn wrong_shape_and_non_finite_tensors_are_refused() {
    use lowband_engine::checkpoint::{tensors_to_safetensors, write_atomic};
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let manifest_path = dir.path().join(MANIFEST_FILE);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    let model = common::tiny_model(1);
    // Rewrite the data file with one tensor changed, and fix the manifest's digest to match, so
    // only the content check can catch it.
    let rewrite = |change: &dyn Fn(&str, &mut Vec<usize>, &mut Vec<f32>)| {
        let owned: Vec<(String, Vec<usize>, Vec<f32>)> = model
            .layout()
            .tensors
            .iter()
            .map(|t| {
                let (mut shape, mut data) = (t.shape.clone(), model.params()[t.range()].to_vec());
                change(&t.name, &mut shape, &mut data);
                (t.name.clone(), shape, data)
            })
            .collect();
        let named: Vec<_> = owned
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
            .collect();
        let bytes = tensors_to_safetensors(&named, None).unwrap();
        let name = "model-test.safetensors";
        write_atomic(&dir.path().join(name), &bytes).unwrap();
        let mut m = manifest.clone();
        m["params"] = serde_json::json!({ "file": name, "bytes": bytes.len(), "crc32": crc32fast::hash(&bytes) });
        fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    };
    rewrite(&|name, shape, data| {
        if name == "wpe" {
            shape[0] -= 1;
            data.truncate(shape.iter().product());
        }
    });
    expect_bad(dir.path(), "shape");
    rewrite(&|name, _, data| {
        if name == "h.1.mlp.fc.bias" {
            data[3] = f32::NAN;
        }
    });
    match checkpoint::load(dir.path()) {
        Err(EngineError::NonFinite { tensor, index }) => {
            assert_eq!((tensor.as_str(), index), ("h.1.mlp.fc.bias", 3))
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn hugging_face_export_imports_back_exactly_and_foreign_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(5);
    hf::export(dir.path(), &common::tiny(), model.params()).unwrap();
    let (config, params) = hf::import(dir.path()).unwrap();
    assert_eq!(config, common::tiny());
    assert_eq!(params, model.params());
    // Our checkpoint loader points at the right command for an HF directory.
    expect_bad(dir.path(), "import hf");
    let config_path = dir.path().join(hf::CONFIG_FILE);
    let text = fs::read_to_string(&config_path).unwrap();
    for (from, to, fragment) in [
        ("\"gelu_new\"", "\"relu\"", "activation_function"),
        (
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false",
            "tie_word_embeddings",
        ),
        ("\"n_head\": 2", "\"n_head\": 3", "heads"),
    ] {
        fs::write(&config_path, text.replace(from, to)).unwrap();
        let error = hf::import(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(fragment),
            "{error} should mention {fragment}"
        );
    }
    fs::write(&config_path, &text).unwrap();
    let weights = dir.path().join(hf::WEIGHTS_FILE);
    let bytes = fs::read(&weights).unwrap();
    fs::write(&weights, &bytes[..100]).unwrap();
    assert!(hf::import(dir.path())
        .unwrap_err()
        .to_string()
        .contains("safetensors"));
}

#[test]
fn same_seed_and_threads_give_bitwise_identical_training() {
    let run = || {
        let mut trainer =
            CpuTrainer::new(common::tiny_model(9), OptimizerConfig::default()).unwrap();
        let mut losses = Vec::new();
        for step in 0..5 {
            let (inputs, targets) = common::batch(&common::tiny(), 4, 32, step);
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
                batch_size: 4,
                seq_len: 32,
            };
            losses.push(trainer.step(&batch, 1e-3).unwrap().0.to_bits());
        }
        (
            losses,
            trainer
                .params()
                .iter()
                .map(|p| p.to_bits())
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(run(), run());
    assert_ne!(
        Gpt::new(common::tiny(), 1).unwrap().params(),
        Gpt::new(common::tiny(), 2).unwrap().params()
    );
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let mut model = common::tiny_model(1);
    let t = common::tiny().context_length;
    let ok: Vec<u32> = vec![1; 2 * t];
    for (inputs, b, seq, fragment) in [
        (vec![1u32; 2 * (t + 1)], 2, t + 1, "context length"),
        (vec![1u32; 5], 2, 4, "tokens for a 2 x 4 batch"),
        (vec![300u32; 8], 2, 4, "outside the vocabulary"),
        (vec![], 0, 4, "empty batch"),
        (vec![1u32; 8], 1 << 40, 8, "activations"),
    ] {
        let error = model
            .forward(&inputs, None, b, seq)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(fragment),
            "{error} should mention {fragment}"
        );
    }
    let mut fresh = common::tiny_model(1);
    assert!(
        fresh.backward().is_err(),
        "backward before any forward is an error"
    );
    fresh.forward(&ok, None, 2, t).unwrap();
    assert!(
        fresh.backward().is_err(),
        "backward after a forward without targets is an error"
    );
}

#[test]
fn loss_decreases_on_text_within_a_bounded_number_of_steps() {
    // Repetitive but non-trivial text: the model must learn it from about 5.5 nats (uniform over
    // 256 bytes) to well under half of that in 150 steps of the tiny preset.
    let text =
        "the quick brown fox jumps over the lazy dog; a lazy dog sleeps under the old oak tree. "
            .repeat(40);
    let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
    let mut trainer = CpuTrainer::new(
        common::tiny_model(0),
        OptimizerConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let (b, t) = (8, 32);
    let mut first = None;
    let mut last = 0.0;
    for step in 0..150usize {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for row in 0..b {
            let start = (step * 131 + row * 977) % (bytes.len() - t - 1);
            inputs.extend_from_slice(&bytes[start..start + t]);
            targets.extend_from_slice(&bytes[start + 1..start + t + 1]);
        }
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            batch_size: b,
            seq_len: t,
        };
        last = trainer.step(&batch, 1e-2).unwrap().0;
        first.get_or_insert(last);
    }
    assert!(first.unwrap() > 5.0, "starts near uniform: {first:?}");
    assert!(last < 1.5, "after 150 steps the loss is {last}");
}

/// `--summary /dev/null` as root must not turn the null device into a regular file: a path that
/// names a pipe or a device is written in place, a symlink's target is replaced (the link stays),
/// a directory is refused and left alone.
#[cfg(unix)]
#[test]
fn atomic_writes_keep_pipes_symlinks_and_directories_what_they_are() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();

    let pipe = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = {
        let pipe = pipe.clone();
        std::thread::spawn(move || fs::read(pipe).unwrap())
    };
    checkpoint::write_atomic(&pipe, b"through the pipe").unwrap();
    // Checked before joining: a pipe replaced by a file would leave the reader waiting forever.
    assert!(fs::symlink_metadata(&pipe).unwrap().file_type().is_fifo());
    assert_eq!(reader.join().unwrap(), b"through the pipe");

    let target = dir.path().join("target.json");
    fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    checkpoint::write_atomic(&link, b"new").unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&target).unwrap(), b"new");

    let error = checkpoint::write_atomic(dir.path(), b"x").unwrap_err();
    assert!(error.to_string().contains("directory"), "{error}");
    assert!(dir.path().is_dir());
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "no temp file left behind: {names:?}");
}
