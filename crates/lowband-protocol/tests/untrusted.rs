//! Untrusted sites at the protocol level: a hostile update is refused or outvoted, its sender is
//! scored and, when refused repeatedly, excluded; the plain mean is shown to fail.

use lowband_protocol::{
    Action, AggregatorSpec, Coordinator, CoordinatorConfig, Event, OuterConfig, ProtocolError,
    Robustness, Site, SiteAction, SiteEvent,
};

const PARAMS: usize = 64;

fn coordinator(aggregator: &str) -> Coordinator {
    let robustness = Robustness {
        exclude_after_refusals: 3,
        score_window_rounds: 5,
        ..Robustness::with(aggregator.parse().unwrap())
    };
    let config = CoordinatorConfig {
        quorum: 1,
        round_deadline_ms: 1_000,
        robustness,
        ..CoordinatorConfig::new(PARAMS, OuterConfig::FEDAVG)
    };
    Coordinator::new(config, vec![0.0; PARAMS]).unwrap()
}

/// One round: every site that got a packet "trains" to start − honest(k) (site `bad` to
/// start − attack(honest)), and the coordinator gets every update.
fn round(
    c: &mut Coordinator,
    sites: &mut [Site],
    packets: Vec<(u32, Vec<u8>)>,
    bad: u32,
    attack: &dyn Fn(&[f32]) -> Vec<f32>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (to, bytes) in packets {
        let site = &mut sites[to as usize];
        let SiteAction::Train { round } = site.handle(SiteEvent::PacketArrived(&bytes)).unwrap()[0]
        else {
            panic!("expected Train")
        };
        // Honest deltas: 1 + small per-site, per-coordinate differences.
        let honest: Vec<f32> = (0..PARAMS)
            .map(|j| 1.0 + 0.01 * ((to as usize * 7 + j) % 5) as f32)
            .collect();
        let delta = if to == bad { attack(&honest) } else { honest };
        let trained: Vec<f32> = site
            .round_start()
            .iter()
            .zip(&delta)
            .map(|(s, d)| s - d)
            .collect();
        let SiteAction::Send(update) = &site
            .handle(SiteEvent::TrainingDone {
                round,
                params: &trained,
            })
            .unwrap()[0]
        else {
            panic!("expected Send")
        };
        actions.extend(c.handle(
            10,
            Event::PacketArrived {
                from: to,
                bytes: update,
            },
        ));
    }
    actions
}

fn sends(actions: &[Action]) -> Vec<(u32, Vec<u8>)> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::Send { to, bytes } = a {
                Some((*to, bytes.to_vec()))
            } else {
                None
            }
        })
        .collect()
}

fn start(c: &mut Coordinator, k: u32) -> (Vec<Site>, Vec<(u32, Vec<u8>)>) {
    for site in 0..k {
        c.handle(0, Event::SiteJoined { site });
    }
    (
        (0..k).map(|i| Site::new(i, PARAMS)).collect(),
        sends(&c.start(0)),
    )
}

#[test]
fn the_plain_mean_follows_a_scaled_attacker_and_the_median_does_not() {
    let scale = |h: &[f32]| h.iter().map(|v| -10.0 * v).collect::<Vec<_>>();
    let mut mean = coordinator("mean");
    let (mut sites, packets) = start(&mut mean, 4);
    round(&mut mean, &mut sites, packets, 3, &scale);
    // (3 honest ≈ 1 and one −10) / 4 ≈ −1.75: θ moves the wrong way.
    assert!(
        mean.global().iter().all(|p| *p > 1.5),
        "the mean follows the attacker: {:?}",
        &mean.global()[..4]
    );

    let mut median = coordinator("median");
    let (mut sites, packets) = start(&mut median, 4);
    let actions = round(&mut median, &mut sites, packets, 3, &scale);
    assert!(
        median.global().iter().all(|p| (-1.05..=-0.99).contains(p)),
        "the median stays honest: {:?}",
        &median.global()[..4]
    );
    // The norm check refused it (10x the median norm, above the bound of 4x).
    let report = actions
        .iter()
        .find_map(|a| {
            if let Action::RoundClosed(r) = a {
                Some(r.clone())
            } else {
                None
            }
        })
        .unwrap();
    assert_eq!(
        (report.contributors, report.refused),
        (vec![0, 1, 2], vec![3])
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Rejected {
            from: 3,
            reason: ProtocolError::UpdateNorm { .. }
        }
    )));
}

#[test]
fn a_site_refused_repeatedly_is_excluded_with_its_reason_and_cannot_rejoin() {
    let zeros = |h: &[f32]| vec![0.0; h.len()];
    for aggregator in ["median", "trimmed-mean", "centered-clip", "clipped-mean"] {
        let mut c = coordinator(aggregator);
        let (mut sites, mut packets) = start(&mut c, 4);
        let mut excluded = None;
        for r in 0..5 {
            let actions = round(&mut c, &mut sites, packets, 2, &zeros);
            if let Some(reason) = actions.iter().find_map(|a| {
                if let Action::Excluded { site: 2, reason } = a {
                    Some(reason.clone())
                } else {
                    None
                }
            }) {
                excluded = Some((r, reason));
            }
            packets = sends(&actions);
        }
        let (r, reason) =
            excluded.unwrap_or_else(|| panic!("{aggregator}: the free rider was never excluded"));
        assert_eq!(r, 2, "{aggregator}: excluded at its third refusal");
        assert!(
            reason.contains("refused in 3 of its last 3 rounds") && reason.contains("norm"),
            "{reason}"
        );
        assert!(!c.members().contains(&2));
        assert_eq!(
            packets.iter().map(|(to, _)| *to).collect::<Vec<_>>(),
            vec![0, 1, 3],
            "no packet for the excluded site"
        );
        let score = &c.scores()[&2];
        assert_eq!((score.accepted, score.refused), (0, 3));
        assert!(matches!(
            c.handle(20, Event::SiteJoined { site: 2 })[..],
            [Action::Rejected {
                reason: ProtocolError::Excluded(2),
                ..
            }]
        ));
        // Exclusion survives a restart from the saved state.
        let saved = c.state();
        let mut restored = coordinator(aggregator);
        for site in 0..4 {
            restored.handle(0, Event::SiteJoined { site });
        }
        restored.restore(saved).unwrap();
        assert!(!restored.members().contains(&2));
        assert!(matches!(
            restored.handle(20, Event::SiteJoined { site: 2 })[..],
            [Action::Rejected {
                reason: ProtocolError::Excluded(2),
                ..
            }]
        ));
    }
}

#[test]
fn a_sign_flipping_site_is_refused_by_the_direction_check_or_else_outvoted() {
    let flip = |h: &[f32]| h.iter().map(|v| -v).collect::<Vec<_>>();
    for aggregator in ["median", "trimmed-mean", "centered-clip"] {
        for direction_check in [true, false] {
            let mut c = if direction_check {
                coordinator(aggregator)
            } else {
                let robustness = Robustness {
                    cosine_ratio_min: None,
                    ..Robustness::with(aggregator.parse().unwrap())
                };
                Coordinator::new(
                    CoordinatorConfig {
                        quorum: 1,
                        round_deadline_ms: 1_000,
                        robustness,
                        ..CoordinatorConfig::new(PARAMS, OuterConfig::FEDAVG)
                    },
                    vec![0.0; PARAMS],
                )
                .unwrap()
            };
            let (mut sites, mut packets) = start(&mut c, 4);
            let mut refusals = Vec::new();
            for _ in 0..3 {
                let actions = round(&mut c, &mut sites, packets, 1, &flip);
                refusals.extend(actions.iter().filter_map(|a| {
                    if let Action::Rejected { from, reason } = a {
                        Some((*from, reason.clone()))
                    } else {
                        None
                    }
                }));
                packets = sends(&actions);
            }
            // Three rounds of honest deltas ≈ 1.0x: θ ≈ −3 (the mean would give −1.5).
            assert!(
                c.global().iter().all(|p| (-3.2..=-2.6).contains(p)),
                "{aggregator}: {:?}",
                &c.global()[..4]
            );
            let score = &c.scores()[&1];
            if direction_check {
                assert_eq!((score.accepted, score.refused), (0, 3), "{aggregator}");
                assert!(
                    refusals.iter().all(|(site, reason)| *site == 1
                        && matches!(reason, ProtocolError::UpdateDirection { .. })),
                    "{refusals:?}"
                );
                assert!(score.excluded.is_some());
            } else {
                assert_eq!(
                    (score.accepted, score.downweighted, score.refused),
                    (3, 3, 0),
                    "{aggregator}: the aggregator alone cuts it"
                );
            }
            assert!(
                c.scores()[&0].downweighted == 0 && c.scores()[&0].refused == 0,
                "{aggregator}: an honest site is not flagged"
            );
        }
    }
}

#[test]
fn robust_aggregation_of_an_honest_round_stays_close_to_the_mean() {
    let none = |h: &[f32]| h.to_vec();
    let mut results = Vec::new();
    for aggregator in AggregatorSpec::NAMES {
        let mut c = coordinator(aggregator);
        let (mut sites, packets) = start(&mut c, 4);
        let actions = round(&mut c, &mut sites, packets, 0, &none);
        assert!(
            actions
                .iter()
                .all(|a| !matches!(a, Action::Rejected { .. } | Action::Excluded { .. })),
            "{aggregator} refused an honest site"
        );
        results.push(c.global().to_vec());
    }
    for (name, r) in AggregatorSpec::NAMES.iter().zip(&results) {
        for (a, b) in r.iter().zip(&results[0]) {
            assert!((a - b).abs() <= 0.02, "{name}: {a} vs the mean's {b}");
        }
    }
}

#[test]
fn a_merge_that_would_carry_the_parameters_out_of_range_is_refused_and_its_sender_named() {
    // Issue 17: one site scaling its update by 1e30 (finite) under the plain mean put every
    // honest site's gradients at inf. The merge is refused, θ and the momentum are kept, the
    // attacker is named, and once excluded the honest sites' rounds apply again.
    let huge = |h: &[f32]| h.iter().map(|v| 1e30 * v).collect::<Vec<_>>();
    let mut c = coordinator("mean");
    let (mut sites, mut packets) = start(&mut c, 3);
    let mut refused_merges = 0;
    for r in 0..5 {
        let before = c.global().to_vec();
        let actions = round(&mut c, &mut sites, packets, 1, &huge);
        assert!(c.global().iter().all(|p| p.abs() <= 1e6), "round {r}");
        let report = actions
            .iter()
            .find_map(|a| match a {
                Action::RoundClosed(report) => Some(report.clone()),
                _ => None,
            })
            .unwrap();
        if !report.applied {
            refused_merges += 1;
            assert_eq!(c.global(), &before[..], "round {r}: θ kept as it was");
            assert!(actions.iter().any(|a| matches!(
                a,
                Action::Rejected {
                    from: 1,
                    reason: ProtocolError::MergeOutOfRange { update_value, .. },
                } if *update_value > 1e29
            )));
        } else {
            assert!(
                c.global()
                    .iter()
                    .all(|p| (-1.05..=-0.99).contains(p) || *p < before[0]),
                "round {r}: the honest sites' merge applies"
            );
        }
        packets = sends(&actions);
    }
    assert_eq!(
        refused_merges, 3,
        "refused until its third refusal excludes it"
    );
    assert!(!c.members().contains(&1));
    let score = &c.scores()[&1];
    assert_eq!(
        (score.accepted, score.refused),
        (0, 3),
        "never scored as accepted"
    );
    // The excluded site's later rounds merged the honest two only: θ moved by about -1 a round.
    assert!(
        c.global().iter().all(|p| (-2.1..=-1.9).contains(p)),
        "{:?}",
        &c.global()[..4]
    );
}
