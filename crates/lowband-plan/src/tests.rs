//! Every formula on hand-computed cases (the arithmetic is in the comments).

use super::*;

fn close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
        "{actual} != {expected}"
    );
}

/// K sites of one accelerator each at 1 Gbit/s, 80 ms RTT, $0.05/GB; every inner step takes
/// exactly 1 s (step_seconds), so the arithmetic stays readable.
fn scenario(sites: usize) -> Scenario {
    let hardware = Hardware {
        peak_flops_per_second: 1e15,
        mfu: 0.5,
        accelerators: 1,
        dollars_per_accelerator_hour: 2.0,
        fabric_gbit_per_second: 400.0,
    };
    let link = Link {
        bandwidth_gbit_per_second: 1.0,
        rtt_ms: 80.0,
        egress_dollars_per_gb: 0.05,
    };
    Scenario {
        params: 1e9,
        tokens: 1e9 * 1000.0,
        batch_tokens: 1e6,
        sites: vec![
            Site {
                hardware: hardware.clone(),
                link
            };
            sites
        ],
        relay: Relay {
            bandwidth_gbit_per_second: 25.0,
            egress_dollars_per_gb: 0.05,
            dollars_per_hour: 1.0,
        },
        central: Hardware {
            accelerators: sites as u32,
            ..hardware
        },
        ddp_bits_per_param: 16.0,
        data_bits_per_token: 17.0,
        law: LossLaw::chinchilla(),
        step_seconds: Some(1.0),
    }
}

fn int8_diloco(inner_steps: u64, overlap: bool) -> Strategy {
    Strategy {
        name: "int8".into(),
        inner_steps,
        bits_per_param_up: 8.0,
        bits_per_param_down: None,
        pattern: Pattern::AllReduce,
        fragments: 1,
        overlap_steps: if overlap { inner_steps as f64 } else { 0.0 },
        loss_gap: 0.0,
    }
}

#[test]
fn ring_all_reduce_time_and_bytes() {
    // 2(K−1)/K × 1e9 B / 125e6 B/s = 1.5 × 8 s = 12 s, plus 2(K−1) × 40 ms = 0.24 s.
    close(ring_all_reduce_seconds(4, 1e9, 125e6, 0.04), 12.24);
    let s = scenario(4);
    let sync = exchange(Pattern::AllReduce, &s.sites, &s.relay, 1e9, 0.0);
    close(sync.seconds, 12.24);
    // Each site sends 1.5e9 bytes and receives as much.
    assert_eq!(sync.site_bytes_sent, vec![1.5e9; 4]);
    assert_eq!(sync.site_bytes_moved, vec![3e9; 4]);
    close(sync.wan_bytes(), 6e9);
    // One member: nothing to reduce.
    assert_eq!(ring_all_reduce_seconds(1, 1e9, 125e6, 0.04), 0.0);
}

#[test]
fn relay_and_all_gather_time_and_bytes() {
    let s = scenario(4);
    // Relay: upload max(1e8 / 125e6, 4 × 1e8 / 3.125e9) = 0.8 s; download of 4e8 bytes per
    // site max(4e8 / 125e6, 16e8 / 3.125e9) = 3.2 s; 2 × 40 ms one way.
    let relay = exchange(Pattern::Relay, &s.sites, &s.relay, 1e8, 4e8);
    close(relay.seconds, 0.8 + 3.2 + 0.08);
    assert_eq!(relay.site_bytes_sent, vec![1e8; 4]);
    close(relay.relay_bytes_sent, 16e8);
    close(relay.wan_bytes(), 4e8 + 16e8);
    // All-gather: each site sends 3 × 1e8 bytes: 2.4 s plus one 40 ms hop.
    let gather = exchange(Pattern::AllGather, &s.sites, &s.relay, 1e8, 0.0);
    close(gather.seconds, 2.44);
    assert_eq!(gather.site_bytes_sent, vec![3e8; 4]);
    // A relay's downlink defaults to the other K−1 sites' packets.
    let relayed = Strategy {
        pattern: Pattern::Relay,
        ..int8_diloco(100, false)
    };
    let plan = plan_strategy(&s, &relayed).unwrap();
    // up 1e9 B, down 3e9 B: upload 8 s (relay: 4e9 / 3.125e9 = 1.28 s), download 24 s
    // (relay 12e9 / 3.125e9 = 3.84 s), 0.08 s latency.
    close(plan.communication_seconds_per_round, 8.0 + 24.0 + 0.08);
}

#[test]
fn utilization_with_and_without_overlap() {
    let s = scenario(4);
    // 1e12 tokens / 1e6 per step = 1e6 steps; H = 100: 1e4 rounds of 100 s compute.
    let blocking = plan_strategy(&s, &int8_diloco(100, false)).unwrap();
    close(blocking.rounds, 1e4);
    close(blocking.compute_seconds_per_round, 100.0);
    // int8: 1e9 bytes per packet, 12.24 s per all-reduce (first test).
    close(blocking.round_seconds, 112.24);
    close(blocking.utilization, 100.0 / 112.24);
    close(blocking.wall_seconds, 1e4 * 112.24);
    // Overlapped, the link hides behind 100 s of compute.
    let streaming = plan_strategy(&s, &int8_diloco(100, true)).unwrap();
    close(streaming.utilization, 1.0);
    close(streaming.round_seconds, 100.0);
    // H = 10: 10 s of compute cannot hide 12.24 s of link.
    let short = plan_strategy(&s, &int8_diloco(10, true)).unwrap();
    close(short.utilization, 10.0 / 12.24);
}

#[test]
fn fragments_and_overlap_steps() {
    let s = scenario(4);
    // Four fragments of 2.5e8 bytes: 1.5 × 2.5e8 / 125e6 = 3 s + 0.24 s each; each may overlap
    // one 1 s step, so each stalls the sites 2.24 s: a round is 100 + 4 × 2.24 s.
    let streaming = Strategy {
        fragments: 4,
        overlap_steps: 1.0,
        ..int8_diloco(100, false)
    };
    let plan = plan_strategy(&s, &streaming).unwrap();
    close(plan.round_seconds, 100.0 + 4.0 * 2.24);
    close(plan.communication_seconds_per_round, 4.0 * 3.24);
    // Same bytes as one blocking sync, a quarter of the peak load.
    let whole = plan_strategy(&s, &int8_diloco(100, false)).unwrap();
    close(plan.wan_bytes, whole.wan_bytes);
    close(
        plan.peak_site_bytes_per_sync,
        whole.peak_site_bytes_per_sync / 4.0,
    );
    // Overlapping five steps hides it all.
    let hidden = Strategy {
        fragments: 4,
        overlap_steps: 5.0,
        ..int8_diloco(100, false)
    };
    close(plan_strategy(&s, &hidden).unwrap().round_seconds, 100.0);
    // A slow link (0.1 Gbit/s): each fragment takes 30.24 s, and stalls the sites 25.24 s.
    let slow = s.with_wan_bandwidth(0.1);
    let plan = plan_strategy(&slow, &hidden).unwrap();
    close(plan.round_seconds, 100.0 + 4.0 * (30.24 - 5.0));
}

#[test]
fn egress_and_compute_dollars() {
    let s = scenario(4);
    let plan = plan_strategy(&s, &int8_diloco(100, false)).unwrap();
    // Per round 4 sites × 1.5e9 bytes = 6e9 bytes = 6 GB at $0.05: $0.30; 1e4 rounds: $3,000.
    close(plan.wan_bytes, 6e13);
    close(plan.egress_dollars, 3000.0);
    // 4 accelerators × $2/h × 1,122,400 s / 3600.
    close(plan.compute_dollars, 8.0 * 1e4 * 112.24 / 3600.0);
    close(plan.total_dollars, plan.compute_dollars + 3000.0);
    // No gap: priced and equal-token figures agree.
    close(plan.total_dollars_equal_tokens, plan.total_dollars);
}

#[test]
fn centralized_and_decentralized_ddp() {
    let mut s = scenario(4);
    s.step_seconds = None;
    // 6 × 1e9 × 1e6 FLOP per step over 4 × 1e15 × 0.5 FLOP/s = 3 s; the fabric's ring over
    // 4 accelerators: 1.5 × 2e9 bytes / 50e9 B/s = 0.06 s, hidden.
    let central = plan_centralized(&s).unwrap();
    close(central.round_seconds, 3.0);
    close(central.utilization, 1.0);
    close(central.compute_dollars, 1e6 * 3.0 / 3600.0 * 8.0);
    // Each site: 6e9 × 2.5e5 / 5e14 = 3 s per step. DDP over 1 Gbit/s: 2e9 bytes BF16,
    // 1.5 × 2e9 / 125e6 = 24 s + 0.24 s per step, overlapped with the 2 s backward pass:
    // 3 + (24.24 − 2) s per step.
    let ddp = plan_decentralized_ddp(&s).unwrap();
    close(ddp.round_seconds, 25.24);
    close(ddp.utilization, 3.0 / 25.24);
    close(ddp.wan_bytes, 1e6 * 4.0 * 3e9);
}

#[test]
fn shipping_the_data() {
    let s = scenario(4);
    // 1e12 tokens × 17 bits / 8 = 2.125e12 bytes, a quarter per site; three shares move to
    // site 0, whose downlink takes 3 × 5.3125e11 B / 125e6 B/s = 12,750 s: shorter than
    // training (1e6 steps × 1 s), so the wall time is training's.
    let ship = plan_ship_data(&s).unwrap();
    close(ship.wan_bytes, 3.0 * 5.3125e11);
    close(ship.communication_seconds_per_round, 12750.0);
    close(ship.wall_seconds, 1e6);
    close(ship.egress_dollars, 3.0 * 531.25 * 0.05);
    let central = plan_centralized(&s).unwrap();
    close(ship.compute_dollars, central.compute_dollars);
}

#[test]
fn token_factor_inverts_the_law() {
    let law = LossLaw::chinchilla();
    assert_eq!(law.token_factor(1e9, 2e10, 0.0).unwrap(), 1.0);
    let (n, d, gap) = (1e9, 2e10, 0.02);
    let factor = law.token_factor(n, d, gap).unwrap();
    // The strategy's effective tokens D / factor give the strategy's loss (1 + gap) L(D).
    close(law.loss(n, d / factor), (1.0 + gap) * law.loss(n, d));
    assert!(factor > 1.0);
    // Hand value: L(1e9, 2e10) = 1.69 + 406.4 / 1e9^0.34 + 410.7 / 2e10^0.28 = 2.5800;
    // X = 1.02 L − 1.69 − 406.4 / 1e9^0.34 = 0.5877; factor = 2e10 × (X / 410.7)^(1 / 0.28)
    // / 2e10 = 1.388: a 2% gap costs 39% more tokens at this size.
    assert!((factor - 1.388).abs() < 0.001, "{factor}");
    // A gap that would beat the irreducible loss is refused, naming the field.
    assert_eq!(
        law.token_factor(1e9, 2e10, -0.5).unwrap_err().field,
        "loss_gap"
    );
}

#[test]
fn gap_is_priced_in_tokens_and_dollars() {
    let s = scenario(4);
    let gapped = Strategy {
        loss_gap: 0.02,
        ..int8_diloco(100, false)
    };
    let plan = plan_strategy(&s, &gapped).unwrap();
    let factor = s.law.token_factor(s.params, s.tokens, 0.02).unwrap();
    close(plan.token_factor, factor);
    close(plan.tokens, s.tokens * factor);
    close(plan.total_dollars, plan.total_dollars_equal_tokens * factor);
    // Beating DDP earns no discount.
    let better = plan_strategy(
        &s,
        &Strategy {
            loss_gap: -0.1,
            ..int8_diloco(100, false)
        },
    )
    .unwrap();
    close(better.token_factor, 1.0);
    close(better.loss_gap, -0.1);
}

#[test]
fn break_even_thresholds() {
    let s = scenario(4);
    let strategy = int8_diloco(100, false);
    // Same prices everywhere: the strategy idles 12.24 s of every 112.24 and pays egress, so it
    // can never be cheaper than centralized (100% utilization) without a discount.
    let at_par = break_even(&s, &strategy).unwrap();
    assert_eq!(at_par.min_wan_gbit_per_second, Threshold::Never);
    assert_eq!(at_par.max_egress_dollars_per_gb, Threshold::Never);
    // Discount: central $ = 1e6 s × $8/h = $2,222.2; strategy compute $ = $2,494.2, egress
    // $3,000: even free accelerators lose (2,222 − 3,000 < 0).
    assert_eq!(at_par.min_accelerator_discount, Threshold::Never);
    // With free egress: discount 1 − 2,222.2 / 2,494.2 = 0.1090.
    let free = s.with_egress_price(0.0);
    let Threshold::At(discount) = break_even(&free, &strategy)
        .unwrap()
        .min_accelerator_discount
    else {
        panic!()
    };
    close(discount, 1.0 - 100.0 / 112.24);
    // Sites 30% cheaper, egress $0.005/GB: cheaper above some bandwidth, and below some egress
    // price (at $0.05/GB the $3,000 of egress alone exceeds the saving at any bandwidth).
    let cheap = s.with_site_discount(0.3).with_egress_price(0.005);
    let result = break_even(&cheap, &strategy).unwrap();
    let Threshold::At(gbit) = result.min_wan_gbit_per_second else {
        panic!("{result:?}")
    };
    let just_above = plan_strategy(&cheap.with_wan_bandwidth(gbit * 1.001), &strategy)
        .unwrap()
        .total_dollars;
    let just_below = plan_strategy(&cheap.with_wan_bandwidth(gbit * 0.999), &strategy)
        .unwrap()
        .total_dollars;
    let central = plan_centralized(&cheap).unwrap().total_dollars;
    assert!(
        just_above <= central && just_below > central,
        "{just_below} {central} {just_above}"
    );
    let Threshold::At(price) = result.max_egress_dollars_per_gb else {
        panic!("{result:?}")
    };
    let at_price = plan_strategy(&cheap.with_egress_price(price), &strategy)
        .unwrap()
        .total_dollars;
    close(at_price, central);
}

#[test]
fn bad_input_names_the_field() {
    let mut s = scenario(4);
    s.params = 0.0;
    assert_eq!(plan_centralized(&s).unwrap_err().field, "params");
    let mut s = scenario(4);
    s.sites.clear();
    assert_eq!(plan_centralized(&s).unwrap_err().field, "sites");
    let mut s = scenario(4);
    s.sites[2].link.bandwidth_gbit_per_second = -1.0;
    assert_eq!(
        plan_centralized(&s).unwrap_err().field,
        "sites[2].link.bandwidth_gbit_per_second"
    );
    let mut s = scenario(4);
    s.sites[0].hardware.dollars_per_accelerator_hour = f64::NAN;
    assert_eq!(
        plan_centralized(&s).unwrap_err().field,
        "sites[0].hardware.dollars_per_accelerator_hour"
    );
    let s = scenario(4);
    let zero_h = Strategy {
        inner_steps: 0,
        ..int8_diloco(100, false)
    };
    assert_eq!(
        plan_strategy(&s, &zero_h).unwrap_err().field,
        "strategy int8: inner_steps"
    );
    let down_on_ring = Strategy {
        bits_per_param_down: Some(1.0),
        ..int8_diloco(100, false)
    };
    assert_eq!(
        plan_strategy(&s, &down_on_ring).unwrap_err().field,
        "strategy int8: bits_per_param_down"
    );
}

/// INTELLECT-1 (arXiv 2412.01152): 10B parameters, int8 ring all-reduce every H = 100 inner
/// steps, about 38 minutes of compute per round, median all-reduce 103 s (USA) and 469 s (global);
/// compute utilization 95.7% and 83.0%. The report gives times, not link bandwidths: the
/// bandwidth here is the one at which our ring model takes the published time (an assumption
/// stated in docs/economics.md), so this checks the round accounting, not a bandwidth forecast.
#[test]
fn intellect_1_utilization() {
    for (all_reduce_seconds, rtt_ms, published) in [(103.0, 60.0, 0.957), (469.0, 200.0, 0.830)] {
        let plan = crate::presets::intellect_1(all_reduce_seconds, rtt_ms).unwrap();
        let (scenario, strategy) = plan;
        let result = plan_strategy(&scenario, &strategy).unwrap();
        close(result.communication_seconds_per_round, all_reduce_seconds);
        assert!(
            (result.utilization - published).abs() < 0.02,
            "{} vs {published}",
            result.utilization
        );
    }
}

/// Streaming DiLoCo's Table 4 (arXiv 2501.18512), set up as its caption states: every cell up to
/// 95% utilization within 25% of the paper's. The paper's values sit on a grid about 21% apart
/// (152.6, 184.2, 222.3, 268.3, 323.8, ...: ratios of 1.21), so one grid step is the resolution of the comparison; the 99%
/// column is documented, not held (docs/economics.md).
#[test]
fn streaming_diloco_table_4_within_one_grid_step() {
    for (params, layers, step, rows) in crate::presets::STREAMING_DILOCO_TABLE_4 {
        let (scenario, strategies) =
            crate::presets::streaming_diloco_table_4(params, layers, step).unwrap();
        for (strategy, (name, published)) in strategies.iter().zip(rows) {
            assert_eq!(strategy.name, name);
            for (target, paper) in crate::presets::TABLE_4_TARGETS
                .iter()
                .zip(published)
                .take(4)
            {
                let ours = bandwidth_for_utilization(&scenario, strategy, *target)
                    .unwrap()
                    .unwrap();
                assert!(
                    (ours / paper).max(paper / ours) < 1.25,
                    "{params:e} {name} at {target}: {ours} vs {paper}"
                );
            }
        }
    }
}
