//! More bandwidth, cheaper egress or fewer bits never make a plan more expensive (or slower), for
//! arbitrary scenarios and strategies. Fixed seed (PROPTEST_RNG_SEED=random explores).

use lowband_plan::{
    plan_decentralized_ddp, plan_ship_data, plan_strategy, Hardware, Link, LossLaw, Pattern, Plan,
    Relay, Scenario, Site,
};
use proptest::prelude::*;

fn hardware() -> impl proptest::strategy::Strategy<Value = Hardware> {
    (
        1e12..2e15f64,
        0.05..1.0f64,
        1u32..512,
        0.0..10.0f64,
        10.0..800.0f64,
    )
        .prop_map(|(peak, mfu, accelerators, price, fabric)| Hardware {
            peak_flops_per_second: peak,
            mfu,
            accelerators,
            dollars_per_accelerator_hour: price,
            fabric_gbit_per_second: fabric,
        })
}

fn site() -> impl proptest::strategy::Strategy<Value = Site> {
    (hardware(), 0.01..100.0f64, 0.0..300.0f64, 0.0..0.2f64).prop_map(
        |(hardware, bandwidth, rtt, egress)| Site {
            hardware,
            link: Link {
                bandwidth_gbit_per_second: bandwidth,
                rtt_ms: rtt,
                egress_dollars_per_gb: egress,
            },
        },
    )
}

fn scenario() -> impl proptest::strategy::Strategy<Value = Scenario> {
    (
        1e6..1e12f64,
        1.0..100.0f64,
        1e4..1e7f64,
        prop::collection::vec(site(), 1..9),
        hardware(),
        proptest::option::of(0.01..100.0f64),
        0.5..400.0f64,
    )
        .prop_map(
            |(params, tokens_per_param, batch, sites, central, step_seconds, relay_bandwidth)| {
                Scenario {
                    params,
                    tokens: params * tokens_per_param,
                    batch_tokens: batch,
                    sites,
                    relay: Relay {
                        bandwidth_gbit_per_second: relay_bandwidth,
                        egress_dollars_per_gb: 0.02,
                        dollars_per_hour: 1.0,
                    },
                    central,
                    ddp_bits_per_param: 16.0,
                    data_bits_per_token: 17.0,
                    law: LossLaw::chinchilla(),
                    step_seconds,
                }
            },
        )
}

fn plan_strategy_of() -> impl proptest::strategy::Strategy<Value = lowband_plan::Strategy> {
    (
        1u64..500,
        0.01..32.0f64,
        prop_oneof![
            Just(Pattern::AllReduce),
            Just(Pattern::AllGather),
            Just(Pattern::Relay)
        ],
        1u32..16,
        0.0..1.0f64,
        -0.05..0.3f64,
        proptest::option::of(0.0..64.0f64),
    )
        .prop_map(
            |(inner_steps, bits, pattern, fragments, overlap, gap, down)| lowband_plan::Strategy {
                name: "s".into(),
                inner_steps,
                bits_per_param_up: bits,
                bits_per_param_down: if pattern == Pattern::Relay {
                    down
                } else {
                    None
                },
                pattern,
                fragments,
                overlap_steps: overlap * inner_steps as f64,
                loss_gap: gap,
            },
        )
}

fn no_worse(better: &Plan, worse: &Plan) -> Result<(), TestCaseError> {
    let slack = |x: f64| x * 1e-12 + 1e-12;
    prop_assert!(
        better.total_dollars <= worse.total_dollars + slack(worse.total_dollars),
        "dollars {} > {}",
        better.total_dollars,
        worse.total_dollars
    );
    prop_assert!(
        better.wall_seconds <= worse.wall_seconds + slack(worse.wall_seconds),
        "seconds {} > {}",
        better.wall_seconds,
        worse.wall_seconds
    );
    Ok(())
}

/// PROPTEST_RNG_SEED=N or =random overrides the fixed seed.
fn seed_from_env() -> proptest::test_runner::RngSeed {
    match std::env::var("PROPTEST_RNG_SEED").as_deref() {
        Ok("random") => proptest::test_runner::RngSeed::Random,
        Ok(n) => n
            .parse()
            .unwrap_or(proptest::test_runner::RngSeed::Fixed(9)),
        Err(_) => proptest::test_runner::RngSeed::Fixed(9),
    }
}

proptest! {
    // At most a quarter of the cases may be discarded (scenarios the planner refuses): a generator
    // that drifts into refused scenarios fails the suite instead of passing on nothing.
    #![proptest_config(ProptestConfig { cases: 512, max_global_rejects: 128, rng_seed: seed_from_env(), ..ProptestConfig::default() })]

    #[test]
    fn more_bandwidth_never_costs_more(s in scenario(), strategy in plan_strategy_of(), factor in 1.0..100.0f64) {
        // (A scenario the planner refuses is discarded and counted; past the bound the test fails.)
        let base = plan_strategy(&s, &strategy);
        prop_assume!(base.is_ok());
        let base = base.unwrap();
        let faster = s.with_wan_bandwidth(s.slowest_link_gbit_per_second() * factor);
        no_worse(&plan_strategy(&faster, &strategy).unwrap(), &base)?;
        no_worse(&plan_decentralized_ddp(&faster).unwrap(), &plan_decentralized_ddp(&s).unwrap())?;
        no_worse(&plan_ship_data(&faster).unwrap(), &plan_ship_data(&s).unwrap())?;
    }

    #[test]
    fn cheaper_egress_never_costs_more(s in scenario(), strategy in plan_strategy_of(), price in 0.0..0.2f64, cut in 0.0..1.0f64) {
        let dear = s.with_egress_price(price);
        let cheap = s.with_egress_price(price * cut);
        let base = plan_strategy(&dear, &strategy);
        prop_assume!(base.is_ok());
        let base = base.unwrap();
        no_worse(&plan_strategy(&cheap, &strategy).unwrap(), &base)?;
        no_worse(&plan_ship_data(&cheap).unwrap(), &plan_ship_data(&dear).unwrap())?;
    }

    #[test]
    fn fewer_bits_never_cost_more(s in scenario(), strategy in plan_strategy_of(), cut in 0.0..1.0f64) {
        // (A scenario the planner refuses is discarded and counted; past the bound the test fails.)
        let base = plan_strategy(&s, &strategy);
        prop_assume!(base.is_ok());
        let base = base.unwrap();
        let fewer = lowband_plan::Strategy {
            bits_per_param_up: strategy.bits_per_param_up * cut.max(1e-6),
            bits_per_param_down: strategy.bits_per_param_down.map(|d| d * cut),
            ..strategy.clone()
        };
        no_worse(&plan_strategy(&s, &fewer).unwrap(), &base)?;
        let mut fewer_data = s.clone();
        fewer_data.data_bits_per_token *= cut.max(1e-6);
        no_worse(&plan_ship_data(&fewer_data).unwrap(), &plan_ship_data(&s).unwrap())?;
    }
}
