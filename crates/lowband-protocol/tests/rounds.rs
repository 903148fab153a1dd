//! Scenario tests of the round protocol: coordinator and sites driven by hand with a virtual
//! clock, no IO.

use lowband_protocol::wire::{self, MessageKind};
use lowband_protocol::{
    Action, Coordinator, CoordinatorConfig, Event, OuterConfig, ProtocolError, Site, SiteAction,
    SiteEvent,
};

const PARAMS: usize = 4;

fn coordinator(outer: OuterConfig, quorum: usize) -> Coordinator {
    let config = CoordinatorConfig {
        quorum,
        round_deadline_ms: 1_000,
        ..CoordinatorConfig::new(PARAMS, outer)
    };
    Coordinator::new(config, vec![1.0, 2.0, 3.0, 4.0]).unwrap()
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

/// Deliver the coordinator's sends to the sites, let each "train" by subtracting `step(site)`,
/// and return their update packets.
fn run_sites(
    sites: &mut [Site],
    packets: &[(u32, Vec<u8>)],
    step: impl Fn(u32) -> f32,
) -> Vec<(u32, Vec<u8>)> {
    let mut updates = Vec::new();
    for (to, bytes) in packets {
        let site = sites.iter_mut().find(|s| s.id() == *to).unwrap();
        let actions = site.handle(SiteEvent::PacketArrived(bytes)).unwrap();
        let SiteAction::Train { round } = actions[0] else {
            panic!("expected Train")
        };
        let trained: Vec<f32> = site.round_start().iter().map(|p| p - step(*to)).collect();
        let actions = site
            .handle(SiteEvent::TrainingDone {
                round,
                params: &trained,
            })
            .unwrap();
        let SiteAction::Send(bytes) = &actions[0] else {
            panic!("expected Send")
        };
        updates.push((*to, bytes.clone()));
    }
    updates
}

fn join_all(c: &mut Coordinator, ids: &[u32]) {
    for &site in ids {
        assert!(c.handle(0, Event::SiteJoined { site }).is_empty());
    }
}

#[test]
fn rounds_complete_and_every_site_starts_each_round_from_identical_parameters() {
    let mut c = coordinator(OuterConfig::FEDAVG, 3);
    let mut sites: Vec<Site> = (0..3).map(|i| Site::new(i, PARAMS)).collect();
    join_all(&mut c, &[0, 1, 2]);
    let mut packets = sends(&c.start(0));
    for round in 0..3u64 {
        assert_eq!(packets.len(), 3);
        // Site k moves every parameter down by k + 1: the mean delta is 2.
        let updates = run_sites(&mut sites, &packets, |k| (k + 1) as f32);
        let before = c.global().to_vec();
        let mut actions = Vec::new();
        for (from, bytes) in &updates {
            actions.extend(c.handle(10, Event::PacketArrived { from: *from, bytes }));
        }
        let closed: Vec<_> = actions
            .iter()
            .filter(|a| matches!(a, Action::RoundClosed(_)))
            .collect();
        assert_eq!(closed.len(), 1, "round {round} closes exactly once");
        assert!(actions.contains(&Action::Checkpoint { round: round + 1 }));
        let expected: Vec<f32> = before.iter().map(|p| p - 2.0).collect();
        assert_eq!(
            c.global(),
            expected.as_slice(),
            "FedAvg lands on the mean of the sites"
        );
        packets = sends(&actions);
        for (_, bytes) in &packets {
            let m = wire::decode(bytes, 1 << 20).unwrap();
            assert_eq!((m.kind, m.round), (MessageKind::Global, round + 1));
        }
    }
    run_sites(&mut sites, &packets, |_| 0.0);
    for s in &sites {
        assert_eq!(
            s.round_start(),
            c.global(),
            "site {} holds the global parameters",
            s.id()
        );
    }
}

#[test]
fn diloco_nesterov_through_the_protocol_matches_a_hand_computation() {
    let mut c = coordinator(OuterConfig::DILOCO, 2);
    let mut sites: Vec<Site> = (0..2).map(|i| Site::new(i, PARAMS)).collect();
    join_all(&mut c, &[0, 1]);
    let packets = sends(&c.start(0));
    // Sites move by 1 and 3: delta = 2 everywhere. buf = 2; step = 0.7 * (2 + 0.9 * 2) = 2.66.
    let updates = run_sites(&mut sites, &packets, |k| if k == 0 { 1.0 } else { 3.0 });
    let mut actions = Vec::new();
    for (from, bytes) in &updates {
        actions.extend(c.handle(5, Event::PacketArrived { from: *from, bytes }));
    }
    let expected = [1.0 - 2.66f32, 2.0 - 2.66, 3.0 - 2.66, 4.0 - 2.66];
    for (g, e) in c.global().iter().zip(expected) {
        assert!((g - e).abs() < 1e-6, "{:?} vs {expected:?}", c.global());
    }
}

#[test]
fn round_closes_on_quorum_when_a_site_is_silent() {
    let mut c = coordinator(OuterConfig::FEDAVG, 2);
    let mut sites: Vec<Site> = (0..3).map(|i| Site::new(i, PARAMS)).collect();
    join_all(&mut c, &[0, 1, 2]);
    let packets = sends(&c.start(0));
    let updates = run_sites(&mut sites, &packets, |_| 1.0);
    for (from, bytes) in &updates[..2] {
        assert!(
            c.handle(100, Event::PacketArrived { from: *from, bytes })
                .is_empty(),
            "waits for site 2"
        );
    }
    assert!(
        c.handle(999, Event::Tick).is_empty(),
        "before the deadline nothing happens"
    );
    let actions = c.handle(1_000, Event::Tick);
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
    assert_eq!((report.contributors, report.missing), (vec![0, 1], vec![2]));
    // The silent site's update, arriving now, belongs to a closed round: refused, no effect.
    let global = c.global().to_vec();
    let late = c.handle(
        1_001,
        Event::PacketArrived {
            from: 2,
            bytes: &updates[2].1,
        },
    );
    assert!(matches!(
        late[..],
        [Action::Rejected {
            from: 2,
            reason: ProtocolError::WrongRound {
                expected: 1,
                found: 0
            }
        }]
    ));
    assert_eq!(c.global(), global.as_slice());
}

#[test]
fn below_quorum_the_round_waits_past_its_deadline() {
    let mut c = coordinator(OuterConfig::FEDAVG, 2);
    let mut sites: Vec<Site> = (0..3).map(|i| Site::new(i, PARAMS)).collect();
    join_all(&mut c, &[0, 1, 2]);
    let packets = sends(&c.start(0));
    let updates = run_sites(&mut sites, &packets, |_| 1.0);
    c.handle(
        10,
        Event::PacketArrived {
            from: 0,
            bytes: &updates[0].1,
        },
    );
    assert!(
        c.handle(5_000, Event::Tick).is_empty(),
        "one update is below the quorum of 2"
    );
    let actions = c.handle(5_001, Event::SiteLeft { site: 2 });
    assert!(actions.is_empty(), "site 1 is still expected");
    let actions = c.handle(
        5_002,
        Event::PacketArrived {
            from: 1,
            bytes: &updates[1].1,
        },
    );
    assert!(actions.iter().any(|a| matches!(a, Action::RoundClosed(_))));
    assert_eq!(
        sends(&actions).len(),
        2,
        "the next round goes to the two remaining members"
    );
}

#[test]
fn forged_duplicate_malformed_and_foreign_packets_are_refused_without_effect() {
    let setup = || {
        let mut c = coordinator(OuterConfig::FEDAVG, 2);
        let mut sites: Vec<Site> = (0..2).map(|i| Site::new(i, PARAMS)).collect();
        join_all(&mut c, &[0, 1]);
        let packets = sends(&c.start(0));
        let updates = run_sites(&mut sites, &packets, |_| 1.0);
        (c, packets, updates)
    };
    let reject = |c: &mut Coordinator, from: u32, bytes: &[u8]| match &c
        .handle(1, Event::PacketArrived { from, bytes })[..]
    {
        [Action::Rejected { reason, .. }] => reason.clone(),
        other => panic!("expected a rejection, got {other:?}"),
    };
    let (_, packets, updates) = setup();
    let mut corrupted = updates[0].1.clone();
    corrupted[30] ^= 1;
    let short_payload = wire::encode(MessageKind::Update, 0, 0, &[1, 2, 0, 0, 0, 0, 0, 128, 127]);
    let nan: Vec<u8> = [
        vec![1u8],
        4u32.to_le_bytes().to_vec(),
        [1.0f32, f32::NAN, 0.0, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    ]
    .concat();
    let nan = wire::encode(MessageKind::Update, 0, 0, &nan);
    // A member's bad update forfeits its turn: the round closes on the other site alone, and
    // the bad packet changed nothing.
    type Case<'a> = (u32, &'a [u8], fn(&ProtocolError) -> bool);
    let cases: [Case; 5] = [
        (1, &updates[0].1, |e| {
            matches!(
                e,
                ProtocolError::SiteMismatch {
                    claimed: 0,
                    from: 1
                }
            )
        }),
        (0, &corrupted, |e| matches!(e, ProtocolError::Wire(_))),
        (0, &packets[0].1, |e| {
            matches!(e, ProtocolError::WrongKind(MessageKind::Global))
        }),
        (0, &short_payload, |e| matches!(e, ProtocolError::Codec(_))),
        (0, &nan, |e| matches!(e, ProtocolError::Codec(_))),
    ];
    for (from, bytes, expected) in cases {
        let (mut c, _, updates) = setup();
        let reason = reject(&mut c, from, bytes);
        assert!(expected(&reason), "{reason:?}");
        assert_eq!(
            c.global(),
            &[1.0, 2.0, 3.0, 4.0],
            "nothing refused changed the parameters"
        );
        let other = 1 - from;
        let actions = c.handle(
            2,
            Event::PacketArrived {
                from: other,
                bytes: &updates[other as usize].1,
            },
        );
        let report = actions
            .iter()
            .find_map(|a| {
                if let Action::RoundClosed(r) = a {
                    Some(r.clone())
                } else {
                    None
                }
            })
            .expect("closes without the forfeited site");
        assert_eq!((report.contributors, report.missing), (vec![other], vec![]));
        assert_eq!(c.scores()[&from].refused, 1);
    }
    // A foreign site and a duplicate are refused but do not forfeit anything.
    let (mut c, _, updates) = setup();
    assert!(matches!(
        reject(&mut c, 9, &wire::encode(MessageKind::Update, 0, 9, &[])),
        ProtocolError::UnknownSite(9)
    ));
    assert!(c
        .handle(
            1,
            Event::PacketArrived {
                from: 0,
                bytes: &updates[0].1
            }
        )
        .is_empty());
    assert!(matches!(
        reject(&mut c, 0, &updates[0].1),
        ProtocolError::Duplicate { site: 0, round: 0 }
    ));
    assert_eq!(c.global(), &[1.0, 2.0, 3.0, 4.0]);
    let actions = c.handle(
        2,
        Event::PacketArrived {
            from: 1,
            bytes: &updates[1].1,
        },
    );
    assert!(actions.iter().any(|a| matches!(a, Action::RoundClosed(_))));
    assert_eq!(c.global(), &[0.0, 1.0, 2.0, 3.0]);
}

#[test]
fn a_site_joining_mid_round_takes_part_from_the_next_round() {
    let mut c = coordinator(OuterConfig::FEDAVG, 1);
    let mut sites: Vec<Site> = (0..2).map(|i| Site::new(i, PARAMS)).collect();
    join_all(&mut c, &[0]);
    let packets = sends(&c.start(0));
    assert!(
        c.handle(3, Event::SiteJoined { site: 1 }).is_empty(),
        "no packet for the newcomer mid-round"
    );
    let updates = run_sites(&mut sites, &packets, |_| 1.0);
    let actions = c.handle(
        4,
        Event::PacketArrived {
            from: 0,
            bytes: &updates[0].1,
        },
    );
    assert!(
        actions.iter().any(|a| matches!(a, Action::RoundClosed(_))),
        "round 0 closes with its only member"
    );
    let next: Vec<u32> = sends(&actions).iter().map(|(to, _)| *to).collect();
    assert_eq!(next, vec![0, 1]);
}

#[test]
fn membership_is_bounded() {
    let config = CoordinatorConfig {
        sites_max: 2,
        ..CoordinatorConfig::new(PARAMS, OuterConfig::FEDAVG)
    };
    let mut c = Coordinator::new(config, vec![0.0; PARAMS]).unwrap();
    join_all(&mut c, &[0, 1]);
    assert!(matches!(
        c.handle(0, Event::SiteJoined { site: 2 })[..],
        [Action::Rejected {
            reason: ProtocolError::TooManySites(2),
            ..
        }]
    ));
}

/// A compressed downlink: members present at the start get an empty change (they hold θ₀), a
/// site that joins later gets θ_sites in full once, then changes; every site holds exactly what
/// every other member holds; a change for a site that holds nothing is refused.
#[test]
fn compressed_downlink_sends_changes_and_parameters_only_to_newcomers() {
    use lowband_protocol::Compression;
    let int8: lowband_codec::CodecSpec = "int8:chunk=2".parse().unwrap();
    let compression = Compression {
        uplink: int8,
        downlink: int8,
        feedback_decay: Some(1.0),
    };
    let config = CoordinatorConfig {
        quorum: 2,
        round_deadline_ms: 1_000,
        compression,
        sites_start_synced: true,
        ..CoordinatorConfig::new(PARAMS, OuterConfig::FEDAVG)
    };
    let initial = vec![1.0, 2.0, 3.0, 4.0];
    let mut c = Coordinator::new(config, initial.clone()).unwrap();
    let mut sites: Vec<Site> = (0..2)
        .map(|i| Site::with_initial(i, initial.clone(), compression).unwrap())
        .collect();
    join_all(&mut c, &[0, 1]);
    let first = sends(&c.start(0));
    for (_, bytes) in &first {
        let m = wire::decode(bytes, 1 << 20).unwrap();
        assert_eq!(
            (m.kind, m.payload.len()),
            (MessageKind::GlobalDelta, 0),
            "round 0 needs no parameters"
        );
    }
    let updates = run_sites(&mut sites, &first, |s| 0.25 * (s + 1) as f32);
    let mut next = Vec::new();
    for (from, bytes) in &updates {
        next.extend(sends(
            &c.handle(10, Event::PacketArrived { from: *from, bytes }),
        ));
    }
    assert_eq!(next.len(), 2);
    assert!(next
        .iter()
        .all(|(_, b)| wire::decode(b, 1 << 20).unwrap().kind == MessageKind::GlobalDelta));
    // A newcomer joins: the next round sends it θ_sites in full.
    let mut late = Site::new(2, PARAMS);
    let forged = wire::encode(MessageKind::GlobalDelta, 1, 2, &[]);
    assert!(late.needs_full_parameters(&forged), "it must rejoin for θ");
    assert!(!sites[0].needs_full_parameters(&forged));
    assert!(!late.needs_full_parameters(b"garbage"));
    assert_eq!(
        late.handle(SiteEvent::PacketArrived(&forged)),
        Err(ProtocolError::NotSynced)
    );
    assert!(
        c.handle(20, Event::SiteJoined { site: 2 }).is_empty(),
        "joins at the next round boundary"
    );
    let updates = run_sites(&mut sites, &next, |_| 0.1);
    let mut third = Vec::new();
    for (from, bytes) in &updates {
        third.extend(sends(
            &c.handle(30, Event::PacketArrived { from: *from, bytes }),
        ));
    }
    let to_late = third.iter().find(|(to, _)| *to == 2).unwrap();
    assert_eq!(
        wire::decode(&to_late.1, 1 << 20).unwrap().kind,
        MessageKind::Global
    );
    late.handle(SiteEvent::PacketArrived(&to_late.1)).unwrap();
    for (to, bytes) in third.iter().filter(|(to, _)| *to != 2) {
        sites[*to as usize]
            .handle(SiteEvent::PacketArrived(bytes))
            .unwrap();
    }
    // Everyone holds the same θ_sites: the members by adding changes, the newcomer from one copy.
    assert_eq!(sites[0].round_start(), sites[1].round_start());
    assert_eq!(late.round_start(), sites[0].round_start());
    assert_ne!(sites[0].round_start(), &initial[..]);
}

#[test]
fn a_broadcast_is_one_envelope_shared_by_every_member_and_a_global_for_another_site_is_refused() {
    let mut c = coordinator(OuterConfig::FEDAVG, 3);
    join_all(&mut c, &[0, 1, 2]);
    let actions = c.start(0);
    let shared: Vec<&bytes::Bytes> = actions
        .iter()
        .filter_map(|a| {
            if let Action::Send { bytes, .. } = a {
                Some(bytes)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(shared.len(), 3);
    // The same buffer, not three copies: the coordinator holds one envelope per round whatever K.
    assert!(shared.iter().all(|b| b.as_ptr() == shared[0].as_ptr()));
    assert_eq!(
        wire::decode(shared[0], 1 << 20).unwrap().site,
        wire::EVERY_SITE
    );
    let mut site = Site::new(1, PARAMS);
    assert!(matches!(
        site.handle(SiteEvent::PacketArrived(shared[0])).unwrap()[0],
        SiteAction::Train { round: 0 }
    ));
    // A global addressed to site 2 is not site 1's.
    let other = wire::encode(
        MessageKind::Global,
        1,
        2,
        wire::decode(shared[0], 1 << 20).unwrap().payload,
    );
    assert!(matches!(
        Site::new(1, PARAMS).handle(SiteEvent::PacketArrived(&other)),
        Err(ProtocolError::SiteMismatch {
            claimed: 2,
            from: 1
        })
    ));
    // Nobody joins as "every site".
    let refused = c.handle(
        0,
        Event::SiteJoined {
            site: wire::EVERY_SITE,
        },
    );
    assert!(matches!(
        refused.as_slice(),
        [Action::Rejected {
            reason: ProtocolError::UnknownSite(_),
            ..
        }]
    ));
}

/// A coordinator that resumed from a checkpoint older than the rounds its sites trained (its
/// checkpoints are written behind the rounds): a site ahead of it cannot apply its change to an
/// older round, asks for the parameters in full (rejoin), and takes them with the older round.
#[test]
fn a_site_ahead_of_a_resumed_coordinator_rejoins_and_takes_its_older_round() {
    let compression = lowband_protocol::Compression {
        downlink: "int8".parse().unwrap(),
        ..Default::default()
    };
    let mut site = Site::unsynced(0, PARAMS, compression).unwrap();
    let full = |round: u64, values: &[f32]| {
        let mut payload = Vec::new();
        lowband_codec::Codec::encode(&mut lowband_codec::Fp32, values, &mut payload);
        wire::encode(MessageKind::Global, round, wire::EVERY_SITE, &payload)
    };
    let opened = site
        .handle(SiteEvent::PacketArrived(&full(5, &[1.0, 2.0, 3.0, 4.0])))
        .unwrap();
    assert_eq!(opened, vec![SiteAction::Train { round: 5 }]);
    // The resumed coordinator's change for round 3 applies to parameters this site moved past.
    let mut change = Vec::new();
    let mut int8 = lowband_codec::build(&"int8".parse().unwrap()).unwrap();
    int8.encode(&[0.5, 0.5, 0.5, 0.5], &mut change);
    let stale = wire::encode(MessageKind::GlobalDelta, 3, wire::EVERY_SITE, &change);
    assert!(site.needs_full_parameters(&stale));
    assert_eq!(
        site.handle(SiteEvent::PacketArrived(&stale)),
        Err(ProtocolError::NotSynced)
    );
    assert_eq!(site.round_start(), &[1.0, 2.0, 3.0, 4.0], "nothing applied");
    // Rejoined, it is sent the parameters in full for round 3: they are the cluster's.
    let opened = site
        .handle(SiteEvent::PacketArrived(&full(3, &[4.0, 3.0, 2.0, 1.0])))
        .unwrap();
    assert_eq!(opened, vec![SiteAction::Train { round: 3 }]);
    assert_eq!(site.round_start(), &[4.0, 3.0, 2.0, 1.0]);
    // And it goes on from there: round 3's change applies.
    let next = wire::encode(MessageKind::GlobalDelta, 4, wire::EVERY_SITE, &change);
    assert!(!site.needs_full_parameters(&next));
    assert_eq!(
        site.handle(SiteEvent::PacketArrived(&next)).unwrap(),
        vec![SiteAction::Train { round: 4 }]
    );
}

/// A quorum counts the members a round still expects: the update of a site that left after
/// sending it is merged, but does not stand in for a member the round waits for.
#[test]
fn a_departed_sites_update_does_not_stand_in_for_a_waited_member() {
    let mut c = coordinator(OuterConfig::FEDAVG, 3);
    let mut sites: Vec<Site> = (0..3).map(|i| Site::new(i, PARAMS)).collect();
    join_all(&mut c, &[0, 1, 2]);
    let packets = sends(&c.start(0));
    let updates = run_sites(&mut sites, &packets, |k| (k + 1) as f32);
    // Past the deadline: sites 0 and 1 are in, then site 0 leaves.
    for (from, bytes) in &updates[..2] {
        c.handle(5_000, Event::PacketArrived { from: *from, bytes });
    }
    let actions = c.handle(5_000, Event::SiteLeft { site: 0 });
    assert!(
        !actions.iter().any(|a| matches!(a, Action::RoundClosed(_))),
        "{actions:?}"
    );
    let (from, bytes) = &updates[2];
    let actions = c.handle(5_000, Event::PacketArrived { from: *from, bytes });
    let report = actions
        .iter()
        .find_map(|a| match a {
            Action::RoundClosed(r) => Some(r.clone()),
            _ => None,
        })
        .expect("every member still expected is in");
    assert_eq!(report.contributors, vec![0, 1, 2]);
    assert!(report.missing.is_empty());
}

/// Positions that cost no bits: with `randomk` both ways from one seed, every site and the
/// coordinator's downlink draw the same positions each round (one packet each per round), so the
/// merge of the sites' packets is sparse exactly where the broadcast looks, and with f32 values
/// the broadcast carries all of it: the sites hold the coordinator's θ after every round (a
/// downlink on other positions would leave the merge in its error feedback instead).
#[test]
fn shared_random_positions_carry_the_whole_merge_down() {
    use lowband_protocol::Compression;
    let spec: lowband_codec::CodecSpec = "randomk:k=4,chunk=16,values=f32,seed=7".parse().unwrap();
    let compression = Compression {
        uplink: spec,
        downlink: spec,
        feedback_decay: Some(1.0),
    };
    let params = 64;
    let config = CoordinatorConfig {
        quorum: 2,
        round_deadline_ms: 1_000,
        compression,
        sites_start_synced: true,
        ..CoordinatorConfig::new(params, OuterConfig::FEDAVG)
    };
    let initial: Vec<f32> = (0..params).map(|i| i as f32 * 0.01).collect();
    let mut c = Coordinator::new(config, initial.clone()).unwrap();
    let mut sites: Vec<Site> = (0..2)
        .map(|i| Site::with_initial(i, initial.clone(), compression).unwrap())
        .collect();
    join_all(&mut c, &[0, 1]);
    let mut packets = sends(&c.start(0));
    for round in 0..6u64 {
        let mut updates = Vec::new();
        for (to, bytes) in &packets {
            let site = &mut sites[*to as usize];
            let actions = site.handle(SiteEvent::PacketArrived(bytes)).unwrap();
            let SiteAction::Train { round: started } = actions[0] else {
                panic!("expected Train")
            };
            assert_eq!(started, round);
            assert_eq!(site.round_start(), c.global(), "round {round}");
            let step = 0.25 * (*to + 1) as f32;
            let trained: Vec<f32> = site.round_start().iter().map(|p| p - step).collect();
            let actions = site
                .handle(SiteEvent::TrainingDone {
                    round,
                    params: &trained,
                })
                .unwrap();
            let SiteAction::Send(update) = &actions[0] else {
                panic!("expected Send")
            };
            updates.push((*to, update.clone()));
        }
        packets = updates
            .iter()
            .flat_map(|(from, bytes)| {
                sends(&c.handle(
                    10 * (round + 1),
                    Event::PacketArrived { from: *from, bytes },
                ))
            })
            .collect();
        assert_eq!(packets.len(), 2, "round {round} closed");
    }
    assert_ne!(c.global(), &initial[..]);
}
