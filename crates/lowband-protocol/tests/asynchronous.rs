//! Asynchronous rounds (`AsyncMerge`): merges of every token alike, staleness-weighted, the
//! stale bound, the grace window, a site's second update closing the round, and the carry of a
//! site's progress onto a merge. Driven by hand with a virtual clock, no IO.

use lowband_codec::{Codec, Fp32};
use lowband_protocol::site::carry;
use lowband_protocol::wire::{self, MessageKind};
use lowband_protocol::{
    Action, AsyncMerge, Coordinator, CoordinatorConfig, Event, OuterConfig, ProtocolError,
    RoundReport,
};

const PARAMS: usize = 4;
const GRACE_MS: u64 = 100;

fn coordinator(site_tokens: Vec<u64>, staleness_max: u64) -> Coordinator {
    let config = CoordinatorConfig {
        asynchronous: Some(AsyncMerge {
            site_tokens,
            staleness_max,
            grace_ms: GRACE_MS,
        }),
        ..CoordinatorConfig::new(PARAMS, OuterConfig::FEDAVG)
    };
    let mut c = Coordinator::new(config, vec![0.0; PARAMS]).unwrap();
    for site in 0..3 {
        c.handle(0, Event::SiteJoined { site });
    }
    c.start(0);
    c
}

/// Site `site`'s update δ = `value` everywhere, trained from round `round`'s parameters.
fn update(site: u32, round: u64, value: f32) -> Vec<u8> {
    let mut payload = Vec::new();
    Fp32.encode(&[value; PARAMS], &mut payload);
    wire::encode(MessageKind::Update, round, site, &payload)
}

fn arrive(c: &mut Coordinator, now_ms: u64, from: u32, bytes: &[u8]) -> Vec<Action> {
    c.handle(now_ms, Event::PacketArrived { from, bytes })
}

fn closed(actions: &[Action]) -> Vec<RoundReport> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RoundClosed(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn fresh_updates_merge_as_one_budget_of_their_per_token_rate() {
    // Tokens 2 : 1 : 1, budget 2; δ = 1, 4, 7: every token alike, (1 + 4 + 7) / 4 tokens per
    // token, times the budget: 6; FedAvg: θ = 0 − 6. (The token-weighted mean would be 3.25.)
    let mut c = coordinator(vec![2, 1, 1], 4);
    let first = arrive(&mut c, 10, 0, &update(0, 0, 1.0));
    assert!(first.is_empty(), "{first:?}");
    assert!(closed(&arrive(&mut c, 20, 1, &update(1, 0, 4.0))).is_empty());
    let reports = closed(&arrive(&mut c, 30, 2, &update(2, 0, 7.0)));
    assert_eq!(
        reports.len(),
        1,
        "every member in: the round closes at once"
    );
    assert_eq!(reports[0].update_staleness, vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(c.global(), &[-6.0; PARAMS]);
}

#[test]
fn a_round_with_less_than_a_budget_is_not_scaled_up() {
    // Budget 4; the slow site alone (1 token, δ = 2) after the grace window: merged as it is,
    // not stretched to the budget: θ = −2.
    let mut c = coordinator(vec![4, 1, 4], 4);
    let first = arrive(&mut c, 0, 1, &update(1, 0, 2.0));
    assert!(closed(&first).is_empty(), "{first:?}");
    let tick = c.handle(GRACE_MS, Event::Tick);
    assert_eq!(closed(&tick).len(), 1, "{tick:?}");
    assert_eq!(c.global(), &[-2.0; PARAMS]);
    // Then two, fresh (5 tokens ≥ the budget): (3 + 8) / 5 · 4 = 8.8, θ = −10.8.
    arrive(&mut c, 1_000, 0, &update(0, 1, 3.0));
    arrive(&mut c, 1_010, 1, &update(1, 1, 8.0));
    assert_eq!(closed(&c.handle(1_000 + GRACE_MS, Event::Tick)).len(), 1);
    assert!((c.global()[0] + 10.8).abs() < 1e-5, "{:?}", c.global());
}

#[test]
fn a_stale_update_pulls_with_a_fraction_of_its_weight() {
    let mut c = coordinator(vec![1, 1, 1], 4);
    // Round 0 closes on the grace window with site 0 alone: θ = −1.
    arrive(&mut c, 0, 0, &update(0, 0, 1.0));
    assert!(closed(&c.handle(GRACE_MS - 1, Event::Tick)).is_empty());
    assert_eq!(closed(&c.handle(GRACE_MS, Event::Tick)).len(), 1);
    assert_eq!(c.global(), &[-1.0; PARAMS]);
    // Site 1 trained from round 0 while round 1 is open: staleness 1, weight 1/2; with site 0's
    // fresh δ = 2: (1·2 + ½·4) / 2 = 2, θ = −3.
    arrive(&mut c, 200, 1, &update(1, 0, 4.0));
    arrive(&mut c, 210, 0, &update(0, 1, 2.0));
    let reports = closed(&c.handle(200 + GRACE_MS, Event::Tick));
    assert_eq!(reports[0].update_staleness, vec![(0, 0), (1, 1)]);
    assert_eq!(c.global(), &[-3.0; PARAMS]);
}

#[test]
fn an_update_past_the_bound_is_refused_with_its_reason_and_no_trust_penalty() {
    let mut c = coordinator(vec![1, 1, 1], 1);
    for round in 0..3u64 {
        let now = round * 1_000;
        arrive(&mut c, now, 0, &update(0, round, 1.0));
        c.handle(now + GRACE_MS, Event::Tick);
    }
    assert_eq!(c.round(), 3);
    // Site 2 trained from round 0: 3 rounds behind, the bound is 1. Again and again: it is
    // slow, not hostile, and is never excluded.
    for _ in 0..5 {
        let actions = arrive(&mut c, 5_000, 2, &update(2, 0, 1.0));
        assert!(matches!(
            actions.as_slice(),
            [Action::Rejected {
                from: 2,
                reason: ProtocolError::TooStale {
                    round: 0,
                    open: 3,
                    staleness_max: 1
                }
            }]
        ));
    }
    assert!(c.members().contains(&2));
    // One round behind is within the bound.
    let actions = arrive(&mut c, 5_000, 2, &update(2, 2, 1.0));
    assert!(actions.is_empty(), "{actions:?}");
    // An update from a round that has not opened is refused.
    let actions = arrive(&mut c, 5_000, 1, &update(1, 9, 1.0));
    assert!(matches!(
        actions.as_slice(),
        [Action::Rejected {
            reason: ProtocolError::WrongRound { .. },
            ..
        }]
    ));
}

#[test]
fn a_second_update_from_one_site_closes_the_round_and_goes_into_the_next() {
    let mut c = coordinator(vec![1, 1, 1], 4);
    arrive(&mut c, 0, 0, &update(0, 0, 1.0));
    let actions = arrive(&mut c, 50, 0, &update(0, 0, 3.0));
    let reports = closed(&actions);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].contributors, vec![0]);
    assert_eq!(c.global(), &[-1.0; PARAMS]);
    // The second is held by round 1, one round stale: ½·3 / 1.
    c.handle(50 + GRACE_MS, Event::Tick);
    assert_eq!(c.round(), 2);
    assert_eq!(c.global(), &[-2.5; PARAMS]);
}

#[test]
fn carry_restarts_from_the_merge_and_keeps_the_steps_since_the_reference() {
    let mut reference = vec![1.0, 2.0, 3.0, 4.0];
    let mut local = vec![0.5, 2.5, 3.0, 3.0];
    let global = vec![10.0, 20.0, 30.0, 40.0];
    carry(&mut local, &mut reference, &global).unwrap();
    assert_eq!(local, global);
    // The next update (reference − trained) holds the steps taken before the merge arrived.
    assert_eq!(reference, vec![10.5, 19.5, 30.0, 41.0]);
    // Nothing trained since the reference: exactly the global parameters, both.
    let (mut untouched, mut reference) = (vec![1.0, 2.0, 3.0, 4.0], vec![1.0, 2.0, 3.0, 4.0]);
    carry(&mut untouched, &mut reference, &global).unwrap();
    assert_eq!((&untouched, &reference), (&global, &global));
    assert!(carry(&mut [0.0; 3], &mut reference, &global).is_err());
}

/// SplitMix64, the test's only randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One seeded timeline: K sites send updates trained from whatever round they last heard of,
/// with random delays (so updates arrive reordered, also one site's own), one site is always
/// last (its updates take longer than the grace window), sites leave and come back, and
/// some updates arrive after their site left. Against the stated rule, every time: each
/// closed round merged exactly the updates held (weights budget / (1 + staleness), over at
/// least a budget's tokens; staleness within the bound), each refusal is for the rule's reason,
/// nothing held is left behind at the end. Returns θ for the replay check.
fn timeline(seed: u64, coverage: &mut Coverage) -> f32 {
    let mut model = Model {
        held: Default::default(),
        tokens: Vec::new(),
        staleness_max: 0,
        coverage,
    };
    let mut rng = Rng(seed);
    let sites = 2 + rng.below(4) as u32;
    let tokens: Vec<u64> = (0..sites).map(|_| 1 + rng.below(4)).collect();
    let staleness_max = rng.below(3);
    model.tokens = tokens.clone();
    model.staleness_max = staleness_max;
    let mut c = Coordinator::new(
        CoordinatorConfig {
            asynchronous: Some(AsyncMerge {
                site_tokens: tokens.clone(),
                staleness_max,
                grace_ms: GRACE_MS,
            }),
            ..CoordinatorConfig::new(PARAMS, OuterConfig::FEDAVG)
        },
        vec![0.0; PARAMS],
    )
    .unwrap();
    for site in 0..sites {
        c.handle(0, Event::SiteJoined { site });
    }
    c.start(0);
    let always_last = sites - 1;
    // (arrival ms, site, round trained from, δ); the rounds a site hears of lag the truth.
    let mut in_flight: Vec<(u64, u32, u64, f32)> = Vec::new();
    let mut heard: Vec<u64> = vec![0; sites as usize];
    let mut members: std::collections::BTreeSet<u32> = (0..sites).collect();
    let mut now = 0u64;
    for _ in 0..60 {
        now += 1 + rng.below(40);
        let site = rng.below(sites as u64) as u32;
        match rng.below(10) {
            0 if members.contains(&site) => {
                members.remove(&site);
                check(&mut c, now, Event::SiteLeft { site }, None, &mut model);
            }
            1 if !members.contains(&site) => {
                members.insert(site);
                check(&mut c, now, Event::SiteJoined { site }, None, &mut model);
            }
            _ => {
                heard[site as usize] =
                    heard[site as usize].max(c.round().saturating_sub(rng.below(3)));
                let delay = if site == always_last {
                    GRACE_MS + rng.below(300)
                } else {
                    rng.below(150)
                };
                let value = (rng.below(2001) as f32 - 1000.0) / 1000.0;
                in_flight.push((now + delay, site, heard[site as usize], value));
            }
        }
        in_flight.sort_by_key(|u| u.0);
        while in_flight.first().is_some_and(|u| u.0 <= now) {
            let (at, site, round, value) = in_flight.remove(0);
            let bytes = update(site, round, value);
            let event = Event::PacketArrived {
                from: site,
                bytes: &bytes,
            };
            let known = members.contains(&site);
            let accepted = check(
                &mut c,
                at.max(now),
                event,
                Some((site, round, value)),
                &mut model,
            );
            assert!(
                known || !accepted,
                "seed {seed}: an update from a site that left was held"
            );
        }
        check(&mut c, now, Event::Tick, None, &mut model);
    }
    // The end: everything in flight arrives, then the grace window passes.
    for (at, site, round, value) in std::mem::take(&mut in_flight) {
        let bytes = update(site, round, value);
        let event = Event::PacketArrived {
            from: site,
            bytes: &bytes,
        };
        check(
            &mut c,
            at.max(now),
            event,
            Some((site, round, value)),
            &mut model,
        );
    }
    check(&mut c, now + 10_000, Event::Tick, None, &mut model);
    let held = &model.held;
    assert!(
        held.is_empty() || members.is_empty(),
        "seed {seed}: updates left behind: {held:?}"
    );
    c.global()[0]
}

/// What the rule says the coordinator holds, the run's settings, and the paths taken.
struct Model<'a> {
    held: std::collections::BTreeMap<u32, (u64, f32)>,
    tokens: Vec<u64>,
    staleness_max: u64,
    coverage: &'a mut Coverage,
}

/// Hand `event` to the coordinator and hold it to the rule; returns whether the update it
/// carried (if any) was accepted.
fn check(
    c: &mut Coordinator,
    now: u64,
    event: Event,
    carried: Option<(u32, u64, f32)>,
    model: &mut Model,
) -> bool {
    let Model {
        held,
        tokens,
        staleness_max,
        coverage,
    } = model;
    let staleness_max = *staleness_max;
    let before = c.global()[0];
    let open = c.round();
    let description = format!("{event:?}").chars().take(60).collect::<String>();
    let actions = c.handle(now, event);
    if std::env::var("TRACE").is_ok() {
        eprintln!(
            "{now} round {open} {description} {carried:?} -> {:?}",
            actions
                .iter()
                .map(|a| match a {
                    Action::RoundClosed(r) => format!("closed {} {:?}", r.round, r.contributors),
                    Action::Rejected { from, reason } => format!("rejected {from} {reason}"),
                    Action::Send { to, .. } => format!("send {to}"),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
        );
    }
    // The update is held from its arrival on (it may close its round at once, as the last one
    // in); a site's second update closes the round holding its first, then is held.
    let duplicate = carried.is_some_and(|(site, _, _)| held.contains_key(&site));
    coverage.second_updates += u64::from(duplicate);
    if let Some((site, round, value)) = carried.filter(|_| !duplicate) {
        held.insert(site, (round, value));
    }
    let (mut rejected, mut closed_seen) = (false, false);
    for action in &actions {
        match action {
            Action::RoundClosed(report) => {
                let sites: Vec<u32> = held.keys().copied().collect();
                assert_eq!(report.contributors, sites, "the round merged what it held");
                let (mut sum, mut total) = (0.0f64, 0.0f64);
                for (site, stale) in &report.update_staleness {
                    let (round, value) = held[site];
                    assert_eq!(*stale, report.round - round);
                    assert!(*stale <= staleness_max);
                    coverage.stale_merged += u64::from(*stale > 0);
                    let budget = *tokens.iter().max().unwrap() as f64;
                    let weight = budget / (1 + stale) as f64;
                    sum += weight * value as f64;
                    total += tokens[*site as usize] as f64;
                }
                let budget = *tokens.iter().max().unwrap() as f64;
                let expected = before as f64 - sum / total.max(budget);
                assert!(
                    (c.global()[0] as f64 - expected).abs() < 1e-4,
                    "{} vs {expected}",
                    c.global()[0]
                );
                held.clear();
                closed_seen = true;
                if let Some((site, round, value)) = carried.filter(|_| duplicate) {
                    held.insert(site, (round, value));
                }
            }
            Action::Rejected { from, reason } => {
                let (site, round, _) = carried.expect("only updates are refused here");
                assert_eq!(*from, site);
                rejected = true;
                // (Refused before it closed anything: a held first update stays held.)
                if !duplicate || closed_seen {
                    held.remove(&site);
                }
                match reason {
                    ProtocolError::TooStale {
                        round: r, open: o, ..
                    } => {
                        assert!(*o - *r > staleness_max && *r == round);
                        coverage.too_stale += 1;
                    }
                    ProtocolError::UnknownSite(_) => coverage.after_leaving += 1,
                    ProtocolError::WrongRound { .. } => {}
                    other => panic!("refused for {other}"),
                }
            }
            _ => {}
        }
    }
    carried.is_some() && !rejected
}

/// How often the timelines took each path (so that the test cannot pass by avoiding them).
#[derive(Default, Debug)]
struct Coverage {
    stale_merged: u64,
    too_stale: u64,
    after_leaving: u64,
    second_updates: u64,
}

#[test]
fn a_thousand_seeded_timelines_keep_the_rule_and_replay_bitwise() {
    let mut coverage = Coverage::default();
    for seed in 0..1_000 {
        let theta = timeline(seed, &mut coverage);
        assert!(theta.is_finite(), "seed {seed}");
        let replay = timeline(seed, &mut Coverage::default());
        assert_eq!(theta.to_bits(), replay.to_bits(), "seed {seed}: replay");
    }
    eprintln!("{coverage:?}");
    assert!(coverage.stale_merged > 1_000, "{coverage:?}");
    assert!(coverage.too_stale > 1_000, "{coverage:?}");
    assert!(coverage.after_leaving > 100, "{coverage:?}");
    assert!(coverage.second_updates > 1_000, "{coverage:?}");
}
