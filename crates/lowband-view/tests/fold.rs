//! The view's fold over a run's events, its JSON pushes, its Prometheus text and the replay of
//! `events.jsonl`.

use lowband_runtime::ledger::Endpoint;
use lowband_runtime::{Metric, RunEvent};
use lowband_view::state::SiteState;
use lowband_view::{Live, ViewState};

const NAME: &str = "sparseloco@10[up=topk:k=64,chunk=4096,values=q2]";

fn started(keys: bool) -> RunEvent {
    RunEvent::Started {
        strategy: NAME.into(),
        sites: 2,
        steps: 20,
        tokens_per_step: 100,
        params: 1000,
        price_per_gb: 0.05,
        site_keys: if keys {
            vec!["ab".repeat(32), "cd".repeat(32)]
        } else {
            Vec::new()
        },
    }
}

fn metric(metric: Metric) -> RunEvent {
    RunEvent::Metric {
        strategy: NAME.into(),
        emulated_seconds: 1.5,
        metric,
    }
}

fn traffic(round: u64, from: Endpoint, to: Endpoint, bytes: u64) -> RunEvent {
    RunEvent::Traffic {
        strategy: NAME.into(),
        round,
        from,
        to,
        bytes,
    }
}

/// One networked round: site 0 reports, sends and is merged; site 1 is refused; the round
/// closes; the next round's broadcast goes out.
fn one_round() -> Vec<(RunEvent, f64)> {
    vec![
        (started(true), 0.0),
        (metric(Metric::Joined { round: 0, site: 0 }), 0.1),
        (metric(Metric::Joined { round: 0, site: 1 }), 0.1),
        (
            RunEvent::Report {
                strategy: NAME.into(),
                round: 0,
                site: 0,
                seconds: 2.0,
                received_bytes: 2_000_000,
                received_seconds: 0.25,
            },
            2.0,
        ),
        (
            traffic(0, Endpoint::Site(0), Endpoint::Coordinator, 1_000_000),
            2.5,
        ),
        (
            RunEvent::Arrived {
                strategy: NAME.into(),
                round: 0,
                site: 0,
                bytes: 1_000_000,
            },
            2.5,
        ),
        (
            traffic(0, Endpoint::Site(1), Endpoint::Coordinator, 10),
            2.6,
        ),
        (
            metric(Metric::Refused {
                round: 0,
                site: 1,
                reason: "norm 1e9 above the bound".into(),
                too_stale: false,
            }),
            2.6,
        ),
        (
            metric(Metric::Step {
                step: 9,
                loss: 3.0,
                lr: 1e-3,
            }),
            2.7,
        ),
        (
            metric(Metric::Round {
                round: 0,
                step: 10,
                inter_site_bytes: 1_000_010,
                delta_norm: 1.0,
                update_norms: Vec::new(),
                update_cosines: Vec::new(),
                update_staleness: Vec::new(),
            }),
            2.7,
        ),
        (
            traffic(1, Endpoint::Coordinator, Endpoint::Site(0), 500),
            3.0,
        ),
    ]
}

#[test]
fn a_networked_round_folds_into_sites_timeline_and_totals() {
    let mut state = ViewState::new("run", vec![NAME.into()], true);
    for (event, wall) in one_round() {
        state.apply(&event, wall);
    }
    let view = &state.strategies[0];
    assert_eq!((view.rounds, view.step, view.bytes), (1, 10, 1_000_510));
    assert!((view.egress_dollars - 1_000_510.0 / 1e9 * 0.05).abs() < 1e-12);
    let site = &view.site_views[0];
    assert_eq!(site.key.as_deref(), Some("abababababababab"));
    assert_eq!(site.state, SiteState::Training);
    // Uploaded 1 MB in 0.5 s: 16 Mbit/s; waited from 2.5 s to the broadcast at 3.0 s.
    assert!((site.up_mbit_per_s.unwrap() - 16.0).abs() < 1e-9);
    // It received 2 MB in 0.25 s: 64 Mbit/s.
    assert!((site.down_mbit_per_s.unwrap() - 64.0).abs() < 1e-9);
    assert_eq!((site.accepted, view.site_views[1].accepted), (1, 0));
    assert!((site.waiting_seconds - 0.5).abs() < 1e-9);
    assert_eq!(site.compute_seconds, 2.0);
    let states: Vec<SiteState> = site.history.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        states,
        [
            SiteState::Joining,
            SiteState::Training,
            SiteState::Sending,
            SiteState::Waiting,
            SiteState::Training
        ]
    );
    assert_eq!(view.site_views[1].refused, 1);
    let round = &view.timeline[0];
    assert_eq!(round.closed_wall_seconds, Some(2.7));
    let statuses: Vec<&str> = round.arrivals.iter().map(|a| a.status).collect();
    assert_eq!(statuses, ["merged", "refused"]);
    // The ETA: 10 of 20 steps done in the 3 s so far.
    assert!((view.eta_seconds.unwrap() - 3.0).abs() < 1e-9);
}

#[test]
fn an_excluded_site_stays_excluded_and_a_gone_one_comes_back() {
    let mut state = ViewState::new("run", vec![NAME.into()], true);
    state.apply(&started(true), 0.0);
    let excluded = Metric::Excluded {
        round: 3,
        site: 1,
        reason: "refused 3 times in 10 rounds".into(),
    };
    state.apply(&metric(excluded), 1.0);
    state.apply(&metric(Metric::Joined { round: 4, site: 1 }), 2.0);
    state.apply(
        &metric(Metric::Left {
            round: 4,
            site: 0,
            reason: "lost".into(),
        }),
        3.0,
    );
    state.apply(&metric(Metric::Joined { round: 5, site: 0 }), 4.0);
    let view = &state.strategies[0];
    assert_eq!(view.site_views[1].state, SiteState::Excluded);
    assert_eq!(view.exclusions.len(), 1);
    let back: Vec<SiteState> = view.site_views[0].history.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        back,
        [SiteState::Joining, SiteState::Gone, SiteState::Training]
    );
}

#[test]
fn pushes_carry_only_the_points_a_client_lacks() {
    let mut state = ViewState::new("run", vec![NAME.into()], true);
    state.apply(&started(false), 0.0);
    let step = |step| {
        metric(Metric::Step {
            step,
            loss: 1.0,
            lr: 0.0,
        })
    };
    state.apply(&step(0), 0.1);
    state.apply(&step(1), 0.2);
    let mut cursors = Vec::new();
    let first = state.to_json(&mut cursors);
    assert_eq!(first["strategies"][0]["train"].as_array().unwrap().len(), 2);
    state.apply(&step(2), 0.3);
    let next = state.to_json(&mut cursors);
    assert_eq!(next["strategies"][0]["train_from"], 2);
    let points = next["strategies"][0]["train"].as_array().unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0]["tokens"], 300);
    // An in-memory run's sites have no keys.
    assert!(next["strategies"][0]["site_views"][0]["key"].is_null());
}

#[test]
fn prometheus_text_names_escapes_and_counts() {
    let live = Live::new("run", vec![NAME.into()]);
    for (event, _) in one_round() {
        live.record(event);
    }
    let text = live.prometheus();
    let label = "strategy=\"sparseloco@10[up=topk:k=64,chunk=4096,values=q2]\"";
    assert!(
        text.contains(&format!("lowband_rounds_total{{{label}}} 1\n")),
        "{text}"
    );
    assert!(text.contains(&format!(
        "lowband_bytes_total{{{label},site=\"0\",direction=\"up\"}} 1000000\n"
    )));
    assert!(text.contains("# TYPE lowband_bytes_total counter\n"));
    assert!(text.contains(&format!(
        "lowband_site_refused_total{{{label},site=\"1\"}} 1\n"
    )));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("lowband_"), "{line}");
    }
    let mut odd = ViewState::new("run", Vec::new(), true);
    odd.apply(
        &RunEvent::Started {
            strategy: "a\"b\\c\nd".into(),
            sites: 1,
            steps: 1,
            tokens_per_step: 1,
            params: 1,
            price_per_gb: 0.0,
            site_keys: Vec::new(),
        },
        0.0,
    );
    let text = lowband_view::metrics::prometheus(&odd);
    assert!(text.contains("strategy=\"a\\\"b\\\\c\\nd\""), "{text}");
}

#[test]
fn a_finished_run_replays_from_its_events_to_the_same_state() {
    let live = Live::new("run", vec![NAME.into()]);
    for (event, _) in one_round() {
        live.record(event);
    }
    live.record(RunEvent::Finished {
        strategy: NAME.into(),
        rounds: 1,
        final_val_loss: Some(2.5),
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, live.events_jsonl()).unwrap();
    let replayed = Live::replay("run", &path).unwrap().state();
    let original = live.state();
    assert!(!replayed.live);
    assert_eq!(replayed.strategies, original.strategies);
    // A damaged file is an error naming the line.
    std::fs::write(&path, b"{\"wall_seconds\": 1}\n").unwrap();
    let error = Live::replay("run", &path).err().unwrap().to_string();
    assert!(error.contains("line 1"), "{error}");
}
