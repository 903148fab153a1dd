//! The in-memory driver: exactness of the strategies, the ledger, and resuming.

use lowband_data::{ShardMode, Split, SyntheticLanguage, SyntheticSpec};
use lowband_engine::{preset, Batch, CpuTrainer, Gpt, LrSchedule, Trainer};
use lowband_runtime::{run, Endpoint, Persistence, RunConfig, RunError, RunResult, Strategy};

fn config(sites: usize, steps: u64, inner_steps: u64) -> RunConfig {
    RunConfig {
        preset: "tiny".into(),
        sites,
        site_batch: 2,
        steps,
        inner_steps,
        eval_every_steps: 4,
        eval_windows: 8,
        ..RunConfig::default()
    }
}

fn split(config: &RunConfig) -> Split {
    let text = SyntheticLanguage::new(SyntheticSpec {
        words: 100,
        ..SyntheticSpec::default()
    })
    .generate(60_000, 3);
    Split::new(
        &text,
        config.validation_fraction,
        config.sites,
        ShardMode::NonIid,
        preset("tiny").unwrap().model.context_length,
    )
    .unwrap()
}

fn go(
    config: &RunConfig,
    strategy: &str,
    persistence: &Persistence,
) -> Result<RunResult, RunError> {
    run(
        config,
        Strategy::parse(strategy, config.inner_steps).unwrap(),
        &split(config),
        persistence,
        &mut |_| {},
    )
}

#[test]
fn same_config_gives_bitwise_identical_runs() {
    let c = config(2, 6, 3);
    let (a, b) = (
        go(&c, "diloco", &Persistence::default()).unwrap(),
        go(&c, "diloco", &Persistence::default()).unwrap(),
    );
    assert_eq!(a.final_params, b.final_params);
    assert_eq!(a.final_val_loss, b.final_val_loss);
}

#[test]
fn ddp_with_k_sites_equals_one_site_with_k_times_the_batch() {
    let c = config(2, 5, 1);
    let ddp = go(&c, "ddp", &Persistence::default()).unwrap();
    // By hand: one trainer, each step on the two sites' batches concatenated.
    let s = split(&c);
    let model = preset("tiny").unwrap().model;
    let t = model.context_length;
    let mut trainer = CpuTrainer::new(Gpt::new(model, c.seed).unwrap(), c.optimizer).unwrap();
    let mut samplers: Vec<_> = (0..2).map(lowband_data::Sampler::new).collect();
    let schedule = LrSchedule::reference(c.optimizer.lr, c.steps);
    for step in 0..c.steps {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for (k, sampler) in samplers.iter_mut().enumerate() {
            let (mut i, mut tg) = (Vec::new(), Vec::new());
            sampler.fill(&s.shards[k], c.site_batch, t, &mut i, &mut tg);
            inputs.extend(i);
            targets.extend(tg);
        }
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            batch_size: 2 * c.site_batch,
            seq_len: t,
        };
        trainer.step(&batch, schedule.lr_at(step)).unwrap();
    }
    // The mean of per-site mean gradients equals the gradient of the whole batch's mean loss up
    // to float summation order, so the two agree closely but not bitwise.
    let worst = ddp
        .final_params
        .iter()
        .zip(trainer.params())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 2e-5, "largest parameter difference {worst}");
}

#[test]
fn fedavg_with_one_site_and_one_step_per_round_reproduces_plain_training() {
    // θ − (θ − θ_site) is θ_site exactly whenever θ and θ_site are within a factor of two of each
    // other (Sterbenz). AdamW's first step moves every weight by about lr (a sign step), so the
    // weights within a few lr of zero can round differently (measured: 1.2% of the tiny model);
    // the rest are bitwise equal to plain training. After that, every gradient differs in its
    // last bits and the runs stay equal only to rounding.
    let one = config(1, 1, 1);
    let (fedavg, plain) = (
        go(&one, "fedavg@1", &Persistence::default()).unwrap(),
        go(&one, "ddp", &Persistence::default()).unwrap(),
    );
    let equal = fedavg
        .final_params
        .iter()
        .zip(&plain.final_params)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    assert!(
        equal as f64 > 0.97 * plain.final_params.len() as f64,
        "{equal} of {} bitwise equal",
        plain.final_params.len()
    );
    let c = config(1, 6, 1);
    let (fedavg, plain) = (
        go(&c, "fedavg@1", &Persistence::default()).unwrap(),
        go(&c, "ddp", &Persistence::default()).unwrap(),
    );
    // A wrong outer step (sign, scale, a missed round) moves parameters by about lr per step
    // (3e-3 here); rounding, amplified by AdamW's normalisation, stays far below 1% of that.
    let worst = fedavg
        .final_params
        .iter()
        .zip(&plain.final_params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-2 * c.optimizer.lr, "largest difference {worst}");
    assert!(
        fedavg.ledger.total_bytes() > 0 && plain.ledger.total_bytes() == 0,
        "one site: DDP sends nothing, rounds still go through the protocol"
    );
}

#[test]
fn ledger_counts_every_packet_and_adds_up() {
    let c = config(3, 10, 4);
    let r = go(&c, "diloco", &Persistence::default()).unwrap();
    let n = r.params as u64;
    // Rounds of 4, 4 and 2 steps; every round one global down and one update up per site, each
    // an fp32 payload (6 + 4n bytes) in a 28-byte envelope.
    assert_eq!(r.rounds, 3);
    let packet = 28 + 6 + 4 * n;
    assert_eq!(r.ledger.total_bytes(), 3 * 3 * 2 * packet);
    assert_eq!(r.ledger.bytes_sent_by(Endpoint::Coordinator), 9 * packet);
    for k in 0..3 {
        assert_eq!(r.ledger.bytes_sent_by(Endpoint::Site(k)), 3 * packet);
    }
    let ddp = go(&c, "ddp", &Persistence::default()).unwrap();
    assert_eq!(
        ddp.ledger.total_bytes(),
        10 * 3 * (2 * 2 * 4 * n / 3),
        "ring all-reduce: 2(K-1)/K x 4n per site per step"
    );
    assert_eq!(r.tokens, ddp.tokens, "same tokens for every strategy");
    let per_link: u64 = r.ledger.per_link().iter().map(|l| l.3).sum();
    assert_eq!(per_link, r.ledger.total_bytes());
}

#[test]
fn a_run_stopped_midway_resumes_to_exactly_the_uninterrupted_result() {
    for strategy in ["diloco", "ddp"] {
        let dir = tempfile::tempdir().unwrap();
        let c = RunConfig {
            checkpoint_every_rounds: 1,
            ..config(2, 12, 3)
        };
        let straight = go(&c, strategy, &Persistence::default()).unwrap();
        let persistence = Persistence {
            observer: None,
            state_dir: Some(dir.path().to_path_buf()),
            stop_after_rounds: Some(2),
        };
        assert!(
            matches!(
                go(&c, strategy, &persistence),
                Err(RunError::Stopped { step: 6 })
            ),
            "{strategy}"
        );
        let resumed = go(
            &c,
            strategy,
            &Persistence {
                observer: None,
                state_dir: Some(dir.path().to_path_buf()),
                stop_after_rounds: None,
            },
        )
        .unwrap();
        assert_eq!(
            resumed.final_params, straight.final_params,
            "{strategy}: parameters"
        );
        assert_eq!(
            resumed.final_val_loss, straight.final_val_loss,
            "{strategy}"
        );
        assert_eq!(
            resumed.ledger, straight.ledger,
            "{strategy}: the ledger carries over"
        );
        assert_eq!(
            resumed.metrics.len(),
            straight.metrics.len(),
            "{strategy}: metrics carry over"
        );
    }
}

/// A compressed strategy: each update is exactly its codec's documented size; the coordinator's
/// first broadcast is empty (every site derives θ₀ from the seed), later ones carry the change in
/// the same codec; and a stopped run resumes to exactly the uninterrupted result, error-feedback
/// residuals included.
#[test]
fn compressed_rounds_send_exactly_their_codec_sizes_and_resume_exactly() {
    let c = RunConfig {
        checkpoint_every_rounds: 1,
        ..config(3, 10, 4)
    };
    for name in ["sparseloco", "diloco-int8", "demo-dct"] {
        let strategy = Strategy::parse(name, c.inner_steps).unwrap();
        let r = go(&c, name, &Persistence::default()).unwrap();
        let n = r.params;
        let compression = strategy.compression_for(c.sites);
        let up = 28 + compression.uplink.payload_bytes(n) as u64;
        let down = 28 + compression.downlink.payload_bytes(n) as u64;
        assert_eq!(r.rounds, 3);
        for k in 0..3 {
            assert_eq!(r.ledger.bytes_sent_by(Endpoint::Site(k)), 3 * up, "{name}");
        }
        assert_eq!(
            r.ledger.bytes_sent_by(Endpoint::Coordinator),
            3 * (28 + 2 * down),
            "{name}"
        );
        assert!(r.final_val_loss.is_finite());
        let dir = tempfile::tempdir().unwrap();
        let stop = Persistence {
            observer: None,
            state_dir: Some(dir.path().to_path_buf()),
            stop_after_rounds: Some(2),
        };
        assert!(
            matches!(go(&c, name, &stop), Err(RunError::Stopped { step: 8 })),
            "{name}"
        );
        let resumed = go(
            &c,
            name,
            &Persistence {
                observer: None,
                state_dir: Some(dir.path().to_path_buf()),
                stop_after_rounds: None,
            },
        )
        .unwrap();
        assert_eq!(resumed.final_params, r.final_params, "{name}");
        assert_eq!(
            resumed.ledger.total_bytes(),
            r.ledger.total_bytes(),
            "{name}"
        );
    }
}

#[test]
fn invalid_configs_name_their_field() {
    for (c, field) in [
        (
            RunConfig {
                sites: 0,
                ..config(1, 1, 1)
            },
            "sites",
        ),
        (
            RunConfig {
                inner_steps: 0,
                ..config(1, 1, 1)
            },
            "inner_steps",
        ),
        (
            RunConfig {
                steps: 0,
                ..config(1, 1, 1)
            },
            "steps",
        ),
        (
            RunConfig {
                site_speeds: vec![1.0],
                ..config(2, 1, 1)
            },
            "site_speeds",
        ),
        (
            RunConfig {
                site_speeds: vec![1.0, 0.0],
                ..config(2, 1, 1)
            },
            "site_speeds",
        ),
        (
            RunConfig {
                preset: "huge".into(),
                ..config(1, 1, 1)
            },
            "preset",
        ),
        (
            RunConfig {
                lr_outer: -1.0,
                ..config(1, 1, 1)
            },
            "lr_outer",
        ),
    ] {
        match c.validate() {
            Err((f, _)) => assert_eq!(f, field),
            Ok(()) => panic!("{field} should be refused"),
        }
    }
}

#[test]
fn resuming_under_other_settings_or_from_a_corrupted_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = RunConfig {
        checkpoint_every_rounds: 1,
        ..config(2, 12, 3)
    };
    let stop = Persistence {
        observer: None,
        state_dir: Some(dir.path().to_path_buf()),
        stop_after_rounds: Some(2),
    };
    assert!(matches!(
        go(&c, "diloco", &stop),
        Err(RunError::Stopped { .. })
    ));
    let resume = Persistence {
        observer: None,
        state_dir: Some(dir.path().to_path_buf()),
        stop_after_rounds: None,
    };
    let other = RunConfig {
        seed: 1,
        ..c.clone()
    };
    match go(&other, "diloco", &resume) {
        Err(RunError::State(reason)) => assert!(reason.contains("other settings"), "{reason}"),
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|r| r.final_val_loss)
        ),
    }
    // Corrupt the saved global parameters: a NaN where a value was.
    let strategy_dir = dir.path().join("diloco-h3");
    let current: serde_json::Value =
        serde_json::from_slice(&std::fs::read(strategy_dir.join("current.json")).unwrap()).unwrap();
    let tensors = strategy_dir
        .join(current["dir"].as_str().unwrap())
        .join("tensors.safetensors");
    let mut bytes = std::fs::read(&tensors).unwrap();
    let at = bytes.len() - 4; // the last value of the last tensor
    bytes[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&tensors, &bytes).unwrap();
    match go(&c, "diloco", &resume) {
        // (The tensors file's checksum refuses it before any value is read.)
        Err(RunError::State(reason)) => assert!(reason.contains("altered"), "{reason}"),
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|r| r.final_val_loss)
        ),
    }
}

/// Streaming with one fragment, no overlap and no mixing is exactly DiLoCo with the same codecs;
/// with P fragments each sync moves about 1/P of the bytes (the lower peak bandwidth).
#[test]
fn streaming_reduces_to_diloco_and_lowers_the_peak() {
    let c = config(2, 16, 8);
    let diloco = go(&c, "diloco-4bit", &Persistence::default()).unwrap();
    let one = go(
        &c,
        "streaming[fragments=1;overlap=0;mix=0]",
        &Persistence::default(),
    )
    .unwrap();
    assert_eq!(
        one.final_params, diloco.final_params,
        "P = 1, τ = 0, α = 0 is DiLoCo"
    );
    assert_eq!(one.ledger.total_bytes(), diloco.ledger.total_bytes());
    let four = go(
        &c,
        "streaming[fragments=4;overlap=1]",
        &Persistence::default(),
    )
    .unwrap();
    assert!(four.final_val_loss.is_finite());
    // 16 steps, H = 8, P = 4: a fragment syncs every 2 steps (7 inside the run) + 4 at the end.
    assert_eq!(four.rounds, 11);
    let ratio = four.peak_sync_bytes_per_site as f64 / diloco.peak_sync_bytes_per_site as f64;
    assert!(
        (0.2..0.3).contains(&ratio),
        "peak per sync: {} vs {} bytes",
        four.peak_sync_bytes_per_site,
        diloco.peak_sync_bytes_per_site
    );
}

/// Codecs with a pseudo-random stream (random-k positions, stochastic rounding, on the uplink
/// and the downlink) resume to exactly the uninterrupted run: their streams are saved too.
#[test]
fn randomized_codecs_resume_exactly() {
    let c = RunConfig {
        checkpoint_every_rounds: 1,
        ..config(3, 10, 4)
    };
    for name in ["sparseloco[up=randomk:k=64,chunk=4096,values=q2,seed=5;down=randomk:k=256,chunk=4096,values=q2,seed=6]", "diloco-4bit[up=int4:round=stochastic,seed=3;down=int4:round=stochastic,seed=4]"] {
        let straight = go(&c, name, &Persistence::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stop = Persistence { observer: None, state_dir: Some(dir.path().to_path_buf()), stop_after_rounds: Some(1) };
        assert!(matches!(go(&c, name, &stop), Err(RunError::Stopped { .. })), "{name}");
        let resumed = go(&c, name, &Persistence { observer: None, state_dir: Some(dir.path().to_path_buf()), stop_after_rounds: None }).unwrap();
        assert!(resumed.final_params == straight.final_params, "{name}: the resumed parameters differ");
        assert_eq!(resumed.ledger, straight.ledger, "{name}");
    }
}

/// Streaming DiLoCo saves a state right after a sync (its merge in flight) and resumes to
/// exactly the uninterrupted run: parameters, ledger, peak and emulated time.
#[test]
fn a_streaming_run_stopped_midway_resumes_exactly() {
    let c = RunConfig {
        checkpoint_every_rounds: 1,
        ..config(3, 24, 8)
    };
    let name = "streaming@8[fragments=4;overlap=1;mix=0.5]";
    let straight = go(&c, name, &Persistence::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = Persistence {
        observer: None,
        state_dir: Some(dir.path().to_path_buf()),
        stop_after_rounds: Some(5),
    };
    assert!(matches!(go(&c, name, &stop), Err(RunError::Stopped { .. })));
    let resumed = go(
        &c,
        name,
        &Persistence {
            observer: None,
            state_dir: Some(dir.path().to_path_buf()),
            stop_after_rounds: None,
        },
    )
    .unwrap();
    assert!(
        resumed.final_params == straight.final_params,
        "the resumed parameters differ"
    );
    assert_eq!(resumed.ledger, straight.ledger);
    assert_eq!(
        resumed.peak_sync_bytes_per_site,
        straight.peak_sync_bytes_per_site
    );
    assert_eq!(resumed.rounds, straight.rounds);
    assert_eq!(resumed.metrics.len(), straight.metrics.len());
}

/// Site speeds change when things happen on the emulated clock, never what is computed; a slow
/// site is busy for more of the run (the fast ones wait for it), and every share is in (0, 1].
#[test]
fn site_speeds_charge_each_site_its_own_compute_and_change_no_result() {
    let even = config(2, 12, 4);
    let uneven = RunConfig {
        site_speeds: vec![1.0, 0.2],
        ..even.clone()
    };
    for strategy in ["ddp", "diloco", "streaming@8[fragments=2;overlap=1]"] {
        let a = go(&even, strategy, &Persistence::default()).unwrap();
        let b = go(&uneven, strategy, &Persistence::default()).unwrap();
        assert_eq!(a.final_params, b.final_params, "{strategy}");
        assert_eq!(a.metrics.len(), b.metrics.len(), "{strategy}");
        assert!(
            b.compute_seconds > a.compute_seconds,
            "{strategy}: the slow site takes longer"
        );
        assert_eq!(b.site_goodput.len(), 2);
        for g in &b.site_goodput {
            assert!(*g > 0.0 && *g <= 1.0, "{strategy}: goodput {g}");
        }
        // Site 1 computes 5x as long on the emulated clock: the busier share by far.
        assert!(
            b.site_goodput[1] > 2.0 * b.site_goodput[0],
            "{strategy}: {:?}",
            b.site_goodput
        );
        assert!((b.goodput() - (b.site_goodput[0] + b.site_goodput[1]) / 2.0).abs() < 1e-12);
    }
}

/// Muon as the sites' inner optimizer: a run trains, differs from AdamW's, and a run stopped
/// midway resumes to exactly the uninterrupted one (Muon's momentum is saved with the sites'
/// optimizer state).
#[test]
fn muon_inner_optimizer_trains_and_resumes_exactly() {
    let mut c = RunConfig {
        checkpoint_every_rounds: 1,
        ..config(2, 12, 3)
    };
    let adamw = go(&c, "diloco", &Persistence::default()).unwrap();
    c.optimizer.muon = Some(lowband_engine::MuonConfig::default());
    let straight = go(&c, "diloco", &Persistence::default()).unwrap();
    assert_ne!(straight.final_params, adamw.final_params);
    assert!(straight.final_val_loss.is_finite());
    let dir = tempfile::tempdir().unwrap();
    let stop = Persistence {
        observer: None,
        state_dir: Some(dir.path().to_path_buf()),
        stop_after_rounds: Some(2),
    };
    assert!(matches!(
        go(&c, "diloco", &stop),
        Err(RunError::Stopped { step: 6 })
    ));
    let resume = Persistence {
        stop_after_rounds: None,
        ..stop
    };
    let resumed = go(&c, "diloco", &resume).unwrap();
    assert_eq!(resumed.final_params, straight.final_params);
}

/// `inner=muon` picks Muon for one strategy of a run, beside AdamW in another: the same as the
/// run-wide `[optimizer.muon]`, bit for bit.
#[test]
fn a_strategy_can_pick_muon_for_its_sites() {
    let c = config(2, 12, 3);
    let picked = go(
        &c,
        "diloco[inner=muon;muon_lr=0.01]",
        &Persistence::default(),
    )
    .unwrap();
    let mut run_wide = c.clone();
    run_wide.optimizer.muon = Some(lowband_engine::MuonConfig {
        lr: 0.01,
        ..Default::default()
    });
    let everywhere = go(&run_wide, "diloco", &Persistence::default()).unwrap();
    assert_eq!(picked.final_params, everywhere.final_params);
    let adamw = go(&run_wide, "diloco[inner=adamw]", &Persistence::default()).unwrap();
    assert_eq!(
        adamw.final_params,
        go(&c, "diloco", &Persistence::default())
            .unwrap()
            .final_params
    );
    assert_eq!(
        Strategy::parse("diloco[muon_lr=0.01;inner=muon]", 3)
            .unwrap()
            .name(),
        "diloco@3[inner=muon;muon_lr=0.01]"
    );
    assert!(Strategy::parse("diloco[inner=sgd]", 3).is_err());
    assert!(Strategy::parse("diloco[inner=adamw;muon_lr=0.01]", 3).is_err());
}

/// `ddp[inner=muon]` (the reference for Muon sites) is DDP with the run-wide Muon, bit for bit,
/// and differs from AdamW's DDP.
#[test]
fn ddp_takes_muon_as_its_optimizer() {
    let c = config(2, 6, 3);
    let picked = go(&c, "ddp[inner=muon;muon_lr=0.01]", &Persistence::default()).unwrap();
    let mut run_wide = c.clone();
    run_wide.optimizer.muon = Some(lowband_engine::MuonConfig {
        lr: 0.01,
        ..Default::default()
    });
    let everywhere = go(&run_wide, "ddp", &Persistence::default()).unwrap();
    assert_eq!(picked.final_params, everywhere.final_params);
    let adamw = go(&c, "ddp", &Persistence::default()).unwrap();
    assert_ne!(picked.final_params, adamw.final_params);
    assert!(picked.final_val_loss.is_finite());
}
