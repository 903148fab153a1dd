//! The networked coordinator's side: a connection per site (a reader and a writer task each),
//! the sites' training reports, and the event loop that drives `lowband_protocol::Coordinator`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use lowband_net::{open, seal, Identity, NetError, Node, Peer, PublicKey};
use lowband_protocol::wire::{self, MessageKind, TrainingReport};
use lowband_protocol::{Coordinator, Event};

use crate::driver::{absorb, Common, Metric};
use crate::ledger::Endpoint;
use crate::RunError;

use super::join::{Admission, Doorway, Refusal};
use super::{NetworkOptions, RoundSteps, CLOSE_EXCLUDED, CLOSE_REJOIN};

/// What a connection's reader forwards: the site, the connection's generation (a site that
/// reconnects gets a new one, and what its old connection still delivers is ignored), the message.
/// A writer that cannot deliver forwards its error the same way.
type Inbound = (u32, u64, Result<Vec<u8>, NetError>);

/// How much a site may have queued and not yet read, in copies of the fp32 parameters: past this
/// (a hung process, a link far slower than the others) it is asked to rejoin, so that a lagging
/// site costs the coordinator a bounded amount of memory and never holds up the others.
const OUTBOX_MODELS: usize = 4;

/// A site's connection: its generation, and the queue its writer sends in order. Every site has
/// its own writer, so sends to K sites go out at once and a slow one delays only itself.
struct SiteConnection {
    generation: u64,
    peer: Peer,
    outbox: tokio::sync::mpsc::UnboundedSender<bytes::Bytes>,
    /// Bytes queued or in flight, not yet read by the site.
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl SiteConnection {
    fn open(
        peer: Peer,
        site: u32,
        generation: u64,
        inbound: tokio::sync::mpsc::UnboundedSender<Inbound>,
    ) -> SiteConnection {
        spawn_reader(peer.clone(), site, generation, inbound.clone());
        let (outbox, mut queue) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
        let queued_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (writer, queued) = (peer.clone(), queued_bytes.clone());
        tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                let length = message.len();
                let sent = writer.send_bytes(message).await;
                queued.fetch_sub(length, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = sent {
                    // The site is gone (or refused what it was sent): it leaves the round.
                    let e = match e {
                        e @ (NetError::Closed(_) | NetError::Ended { .. }) => e,
                        other => NetError::Closed(format!("unreachable: {other}")),
                    };
                    let _ = inbound.send((site, generation, Err(e)));
                    return;
                }
            }
        });
        SiteConnection {
            generation,
            peer,
            outbox,
            queued_bytes,
        }
    }

    /// Queue `sealed`; false if the site already has `budget` bytes waiting (it is behind).
    fn queue(&self, sealed: bytes::Bytes, budget: usize) -> bool {
        let waiting = self.queued_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if waiting > 0 && waiting + sealed.len() > budget {
            return false;
        }
        self.queued_bytes
            .fetch_add(sealed.len(), std::sync::atomic::Ordering::Relaxed);
        // A closed queue means the writer has stopped; its error is on its way as an Inbound.
        let _ = self.outbox.send(sealed);
        true
    }
}

fn spawn_reader(
    peer: Peer,
    site: u32,
    generation: u64,
    tx: tokio::sync::mpsc::UnboundedSender<Inbound>,
) {
    tokio::spawn(async move {
        loop {
            let message = peer.recv().await;
            let closed = matches!(message, Err(NetError::Closed(_) | NetError::Ended { .. }));
            if tx.send((site, generation, message)).is_err() || closed {
                return;
            }
        }
    });
}

/// The sites' open connections, for the door's duplicate-key check.
fn open_connections(peers: &BTreeMap<u32, SiteConnection>) -> BTreeMap<u32, Peer> {
    peers
        .iter()
        .map(|(site, c)| (*site, c.peer.clone()))
        .collect()
}

/// A refused join in the run's metrics (the report's membership section lists it).
fn record_join_refusal(common: &mut Common, round: u64, refusal: &Refusal) {
    if let Some(site) = refusal.site {
        common.metrics.push(Metric::Refused {
            round,
            site,
            reason: format!("join refused: {}", refusal.reason),
        });
    }
}

/// The training reports of the open round, by site (what arrives for a closed round is dropped).
type Reports = BTreeMap<u64, BTreeMap<u32, TrainingReport>>;

/// A closed round's training as its sites reported it: per step, the mean loss of the sites
/// that reported (summed in site order, as the in-memory driver does), and the slowest site's
/// training seconds added to the run's compute time.
fn push_reported(common: &mut Common, first_step: u64, reported: &BTreeMap<u32, TrainingReport>) {
    let steps = reported.values().map(|r| r.losses.len()).max().unwrap_or(0);
    for i in 0..steps {
        let (mut sum, mut count) = (0.0f32, 0usize);
        for report in reported.values().filter(|r| r.losses.len() > i) {
            sum += report.losses[i];
            count += 1;
        }
        let step = first_step + i as u64;
        common.metrics.push(Metric::Step {
            step,
            loss: sum / count as f32,
            lr: common.schedule.lr_at(step),
        });
    }
    common.compute_seconds += reported.values().map(|r| r.seconds).fold(0.0, f64::max);
}

/// The protocol's actions into the run: metrics, evaluation at a round's close, and the
/// coordinator's checkpoint. A round closed on a quorum lists its missing members as `Missed`.
fn absorb_network(
    actions: Vec<lowband_protocol::Action>,
    common: &mut Common,
    coordinator: &Coordinator,
    persistence: &crate::Persistence,
    reports: &mut Reports,
) -> Result<crate::driver::Sends, RunError> {
    let rounds = RoundSteps::of(common.config, &common.strategy);
    let mut checkpoint = false;
    let mut step = rounds.first_step(coordinator.round());
    let actions: Vec<lowband_protocol::Action> = actions
        .into_iter()
        .filter_map(|action| match action {
            lowband_protocol::Action::RoundClosed(mut report) => {
                step = rounds.end_step(report.round);
                let reported = reports.remove(&report.round).unwrap_or_default();
                reports.retain(|round, _| *round > report.round);
                push_reported(common, rounds.first_step(report.round), &reported);
                for site in std::mem::take(&mut report.missing) {
                    common.metrics.push(Metric::Missed {
                        round: report.round,
                        site,
                    });
                }
                Some(lowband_protocol::Action::RoundClosed(report))
            }
            lowband_protocol::Action::Checkpoint { .. } => {
                checkpoint = true;
                None
            }
            other => Some(other),
        })
        .collect();
    let sends = absorb(actions, common, coordinator, step)?;
    if checkpoint && persistence.state_dir.is_some() {
        crate::state::RunState::of_coordinator(common, step, coordinator)
            .save(persistence, &common.strategy)?;
    }
    Ok(sends)
}

/// The coordinator's side over the network: wait for the sites (every one, or a quorum once
/// the join timeout passes), then run rounds until the run's steps are done: sends signed,
/// packets checked, sites joining, leaving and rejoining at any time, deadlines ticking, a
/// checkpoint after every round when a state directory is set. Returns the run's state for
/// `finish_rounds`.
#[allow(clippy::too_many_arguments)] // (issue 18 turns this loop into a state machine)
pub(super) async fn coordinate<'a>(
    mut common: Common<'a>,
    mut coordinator: Coordinator,
    node: &Node,
    identity: &Identity,
    site_keys: &[PublicKey],
    options: &NetworkOptions,
    settings: &lowband_protocol::wire::JoinRequest,
    started: Instant,
) -> Result<(Common<'a>, Coordinator, Vec<(String, bytes::Bytes)>), RunError> {
    let rounds = RoundSteps::of(common.config, &common.strategy);
    let inner_steps = common.strategy.inner_steps;
    let overlap_steps = common.strategy.streaming.map_or(0, |s| s.overlap_steps);
    let persistence = crate::Persistence {
        state_dir: options.state_dir.clone(),
        stop_after_rounds: None,
    };
    let quorum = if options.quorum == 0 {
        site_keys.len()
    } else {
        options.quorum.min(site_keys.len())
    };
    let ids: BTreeMap<PublicKey, u32> = site_keys
        .iter()
        .enumerate()
        .map(|(k, key)| (*key, k as u32))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Inbound>();
    let mut peers: BTreeMap<u32, SiteConnection> = BTreeMap::new();
    let mut reports = Reports::new();
    let outbox_budget = OUTBOX_MODELS * (4 * coordinator.global().len() + 1024);
    let mut generation = 0u64;
    let now_ms = || started.elapsed().as_millis() as u64;

    // New connections first send their join request; each is awaited in a task of its own.
    let mut door = Doorway::new(node, &ids, settings, options.limits.keep_alive_ms);
    let join_deadline =
        tokio::time::Instant::now() + std::time::Duration::from_millis(options.join_timeout_ms);
    while peers.len() < site_keys.len() {
        tokio::select! {
            admission = door.next(now_ms(), open_connections(&peers)) => match admission? {
                Admission::Admitted(id, peer) => {
                    generation += 1;
                    if let Some(old) = peers.insert(id, SiteConnection::open(peer, id, generation, tx.clone())) {
                        old.peer.close();
                    }
                }
                Admission::Refused(refusal) => record_join_refusal(&mut common, coordinator.round(), &refusal),
                Admission::Pending => {}
            },
            _ = tokio::time::sleep_until(join_deadline) => {
                if peers.len() >= quorum {
                    break;
                }
                let refused = if door.refusals.latest.is_empty() { String::new() } else { format!("; refused: {}", door.refusals.summary()) };
                return Err(RunError::Protocol(format!(
                    "{} of {} sites joined within {} s (a quorum is {quorum}){refused}",
                    peers.len(),
                    site_keys.len(),
                    options.join_timeout_ms / 1000
                )));
            }
        }
    }
    for &id in peers.keys() {
        coordinator.handle(now_ms(), Event::SiteJoined { site: id });
    }
    let mut sends = absorb_network(
        coordinator.start(now_ms()),
        &mut common,
        &coordinator,
        &persistence,
        &mut reports,
    )?;
    let end_round = rounds.rounds();
    // Streaming: the broadcasts of the final syncs are not counted (no site trains after them),
    // as in memory.
    let counted_rounds = if rounds.fragments == 0 {
        u64::MAX
    } else {
        rounds.syncs_in_run()
    };
    let tick = std::time::Duration::from_millis((options.round_deadline_ms / 4).clamp(10, 1000));
    let mut sample_packets: Vec<(String, bytes::Bytes)> = Vec::new();
    // The largest message each way in the open round (for the link model's time).
    let (mut link_round, mut down_bytes, mut up_bytes) = (coordinator.round(), 0u64, 0u64);
    // When the last member went (excluded, left or lost): the run waits for a site to come back
    // for at most `join_timeout_ms`, never without a deadline.
    let mut alone_since: Option<tokio::time::Instant> = None;
    loop {
        if coordinator.round() != link_round {
            let link = &common.config.link;
            common.communication_seconds += if rounds.fragments == 0 {
                link.transfer_seconds(down_bytes) + link.transfer_seconds(up_bytes)
            } else if link_round < counted_rounds {
                // The sites compute on while a sync travels: `overlap_steps` of their mean step
                // time hides it.
                let hidden = overlap_steps as f64 * common.compute_seconds
                    / rounds.end_step(link_round).max(1) as f64;
                (link.transfer_seconds(down_bytes) + link.transfer_seconds(up_bytes) - hidden)
                    .max(0.0)
            } else {
                link.transfer_seconds(up_bytes)
            };
            common.peak_sync_bytes = common.peak_sync_bytes.max(down_bytes + up_bytes);
            (link_round, down_bytes, up_bytes) = (coordinator.round(), 0, 0);
        }
        if coordinator.round() >= end_round {
            break;
        }
        // An excluded site's connection is ended with the reason (it does not try again).
        let excluded: Vec<(u32, String)> = coordinator
            .scores()
            .iter()
            .filter_map(|(site, score)| {
                score
                    .excluded
                    .clone()
                    .filter(|_| peers.contains_key(site))
                    .map(|reason| (*site, reason))
            })
            .collect();
        for (site, reason) in excluded {
            if let Some(connection) = peers.remove(&site) {
                connection
                    .peer
                    .close_with(CLOSE_EXCLUDED as u32, &format!("excluded: {reason}"));
            }
        }
        let round = coordinator.round();
        // A message every member receives alike is signed once and shared by their queues.
        let mut last_sealed: Option<(bytes::Bytes, bytes::Bytes)> = None;
        for (to, bytes) in std::mem::take(&mut sends) {
            let sealed = match &last_sealed {
                Some((message, sealed))
                    if message.as_ptr() == bytes.as_ptr() && message.len() == bytes.len() =>
                {
                    sealed.clone()
                }
                _ => {
                    let sealed = bytes::Bytes::from(seal(identity, &bytes));
                    last_sealed = Some((bytes.clone(), sealed.clone()));
                    sealed
                }
            };
            if round <= counted_rounds {
                down_bytes = down_bytes.max(sealed.len() as u64);
                common.ledger.record(
                    round,
                    Endpoint::Coordinator,
                    Endpoint::Site(to),
                    sealed.len() as u64,
                );
            }
            if to == 0 {
                sample_packets = vec![("global".into(), bytes)];
            }
            let Some(connection) = peers.get(&to) else {
                continue;
            };
            if !connection.queue(sealed, outbox_budget) {
                // Too far behind: it rejoins and gets the current parameters in full.
                let connection = peers.remove(&to).expect("looked up above");
                connection
                    .peer
                    .close_with(CLOSE_REJOIN as u32, "fell too far behind: rejoin");
                common.metrics.push(Metric::Left { round, site: to, reason: format!("fell behind by more than {OUTBOX_MODELS} copies of the parameters: asked to rejoin") });
                let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: to });
                sends.extend(absorb_network(
                    actions,
                    &mut common,
                    &coordinator,
                    &persistence,
                    &mut reports,
                )?);
            }
        }
        if !sends.is_empty() {
            continue;
        }
        tokio::select! {
            admission = door.next(now_ms(), open_connections(&peers)) => match admission? {
                    Admission::Pending => {}
                    Admission::Refused(refusal) => record_join_refusal(&mut common, round, &refusal),
                    Admission::Admitted(id, peer) => {
                        generation += 1;
                        if let Some(old) = peers.insert(id, SiteConnection::open(peer, id, generation, tx.clone())) {
                            // Back before its old connection timed out: that one is over.
                            old.peer.close();
                            common.metrics.push(Metric::Left { round, site: id, reason: "a new connection with its key replaced the old one (a restarted process)".into() });
                            let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: id });
                            sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
                        }
                        common.metrics.push(Metric::Joined { round: coordinator.round(), site: id });
                        let actions = coordinator.handle(now_ms(), Event::SiteJoined { site: id });
                        sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
                    }
            },
            inbound = rx.recv() => {
                let Some((from, connection, message)) = inbound else { return Err(RunError::Protocol("every site connection closed".into())) };
                if peers.get(&from).map(|c| c.generation) != Some(connection) {
                    continue;
                }
                let sealed = match message {
                    Ok(bytes) => bytes,
                    Err(e @ (NetError::Closed(_) | NetError::Ended { .. })) => {
                        let reason = e.to_string();
                        peers.remove(&from);
                        common.metrics.push(Metric::Left { round, site: from, reason });
                        let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: from });
                        sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
                        continue;
                    }
                    Err(e) => {
                        common.metrics.push(Metric::Refused { round, site: from, reason: e.to_string() });
                        continue;
                    }
                };
                let packet = match open(site_keys[from as usize], &sealed) {
                    Ok(packet) => packet,
                    // Not signed by the site that sent it: logged as such, and handed to the
                    // protocol as an empty (malformed) packet, which refuses and scores it, so
                    // that it cannot stall the round.
                    Err(e) => {
                        common.ledger.record(round, Endpoint::Site(from), Endpoint::Coordinator, sealed.len() as u64);
                        common.metrics.push(Metric::Refused { round, site: from, reason: e.to_string() });
                        let actions = coordinator.handle(now_ms(), Event::PacketArrived { from, bytes: &[] });
                        let actions = actions.into_iter().filter(|a| !matches!(a, lowband_protocol::Action::Rejected { .. })).collect();
                        sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
                        continue;
                    }
                };
                // A training report (a whole, checksummed envelope of kind 4) is telemetry:
                // recorded for the open round, never handed to the protocol. Anything else,
                // garbage included, goes to the protocol, which refuses it and forfeits the round
                // (so garbage cannot stall a round by looking like a report).
                let steps_max = inner_steps as usize;
                if let Some(message) = wire::decode(packet, 12 + 4 * steps_max).ok().filter(|m| m.kind == MessageKind::Report) {
                    common.telemetry_bytes += sealed.len() as u64;
                    match TrainingReport::decode(message.payload, steps_max) {
                        // (A site that is not a member, excluded for one, trains for nobody.)
                        Ok(report) if message.site == from && message.round == coordinator.round() && coordinator.members().contains(&from) => {
                            reports.entry(message.round).or_default().insert(from, report);
                        }
                        // For a round already closed (a late site): nothing to report it in.
                        Ok(_) if message.site == from => {}
                        Ok(_) => common.metrics.push(Metric::Refused { round, site: from, reason: format!("training report claims site {}", message.site) }),
                        Err(e) => common.metrics.push(Metric::Refused { round, site: from, reason: e.to_string() }),
                    }
                    continue;
                }
                common.ledger.record(round, Endpoint::Site(from), Endpoint::Coordinator, sealed.len() as u64);
                up_bytes = up_bytes.max(sealed.len() as u64);
                if from == 0 {
                    sample_packets.retain(|(kind, _)| kind != "update");
                    sample_packets.push(("update".into(), bytes::Bytes::copy_from_slice(packet)));
                }
                let actions = coordinator.handle(now_ms(), Event::PacketArrived { from, bytes: packet });
                sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
            }
            _ = tokio::time::sleep(tick) => {
                if coordinator.members().is_empty() && peers.is_empty() {
                    let since = *alone_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed().as_millis() as u64 >= options.join_timeout_ms {
                        return Err(RunError::Protocol(format!(
                            "every site is gone at round {} (excluded, left or lost) and none came back within {} s; the state after the last closed round is saved: fix the sites and restart with --resume",
                            coordinator.round(),
                            options.join_timeout_ms / 1000
                        )));
                    }
                } else {
                    alone_since = None;
                }
                let actions = coordinator.handle(now_ms(), Event::Tick);
                sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
            }
        }
    }
    Ok((common, coordinator, sample_packets))
}
