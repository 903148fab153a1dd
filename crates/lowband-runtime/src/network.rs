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
//! - every site connection has its own writer: a broadcast (one envelope, signed once, one
//!   buffer shared by every queue) goes to K sites at once, and a slow or frozen site delays
//!   only itself; one with more than `OUTBOX_MODELS` copies of the parameters unread is asked to
//!   rejoin (it reconnects and gets the current parameters in full, as after a crash);
//! - after every round the coordinator saves its state atomically (`state_dir`); started again
//!   with `resume` it continues from there (at most the round in flight is redone) and the sites,
//!   which keep trying to reconnect for `reconnect_ms`, come back by themselves.
//!
//! Streaming DiLoCo runs over the network too: a streaming site trains step after step, sends
//! the update of fragment r after step `RoundSteps::end_step(r)` without waiting, and mixes the
//! coordinator's merge in `overlap_steps` later (waiting only if it is late), then the final
//! syncs; bitwise the in-memory run. After a lost connection (or a coordinator restarted from its
//! checkpoint) it reconnects and trains on from the parameters it is sent, from the first step of
//! their round; it saves and resumes its own state and leaves on Ctrl-C as a round site does.
//!
//! What the coordinator receives is opened with the sending site's key (a packet that another
//! key signed is refused and counted against that site); what it sends is signed with its own.
//! Sites train in parallel; since the coordinator merges in site order, a fault-free run is
//! bitwise the in-memory driver's. The ledger counts the bytes handed to QUIC: the envelope plus
//! its 64-byte signature (the in-memory ledger has no signatures), not QUIC's own headers.
//! Emulated time is defined as in the in-memory driver (per round, the slowest site's measured
//! training plus the link profile's time for the largest message each way): each site sends a
//! training report (`wire::TrainingReport`: its seconds and per-step losses) just before its
//! update, so a networked run's per-step losses and compute time are the sites' own, as in memory.
//! Reports are telemetry: counted in `RunResult::telemetry_bytes`, not in the ledger.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use lowband_codec::CodecSpec;
use lowband_data::Split;
use lowband_net::{open, seal, AllowList, Identity, Limits, NetError, Node, Peer, PublicKey};
use lowband_engine::Trainer;
use lowband_protocol::wire::{self, MessageKind, TrainingReport};
use lowband_protocol::{Coordinator, CoordinatorConfig, Event, SiteEvent};

use crate::config::RunConfig;
use crate::driver::{absorb, finish_rounds, new_site, train_steps, BatchShape, Common, Metric, SiteRuntime};
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
    if strategy.kind != StrategyKind::Rounds {
        return Err(RunError::InvalidConfig { field: "strategy", reason: format!("{}: the networked driver runs round and streaming strategies (DDP runs in memory, as the reference)", strategy.name()) });
    }
    if split.shards.len() != config.sites {
        return Err(RunError::InvalidConfig { field: "sites", reason: format!("{} shards for {} sites", split.shards.len(), config.sites) });
    }
    Ok(())
}

/// A coordinator process: listen on `listen`, admit exactly `site_keys` (site k is the k-th),
/// run the rounds, return the result. `listening` is told the bound address first (a port 0
/// becomes a real one). Compute time and per-step losses are the sites' own (their training
/// reports). With `options.state_dir` holding a saved
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
        let (common, coordinator, sample_packets) = coordinate(common, coordinator, &node, &identity, &site_keys, &options, started).await?;
        node.close();
        // Tell every site the run is over before this process goes.
        node.wait_closed(std::time::Duration::from_secs(2)).await;
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
    let mut state = network_site(config, &strategy, &initial, k)?;
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
        streaming: strategy.streaming,
        rounds: RoundSteps::of(config, &strategy),
    };
    runtime(2)?.block_on(any_site_task(state, job, connected))
}

/// Site k as the networked driver runs it (with its fragments when streaming).
fn network_site(config: &RunConfig, strategy: &Strategy, initial: &[f32], k: usize) -> Result<SiteRuntime, RunError> {
    let mut site = new_site(config, initial, strategy.compression, k)?;
    if let Some(streaming) = strategy.streaming {
        site.site = site.site.with_fragments(crate::driver::fragments(initial.len(), streaming.fragments))?;
    }
    Ok(site)
}

async fn any_site_task(site: SiteRuntime, job: SiteJob, connected: impl FnMut()) -> Result<(), RunError> {
    if job.streaming.is_some() { streaming_site_task(site, job, connected).await } else { site_task(site, job, connected).await }
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
        fragments: strategy.streaming.map(|s| crate::driver::fragments(params, s.fragments)).unwrap_or_default(),
        robustness: strategy.robustness(config.aggregator),
        ..CoordinatorConfig::new(params, outer)
    }
}

/// How long the coordinator waits for every listed site to connect before it gives up.
pub const JOIN_TIMEOUT_MS: u64 = 120_000;

/// Where a run's rounds fall in its steps. Round strategies: round r trains steps
/// [rH, min((r + 1)H, T)). Streaming (P fragments): fragment sync r comes after step
/// max(⌊(r + 1)H/P⌋, r + 1) while that is before T, as in the in-memory driver, then P final
/// syncs at T (no training between them).
#[derive(Clone, Copy, Debug)]
struct RoundSteps {
    steps: u64,
    inner_steps: u64,
    /// P; 0 for whole-model rounds.
    fragments: u64,
}

impl RoundSteps {
    fn of(config: &RunConfig, strategy: &Strategy) -> RoundSteps {
        RoundSteps { steps: config.steps, inner_steps: strategy.inner_steps, fragments: strategy.streaming.map_or(0, |s| s.fragments as u64) }
    }

    /// The step after which round `round`'s updates are sent.
    fn end_step(&self, round: u64) -> u64 {
        if self.fragments == 0 {
            return round.saturating_add(1).saturating_mul(self.inner_steps).min(self.steps);
        }
        (round.saturating_add(1).saturating_mul(self.inner_steps) / self.fragments).max(round.saturating_add(1)).min(self.steps)
    }

    /// The first step round `round` trains.
    fn first_step(&self, round: u64) -> u64 {
        if round == 0 { 0 } else { self.end_step(round - 1) }
    }

    /// Streaming: fragment syncs during training (those before step T); the end step grows
    /// strictly with the round, so a binary search finds the first one at T.
    fn syncs_in_run(&self) -> u64 {
        let (mut low, mut high) = (0u64, self.steps);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.end_step(middle) < self.steps { low = middle + 1 } else { high = middle }
        }
        low
    }

    /// Every round the coordinator runs.
    fn rounds(&self) -> u64 {
        if self.fragments == 0 { self.steps.div_ceil(self.inner_steps) } else { self.syncs_in_run() + self.fragments }
    }
}

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
    /// Streaming DiLoCo's fragments, delay and mix (None: whole-model rounds).
    streaming: Option<crate::strategy::Streaming>,
    rounds: RoundSteps,
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
    let sites: Vec<SiteRuntime> = (0..config.sites).map(|k| network_site(config, &strategy, &initial, k)).collect::<Result<_, _>>()?;

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
            streaming: strategy.streaming,
            rounds: RoundSteps::of(config, &strategy),
        };
        site_tasks.push(tokio::spawn(any_site_task(site, job, || {})));
    }

    let (common, coordinator, sample_packets) = coordinate(common, coordinator, &node, &coordinator_identity, &site_keys, &options, started).await?;
    node.close();
    for task in site_tasks {
        task.await.map_err(|e| RunError::Protocol(format!("a site task failed: {e}")))??;
    }
    finish_rounds(common, &coordinator, sample_packets)
}

/// What a connection's reader forwards: the site, the connection's generation (a site that
/// reconnects gets a new one, and what its old connection still delivers is ignored), the message.
/// A writer that cannot deliver forwards its error the same way.
type Inbound = (u32, u64, Result<Vec<u8>, NetError>);

/// The close codes (as `NetError::Ended` reports them) of a site excluded for its updates (it
/// stops), leaving on Ctrl-C, and asked to rejoin.
const CLOSE_EXCLUDED: u64 = 1;
const CLOSE_LEAVING: u64 = 2;
/// (Rejoin: it fell too far behind; it reconnects and gets the current parameters in full, as
/// after a crash.)
const CLOSE_REJOIN: u64 = 3;
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
    fn open(peer: Peer, site: u32, generation: u64, inbound: tokio::sync::mpsc::UnboundedSender<Inbound>) -> SiteConnection {
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
        SiteConnection { generation, peer, outbox, queued_bytes }
    }

    /// Queue `sealed`; false if the site already has `budget` bytes waiting (it is behind).
    fn queue(&self, sealed: bytes::Bytes, budget: usize) -> bool {
        let waiting = self.queued_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if waiting > 0 && waiting + sealed.len() > budget {
            return false;
        }
        self.queued_bytes.fetch_add(sealed.len(), std::sync::atomic::Ordering::Relaxed);
        // A closed queue means the writer has stopped; its error is on its way as an Inbound.
        let _ = self.outbox.send(sealed);
        true
    }
}

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
        common.metrics.push(Metric::Step { step, loss: sum / count as f32, lr: common.schedule.lr_at(step) });
    }
    common.compute_seconds += reported.values().map(|r| r.seconds).fold(0.0, f64::max);
}

/// The protocol's actions into the run: metrics, evaluation at a round's close, and the
/// coordinator's checkpoint. A round closed on a quorum lists its missing members as `Missed`.
fn absorb_network(actions: Vec<lowband_protocol::Action>, common: &mut Common, coordinator: &Coordinator, persistence: &crate::Persistence, reports: &mut Reports) -> Result<crate::driver::Sends, RunError> {
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
) -> Result<(Common<'a>, Coordinator, Vec<(String, bytes::Bytes)>), RunError> {
    let rounds = RoundSteps::of(common.config, &common.strategy);
    let inner_steps = common.strategy.inner_steps;
    let overlap_steps = common.strategy.streaming.map_or(0, |s| s.overlap_steps);
    let persistence = crate::Persistence { state_dir: options.state_dir.clone(), stop_after_rounds: None };
    let quorum = if options.quorum == 0 { site_keys.len() } else { options.quorum.min(site_keys.len()) };
    let ids: BTreeMap<PublicKey, u32> = site_keys.iter().enumerate().map(|(k, key)| (*key, k as u32)).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Inbound>();
    let mut peers: BTreeMap<u32, SiteConnection> = BTreeMap::new();
    let mut reports = Reports::new();
    let outbox_budget = OUTBOX_MODELS * (4 * coordinator.global().len() + 1024);
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
                if let Some(old) = peers.insert(id, SiteConnection::open(peer, id, generation, tx.clone())) {
                    old.peer.close();
                }
            }
            Ok(Some(Err(e))) => eprintln!("coordinator: refused a connection: {e}"),
            Ok(None) => return Err(RunError::Protocol("the coordinator's endpoint closed".into())),
        }
    }
    for &id in peers.keys() {
        coordinator.handle(now_ms(), Event::SiteJoined { site: id });
    }
    let mut sends = absorb_network(coordinator.start(now_ms()), &mut common, &coordinator, &persistence, &mut reports)?;
    let end_round = rounds.rounds();
    // Streaming: the broadcasts of the final syncs are not counted (no site trains after them),
    // as in memory.
    let counted_rounds = if rounds.fragments == 0 { u64::MAX } else { rounds.syncs_in_run() };
    let tick = std::time::Duration::from_millis((options.round_deadline_ms / 4).clamp(10, 1000));
    let mut sample_packets: Vec<(String, bytes::Bytes)> = Vec::new();
    // The largest message each way in the open round (for the link model's time).
    let (mut link_round, mut down_bytes, mut up_bytes) = (coordinator.round(), 0u64, 0u64);
    let mut accept = Box::pin(node.accept());
    loop {
        if coordinator.round() != link_round {
            let link = &common.config.link;
            common.communication_seconds += if rounds.fragments == 0 {
                link.transfer_seconds(down_bytes) + link.transfer_seconds(up_bytes)
            } else if link_round < counted_rounds {
                // The sites compute on while a sync travels: `overlap_steps` of their mean step
                // time hides it.
                let hidden = overlap_steps as f64 * common.compute_seconds / rounds.end_step(link_round).max(1) as f64;
                (link.transfer_seconds(down_bytes) + link.transfer_seconds(up_bytes) - hidden).max(0.0)
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
        let excluded: Vec<(u32, String)> = coordinator.scores().iter().filter_map(|(site, score)| score.excluded.clone().filter(|_| peers.contains_key(site)).map(|reason| (*site, reason))).collect();
        for (site, reason) in excluded {
            if let Some(connection) = peers.remove(&site) {
                connection.peer.close_with(CLOSE_EXCLUDED as u32, &format!("excluded: {reason}"));
            }
        }
        let round = coordinator.round();
        // A message every member receives alike is signed once and shared by their queues.
        let mut last_sealed: Option<(bytes::Bytes, bytes::Bytes)> = None;
        for (to, bytes) in std::mem::take(&mut sends) {
            let sealed = match &last_sealed {
                Some((message, sealed)) if message.as_ptr() == bytes.as_ptr() && message.len() == bytes.len() => sealed.clone(),
                _ => {
                    let sealed = bytes::Bytes::from(seal(identity, &bytes));
                    last_sealed = Some((bytes.clone(), sealed.clone()));
                    sealed
                }
            };
            if round <= counted_rounds {
                down_bytes = down_bytes.max(sealed.len() as u64);
                common.ledger.record(round, Endpoint::Coordinator, Endpoint::Site(to), sealed.len() as u64);
            }
            if to == 0 {
                sample_packets = vec![("global".into(), bytes)];
            }
            let Some(connection) = peers.get(&to) else { continue };
            if !connection.queue(sealed, outbox_budget) {
                // Too far behind: it rejoins and gets the current parameters in full.
                let connection = peers.remove(&to).expect("looked up above");
                connection.peer.close_with(CLOSE_REJOIN as u32, "fell too far behind: rejoin");
                common.metrics.push(Metric::Refused { round, site: to, reason: format!("fell behind by more than {OUTBOX_MODELS} copies of the parameters: asked to rejoin") });
                let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: to });
                sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
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
                        if let Some(old) = peers.insert(id, SiteConnection::open(peer, id, generation, tx.clone())) {
                            // Back before its old connection timed out: that one is over.
                            old.peer.close();
                            let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: id });
                            sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
                        }
                        common.metrics.push(Metric::Joined { round: coordinator.round(), site: id });
                        let actions = coordinator.handle(now_ms(), Event::SiteJoined { site: id });
                        sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
                    }
                    Some(Err(e)) => eprintln!("coordinator: refused a connection: {e}"),
                    None => return Err(RunError::Protocol("the coordinator's endpoint closed".into())),
                }
            }
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
                        common.metrics.push(Metric::Refused { round, site: from, reason });
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
                let actions = coordinator.handle(now_ms(), Event::Tick);
                sends.extend(absorb_network(actions, &mut common, &coordinator, &persistence, &mut reports)?);
            }
        }
    }
    Ok((common, coordinator, sample_packets))
}

/// One site: connect, then per packet from the coordinator: H inner steps from the parameters
/// it sent, and the update. A site that falls behind (packets queued while it trained) applies
/// them all and trains for the newest round only. Its training time and losses go to the
/// coordinator in a report before each update.
async fn site_task(mut site: SiteRuntime, job: SiteJob, mut connected: impl FnMut()) -> Result<(), RunError> {
    // Any local address of the coordinator's family (a loopback-bound socket cannot reach
    // another host).
    let local: SocketAddr = if job.coordinator.0.is_ipv6() { "[::]:0".parse().expect("any IPv6") } else { "0.0.0.0:0".parse().expect("any IPv4") };
    let node = Node::client(job.identity.clone(), local, job.limits.clone())?;
    let last_round = job.steps.div_ceil(job.inner_steps).saturating_sub(1);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut peer = node.connect(job.coordinator.0, job.coordinator.1).await?;
    // Ctrl-C is remembered even while the site trains: it leaves before the next round.
    let mut leave = leave_signal(job.leave_on_signal);
    loop {
        connected();
        let mut rx = read_from_coordinator(&peer);
        let open_round = |site: &mut SiteRuntime, sealed: Vec<u8>| -> Result<u64, RunError> {
            let packet = open(job.coordinator.1, &sealed)?;
            match site.site.handle(SiteEvent::PacketArrived(packet))?.as_slice() {
                [lowband_protocol::SiteAction::Train { round }] => Ok(*round),
                other => Err(RunError::Protocol(format!("site answered a global message with {other:?}"))),
            }
        };
        let (mut closed, mut rejoin) = (false, false);
        while !closed {
            let received = if let Some(leave) = leave.as_mut() {
                tokio::select! {
                    message = rx.recv() => message,
                    _ = leave.changed() => {
                        leave_now(&node, &peer, &job).await;
                        return Ok(());
                    }
                }
            } else {
                rx.recv().await
            };
            let mut round = match received {
                Some(Ok(sealed)) => open_round(&mut site, sealed)?,
                Some(Err(NetError::Ended { code: CLOSE_REJOIN, .. })) => {
                    rejoin = true;
                    break;
                }
                // The coordinator ended the run, or our part in it (excluded): nothing more to do.
                Some(Err(NetError::Ended { .. })) => return Ok(()),
                Some(Err(NetError::Closed(_))) | None => break,
                Some(Err(e)) => return Err(e.into()),
            };
            // Catch up: every packet already here is applied; only the newest is trained on.
            loop {
                match rx.try_recv() {
                    Ok(Ok(sealed)) => round = open_round(&mut site, sealed)?,
                    // Asked to rejoin while it was away (a frozen process wakes to find this
                    // behind the packets it missed).
                    Ok(Err(NetError::Ended { code: CLOSE_REJOIN, .. })) => {
                        (rejoin, closed) = (true, true);
                        break;
                    }
                    Ok(Err(NetError::Ended { .. })) => return Ok(()),
                    Ok(Err(NetError::Closed(_))) => {
                        closed = true;
                        break;
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => break,
                }
            }
            // The connection is gone: whatever it trained now could not be sent.
            if closed {
                break;
            }
            // A round past the run's last means the run is over (and keeps the arithmetic below
            // from overflowing on a nonsense round number).
            if round > last_round {
                return Ok(());
            }
            let step = round * job.inner_steps;
            let h = job.inner_steps.min(job.steps - step);
            let mut losses = vec![0.0f32; h as usize];
            site.trainer.params_mut().copy_from_slice(site.site.round_start());
            let took = tokio::task::block_in_place(|| train_steps(&mut site, &job.shard, job.batch, &job.schedule, step, &mut losses, (&mut inputs, &mut targets)))?;
            let update = site.update(round, 0..job.params, &job.uplink)?;
            if let Some(dir) = &job.state_dir {
                crate::state::save_site(dir, &site, round)?;
            }
            // The training report, then the update (the coordinator reads a connection's
            // messages in order, so the report is in before the update can close the round). A
            // send that fails means the connection is gone: reconnect below (unless the
            // coordinator ended it on purpose).
            let report = TrainingReport { seconds: took, losses }.encode(round, site.site.id());
            let mut lost = false;
            for message in [report, update] {
                match peer.send(&seal(&job.identity, &message)).await {
                    Ok(()) => {}
                    Err(NetError::Ended { code: CLOSE_REJOIN, .. }) => {
                        rejoin = true;
                        lost = true;
                        break;
                    }
                    Err(NetError::Ended { .. }) => return Ok(()),
                    Err(_) => {
                        lost = true;
                        break;
                    }
                }
            }
            if lost {
                break;
            }
            if round >= last_round {
                return Ok(());
            }
        }
        // The coordinator went away before the last round: it ended the run without us (we were
        // dropped or excluded), or it crashed and is coming back from its checkpoint.
        // Asked to rejoin (it fell behind), it does so even when it would not retry otherwise.
        if job.reconnect_ms == 0 && !rejoin {
            return Ok(());
        }
        peer = reconnect(&node, &job, if rejoin { job.reconnect_ms.max(REJOIN_MS) } else { job.reconnect_ms }).await?;
    }
}

/// Ctrl-C / SIGINT, when `enabled` (a site process): the receiver changes once it is pressed.
fn leave_signal(enabled: bool) -> Option<tokio::sync::watch::Receiver<()>> {
    enabled.then(|| {
        let (tx, rx) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(());
            }
        });
        rx
    })
}

/// A graceful leave: the coordinator learns it at once (no idle timeout).
async fn leave_now(node: &Node, peer: &Peer, job: &SiteJob) {
    peer.close_with(CLOSE_LEAVING as u32, "leaving");
    node.wait_closed(std::time::Duration::from_secs(2)).await;
    println!("site {}: left the run", job.identity.public_key());
}

/// What the coordinator sends a site, as it arrives, until the connection ends (a reader task,
/// so that the site's QUIC connection is served while it trains).
fn read_from_coordinator(peer: &Peer) -> tokio::sync::mpsc::UnboundedReceiver<Result<Vec<u8>, NetError>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
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
    rx
}

/// How a streaming site's connection ended.
enum StreamingEnd {
    /// The run is over (or the coordinator ended this site's part in it).
    Done,
    /// The connection was lost; `rejoin`: the coordinator asked this site to come back.
    Lost { rejoin: bool },
    /// Ctrl-C: leave the run.
    Leaving,
}

/// A streaming site: it trains step after step and never waits for a merge before it is due.
/// After step `end_step(r)` it sends its report and the update of fragment r and trains on; the
/// coordinator's broadcast with that merge is mixed in `overlap_steps` later (the site waits for
/// it only if it has not arrived by then), exactly when the in-memory driver mixes it, so the run
/// is bitwise the in-memory one. Then the P final syncs, back to back. A site that loses the
/// coordinator reconnects (for `reconnect_ms`, or when asked to rejoin) and starts again from the
/// parameters it is sent, at the first step of their round. With a state directory it saves its
/// own state (optimizer moments, data position, error feedback) after every sync, as a round
/// site does; Ctrl-C is a graceful leave.
async fn streaming_site_task(mut site: SiteRuntime, job: SiteJob, mut connected: impl FnMut()) -> Result<(), RunError> {
    let local: SocketAddr = if job.coordinator.0.is_ipv6() { "[::]:0".parse().expect("any IPv6") } else { "0.0.0.0:0".parse().expect("any IPv4") };
    let node = Node::client(job.identity.clone(), local, job.limits.clone())?;
    let mut peer = node.connect(job.coordinator.0, job.coordinator.1).await?;
    let leave = leave_signal(job.leave_on_signal);
    loop {
        connected();
        // (Pressed while it reconnected: the clones below would take it as seen.)
        if leave.as_ref().is_some_and(|l| l.has_changed().unwrap_or(false)) {
            leave_now(&node, &peer, &job).await;
            return Ok(());
        }
        let rejoin = match streaming_connection(&mut site, &job, &peer, leave.clone()).await? {
            StreamingEnd::Done => return Ok(()),
            StreamingEnd::Leaving => {
                leave_now(&node, &peer, &job).await;
                return Ok(());
            }
            StreamingEnd::Lost { rejoin } => rejoin,
        };
        if job.reconnect_ms == 0 && !rejoin {
            return Ok(());
        }
        peer = reconnect(&node, &job, if rejoin { job.reconnect_ms.max(REJOIN_MS) } else { job.reconnect_ms }).await?;
    }
}

/// One connection of a streaming site, from the first message the coordinator sends it.
async fn streaming_connection(site: &mut SiteRuntime, job: &SiteJob, peer: &Peer, leave: Option<tokio::sync::watch::Receiver<()>>) -> Result<StreamingEnd, RunError> {
    let streaming = job.streaming.expect("a streaming job");
    let mut rx = read_from_coordinator(peer);
    // Ctrl-C, checked between steps (`pressed`) and while waiting for a merge (`waiting`).
    let (mut pressed, mut waiting) = (leave.clone(), leave);
    // The next broadcast, mixed in with `mix`: the round it opens, or how the connection ended.
    let mut next = async |site: &mut SiteRuntime, mix: f32| -> Result<Result<u64, StreamingEnd>, RunError> {
        let received = match waiting.as_mut() {
            Some(leave) => tokio::select! {
                message = rx.recv() => message,
                _ = leave.changed() => return Ok(Err(StreamingEnd::Leaving)),
            },
            None => rx.recv().await,
        };
        match received {
            Some(Ok(sealed)) => Ok(Ok(crate::driver::mix_in(site, open(job.coordinator.1, &sealed)?, mix)?)),
            Some(Err(NetError::Ended { code: CLOSE_REJOIN, .. })) => Ok(Err(StreamingEnd::Lost { rejoin: true })),
            Some(Err(NetError::Ended { .. })) => Ok(Err(StreamingEnd::Done)),
            Some(Err(NetError::Closed(_))) | None => Ok(Err(StreamingEnd::Lost { rejoin: false })),
            Some(Err(e)) => Err(e.into()),
        }
    };
    let send = async |message: Vec<u8>| -> Result<Result<(), StreamingEnd>, RunError> {
        match peer.send(&seal(&job.identity, &message)).await {
            Ok(()) => Ok(Ok(())),
            Err(NetError::Ended { code: CLOSE_REJOIN, .. }) => Ok(Err(StreamingEnd::Lost { rejoin: true })),
            Err(NetError::Ended { .. }) => Ok(Err(StreamingEnd::Done)),
            Err(_) => Ok(Err(StreamingEnd::Lost { rejoin: false })),
        }
    };
    let mut round = match next(site, streaming.mix).await? {
        Ok(round) => round,
        Err(end) => return Ok(end),
    };
    // What the coordinator sent first is what this site trains from (at the start of the run
    // these are its own initial parameters; after a rejoin, the cluster's, in full).
    site.trainer.params_mut().copy_from_slice(site.site.round_start());
    let (rounds, last) = (job.rounds, job.rounds.rounds());
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let (mut step, mut due_step): (u64, Option<u64>) = (rounds.first_step(round), None);
    let (mut losses, mut seconds) = (Vec::new(), 0.0f64);
    while step < job.steps {
        if pressed.as_mut().is_some_and(|leave| leave.has_changed().unwrap_or(false)) {
            return Ok(StreamingEnd::Leaving);
        }
        if due_step.is_some_and(|due| due <= step) {
            due_step = None;
            if let Err(end) = next(site, streaming.mix).await? {
                return Ok(end);
            }
        }
        let mut loss = [0.0f32];
        seconds += tokio::task::block_in_place(|| train_steps(site, &job.shard, job.batch, &job.schedule, step, &mut loss, (&mut inputs, &mut targets)))?;
        losses.push(loss[0]);
        step += 1;
        if step != rounds.end_step(round) || step >= job.steps {
            continue;
        }
        // A merge still in flight is mixed in before the next sync (as in memory).
        if due_step.take().is_some() {
            if let Err(end) = next(site, streaming.mix).await? {
                return Ok(end);
            }
        }
        let report = TrainingReport { seconds, losses: std::mem::take(&mut losses) }.encode(round, site.site.id());
        seconds = 0.0;
        let update = site.update(round, site.site.fragment(round), &job.uplink)?;
        if let Some(dir) = &job.state_dir {
            crate::state::save_site(dir, site, round)?;
        }
        for message in [report, update] {
            if let Err(end) = send(message).await? {
                return Ok(end);
            }
        }
        due_step = Some(step + streaming.overlap_steps);
        round += 1;
    }
    if due_step.is_some() {
        if let Err(end) = next(site, streaming.mix).await? {
            return Ok(end);
        }
    }
    // The final syncs: every fragment once more, so that no step is left out of the global model.
    if !losses.is_empty() {
        if let Err(end) = send(TrainingReport { seconds, losses }.encode(round, site.site.id())).await? {
            return Ok(end);
        }
    }
    while round < last {
        let update = site.update(round, site.site.fragment(round), &job.uplink)?;
        if let Err(end) = send(update).await? {
            return Ok(end);
        }
        round += 1;
        if round < last {
            if let Err(end) = next(site, 0.0).await? {
                return Ok(end);
            }
        }
    }
    Ok(StreamingEnd::Done)
}

/// How long a site asked to rejoin keeps trying (when its own `reconnect_ms` is shorter).
const REJOIN_MS: u64 = 10_000;

/// Try to reach the coordinator again for `reconnect_ms`, every half second.
async fn reconnect(node: &Node, job: &SiteJob, reconnect_ms: u64) -> Result<Peer, RunError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(reconnect_ms);
    loop {
        let attempt = tokio::time::timeout_at(deadline, node.connect(job.coordinator.0, job.coordinator.1)).await;
        match attempt {
            Ok(Ok(peer)) => return Ok(peer),
            Ok(Err(_)) if tokio::time::Instant::now() + std::time::Duration::from_millis(500) < deadline => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            _ => return Err(RunError::Protocol(format!("lost the coordinator before the run's last round and could not reach it again within {} s", reconnect_ms / 1000))),
        }
    }
}
