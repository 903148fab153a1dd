//! The networked driver over loopback QUIC against the in-memory driver: same protocol code,
//! same result, bit for bit; attacks and robust aggregation work across the network too.

use lowband_data::{ShardMode, Split, SyntheticLanguage, SyntheticSpec};
use lowband_engine::preset;
use lowband_net::Limits;
use lowband_runtime::network::run_over_loopback;
use lowband_runtime::{run, Persistence, RunConfig, Strategy};

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
    let text = SyntheticLanguage::new(SyntheticSpec { words: 100, ..SyntheticSpec::default() }).generate(60_000, 3);
    Split::new(&text, config.validation_fraction, config.sites, ShardMode::NonIid, preset("tiny").unwrap().model.context_length).unwrap()
}

#[test]
fn over_quic_the_run_is_bitwise_the_in_memory_run() {
    for (strategy, attacks, aggregator) in [("diloco", vec![], "mean"), ("sparseloco", vec![], "mean"), ("diloco-int8", vec!["2:scale=-10"], "median")] {
        let c = config(3, &attacks, aggregator);
        let s = split(&c);
        let memory = run(&c, Strategy::parse(strategy, c.inner_steps).unwrap(), &s, &Persistence::default(), &mut |_| {}).unwrap();
        let network = run_over_loopback(&c, Strategy::parse(strategy, c.inner_steps).unwrap(), &s, Limits::default()).unwrap();
        assert!(network.final_params == memory.final_params, "{strategy}: parameters differ");
        assert_eq!(network.final_val_loss, memory.final_val_loss, "{strategy}");
        assert_eq!(network.site_scores, memory.site_scores, "{strategy}: the same refusals and exclusions");
        // Every packet is the same envelope plus a 64-byte signature.
        let packets = memory.ledger.total_packets();
        assert_eq!(network.ledger.total_packets(), packets, "{strategy}");
        assert_eq!(network.ledger.total_bytes(), memory.ledger.total_bytes() + 64 * packets, "{strategy}");
    }
}

#[test]
fn ddp_and_streaming_are_refused_with_a_reason() {
    let c = config(2, &[], "mean");
    let s = split(&c);
    for name in ["ddp", "streaming@8[overlap=1]"] {
        let error = run_over_loopback(&c, Strategy::parse(name, 4).unwrap(), &s, Limits::default()).expect_err("refused").to_string();
        assert!(error.contains("round strategies"), "{error}");
    }
}
