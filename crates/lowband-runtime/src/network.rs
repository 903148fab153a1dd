//! The networked driver (issue 5): the coordinator and K sites run the same protocol code as
//! the in-memory driver, but every packet crosses a real QUIC connection (lowband-net: ed25519
//! keys, TLS 1.3, a size limit per message) and is signed by its maker. The nodes are separate
//! processes (`serve_coordinator`, `serve_site`) or tasks of one process (`run_over_loopback`).
//!
//! The coordinator is an event loop over new connections, packets and deadline ticks:
//! - sites join at any time (a newcomer, or a site restarted after a crash, gets the current
//!   parameters in full and trains from the next round); a site that reconnects retires its old
//!   connection (connections carry a generation, and what an old one still delivers is ignored);
//! - a site whose connection closes (QUIC idle timeout) or cannot be sent to leaves the round; a
//!   site interrupted with Ctrl-C closes its connection saying so, and leaves at once;
//! - a site saves its own state (AdamW moments, data position, error feedback, codec stream)
//!   after every update when given a state directory, and a restarted one resumes from it;
//! - a round closes when every member has reported, or on `quorum` updates once
//!   `round_deadline_ms` has passed: a straggler or a hung site cannot stall the run; its late
//!   update is refused as late (not held against its trust score), and when it catches up it
//!   applies every queued packet and trains on the newest round only;
//! - after every round the coordinator saves its state atomically (`state_dir`); started again
//!   with `resume` it continues from there (at most the round in flight is redone) and the sites,
//!   which keep trying to reconnect for `reconnect_ms`, come back by themselves.
//!
//! What the coordinator receives is opened with the sending site's key (a packet that another
//! key signed is refused and counted against that site); what it sends is signed with its own.
//! Sites train in parallel; since the coordinator merges in site order, a fault-free run is
//! bitwise the in-memory driver's. The ledger counts the bytes handed to QUIC: the envelope plus
//! its 64-byte signature (the in-memory ledger has no signatures), not QUIC's own headers.
//! Emulated time is defined as in the in-memory driver (per round, the slowest site's measured
//! training plus the link profile's time for the largest message each way); across processes the
//! coordinator's wall clock stands in for the sites' compute.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use lowband_codec::CodecSpec;
use lowband_data::Split;
use lowband_net::{open, seal, AllowList, Identity, Limits, NetError, Node, Peer, PublicKey};
use lowband_engine::Trainer;
use lowband_protocol::{Coordinator, CoordinatorConfig, Event, SiteEvent};

use crate::config::RunConfig;
use crate::driver::{absorb, finish_rounds, new_site, new_sites, train_steps, BatchShape, Common, Metric, SiteRuntime};
use crate::ledger::Endpoint;
use crate::strategy::{Strategy, StrategyKind};
use crate::{RunError, RunResult};

impl From<NetError> for RunError {
    fn from(e: NetError) -> Self {
        RunError::Protocol(format!("network: {e}"))
    }
}

/// How a networked coordinator runs its rounds (the transport's own limits are in `limits`).
#[derive(Clone, Debug)]
pub struct NetworkOptions {
    pub limits: Limits,
    /// Updates that close a round once its deadline has passed (a round with every member's
    /// update closes at once). 0: every member (no round closes without all of them).
    pub quorum: usize,
    /// Time after a round opens at which it may close on a quorum: a straggler or a hung site
    /// does not hold the run longer than this. Its late update is refused as late (it does not
    /// count against its trust score) and it takes part again from the round it catches.
    pub round_deadline_ms: u64,
    /// How long the coordinator waits for the sites to connect before round 0 (or, resumed,
    /// before its first round): then it starts with whoever is there if that is a quorum.
    pub join_timeout_ms: u64,
    /// Where the coordinator saves its state after every round (atomically; the previous state
    /// survives a crash mid-write).
    pub state_dir: Option<std::path::PathBuf>,
    /// Continue from the state saved there (after a crash or `kill -9`: at most the round in
    /// flight is redone); without it a saved state is removed and the run starts over.
    pub resume: bool,
}

impl NetworkOptions {
    pub fn new(limits: Limits) -> Self {
        NetworkOptions { limits, quorum: 0, round_deadline_ms: 600_000, join_timeout_ms: JOIN_TIMEOUT_MS, state_dir: None, resume: false }
    }
}

/// Run a round strategy with every node on loopback QUIC, in this process.
pub fn run_over_loopback(config: &RunConfig, strategy: Strategy, split: &Split, limits: Limits) -> Result<RunResult, RunError> {
    check_networkable(config, &strategy, split)?;
    runtime(config.sites)?.block_on(run_async(config, strategy, split, NetworkOptions::new(limits)))
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, RunError> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads.clamp(2, 8)).enable_all().build().map_err(|e| RunError::Io { path: "tokio runtime".into(), source: e })
}

fn check_networkable(config: &RunConfig, strategy: &Strategy, split: &Split) -> Result<(), RunError> {
    config.validate().map_err(|(field, reason)| RunError::InvalidConfig { field, reason })?;
    if strategy.kind != StrategyKind::Rounds || strategy.streaming.is_some() {
        return Err(RunError::InvalidConfig { field: "strategy", reason: format!("{}: the networked driver runs round strategies (not DDP, not streaming yet)", strategy.name()) });
    }
    if split.shards.len() != config.sites {
        return Err(RunError::InvalidConfig { field: "sites", reason: format!("{} shards for {} sites", split.shards.len(), config.sites) });
    }
    Ok(())
}

/// A coordinator process: listen on `listen`, admit exactly `site_keys` (site k is the k-th),
/// run the rounds, return the result. `listening` is told the bound address first (a port 0
/// becomes a real one). The emulated time is the coordinator's wall clock here: the sites'
/// compute is not reported across processes yet. With `options.state_dir` holding a saved
/// state, the run resumes from it (after a crash or `kill -9`: at most the round in flight is
/// lost); the sites reconnect by themselves.
#[allow(clippy::too_many_arguments)]
pub fn serve_coordinator(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    identity: Arc<Identity>,
    site_keys: Vec<PublicKey>,
    listen: SocketAddr,
    options: NetworkOptions,
    listening: impl FnOnce(SocketAddr) -> Result<(), RunError>,
) -> Result<RunResult, RunError> {
    check_networkable(config, &strategy, split)?;
    if site_keys.len() != config.sites {
        return Err(RunError::InvalidConfig { field: "site_keys", reason: format!("{} keys for {} sites", site_keys.len(), config.sites) });
    }
    runtime(config.sites)?.block_on(async {
        let started = Instant::now();
        let mut common = Common::new(config, strategy.clone(), split)?;
        let initial = common.initial_params();
        let mut coordinator = Coordinator::new(coordinator_config(config, &strategy, initial.len(), &options), initial)?;
        let persistence = crate::Persistence { state_dir: options.state_dir.clone(), stop_after_rounds: None };
        match crate::state::load(&persistence, &strategy)? {
            Some(saved) if options.resume => {
                let round = saved.round();
                saved.restore_coordinator(&mut common, &mut coordinator)?;
                println!("resuming {} from its saved state at round {round}", strategy.name());
            }
            Some(_) => {
                let dir = options.state_dir.as_ref().expect("a state was loaded from it").join(strategy.dir_name());
                std::fs::remove_dir_all(&dir).map_err(|e| RunError::Io { path: dir.clone(), source: e })?;
            }
            None if options.resume => println!("no saved state of {} to resume: starting at round 0", strategy.name()),
            None => {}
        }
        let allowed: AllowList = Arc::new(std::sync::RwLock::new(site_keys.iter().copied().collect()));
        let node = Node::listen(identity.clone(), listen, allowed, options.limits.clone())?;
        listening(node.local_addr()?)?;
        let (mut common, coordinator, sample_packets) = coordinate(common, coordinator, &node, &identity, &site_keys, &options, started).await?;
        node.close();
        // Tell every site the run is over before this process goes.
        node.wait_closed(std::time::Duration::from_secs(2)).await;
        common.compute_seconds = started.elapsed().as_secs_f64() - common.communication_seconds;
        finish_rounds(common, &coordinator, sample_packets)
    })
}

/// A site process: site `site` of the run, connecting to the coordinator at `coordinator`;
/// `connected` is called once the coordinator has accepted it. A site started mid-run (a
/// newcomer, or a restart after a crash) gets the current parameters and trains from the round it
/// is sent. If the connection drops before the run's last round, the site keeps trying to
/// reconnect for `reconnect_ms` (a coordinator restarting from its checkpoint).
#[allow(clippy::too_many_arguments)]
pub fn serve_site(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    site: u32,
    identity: Arc<Identity>,
    coordinator: (SocketAddr, PublicKey),
    options: SiteOptions,
    connected: impl FnMut() + Send,
) -> Result<(), RunError> {
    check_networkable(config, &strategy, split)?;
    let k = site as usize;
    if k >= config.sites {
        return Err(RunError::InvalidConfig { field: "site", reason: format!("site {site} of a {}-site run", config.sites) });
    }
    let model = lowband_engine::preset(&config.preset)?.model;
    let initial = lowband_engine::Gpt::new(model, config.seed)?.params().to_vec();
    let mut state = new_site(config, &initial, strategy.compression, k)?;
    if let Some(dir) = &options.state_dir {
        if options.resume {
            match crate::state::restore_site(dir, &mut state)? {
                Some(round) => println!("site {site}: resuming from its saved state after round {round} (optimizer, data position, error feedback)"),
                None => println!("site {site}: no saved state to resume: starting fresh"),
            }
        } else if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| RunError::Io { path: dir.clone(), source: e })?;
        }
    }
    let job = SiteJob {
        identity,
        coordinator,
        shard: Arc::new(split.shards[k].clone()),
        batch: BatchShape { site_batch: config.site_batch, context: model.context_length },
        schedule: lowband_engine::LrSchedule::reference(config.optimizer.lr, config.steps),
        steps: config.steps,
        inner_steps: strategy.inner_steps,
        params: initial.len(),
        uplink: strategy.compression.uplink,
        limits: options.limits,
        reconnect_ms: options.reconnect_ms,
        state_dir: options.state_dir,
        leave_on_signal: true,
    };
    runtime(2)?.block_on(site_task(state, job, connected)).map(|_| ())
}

fn coordinator_config(config: &RunConfig, strategy: &Strategy, params: usize, options: &NetworkOptions) -> CoordinatorConfig {
    let outer = strategy.outer.unwrap_or_else(|| config.outer(false));
    let quorum = if options.quorum == 0 { config.sites } else { options.quorum.min(config.sites) };
    CoordinatorConfig {
        quorum,
        round_deadline_ms: options.round_deadline_ms,
        sites_max: config.sites,
        compression: strategy.compression,
        sites_start_synced: true,
        robustness: strategy.robustness(config.aggregator),
        ..CoordinatorConfig::new(params, outer)
    }
}

/// How long the coordinator waits for every listed site to connect before it gives up.
pub const JOIN_TIMEOUT_MS: u64 = 120_000;

/// What a site task needs besides its state.
struct SiteJob {
    identity: Arc<Identity>,
    coordinator: (SocketAddr, PublicKey),
    shard: Arc<Vec<u8>>,
    batch: BatchShape,
    schedule: lowband_engine::LrSchedule,
    steps: u64,
    inner_steps: u64,
    params: usize,
    uplink: CodecSpec,
    limits: Limits,
    /// How long to keep trying to reach the coordinator after the connection drops mid-run.
    reconnect_ms: u64,
    /// Where the site saves its own state after every update it sends.
    state_dir: Option<std::path::PathBuf>,
    /// Ctrl-C / SIGINT makes the site leave the run gracefully (a process; not in-process tasks).
    leave_on_signal: bool,
}

/// How a site process behaves (the transport's own limits are in `limits`).
#[derive(Clone, Debug)]
pub struct SiteOptions {
    pub limits: Limits,
    /// After losing the coordinator mid-run, keep trying to reach it this long.
    pub reconnect_ms: u64,
    /// Where the site saves its optimizer state, data position and error-feedback residual after
    /// every update (atomically); with `resume`, a restarted site continues from them.
    pub state_dir: Option<std::path::PathBuf>,
    pub resume: bool,
}

async fn run_async(config: &RunConfig, strategy: Strategy, split: &Split, options: NetworkOptions) -> Result<RunResult, RunError> {
    let limits = options.limits.clone();
    let started = Instant::now();
    let common = Common::new(config, strategy.clone(), split)?;
    let initial = common.initial_params();
    let n = initial.len();
    let compression = strategy.compression;
    let coordinator = Coordinator::new(coordinator_config(config, &strategy, n, &options), initial.clone())?;
    let sites = new_sites(config, &initial, compression)?;

    // Keys: the coordinator's, and one per site on its allow-list.
    let coordinator_identity = Arc::new(Identity::generate()?);
    let site_identities: Vec<Arc<Identity>> = (0..config.sites).map(|_| Identity::generate().map(Arc::new)).collect::<Result<_, _>>()?;
    let site_keys: Vec<PublicKey> = site_identities.iter().map(|i| i.public_key()).collect();
    let allowed: AllowList = Arc::new(std::sync::RwLock::new(site_keys.iter().copied().collect()));
    let node = Node::listen(coordinator_identity.clone(), "127.0.0.1:0".parse().expect("loopback"), allowed, limits.clone())?;
    let address = node.local_addr()?;

    let mut site_tasks = Vec::new();
    for (k, site) in sites.into_iter().enumerate() {
        let job = SiteJob {
            identity: site_identities[k].clone(),
            coordinator: (address, coordinator_identity.public_key()),
            shard: Arc::new(split.shards[k].clone()),
            batch: BatchShape { site_batch: config.site_batch, context: common.context },
            schedule: common.schedule,
            steps: config.steps,
            inner_steps: strategy.inner_steps,
            params: n,
            uplink: compression.uplink,
            limits: limits.clone(),
            reconnect_ms: 0,
            state_dir: None,
            leave_on_signal: false,
        };
        site_tasks.push(tokio::spawn(site_task(site, job, || {})));
    }

    let (mut common, coordinator, sample_packets) = coordinate(common, coordinator, &node, &coordinator_identity, &site_keys, &options, started).await?;
    node.close();
    // Per round, the slowest site's training time.
    let mut slowest: Vec<f64> = Vec::new();
    for task in site_tasks {
        let seconds = task.await.map_err(|e| RunError::Protocol(format!("a site task failed: {e}")))??;
        for (round, s) in seconds.into_iter().enumerate() {
            if slowest.len() <= round {
                slowest.resize(round + 1, 0.0);
            }
            slowest[round] = slowest[round].max(s);
        }
    }
    common.compute_seconds = slowest.iter().sum();
    finish_rounds(common, &coordinator, sample_packets)
}

/// What a connection's reader forwards: the site, the connection's generation (a site that
/// reconnects gets a new one, and what its old connection still delivers is ignored), the message.
type Inbound = (u32, u64, Result<Vec<u8>, NetError>);

fn spawn_reader(peer: Peer, site: u32, generation: u64, tx: tokio::sync::mpsc::UnboundedSender<Inbound>) {
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

/// The protocol's actions into the run: metrics, evaluation at a round's close, and the
/// coordinator's checkpoint. A round closed on a quorum lists its missing members as `Missed`.
fn absorb_network(actions: Vec<lowband_protocol::Action>, common: &mut Common, coordinator: &Coordinator, persistence: &crate::Persistence) -> Result<Vec<(u32, Vec<u8>)>, RunError> {
    let (steps, inner_steps) = (common.config.steps, common.strategy.inner_steps);
    let mut checkpoint = false;
    let mut step = (coordinator.round() * inner_steps).min(steps);
    let actions: Vec<lowband_protocol::Action> = actions
        .into_iter()
        .filter_map(|action| match action {
            lowband_protocol::Action::RoundClosed(mut report) => {
                step = ((report.round + 1) * inner_steps).min(steps);
                for site in std::mem::take(&mut report.missing) {
                    common.metrics.push(Metric::Missed { round: report.round, site });
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
        crate::state::RunState::of_coordinator(common, step, coordinator).save(persistence, &common.strategy)?;
    }
    Ok(sends)
}

/// The coordinator's side over the network: wait for the sites (every one, or a quorum once
/// the join timeout passes), then run rounds until the run's steps are done: sends signed,
/// packets checked, sites joining, leaving and rejoining at any time, deadlines ticking, a
/// checkpoint after every round when a state directory is set. Returns the run's state for
/// `finish_rounds`.
async fn coordinate<'a>(
    mut common: Common<'a>,
    mut coordinator: Coordinator,
    node: &Node,
    identity: &Identity,
    site_keys: &[PublicKey],
    options: &NetworkOptions,
    started: Instant,
) -> Result<(Common<'a>, Coordinator, Vec<(String, Vec<u8>)>), RunError> {
    let (steps, inner_steps) = (common.config.steps, common.strategy.inner_steps);
    let persistence = crate::Persistence { state_dir: options.state_dir.clone(), stop_after_rounds: None };
    let quorum = if options.quorum == 0 { site_keys.len() } else { options.quorum.min(site_keys.len()) };
    let ids: BTreeMap<PublicKey, u32> = site_keys.iter().enumerate().map(|(k, key)| (*key, k as u32)).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Inbound>();
    let mut peers: BTreeMap<u32, (u64, Peer)> = BTreeMap::new();
    let mut generation = 0u64;
    let now_ms = || started.elapsed().as_millis() as u64;

    let join_deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(options.join_timeout_ms);
    while peers.len() < site_keys.len() {
        match tokio::time::timeout_at(join_deadline, node.accept()).await {
            Err(_) if peers.len() >= quorum => break,
            Err(_) => return Err(RunError::Protocol(format!("{} of {} sites joined within {} s (a quorum is {quorum})", peers.len(), site_keys.len(), options.join_timeout_ms / 1000))),
            Ok(Some(Ok(peer))) => {
                let Some(&id) = ids.get(&peer.key()) else { continue };
                generation += 1;
                spawn_reader(peer.clone(), id, generation, tx.clone());
                if let Some((_, old)) = peers.insert(id, (generation, peer)) {
                    old.close();
                }
            }
            Ok(Some(Err(e))) => eprintln!("coordinator: refused a connection: {e}"),
            Ok(None) => return Err(RunError::Protocol("the coordinator's endpoint closed".into())),
        }
    }
    for &id in peers.keys() {
        coordinator.handle(now_ms(), Event::SiteJoined { site: id });
    }
    let mut sends = absorb_network(coordinator.start(now_ms()), &mut common, &coordinator, &persistence)?;
    let end_round = steps.div_ceil(inner_steps);
    let tick = std::time::Duration::from_millis((options.round_deadline_ms / 4).clamp(10, 1000));
    let mut sample_packets: Vec<(String, Vec<u8>)> = Vec::new();
    // The largest message each way in the open round (for the link model's time).
    let (mut link_round, mut down_bytes, mut up_bytes) = (coordinator.round(), 0u64, 0u64);
    let mut accept = Box::pin(node.accept());
    loop {
        if coordinator.round() != link_round {
            common.communication_seconds += common.config.link.transfer_seconds(down_bytes) + common.config.link.transfer_seconds(up_bytes);
            common.peak_sync_bytes = common.peak_sync_bytes.max(down_bytes + up_bytes);
            (link_round, down_bytes, up_bytes) = (coordinator.round(), 0, 0);
        }
        if coordinator.round() >= end_round {
            break;
        }
        // An excluded site's connection is ended with the reason (it does not try again).
        let excluded: Vec<(u32, String)> = coordinator.scores().iter().filter_map(|(site, score)| score.excluded.clone().filter(|_| peers.contains_key(site)).map(|reason| (*site, reason))).collect();
        for (site, reason) in excluded {
            if let Some((_, peer)) = peers.remove(&site) {
                peer.close_with(1, &format!("excluded: {reason}"));
            }
        }
        let round = coordinator.round();
        for (to, bytes) in std::mem::take(&mut sends) {
            let sealed = seal(identity, &bytes);
            down_bytes = down_bytes.max(sealed.len() as u64);
            common.ledger.record(round, Endpoint::Coordinator, Endpoint::Site(to), sealed.len() as u64);
            if to == 0 {
                sample_packets = vec![("global".into(), bytes)];
            }
            let Some((_, peer)) = peers.get(&to) else { continue };
            // A site that cannot be reached has left: the round goes on without it.
            if let Err(e) = peer.send(&sealed).await {
                peers.remove(&to);
                common.metrics.push(Metric::Refused { round, site: to, reason: format!("unreachable: {e}") });
                let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: to });
                sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence)?);
            }
        }
        if !sends.is_empty() {
            continue;
        }
        tokio::select! {
            accepted = &mut accept => {
                accept = Box::pin(node.accept());
                match accepted {
                    Some(Ok(peer)) => {
                        let Some(&id) = ids.get(&peer.key()) else { continue };
                        generation += 1;
                        spawn_reader(peer.clone(), id, generation, tx.clone());
                        if let Some((_, old)) = peers.insert(id, (generation, peer)) {
                            // Back before its old connection timed out: that one is over.
                            old.close();
                            let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: id });
                            sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence)?);
                        }
                        common.metrics.push(Metric::Joined { round: coordinator.round(), site: id });
                        let actions = coordinator.handle(now_ms(), Event::SiteJoined { site: id });
                        sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence)?);
                    }
                    Some(Err(e)) => eprintln!("coordinator: refused a connection: {e}"),
                    None => return Err(RunError::Protocol("the coordinator's endpoint closed".into())),
                }
            }
            inbound = rx.recv() => {
                let Some((from, connection, message)) = inbound else { return Err(RunError::Protocol("every site connection closed".into())) };
                if peers.get(&from).map(|(g, _)| *g) != Some(connection) {
                    continue;
                }
                let sealed = match message {
                    Ok(bytes) => bytes,
                    Err(e @ (NetError::Closed(_) | NetError::Ended { .. })) => {
                        let reason = e.to_string();
                        peers.remove(&from);
                        common.metrics.push(Metric::Refused { round, site: from, reason });
                        let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: from });
                        sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence)?);
                        continue;
                    }
                    Err(e) => {
                        common.metrics.push(Metric::Refused { round, site: from, reason: e.to_string() });
                        continue;
                    }
                };
                common.ledger.record(round, Endpoint::Site(from), Endpoint::Coordinator, sealed.len() as u64);
                up_bytes = up_bytes.max(sealed.len() as u64);
                let packet = match open(site_keys[from as usize], &sealed) {
                    Ok(packet) => packet,
                    // Not signed by the site that sent it: logged as such, and handed to the
                    // protocol as an empty (malformed) packet, which refuses and scores it, so
                    // that it cannot stall the round.
                    Err(e) => {
                        common.metrics.push(Metric::Refused { round, site: from, reason: e.to_string() });
                        let actions = coordinator.handle(now_ms(), Event::PacketArrived { from, bytes: &[] });
                        let actions = actions.into_iter().filter(|a| !matches!(a, lowband_protocol::Action::Rejected { .. })).collect();
                        sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence)?);
                        continue;
                    }
                };
                if from == 0 {
                    sample_packets.retain(|(kind, _)| kind != "update");
                    sample_packets.push(("update".into(), packet.to_vec()));
                }
                let actions = coordinator.handle(now_ms(), Event::PacketArrived { from, bytes: packet });
                sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence)?);
            }
            _ = tokio::time::sleep(tick) => {
                let actions = coordinator.handle(now_ms(), Event::Tick);
                sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence)?);
            }
        }
    }
    Ok((common, coordinator, sample_packets))
}

/// One site: connect, then per packet from the coordinator: H inner steps from the parameters
/// it sent, and the update. A site that falls behind (packets queued while it trained) applies
/// them all and trains for the newest round only. Returns its training seconds per round.
async fn site_task(mut site: SiteRuntime, job: SiteJob, mut connected: impl FnMut()) -> Result<Vec<f64>, RunError> {
    // Any local address of the coordinator's family (a loopback-bound socket cannot reach
    // another host).
    let local: SocketAddr = if job.coordinator.0.is_ipv6() { "[::]:0".parse().expect("any IPv6") } else { "0.0.0.0:0".parse().expect("any IPv4") };
    let node = Node::client(job.identity.clone(), local, job.limits.clone())?;
    let last_round = job.steps.div_ceil(job.inner_steps).saturating_sub(1);
    let (mut inputs, mut targets, mut seconds) = (Vec::new(), Vec::new(), Vec::new());
    let mut peer = node.connect(job.coordinator.0, job.coordinator.1).await?;
    // Ctrl-C is remembered even while the site trains: it leaves before the next round.
    let mut leave = job.leave_on_signal.then(|| {
        let (tx, rx) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(());
            }
        });
        rx
    });
    loop {
        connected();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = peer.clone();
        tokio::spawn(async move {
            loop {
                let message = reader.recv().await;
                let closed = matches!(message, Err(NetError::Closed(_) | NetError::Ended { .. }));
                if tx.send(message).is_err() || closed {
                    return;
                }
            }
        });
        let open_round = |site: &mut SiteRuntime, sealed: Vec<u8>| -> Result<u64, RunError> {
            let packet = open(job.coordinator.1, &sealed)?;
            match site.site.handle(SiteEvent::PacketArrived(packet))?.as_slice() {
                [lowband_protocol::SiteAction::Train { round }] => Ok(*round),
                other => Err(RunError::Protocol(format!("site answered a global message with {other:?}"))),
            }
        };
        let mut closed = false;
        while !closed {
            let received = if let Some(leave) = leave.as_mut() {
                tokio::select! {
                    message = rx.recv() => message,
                    _ = leave.changed() => {
                        // A graceful leave: the coordinator learns it at once (no timeout).
                        peer.close_with(2, "leaving");
                        node.wait_closed(std::time::Duration::from_secs(2)).await;
                        println!("site {}: left the run", job.identity.public_key());
                        return Ok(seconds);
                    }
                }
            } else {
                rx.recv().await
            };
            let mut round = match received {
                Some(Ok(sealed)) => open_round(&mut site, sealed)?,
                // The coordinator ended the run, or our part in it (excluded): nothing more to do.
                Some(Err(NetError::Ended { .. })) => return Ok(seconds),
                Some(Err(NetError::Closed(_))) | None => break,
                Some(Err(e)) => return Err(e.into()),
            };
            // Catch up: every packet already here is applied; only the newest is trained on.
            loop {
                match rx.try_recv() {
                    Ok(Ok(sealed)) => round = open_round(&mut site, sealed)?,
                    Ok(Err(NetError::Ended { .. })) => return Ok(seconds),
                    Ok(Err(NetError::Closed(_))) => {
                        closed = true;
                        break;
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => break,
                }
            }
            // A round past the run's last means the run is over (and keeps the arithmetic below
            // from overflowing on a nonsense round number).
            if round > last_round {
                return Ok(seconds);
            }
            let step = round * job.inner_steps;
            let h = job.inner_steps.min(job.steps - step);
            let mut losses = vec![0.0f32; h as usize];
            site.trainer.params_mut().copy_from_slice(site.site.round_start());
            let took = tokio::task::block_in_place(|| train_steps(&mut site, &job.shard, job.batch, &job.schedule, step, &mut losses, (&mut inputs, &mut targets)))?;
            if seconds.len() <= round as usize {
                seconds.resize(round as usize + 1, 0.0);
            }
            seconds[round as usize] = took;
            let update = site.update(round, 0..job.params, &job.uplink)?;
            if let Some(dir) = &job.state_dir {
                crate::state::save_site(dir, &site, round)?;
            }
            // A send that fails means the connection is gone: reconnect below (unless the
            // coordinator ended it on purpose).
            match peer.send(&seal(&job.identity, &update)).await {
                Ok(()) => {}
                Err(NetError::Ended { .. }) => return Ok(seconds),
                Err(_) => break,
            }
            if round >= last_round {
                return Ok(seconds);
            }
        }
        // The coordinator went away before the last round: it ended the run without us (we were
        // dropped or excluded), or it crashed and is coming back from its checkpoint.
        if job.reconnect_ms == 0 {
            return Ok(seconds);
        }
        peer = reconnect(&node, &job).await?;
    }
}

/// Try to reach the coordinator again for `reconnect_ms`, every half second.
async fn reconnect(node: &Node, job: &SiteJob) -> Result<Peer, RunError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(job.reconnect_ms);
    loop {
        let attempt = tokio::time::timeout_at(deadline, node.connect(job.coordinator.0, job.coordinator.1)).await;
        match attempt {
            Ok(Ok(peer)) => return Ok(peer),
            Ok(Err(_)) if tokio::time::Instant::now() + std::time::Duration::from_millis(500) < deadline => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            _ => return Err(RunError::Protocol(format!("lost the coordinator before the run's last round and could not reach it again within {} s", job.reconnect_ms / 1000))),
        }
    }
}
