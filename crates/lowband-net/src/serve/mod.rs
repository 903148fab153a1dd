//! The coordinator's network shell: a connection per site (a reader and a writer task each), the
//! door, deadline ticks, and the loop that drives `lowband_protocol::Coordinator` and
//! `lowband_protocol::Membership`. It only moves bytes: what a connection's end means, when the
//! rounds start, whom to close and with which code is `Membership`'s; what the protocol's actions
//! mean for the run (metrics, evaluation, checkpoints, the ledger and link time) is the
//! [`Host`]'s, which the runtime implements.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lowband_protocol::link::close;
use lowband_protocol::wire::{self, JoinRequest, MessageKind, TrainingReport};
use lowband_protocol::{Action, Coordinator, Event, MemberAction, Membership};

pub(crate) mod connection;

use connection::{Inbound, SiteConnection};

use crate::door::{close_reason, Admission, Doorway, Refusal};
use crate::{open, seal, AllowList, Identity, Limits, NetError, Node, Peer, PublicKey};

/// Packets the coordinator addressed to sites: (site, bytes).
pub type Sends = Vec<(u32, Bytes)>;

/// A line of the run's membership record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Joined {
        round: u64,
        site: u32,
    },
    Left {
        round: u64,
        site: u32,
        reason: String,
    },
    Refused {
        round: u64,
        site: u32,
        reason: String,
    },
}

/// What the run does with what crosses the network. The runtime implements it (metrics,
/// evaluation, checkpoints, the ledger, link time); the shell calls it in protocol order.
pub trait Host {
    type Error: From<NetError> + std::fmt::Display;

    /// Carry out the coordinator's actions (metrics, evaluation at a round's close, the
    /// checkpoint); returns the packets to send.
    fn absorb(
        &mut self,
        actions: Vec<Action>,
        coordinator: &Coordinator,
    ) -> Result<Sends, Self::Error>;

    /// A membership line.
    fn record(&mut self, record: Record);

    /// `message` (sealed: `sealed_bytes` on the wire) was handed to `to`'s queue in `round`.
    fn sent(&mut self, round: u64, to: u32, message: &Bytes, sealed_bytes: usize);

    /// A packet (opened; empty when its signature failed) arrived from `from` in `round`, about
    /// to go to the protocol.
    fn received(&mut self, round: u64, from: u32, packet: &[u8], sealed_bytes: usize);

    /// A site's training report for the open round (telemetry: `sealed_bytes` counted apart).
    fn report(
        &mut self,
        round: u64,
        from: u32,
        report: Option<TrainingReport>,
        sealed_bytes: usize,
    );

    /// Called once per loop turn: the run's books for a round that changed.
    fn turn(&mut self, coordinator: &Coordinator);

    /// Whether the run is over (its last round closed).
    fn done(&self, coordinator: &Coordinator) -> bool;
}

/// How the coordinator's rounds run over the network.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub limits: Limits,
    /// Updates that close a round once its deadline passed (at most the number of sites).
    pub quorum: usize,
    pub round_deadline_ms: u64,
    /// How long to wait for the sites before the first round, and for any site to come back when
    /// all are gone.
    pub join_timeout_ms: u64,
    /// The longest training report accepted, in steps.
    pub report_steps_max: usize,
    /// Stop on Ctrl-C (a coordinator process), closing every connection with `close::STOPPED`.
    pub stop_on_ctrl_c: bool,
    /// When the run is over, send every connected site the final global parameters (what the
    /// last round's close broadcasts) and wait, at most `FINAL_PARAMETERS_WAIT_MS`, for each to
    /// read them and close its connection: sites that keep the model (an external model's,
    /// whose final parameters exist only here otherwise).
    pub final_parameters: bool,
    /// Stop the run from outside, with a reason (e.g. every site process died).
    pub abort: Option<crate::Abort>,
}

/// How long a finished run waits for its sites to read the final parameters.
pub const FINAL_PARAMETERS_WAIT_MS: u64 = 60_000;

/// How much a site may have queued and not yet read, in copies of the fp32 parameters: past this
/// (a hung process, a link far slower than the others) it is asked to rejoin, so that a lagging
/// site costs the coordinator a bounded amount of memory and never holds up the others.
pub const OUTBOX_MODELS: usize = 4;

/// Serve a run's rounds: listen on `listen` with `identity`, admit exactly `site_keys` (site k is
/// the k-th) whose join request equals `settings`, and drive `coordinator` until the host says
/// the run is done. `listening` is told the bound address first. On an error (or Ctrl-C, or an
/// abort) every site learns it at once (`close::STOPPED`) and keeps trying to reconnect for a
/// coordinator resumed from its state.
#[allow(clippy::too_many_arguments)]
pub fn serve<H: Host>(
    coordinator: &mut Coordinator,
    host: &mut H,
    identity: Arc<Identity>,
    site_keys: &[PublicKey],
    settings: &JoinRequest,
    listen: SocketAddr,
    options: &ServeOptions,
    listening: impl FnOnce(SocketAddr) -> Result<(), H::Error>,
) -> Result<(), H::Error> {
    let runtime = crate::runtime(site_keys.len().clamp(2, 8), "lowband-coordinator-net")?;
    runtime.block_on(async {
        let allowed: AllowList =
            Arc::new(std::sync::RwLock::new(site_keys.iter().copied().collect()));
        let node = Node::listen(identity.clone(), listen, allowed, options.limits.clone())?;
        listening(node.local_addr()?)?;
        let shell = Shell::new(&node, &identity, site_keys, settings, options);
        let outcome = tokio::select! {
            outcome = shell.run(coordinator, host) => outcome,
            _ = tokio::signal::ctrl_c(), if options.stop_on_ctrl_c => Err(NetError::Stopped(
                "interrupted (Ctrl-C): the state after the last closed round is saved; continue with --resume".into(),
            ).into()),
            reason = crate::abort::aborted(options.abort.as_ref()) => {
                Err(NetError::Stopped(reason).into())
            }
        };
        match outcome {
            Ok(()) => {
                node.close();
                // Tell every site the run is over before this process goes.
                node.wait_closed(Duration::from_secs(2)).await;
                Ok(())
            }
            Err(e) => {
                node.close_with(
                    close::STOPPED as u32,
                    &close_reason(&format!("the coordinator stopped: {e}")),
                );
                node.wait_closed(Duration::from_secs(2)).await;
                Err(e)
            }
        }
    })
}

/// The loop's state.
struct Shell<'a> {
    identity: &'a Identity,
    site_keys: &'a [PublicKey],
    options: &'a ServeOptions,
    door: Doorway<'a>,
    membership: Membership,
    peers: BTreeMap<u32, SiteConnection>,
    inbound_tx: tokio::sync::mpsc::UnboundedSender<Inbound>,
    inbound: tokio::sync::mpsc::UnboundedReceiver<Inbound>,
    started: Instant,
    /// The sends not yet queued.
    sends: Sends,
}

impl<'a> Shell<'a> {
    fn new(
        node: &'a Node,
        identity: &'a Identity,
        site_keys: &'a [PublicKey],
        settings: &'a JoinRequest,
        options: &'a ServeOptions,
    ) -> Shell<'a> {
        let ids: BTreeMap<PublicKey, u32> = site_keys
            .iter()
            .enumerate()
            .map(|(k, key)| (*key, k as u32))
            .collect();
        let (inbound_tx, inbound) = tokio::sync::mpsc::unbounded_channel();
        let quorum = options.quorum.clamp(1, site_keys.len().max(1));
        Shell {
            identity,
            site_keys,
            options,
            door: Doorway::new(node, ids, settings.clone(), options.limits.keep_alive_ms),
            membership: Membership::new(site_keys.len(), quorum, options.join_timeout_ms, 0),
            peers: BTreeMap::new(),
            inbound_tx,
            inbound,
            started: Instant::now(),
            sends: Sends::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Wait until every site connection has closed (its site read the final parameters and
    /// left), at most `FINAL_PARAMETERS_WAIT_MS`.
    async fn wait_for_sites_to_close(&self) {
        // One after another: the wait ends when the last has closed, whatever the order.
        let all = async {
            for connection in self.peers.values() {
                connection.peer.closed().await;
            }
        };
        if tokio::time::timeout(Duration::from_millis(FINAL_PARAMETERS_WAIT_MS), all)
            .await
            .is_err()
        {
            tracing::warn!(
                "coordinator: not every site read the final parameters within {} s",
                FINAL_PARAMETERS_WAIT_MS / 1000
            );
        }
    }

    /// The sites' open connections, for the door's duplicate-key check.
    fn open_connections(&self) -> BTreeMap<u32, Peer> {
        self.peers
            .iter()
            .map(|(site, c)| (*site, c.peer.clone()))
            .collect()
    }

    /// Carry out the membership's decisions.
    fn act<H: Host>(
        &mut self,
        actions: Vec<MemberAction>,
        coordinator: &mut Coordinator,
        host: &mut H,
    ) -> Result<(), H::Error> {
        for action in actions {
            let now_ms = self.now_ms();
            match action {
                MemberAction::Close {
                    site,
                    generation,
                    code,
                    reason,
                } => {
                    // Only the connection the membership means: when a restarted site's new
                    // connection replaces its old one, the close is the old one's (already
                    // closed on replacement), never the new one's.
                    if self
                        .peers
                        .get(&site)
                        .is_some_and(|c| c.generation == generation)
                    {
                        if let Some(connection) = self.peers.remove(&site) {
                            connection
                                .peer
                                .close_with(code as u32, &close_reason(&reason));
                        }
                    }
                }
                MemberAction::Joined { site, late } => {
                    if late {
                        tracing::info!(
                            "coordinator: site {site} joined (it takes part from round {})",
                            coordinator.round()
                        );
                        host.record(Record::Joined {
                            round: coordinator.round(),
                            site,
                        });
                    }
                    let actions = coordinator.handle(now_ms, Event::SiteJoined { site });
                    self.sends.extend(host.absorb(actions, coordinator)?);
                }
                MemberAction::Left { site, reason } => {
                    tracing::info!(
                        "coordinator: site {site} left at round {}: {reason}",
                        coordinator.round()
                    );
                    host.record(Record::Left {
                        round: coordinator.round(),
                        site,
                        reason,
                    });
                    let actions = coordinator.handle(now_ms, Event::SiteLeft { site });
                    self.sends.extend(host.absorb(actions, coordinator)?);
                }
                MemberAction::Start => {
                    let actions = coordinator.start(now_ms);
                    self.sends.extend(host.absorb(actions, coordinator)?);
                }
                MemberAction::Stop(reason) => {
                    let refused = if self.door.refusals.latest.is_empty() {
                        String::new()
                    } else {
                        format!("; refused: {}", self.door.refusals.summary())
                    };
                    let state = if self.membership.started() {
                        format!(" at round {}; the state after the last closed round is saved: fix the sites and restart with --resume", coordinator.round())
                    } else {
                        String::new()
                    };
                    return Err(NetError::Stopped(format!("{reason}{state}{refused}")).into());
                }
            }
        }
        Ok(())
    }

    async fn run<H: Host>(
        mut self,
        coordinator: &mut Coordinator,
        host: &mut H,
    ) -> Result<(), H::Error> {
        let outbox_budget = OUTBOX_MODELS * (4 * coordinator.global().len() + 1024);
        let tick = Duration::from_millis((self.options.round_deadline_ms / 4).clamp(10, 1000));
        loop {
            if self.membership.started() {
                host.turn(coordinator);
                if host.done(coordinator) {
                    if self.options.final_parameters {
                        self.queue_sends(coordinator, host, usize::MAX)?;
                        self.wait_for_sites_to_close().await;
                    }
                    return Ok(());
                }
                self.close_excluded(coordinator, host)?;
                self.queue_sends(coordinator, host, outbox_budget)?;
                if !self.sends.is_empty() {
                    continue;
                }
            }
            let round = coordinator.round();
            let tick_at = match self
                .membership
                .next_deadline_ms()
                .filter(|_| !self.membership.started())
            {
                Some(deadline_ms) => {
                    Duration::from_millis(deadline_ms.saturating_sub(self.now_ms())).min(tick)
                }
                None => tick,
            };
            tokio::select! {
                admission = self.door.next(self.now_ms(), self.open_connections()) => match admission? {
                    Admission::Pending => {}
                    Admission::Refused(refusal) => record_join_refusal(host, round, &refusal),
                    Admission::Admitted(site, peer) => {
                        let (generation, actions) = self.membership.admitted(site);
                        let connection = SiteConnection::open(peer, site, generation, self.inbound_tx.clone());
                        // (A replaced connection is closed by the membership's first action.)
                        let old = self.peers.insert(site, connection);
                        if let Some(old) = old {
                            old.peer.close();
                        }
                        self.act(actions, coordinator, host)?;
                    }
                },
                inbound = self.inbound.recv() => {
                    let Some((from, generation, message)) = inbound else {
                        return Err(NetError::Closed("every site connection closed".into()).into());
                    };
                    self.inbound(from, generation, message, coordinator, host)?;
                }
                _ = tokio::time::sleep(tick_at) => {
                    let now_ms = self.now_ms();
                    let actions = self.membership.tick(now_ms, coordinator.members().len());
                    self.act(actions, coordinator, host)?;
                    if self.membership.started() {
                        let actions = coordinator.handle(now_ms, Event::Tick);
                        self.sends.extend(host.absorb(actions, coordinator)?);
                    }
                }
            }
        }
    }

    /// An excluded site's connection is ended with the reason (it does not try again).
    fn close_excluded<H: Host>(
        &mut self,
        coordinator: &mut Coordinator,
        host: &mut H,
    ) -> Result<(), H::Error> {
        let excluded: Vec<(u32, String)> = coordinator
            .scores()
            .iter()
            .filter_map(|(site, score)| {
                score
                    .excluded
                    .clone()
                    .filter(|_| self.membership.is_connected(*site))
                    .map(|reason| (*site, reason))
            })
            .collect();
        for (site, reason) in excluded {
            let actions = self.membership.excluded(site, &reason);
            self.act(actions, coordinator, host)?;
        }
        Ok(())
    }

    /// Queue the sends: a message every member receives alike is signed once and shared.
    fn queue_sends<H: Host>(
        &mut self,
        coordinator: &mut Coordinator,
        host: &mut H,
        outbox_budget: usize,
    ) -> Result<(), H::Error> {
        let round = coordinator.round();
        let mut last_sealed: Option<(Bytes, Bytes)> = None;
        for (to, bytes) in std::mem::take(&mut self.sends) {
            let sealed = match &last_sealed {
                Some((message, sealed))
                    if message.as_ptr() == bytes.as_ptr() && message.len() == bytes.len() =>
                {
                    sealed.clone()
                }
                _ => {
                    let sealed = Bytes::from(seal(self.identity, &bytes));
                    last_sealed = Some((bytes.clone(), sealed.clone()));
                    sealed
                }
            };
            host.sent(round, to, &bytes, sealed.len());
            let Some(connection) = self.peers.get(&to) else {
                continue;
            };
            if !connection.queue(sealed, outbox_budget) {
                // Too far behind: it rejoins and gets the current parameters in full.
                let actions = self.membership.fell_behind(
                    to,
                    format!("fell behind by more than {OUTBOX_MODELS} copies of the parameters: asked to rejoin"),
                );
                self.act(actions, coordinator, host)?;
            }
        }
        Ok(())
    }

    /// A message (or the end) of a site's connection.
    fn inbound<H: Host>(
        &mut self,
        from: u32,
        generation: u64,
        message: Result<Vec<u8>, NetError>,
        coordinator: &mut Coordinator,
        host: &mut H,
    ) -> Result<(), H::Error> {
        if !self.membership.is_current(from, generation) {
            return Ok(());
        }
        let round = coordinator.round();
        let sealed = match message {
            Ok(bytes) => bytes,
            Err(e @ (NetError::Closed(_) | NetError::Ended { .. })) => {
                self.peers.remove(&from);
                let actions = self.membership.ended(from, generation, e.to_string());
                return self.act(actions, coordinator, host);
            }
            Err(e) => {
                host.record(Record::Refused {
                    round,
                    site: from,
                    reason: e.to_string(),
                });
                return Ok(());
            }
        };
        let now_ms = self.now_ms();
        let packet = match open(self.site_keys[from as usize], &sealed) {
            Ok(packet) => packet,
            // Not signed by the site that sent it: logged as such, and handed to the protocol
            // as an empty (malformed) packet, which refuses and scores it, so that it cannot
            // stall the round.
            Err(e) => {
                host.received(round, from, &[], sealed.len());
                host.record(Record::Refused {
                    round,
                    site: from,
                    reason: e.to_string(),
                });
                let actions = coordinator
                    .handle(now_ms, Event::PacketArrived { from, bytes: &[] })
                    .into_iter()
                    .filter(|a| !matches!(a, Action::Rejected { .. }))
                    .collect();
                self.sends.extend(host.absorb(actions, coordinator)?);
                return Ok(());
            }
        };
        // A training report (a whole, checksummed envelope of kind 4) is telemetry: recorded
        // for the open round, never handed to the protocol. Anything else, garbage included,
        // goes to the protocol, which refuses it and forfeits the round (so garbage cannot
        // stall a round by looking like a report).
        let steps_max = self.options.report_steps_max;
        if let Some(message) = wire::decode(packet, TrainingReport::payload_bytes_max(steps_max))
            .ok()
            .filter(|m| m.kind == MessageKind::Report)
        {
            report(host, coordinator, from, message, sealed.len(), steps_max);
            return Ok(());
        }
        host.received(round, from, packet, sealed.len());
        let actions = coordinator.handle(
            now_ms,
            Event::PacketArrived {
                from,
                bytes: packet,
            },
        );
        self.sends.extend(host.absorb(actions, coordinator)?);
        Ok(())
    }
}

/// A site's training report, recorded for the open round if it is a member's own (what arrives
/// for a closed round has nothing to go in); a report that claims another site is refused.
fn report<H: Host>(
    host: &mut H,
    coordinator: &Coordinator,
    from: u32,
    message: wire::Message<'_>,
    sealed_bytes: usize,
    steps_max: usize,
) {
    let round = coordinator.round();
    match TrainingReport::decode(message.payload, steps_max) {
        // (A site that is not a member, excluded for one, trains for nobody.)
        Ok(report)
            if message.site == from
                && message.round == round
                && coordinator.members().contains(&from) =>
        {
            host.report(message.round, from, Some(report), sealed_bytes)
        }
        // For a round already closed (a late site): nothing to report it in.
        Ok(_) if message.site == from => host.report(message.round, from, None, sealed_bytes),
        Ok(_) => {
            host.report(message.round, from, None, sealed_bytes);
            host.record(Record::Refused {
                round,
                site: from,
                reason: format!("training report claims site {}", message.site),
            })
        }
        Err(e) => {
            host.report(message.round, from, None, sealed_bytes);
            host.record(Record::Refused {
                round,
                site: from,
                reason: e.to_string(),
            })
        }
    }
}

/// A refused join in the run's record (the report's membership section lists it).
fn record_join_refusal<H: Host>(host: &mut H, round: u64, refusal: &Refusal) {
    if let Some(site) = refusal.site {
        host.record(Record::Refused {
            round,
            site,
            reason: format!("join refused: {}", refusal.reason),
        });
    }
}
