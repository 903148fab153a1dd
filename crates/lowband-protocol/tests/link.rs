//! A site's connection decisions (`SiteLink`) under a seeded coordinator that comes and goes:
//! down for a while (connects fail), up (it joins the site, talks, then ends the connection with
//! any close code or just breaks), refusing the key in the TLS handshake, refusing the join, or
//! accepting and closing before it says anything. Time is virtual; nothing sleeps.
//!
//! Checked for every seed: the site stops exactly once and never acts after it stopped; a
//! refusal is final and happens only when the coordinator refused; no attempt is earlier than the
//! machine said, and after a failed one the next waits a retry interval; a site never tries past
//! its budget, and gives up only when every attempt in its budget found no coordinator;
//! a site that was heard and lost reconnects when the coordinator is back within its budget;
//! asked to rejoin, it reconnects even with no budget of its own; a coordinator that accepts and
//! closes without a word cannot keep a site busy past its budget.
//!
//! Replay one seed: `LOWBAND_SIM_SEED=N cargo test -p lowband-protocol --test link`.

mod common;

use common::Rng;
use lowband_protocol::link::close;
use lowband_protocol::{LinkDecision, LinkEnd, LinkPolicy, SiteLink};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Nothing answers: an attempt fails after `CONNECT_MS`.
    Down,
    /// Admits the site and sends it a message every `MESSAGE_MS`; the connection ends at the
    /// phase's end with `end`.
    Up { end: LinkEnd },
    /// Refuses the key in the TLS handshake.
    KeyRefusing,
    /// Admits the connection, then refuses the join request.
    JoinRefusing,
    /// Accepts, then closes before saying anything (a coordinator not ready).
    SilentClose,
}

const CONNECT_MS: u64 = 40;
const MESSAGE_MS: u64 = 300;

/// The coordinator's behaviour: phases back to back, the last one lasting forever.
struct Timeline(Vec<(u64, Phase)>);

impl Timeline {
    fn random(rng: &mut Rng) -> Timeline {
        let mut phases = Vec::new();
        let mut start = 0;
        for _ in 0..1 + rng.below(8) {
            let phase = match rng.below(10) {
                0..=2 => Phase::Down,
                3..=6 => Phase::Up {
                    end: match rng.below(7) {
                        0 => LinkEnd::Broken,
                        1 => LinkEnd::Code(close::STOPPED),
                        2 => LinkEnd::Code(close::REJOIN),
                        3 => LinkEnd::Code(close::EXCLUDED),
                        4 => LinkEnd::Code(0),
                        5 => LinkEnd::Code(rng.below(1000)),
                        _ => LinkEnd::Broken,
                    },
                },
                7 => Phase::KeyRefusing,
                8 => Phase::JoinRefusing,
                _ => Phase::SilentClose,
            };
            phases.push((start, phase));
            start += 1 + rng.below(20_000);
        }
        Timeline(phases)
    }

    fn at(&self, ms: u64) -> (Phase, u64) {
        let i = self.0.iter().rposition(|(start, _)| *start <= ms).unwrap();
        let end = self.0.get(i + 1).map_or(u64::MAX, |(start, _)| *start);
        (self.0[i].1, end)
    }
}

#[derive(Debug, Default)]
struct Outcome {
    connections: u64,
    attempts: u64,
    stopped: Option<LinkDecision>,
}

/// Drive one site against `timeline` until it stops; panics on a broken rule.
fn run(seed: u64, policy: LinkPolicy, timeline: &Timeline) -> Outcome {
    let mut link = SiteLink::new(policy, 0);
    let mut outcome = Outcome::default();
    let mut now = 0u64;
    // The last heard loss (when the budget was renewed) and the attempts of the current budget.
    let mut budget_attempts: Vec<u64> = Vec::new();
    let mut last_failed_attempt: Option<u64> = None;
    let mut refused_by_coordinator = false;
    for _ in 0..100_000 {
        // Connecting: the attempt is due at `next_attempt_ms`.
        let due = link
            .next_attempt_ms()
            .expect("a running site is connecting");
        assert!(due >= now, "seed {seed}: attempt due in the past");
        if let Some(failed) = last_failed_attempt {
            assert!(
                due >= failed + policy.retry_ms,
                "seed {seed}: retried {} ms after a failed attempt",
                due - failed
            );
        }
        now = due;
        let until = link.attempt_until_ms(now).unwrap();
        assert!(until >= now + policy.retry_ms.min(until - now));
        outcome.attempts += 1;
        budget_attempts.push(now);
        let (phase, phase_end) = timeline.at(now);
        let decision = match phase {
            Phase::Down | Phase::KeyRefusing => {
                now += CONNECT_MS;
                last_failed_attempt = Some(now);
                let end = if phase == Phase::Down {
                    LinkEnd::Broken
                } else {
                    refused_by_coordinator = true;
                    LinkEnd::KeyRefused
                };
                link.attempt_failed(end, now)
            }
            Phase::JoinRefusing | Phase::SilentClose => {
                link.connected();
                outcome.connections += 1;
                now += CONNECT_MS;
                last_failed_attempt = Some(now);
                let end = if phase == Phase::JoinRefusing {
                    refused_by_coordinator = true;
                    LinkEnd::Code(close::REFUSED)
                } else {
                    LinkEnd::Broken
                };
                link.ended(end, now)
            }
            Phase::Up { end } => {
                link.connected();
                outcome.connections += 1;
                last_failed_attempt = None;
                let closes_at = phase_end.max(now + 1);
                let heard = now + MESSAGE_MS < closes_at;
                if heard {
                    link.heard();
                }
                now = closes_at.min(now + 50 * MESSAGE_MS);
                if closes_at > now {
                    // The site's run is over before the coordinator's phase ends.
                    return outcome;
                }
                // What ends the connection: the phase's own end if the next phase keeps the
                // coordinator up, else it breaks.
                let end = if refusing_or_down(timeline.at(now).0) {
                    LinkEnd::Broken
                } else {
                    end
                };
                if end.is_refusal() {
                    refused_by_coordinator = true;
                }
                let decision = link.ended(end, now);
                if heard && matches!(end, LinkEnd::Broken | LinkEnd::Code(close::STOPPED)) {
                    match decision {
                        LinkDecision::Reconnect { at_ms, until_ms } => {
                            assert_eq!(at_ms, now, "seed {seed}: a heard loss reconnects at once");
                            assert_eq!(until_ms, now + policy.reconnect_ms);
                        }
                        other => assert_eq!(
                            (policy.reconnect_ms, other),
                            (0, LinkDecision::Finished { excluded: false }),
                            "seed {seed}"
                        ),
                    }
                }
                if end == LinkEnd::Code(close::REJOIN) {
                    assert!(
                        matches!(decision, LinkDecision::Reconnect { until_ms, .. } if until_ms >= now + policy.rejoin_ms),
                        "seed {seed}: asked to rejoin, it got {decision:?}"
                    );
                }
                if end == LinkEnd::Code(close::EXCLUDED) {
                    assert_eq!(decision, LinkDecision::Finished { excluded: true });
                }
                if matches!(decision, LinkDecision::Reconnect { .. }) && heard {
                    budget_attempts.clear();
                }
                decision
            }
        };
        match decision {
            LinkDecision::Reconnect { at_ms, until_ms } => {
                assert!(at_ms < until_ms, "seed {seed}: an attempt past its budget");
                assert!(!link.is_stopped());
            }
            stop => {
                assert!(link.is_stopped(), "seed {seed}: {stop:?} but still running");
                assert_eq!(
                    stop == LinkDecision::Refused,
                    refused_by_coordinator,
                    "seed {seed}: refused {stop:?}"
                );
                if stop == LinkDecision::GaveUp {
                    // Every attempt of the last budget found no coordinator that talks.
                    for attempt in &budget_attempts {
                        assert!(
                            !matches!(timeline.at(*attempt).0, Phase::Up { .. })
                                || timeline.at(*attempt).1 <= attempt + MESSAGE_MS,
                            "seed {seed}: gave up although the coordinator was up at {attempt} ms"
                        );
                    }
                }
                assert_eq!(link.next_attempt_ms(), None);
                outcome.stopped = Some(stop);
                return outcome;
            }
        }
    }
    panic!("seed {seed}: the site neither stopped nor finished after 100,000 decisions");
}

fn refusing_or_down(phase: Phase) -> bool {
    !matches!(phase, Phase::Up { .. })
}

fn seeds() -> Vec<u64> {
    match std::env::var("LOWBAND_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("LOWBAND_SIM_SEED is a number")],
        Err(_) => (0..2_000).collect(),
    }
}

#[test]
fn a_sites_connection_decisions_hold_under_a_seeded_coordinator_that_comes_and_goes() {
    let (mut refused, mut gave_up, mut finished, mut reconnected) = (0, 0, 0, 0);
    for seed in seeds() {
        let mut rng = Rng(seed);
        let policy = LinkPolicy {
            reconnect_ms: [0, 1_000, 5_000, 30_000][rng.below(4) as usize],
            retry_ms: 100 + rng.below(900),
            rejoin_ms: 10_000,
        };
        let timeline = Timeline::random(&mut rng);
        let outcome = run(seed, policy, &timeline);
        // A coordinator that never talks cannot keep a site trying past its budget: at most one
        // attempt per retry interval of it, plus the first.
        if outcome.connections == 0 {
            assert!(
                outcome.attempts <= policy.reconnect_ms / policy.retry_ms + 1,
                "seed {seed}: {} attempts within a {} ms budget",
                outcome.attempts,
                policy.reconnect_ms
            );
        }
        reconnected += (outcome.connections > 1) as u64;
        match outcome.stopped {
            Some(LinkDecision::Refused) => refused += 1,
            Some(LinkDecision::GaveUp) => gave_up += 1,
            Some(LinkDecision::Finished { .. }) => finished += 1,
            _ => {}
        }
    }
    if seeds().len() > 1 {
        // The seeds reach every ending (so a rule that never fires is noticed).
        assert!(
            refused > 100 && gave_up > 100 && finished > 100 && reconnected > 100,
            "refused {refused}, gave up {gave_up}, finished {finished}, reconnected {reconnected}"
        );
    }
}

#[test]
fn a_refusal_is_final_and_a_rejoin_reconnects_without_a_budget_of_its_own() {
    let policy = LinkPolicy::new(0);
    let mut link = SiteLink::new(policy, 0);
    assert_eq!(link.attempt_until_ms(0), Some(LinkPolicy::RETRY_MS));
    link.connected();
    link.heard();
    assert_eq!(
        link.ended(LinkEnd::Code(close::REJOIN), 1_000),
        LinkDecision::Reconnect {
            at_ms: 1_000,
            until_ms: 1_000 + LinkPolicy::REJOIN_MS
        }
    );
    assert_eq!(
        link.attempt_failed(LinkEnd::KeyRefused, 1_100),
        LinkDecision::Refused
    );
    assert!(link.is_stopped());

    // Without a budget, a lost connection ends the site's part (the in-process cluster).
    let mut link = SiteLink::new(policy, 0);
    link.connected();
    link.heard();
    assert_eq!(
        link.ended(LinkEnd::Broken, 5),
        LinkDecision::Finished { excluded: false }
    );
}

#[test]
fn a_connection_closed_before_the_coordinator_spoke_retries_within_the_old_budget() {
    let policy = LinkPolicy {
        reconnect_ms: 2_000,
        retry_ms: 500,
        rejoin_ms: 10_000,
    };
    let mut link = SiteLink::new(policy, 0);
    let mut now = 0;
    let mut connections = 0;
    loop {
        link.connected();
        connections += 1;
        now += 10;
        match link.ended(LinkEnd::Code(close::STOPPED), now) {
            LinkDecision::Reconnect { at_ms, until_ms } => {
                assert_eq!((at_ms, until_ms), (now + 500, 2_000));
                now = at_ms;
            }
            LinkDecision::GaveUp => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        connections, 4,
        "at 0, 510, 1020, 1530 ms; the next would be past 2 s"
    );
}
