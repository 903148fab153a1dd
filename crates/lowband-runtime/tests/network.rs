//! The networked driver over loopback QUIC against the in-memory driver: same protocol code,
//! same result, bit for bit; attacks and robust aggregation work across the network too.

use lowband_data::{ShardMode, Split, SyntheticLanguage, SyntheticSpec};
use lowband_engine::preset;
use lowband_net::Limits;
use lowband_runtime::network::run_over_loopback;
use lowband_runtime::{run, Metric, Persistence, RunConfig, RunResult, Strategy};

fn config(sites: usize, attacks: &[&str], aggregator: &str) -> RunConfig {
    RunConfig {
        preset: "tiny".into(),
        sites,
        site_batch: 2,
        steps: 24,
        inner_steps: 4,
        eval_every_steps: 8,
        eval_windows: 8,
        aggregator: aggregator.parse().unwrap(),
        attacks: attacks.iter().map(|a| a.parse().unwrap()).collect(),
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

/// Run `strategy` over loopback QUIC and in memory; the same parameters, final loss, ledger
/// (plus a 64-byte signature per packet) and per-step training losses.
fn run_both(c: &RunConfig, strategy: &str) -> (RunResult, RunResult) {
    let s = split(c);
    let memory = run(
        c,
        Strategy::parse(strategy, c.inner_steps).unwrap(),
        &s,
        &Persistence::default(),
        &mut |_| {},
    )
    .unwrap();
    let network = run_over_loopback(
        c,
        Strategy::parse(strategy, c.inner_steps).unwrap(),
        &s,
        Limits::default(),
        None,
    )
    .unwrap();
    assert_eq!(network.rounds, memory.rounds, "{strategy}");
    assert!(
        network.final_params == memory.final_params,
        "{strategy}: parameters differ"
    );
    assert_eq!(network.final_val_loss, memory.final_val_loss, "{strategy}");
    let packets = memory.ledger.total_packets();
    assert_eq!(network.ledger.total_packets(), packets, "{strategy}");
    assert_eq!(
        network.ledger.total_bytes(),
        memory.ledger.total_bytes() + 64 * packets,
        "{strategy}"
    );
    let steps = |r: &RunResult| {
        r.metrics
            .iter()
            .filter(|m| matches!(m, Metric::Step { .. }))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&network).len(), c.steps as usize, "{strategy}");
    assert_eq!(
        steps(&network),
        steps(&memory),
        "{strategy}: per-step training losses"
    );
    (network, memory)
}

#[test]
fn over_quic_the_run_is_bitwise_the_in_memory_run() {
    for (strategy, attacks, aggregator) in [
        ("diloco", vec![], "mean"),
        ("sparseloco", vec![], "mean"),
        ("diloco-int8", vec!["2:scale=-10"], "median"),
    ] {
        let c = config(3, &attacks, aggregator);
        let (network, memory) = run_both(&c, strategy);
        assert_eq!(
            network.site_scores, memory.site_scores,
            "{strategy}: the same refusals and exclusions"
        );
        // The sites' training reports (which gave the per-step losses) are counted beside the
        // ledger: per site and round, a 28-byte envelope, 28 bytes, 4 per step and a 64-byte
        // signature. (The attacked run excludes its attacker after a few rounds: fewer reports.)
        let every_site_every_round =
            c.sites as u64 * (c.steps / c.inner_steps) * (28 + 28 + 4 * c.inner_steps + 64);
        if attacks.is_empty() {
            assert_eq!(
                network.telemetry_bytes, every_site_every_round,
                "{strategy}"
            );
        } else {
            assert!(
                network.telemetry_bytes > 0 && network.telemetry_bytes < every_site_every_round,
                "{strategy}"
            );
        }
        assert_eq!(memory.telemetry_bytes, 0);
        assert!(
            network.compute_seconds > 0.0,
            "{strategy}: the sites' reported compute"
        );
    }
}

#[test]
fn streaming_over_quic_is_bitwise_the_in_memory_run() {
    // The preset (4-bit, 4 fragments, a delay of 5 steps) at H = 24, and 2 fragments with a delay
    // of 1 step at H = 8; 24 steps.
    for strategy in ["streaming@24", "streaming@8[overlap=1;fragments=2]"] {
        run_both(&config(3, &[], "mean"), strategy);
    }
}

#[test]
fn ddp_is_refused_with_a_reason() {
    let c = config(2, &[], "mean");
    let s = split(&c);
    let error = run_over_loopback(
        &c,
        Strategy::parse("ddp", 4).unwrap(),
        &s,
        Limits::default(),
        None,
    )
    .expect_err("refused")
    .to_string();
    assert!(error.contains("DDP runs in memory"), "{error}");
}

#[test]
fn one_site_sending_a_huge_finite_update_is_refused_and_the_honest_sites_train_on() {
    // Issue 17: with the plain mean, one site scaling its update by 1e30 (finite) put the
    // global parameters where every honest site's gradients were infinite: they died, and the
    // coordinator waited forever. Now the merge is refused, the parameters kept, the attacker
    // excluded after its third refusal, and the run ends as the honest sites train it, over the
    // network as in memory.
    let c = config(3, &["1:scale=1e30"], "mean");
    let (network, memory) = run_both(&c, "diloco@4");
    for r in [&network, &memory] {
        assert!(
            r.final_val_loss.is_finite() && r.final_val_loss < 5.0,
            "{}",
            r.final_val_loss
        );
        assert!(r.final_params.iter().all(|p| p.abs() <= 1e6));
        assert!(r
            .metrics
            .iter()
            .any(|m| matches!(m, Metric::Excluded { site: 1, .. })));
        let refused: Vec<&String> = r
            .metrics
            .iter()
            .filter_map(|m| match m {
                Metric::Refused {
                    site: 1, reason, ..
                } => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(
            refused[0].contains("the merge was refused and the parameters kept"),
            "{}",
            refused[0]
        );
    }
}

/// Scheduled runs over QUIC: the coordinator keeps the emulated clock's schedule and cues its
/// sites step by step; with sites of different speeds and an emulated fault schedule (a site down
/// for a fifth of the run, another slowed down), the run is bitwise the in-memory one: the same
/// parameters, ledger (plus signatures), per-step losses, refusals and goodput.
#[test]
fn scheduled_runs_over_quic_are_bitwise_the_in_memory_runs() {
    let faults = lowband_runtime::faults::parse_schedule("down:1@0.3-0.5,slow:2@0.4=0.5", 4);
    let c = RunConfig {
        site_speeds: vec![1.0, 1.0, 0.7, 0.4],
        // Steps of a tenth of a second on the emulated clock (as in tests/asynchronous.rs).
        site_gflop_per_second: 0.1,
        faults: faults.unwrap(),
        steps: 32,
        inner_steps: 8,
        ..config(4, &[], "mean")
    };
    for strategy in [
        "async-diloco",
        "diloco[quorum=3]",
        "async-diloco[up=int4;down=int4;decay=1]",
    ] {
        let (network, memory) = run_both(&c, strategy);
        assert_eq!(network.site_goodput, memory.site_goodput, "{strategy}");
        assert_eq!(network.goodput(), memory.goodput(), "{strategy}");
        assert_eq!(network.site_scores, memory.site_scores, "{strategy}");
        assert!(
            network.telemetry_bytes > 0,
            "{strategy}: the cues and step reports"
        );
        let refusals = |r: &RunResult| {
            r.metrics
                .iter()
                .filter(|m| matches!(m, Metric::Refused { .. }))
                .count()
        };
        assert_eq!(refusals(&network), refusals(&memory), "{strategy}");
    }
    // A site whose updates are garbage is refused and scored as in memory; the run goes on.
    let hostile = RunConfig {
        attacks: vec!["2:garbage".parse().unwrap()],
        ..c.clone()
    };
    let (network, memory) = run_both(&hostile, "async-diloco");
    assert_eq!(network.site_scores, memory.site_scores);
    assert!(
        network
            .site_scores
            .iter()
            .any(|(site, score)| *site == 2 && score.refused > 0),
        "{:?}",
        network.site_scores
    );
}
