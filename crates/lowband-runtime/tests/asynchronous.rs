//! Rounds on the emulated clock's schedule (`async-diloco`, `[quorum=N]`): determinism, the
//! equal-speed limit, goodput, and the accounting of stale updates.

use lowband_data::{ShardMode, Split, SyntheticLanguage, SyntheticSpec};
use lowband_engine::preset;
use lowband_runtime::{
    run, Endpoint, LinkProfile, Metric, Persistence, RunConfig, RunError, RunResult, Strategy,
};

/// A link that costs (almost) nothing: the schedule is the sites' compute alone.
const FAST_LINK: LinkProfile = LinkProfile {
    bandwidth_gbit_per_s: 1e6,
    latency_ms: 0.0,
    price_per_gb: 0.0,
};

fn config(speeds: &[f64], steps: u64, inner_steps: u64) -> RunConfig {
    RunConfig {
        preset: "tiny".into(),
        sites: speeds.len(),
        site_batch: 2,
        steps,
        inner_steps,
        eval_every_steps: 8,
        eval_windows: 8,
        site_speeds: speeds.to_vec(),
        link: FAST_LINK,
        // Steps of a tenth of a second on the emulated clock (the tiny model at 0.1 GFLOP/s):
        // far above the coordinator clock's millisecond.
        site_gflop_per_second: 0.1,
        ..RunConfig::default()
    }
}

fn go(config: &RunConfig, strategy: &str) -> Result<RunResult, RunError> {
    go_with(config, strategy, &Persistence::default())
}

fn split(config: &RunConfig) -> Split {
    let text = SyntheticLanguage::new(SyntheticSpec {
        words: 100,
        ..SyntheticSpec::default()
    })
    .generate(60_000, 3);
    let context = preset("tiny").unwrap().model.context_length;
    Split::new(
        &text,
        config.validation_fraction,
        config.sites,
        ShardMode::NonIid,
        context,
    )
    .unwrap()
}

fn go_with(
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
fn the_schedule_is_a_pure_function_of_the_settings_and_the_seed() {
    let speeds = config(&[1.0, 1.0, 0.7, 0.4], 40, 8);
    let a = go(&speeds, "async-diloco").unwrap();
    let b = go(&speeds, "async-diloco").unwrap();
    assert_eq!(a.final_params, b.final_params);
    // Every metric, emulated seconds included: the clock is nominal, not measured.
    assert_eq!(a.metrics, b.metrics);
    assert_eq!(a.emulated_seconds(), b.emulated_seconds());
    // Slower sites train fewer tokens in the same time: 40 + 40 + 28 + 16 steps.
    let tokens_per_step = 2 * preset("tiny").unwrap().model.context_length as u64;
    assert_eq!(a.tokens, 124 * tokens_per_step);
    // The speeds are part of the schedule, so of the result.
    let even = go(&config(&[1.0; 4], 40, 8), "async-diloco").unwrap();
    assert_ne!(a.final_params, even.final_params);
}

#[test]
fn with_equal_speeds_async_diloco_behaves_like_synchronous_rounds() {
    // (An asynchronous site takes a merge one step after it sent its update, having trained
    // that step on: 1 step in 32 is carried here.)
    let even = config(&[1.0; 4], 96, 32);
    let sync = go(&even, "diloco").unwrap();
    let asynchronous = go(&even, "async-diloco").unwrap();
    assert_eq!(asynchronous.rounds, sync.rounds);
    assert_eq!(asynchronous.tokens, sync.tokens);
    let gap = (asynchronous.final_val_loss / sync.final_val_loss - 1.0).abs();
    assert!(
        gap < 0.01,
        "{} vs {}",
        asynchronous.final_val_loss,
        sync.final_val_loss
    );
}

#[test]
fn goodput_is_what_the_schedule_says() {
    let speeds = [1.0, 1.0, 0.7, 0.4];
    let config = config(&speeds, 48, 8);
    // Synchronous rounds wait for the slowest site: each site is busy 1/speed of 1/0.4.
    let sync = go(&config, "diloco").unwrap();
    let expected = 0.4 * speeds.iter().map(|s| 1.0 / s).sum::<f64>() / 4.0;
    assert!(
        (sync.goodput() - expected).abs() < 0.01,
        "{} vs {expected}",
        sync.goodput()
    );
    // Nobody waits: only the run's tail (the last updates' transfer and merge) is not goodput.
    let asynchronous = go(&config, "async-diloco").unwrap();
    assert!(
        asynchronous.goodput() > 0.95,
        "{:?}",
        asynchronous.site_goodput
    );
    assert!(asynchronous.emulated_seconds() < 0.5 * sync.emulated_seconds());
    // A quorum of 3 closes every round without the slowest site: its compute is thrown away.
    let quorum = go(&config, "diloco[quorum=3]").unwrap();
    assert_eq!(quorum.site_goodput[3], 0.0);
    let missed = quorum
        .metrics
        .iter()
        .filter(|m| matches!(m, Metric::Missed { site: 3, .. }))
        .count();
    assert_eq!(missed as u64, quorum.rounds);
    assert!(quorum.emulated_seconds() < sync.emulated_seconds());
}

/// Over a slow link (every transfer takes far longer than a round's compute) updates go stale;
/// each one a site sent is merged or refused with its reason, never dropped, and refused
/// compute is not goodput.
#[test]
fn stale_updates_are_merged_down_weighted_or_refused_with_their_reason() {
    let slow_link = RunConfig {
        link: LinkProfile {
            latency_ms: 3_000.0,
            ..FAST_LINK
        },
        ..config(&[1.0, 1.0, 0.7, 0.4], 64, 4)
    };
    let result = go(&slow_link, "async-diloco@4[stale=2]").unwrap();
    let sent: u64 = result
        .ledger
        .per_link()
        .iter()
        .filter(|(_, to, _, _)| *to == Endpoint::Coordinator)
        .map(|(_, _, packets, _)| packets)
        .sum();
    let merged: usize = result
        .metrics
        .iter()
        .map(|m| match m {
            Metric::Round { update_norms, .. } => update_norms.len(),
            _ => 0,
        })
        .sum();
    let refused: Vec<&String> = result
        .metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Refused {
                reason, too_stale, ..
            } => {
                assert!(*too_stale, "typed as a staleness refusal: {reason}");
                Some(reason)
            }
            _ => None,
        })
        .collect();
    assert!(!refused.is_empty(), "this link makes updates stale");
    assert!(
        refused
            .iter()
            .all(|r| r.contains("more than 2 rounds behind")),
        "{refused:?}"
    );
    assert_eq!(sent, merged as u64 + refused.len() as u64);
    assert!(result.goodput() < 0.9, "{:?}", result.site_goodput);
    assert!(result.final_val_loss.is_finite());
}

/// Synchronous rounds on the schedule with a quorum of every site are plain DiLoCo: the same
/// merges in the same order, so the same bits.
#[test]
fn a_quorum_of_every_site_is_synchronous_diloco() {
    let config = config(&[1.0, 1.0, 0.7, 0.4], 32, 8);
    let plain = go(&config, "diloco").unwrap();
    let scheduled = go(&config, "diloco[quorum=4]").unwrap();
    assert_eq!(plain.final_params, scheduled.final_params);
    assert_eq!(plain.rounds, scheduled.rounds);
    let ratio = scheduled.emulated_seconds() / plain.emulated_seconds();
    assert!((ratio - 1.0).abs() < 0.01, "{ratio}");
    assert!((scheduled.goodput() - plain.goodput()).abs() < 0.01);
}

/// Every update a site sent is merged or refused with its reason.
fn sent_merged_refused(result: &RunResult) -> (u64, u64, Vec<String>) {
    let sent = result
        .ledger
        .per_link()
        .iter()
        .filter(|(_, to, _, _)| *to == Endpoint::Coordinator)
        .map(|(_, _, packets, _)| packets)
        .sum();
    let merged = result
        .metrics
        .iter()
        .map(|m| match m {
            Metric::Round { update_norms, .. } => update_norms.len() as u64,
            _ => 0,
        })
        .sum();
    let refused = result
        .metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Refused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    (sent, merged, refused)
}

#[test]
fn under_a_fault_schedule_nothing_is_lost_and_runs_replay() {
    let faults = lowband_runtime::faults::parse_schedule("down:1@0.3-0.5,slow:2@0.4=0.5", 4);
    let config = RunConfig {
        faults: faults.unwrap(),
        ..config(&[1.0, 1.0, 0.7, 0.4], 48, 8)
    };
    let fault_free = RunConfig {
        faults: Vec::new(),
        ..config.clone()
    };
    for strategy in ["async-diloco", "diloco[quorum=4]", "diloco[quorum=3]"] {
        let result = go(&config, strategy).unwrap();
        let (sent, merged, refused) = sent_merged_refused(&result);
        assert_eq!(
            sent,
            merged + refused.len() as u64,
            "{strategy}: {refused:?}"
        );
        assert!(result.final_val_loss.is_finite(), "{strategy}");
        // Site 1 was gone for a fifth of the run: its lost steps are not goodput.
        let clean = go(&fault_free, strategy).unwrap();
        assert!(result.site_goodput[1] < clean.site_goodput[1], "{strategy}");
        assert_eq!(
            result.final_params,
            go(&config, strategy).unwrap().final_params
        );
    }
    // A strategy off the schedule cannot take faults.
    let error = go(&config, "diloco").unwrap_err().to_string();
    assert!(
        error.contains("plain diloco under faults is diloco[quorum=4]"),
        "{error}"
    );
}

/// The trust checks and robust aggregators hold for asynchronous rounds: a sign-flipping site
/// is refused by the direction check and excluded; compressed codecs with error feedback run.
#[test]
fn asynchronous_rounds_keep_the_defences_and_take_every_codec() {
    let hostile = RunConfig {
        attacks: vec!["2:signflip".parse().unwrap()],
        ..config(&[1.0, 1.0, 0.7, 0.4], 48, 8)
    };
    let result = go(&hostile, "async-diloco[agg=median]").unwrap();
    let excluded = result
        .metrics
        .iter()
        .any(|m| matches!(m, Metric::Excluded { site: 2, .. }));
    assert!(excluded, "the attacker is excluded");
    assert_eq!(
        result.site_goodput[2], 0.0,
        "its refused updates are not goodput"
    );
    let honest = config(&[1.0, 1.0, 0.7, 0.4], 48, 8);
    for strategy in [
        "async-diloco[up=int4;down=int4;decay=1]",
        "async-diloco[up=topk:k=64,values=q2;down=topk:k=256,values=q2;decay=0.95;lr=1;momentum=0]",
    ] {
        let result = go(&honest, strategy).unwrap();
        assert!(result.final_val_loss.is_finite(), "{strategy}");
        assert!(
            result.goodput() > 0.95,
            "{strategy}: {:?}",
            result.site_goodput
        );
    }
}

#[test]
fn scheduled_strategies_refuse_what_they_cannot_do_yet() {
    assert!(Strategy::parse("streaming[quorum=3]", 8).is_err());
    assert!(Strategy::parse("diloco[grace=1]", 8).is_err());
    assert!(Strategy::parse("async-diloco[quorum=2]", 8).is_err());
    assert!(Strategy::parse("async-diloco[grace=-1]", 8).is_err());
    let name = Strategy::parse("async-diloco@8[stale=2;grace=0.25]", 8)
        .unwrap()
        .name();
    assert_eq!(name, "async-diloco@8[grace=0.25;stale=2]");
}

/// A scheduled run stopped after a few rounds (saved at the first quiet moment) and resumed ends
/// bitwise where the uninterrupted run ends, with the same metrics, ledger and goodput: under
/// different speeds and a fault schedule, with a compressed downlink and error feedback, for
/// asynchronous rounds and a quorum. A resume under other settings is refused.
#[test]
fn a_scheduled_run_stopped_and_resumed_is_the_uninterrupted_run() {
    let faults = lowband_runtime::faults::parse_schedule("down:1@0.3-0.5,slow:2@0.4=0.5", 4);
    let config = RunConfig {
        faults: faults.unwrap(),
        checkpoint_every_rounds: 2,
        ..config(&[1.0, 1.0, 0.7, 0.4], 48, 8)
    };
    let sparse =
        "async-diloco[up=topk:k=64,values=q2;down=topk:k=256,values=q2;decay=0.95;lr=1;momentum=0]";
    for strategy in ["async-diloco", "diloco[quorum=3]", sparse] {
        let whole = go(&config, strategy).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let saving = |stop: Option<u64>| Persistence {
            state_dir: Some(dir.path().to_path_buf()),
            stop_after_rounds: stop,
            ..Persistence::default()
        };
        let stopped = go_with(&config, strategy, &saving(Some(3))).unwrap_err();
        assert!(
            matches!(stopped, RunError::Stopped { .. }),
            "{strategy}: {stopped}"
        );
        // Saved mid-run, at a quiet moment at or after round 3.
        let parsed = Strategy::parse(strategy, config.inner_steps).unwrap();
        let saved = lowband_runtime::state::load(&saving(None), &parsed)
            .unwrap()
            .expect("a saved state");
        assert!(
            saved.round() >= 3 && saved.step < config.steps,
            "{strategy}"
        );
        let resumed = go_with(&config, strategy, &saving(None)).unwrap();
        assert!(
            resumed.final_params == whole.final_params,
            "{strategy}: parameters differ"
        );
        assert_eq!(resumed.metrics, whole.metrics, "{strategy}");
        assert_eq!(
            resumed.ledger.total_bytes(),
            whole.ledger.total_bytes(),
            "{strategy}"
        );
        assert_eq!(resumed.site_goodput, whole.site_goodput, "{strategy}");
        assert_eq!(resumed.rounds, whole.rounds, "{strategy}");
        let other = RunConfig {
            seed: 7,
            ..config.clone()
        };
        let error = go_with(&other, strategy, &saving(None))
            .unwrap_err()
            .to_string();
        assert!(error.contains("other settings"), "{strategy}: {error}");
        // A schedule edited by hand so that a site's step takes 0 s (its clock would never
        // move) is refused, not run.
        let manifest = state_json(dir.path());
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        state["schedule"]["sites"][0]["step_seconds"] = 0.0.into();
        std::fs::write(&manifest, serde_json::to_vec(&state).unwrap()).unwrap();
        let error = go_with(&config, strategy, &saving(None))
            .unwrap_err()
            .to_string();
        assert!(error.contains("out of range"), "{strategy}: {error}");
    }
}

/// The one saved state's manifest under `dir`.
fn state_json(dir: &std::path::Path) -> std::path::PathBuf {
    let strategy_dir = std::fs::read_dir(dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let current: serde_json::Value =
        serde_json::from_slice(&std::fs::read(strategy_dir.join("current.json")).unwrap()).unwrap();
    strategy_dir
        .join(current["dir"].as_str().unwrap())
        .join("state.json")
}

/// A networked coordinator asked to resume a scheduled run from a state it cannot continue (here
/// an in-memory run's) says so before it admits any site: it used to wait for every site to
/// join (up to its join timeout) and only then refuse.
#[test]
fn a_networked_scheduled_resume_is_refused_before_the_sites_join() {
    let config = RunConfig {
        checkpoint_every_rounds: 2,
        ..config(&[1.0, 0.7], 48, 8)
    };
    let dir = tempfile::tempdir().unwrap();
    let persistence = Persistence {
        state_dir: Some(dir.path().to_path_buf()),
        stop_after_rounds: Some(3),
        ..Persistence::default()
    };
    assert!(go_with(&config, "async-diloco", &persistence).is_err());
    let site_keys = (0..2)
        .map(|_| lowband_net::Identity::generate().unwrap().public_key())
        .collect();
    let started = std::time::Instant::now();
    let refused = lowband_runtime::network::serve_coordinator(
        &config,
        Strategy::parse("async-diloco", config.inner_steps).unwrap(),
        &split(&config),
        std::sync::Arc::new(lowband_net::Identity::generate().unwrap()),
        site_keys,
        "127.0.0.1:0".parse().unwrap(),
        lowband_runtime::network::NetworkOptions {
            state_dir: Some(dir.path().to_path_buf()),
            resume: true,
            ..lowband_runtime::network::NetworkOptions::of(
                &config,
                lowband_runtime::network::limits(&config),
            )
        },
        |_| Ok(()),
    )
    .unwrap_err();
    assert!(refused.to_string().contains("in-memory run's"), "{refused}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "refused after {:?}, not at once (join timeout {} ms)",
        started.elapsed(),
        config.network.join_timeout_ms
    );
}
