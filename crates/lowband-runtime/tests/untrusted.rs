//! Hostile sites in the in-memory driver: every attack reaches the coordinator through the
//! site's real codec; the defended run goes on, scores and excludes, and resumes exactly.

use lowband_data::{ShardMode, Split, SyntheticLanguage, SyntheticSpec};
use lowband_engine::preset;
use lowband_protocol::AggregatorSpec;
use lowband_runtime::{run, Metric, Persistence, RunConfig, RunError, RunResult, Strategy};

fn config(attacks: &[&str], aggregator: &str) -> RunConfig {
    RunConfig {
        preset: "tiny".into(),
        sites: 4,
        site_batch: 2,
        steps: 40,
        inner_steps: 5,
        eval_every_steps: 0,
        eval_windows: 8,
        aggregator: aggregator.parse().unwrap(),
        attacks: attacks.iter().map(|a| a.parse().unwrap()).collect(),
        ..RunConfig::default()
    }
}

fn go(
    config: &RunConfig,
    strategy: &str,
    persistence: &Persistence,
) -> Result<RunResult, RunError> {
    let text = SyntheticLanguage::new(SyntheticSpec {
        words: 100,
        ..SyntheticSpec::default()
    })
    .generate(60_000, 3);
    let split = Split::new(
        &text,
        config.validation_fraction,
        config.sites,
        ShardMode::NonIid,
        preset("tiny").unwrap().model.context_length,
    )
    .unwrap();
    run(
        config,
        Strategy::parse(strategy, config.inner_steps).unwrap(),
        &split,
        persistence,
        &mut |_| {},
    )
}

fn refusals(r: &RunResult) -> Vec<(u64, u32)> {
    r.metrics
        .iter()
        .filter_map(|m| {
            if let Metric::Refused {
                round,
                site,
                too_stale,
                ..
            } = m
            {
                assert!(!too_stale, "a hostile update is not a stale one");
                Some((*round, *site))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn the_mean_is_wrecked_by_one_scaled_site_and_a_robust_aggregator_is_not() {
    let honest = go(&config(&[], "mean"), "diloco", &Persistence::default()).unwrap();
    let attacked_mean = go(
        &config(&["1:scale=-10"], "mean"),
        "diloco",
        &Persistence::default(),
    )
    .unwrap();
    assert!(
        attacked_mean.final_val_loss > honest.final_val_loss * 1.5,
        "the plain mean follows the attacker: {} vs {}",
        attacked_mean.final_val_loss,
        honest.final_val_loss
    );
    for aggregator in ["median", "trimmed-mean", "centered-clip", "clipped-mean"] {
        let defended = go(
            &config(&["1:scale=-10"], aggregator),
            "diloco",
            &Persistence::default(),
        )
        .unwrap();
        assert!(
            (defended.final_val_loss / honest.final_val_loss - 1.0).abs() < 0.03,
            "{aggregator}: {} vs honest {}",
            defended.final_val_loss,
            honest.final_val_loss
        );
        let score = &defended
            .site_scores
            .iter()
            .find(|(k, _)| *k == 1)
            .unwrap()
            .1;
        assert!(
            score.excluded.is_some(),
            "{aggregator}: the attacker is excluded"
        );
        assert_eq!(
            refusals(&defended)
                .iter()
                .map(|(_, s)| *s)
                .collect::<Vec<_>>(),
            vec![1, 1, 1],
            "{aggregator}: only the attacker, three times"
        );
    }
}

#[test]
fn every_attack_reaches_the_coordinator_and_the_run_goes_on() {
    // Refused: by the norm or direction check, the decoder or the envelope; a stale update is
    // refused once the honest updates have moved away from it (None: either way).
    for (attack, refused) in [
        ("signflip", Some(true)),
        ("noise=1", Some(true)),
        ("zeros", Some(true)),
        ("nan", Some(true)),
        ("stale", None),
        ("garbage", Some(true)),
    ] {
        for strategy in ["diloco", "sparseloco"] {
            let r = go(
                &config(&[&format!("2:{attack}")], "median"),
                strategy,
                &Persistence::default(),
            )
            .unwrap_or_else(|e| panic!("{attack} {strategy}: {e}"));
            assert!(r.final_val_loss.is_finite(), "{attack} {strategy}");
            let bad = refusals(&r).iter().all(|(_, s)| *s == 2);
            assert!(
                bad,
                "{attack} {strategy}: an honest site was refused: {:?}",
                refusals(&r)
            );
            if let Some(refused) = refused {
                assert_eq!(
                    !refusals(&r).is_empty(),
                    refused,
                    "{attack} {strategy}: {:?}",
                    refusals(&r)
                );
            }
        }
    }
}

#[test]
fn an_attacked_run_resumes_to_exactly_the_uninterrupted_result() {
    let c = RunConfig {
        checkpoint_every_rounds: 1,
        ..config(&["1:zeros", "3:stale"], "trimmed-mean")
    };
    let straight = go(&c, "diloco", &Persistence::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = Persistence {
        observer: None,
        state_dir: Some(dir.path().to_path_buf()),
        stop_after_rounds: Some(4),
    };
    assert!(matches!(
        go(&c, "diloco", &stop),
        Err(RunError::Stopped { .. })
    ));
    let resumed = go(
        &c,
        "diloco",
        &Persistence {
            observer: None,
            state_dir: Some(dir.path().to_path_buf()),
            stop_after_rounds: None,
        },
    )
    .unwrap();
    assert_eq!(
        resumed.final_params, straight.final_params,
        "exclusions, scores and the stale update carry over"
    );
    assert_eq!(resumed.site_scores, straight.site_scores);
}

#[test]
fn attacks_on_sites_that_do_not_exist_are_refused_with_the_field() {
    for (attacks, needle) in [
        (vec!["4:zeros"], "only sites 0 to 3"),
        (vec!["1:zeros", "1:nan"], "two attacks"),
        (
            vec!["0:zeros", "1:zeros", "2:zeros", "3:zeros"],
            "every site",
        ),
    ] {
        let c = config(&attacks, "mean");
        let (field, reason) = c.validate().unwrap_err();
        assert_eq!(field, "attacks");
        assert!(reason.contains(needle), "{reason}");
    }
    assert_eq!(config(&[], "median").aggregator, AggregatorSpec::Median);
}

#[test]
fn a_refused_and_excluded_site_has_no_influence_whatever_it_sent() {
    // Issue 17, item 5: an attacker refused and excluded seemed to cost 4-13% against an honest
    // run of the other sites. Whatever the attacker sends once the checks refuse it (a scaled,
    // flipped, noisy or NaN update, garbage bytes), the run is the same to the last bit: every
    // refused update is dropped whole, so what is left is the honest sites' run on their shards.
    // (The rest of that gap is the seed-to-seed spread of the comparison, docs/results.md.)
    for aggregator in ["median", "centered-clip"] {
        let runs: Vec<RunResult> = ["2:scale=-10", "2:nan", "2:garbage", "2:signflip"]
            .iter()
            .map(|attack| {
                go(
                    &config(&[attack], aggregator),
                    "diloco@5",
                    &Persistence::default(),
                )
                .unwrap()
            })
            .collect();
        for r in &runs {
            assert!(
                r.metrics
                    .iter()
                    .any(|m| matches!(m, Metric::Excluded { site: 2, .. })),
                "{aggregator}: the attacker is excluded"
            );
            // Its refused updates' compute is not goodput: the attacker's share is the smallest.
            let honest = r.site_goodput[0].min(r.site_goodput[1]);
            assert!(
                r.site_goodput[2] < honest,
                "{aggregator}: goodput {:?}",
                r.site_goodput
            );
        }
        for r in &runs[1..] {
            assert!(
                r.final_params == runs[0].final_params,
                "{aggregator}: the same run whatever the attacker sent"
            );
        }
    }
}
