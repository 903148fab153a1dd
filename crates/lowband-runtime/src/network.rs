//! The networked driver, first part (issue 5): the coordinator and K sites run the same protocol
//! code as the in-memory driver, but every packet crosses a real QUIC connection (lowband-net:
//! ed25519 keys, TLS 1.3, a size limit per message) and is signed by its maker. Today the nodes
//! are tasks of one process on loopback; the `coordinator` / `site` processes, membership
//! changes, crash recovery and link shaping are the rest of issue 5.
//!
//! What the coordinator receives is opened with the sending site's key (a packet that another
//! key signed is refused and counted against that site); what it sends is signed with its own.
//! Sites train in parallel; since the coordinator merges in site order, the result is bitwise
//! the in-memory driver's. The ledger counts the bytes handed to QUIC: the envelope plus its
//! 64-byte signature (the in-memory ledger has no signatures), not QUIC's own headers. Emulated
//! time is defined as in the in-memory driver (per round, the slowest site's measured training
//! plus the link profile's time for the largest message each way), from what the sites report
//! when the run ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use lowband_codec::CodecSpec;
use lowband_data::Split;
use lowband_net::{open, seal, AllowList, Identity, Limits, NetError, Node, PublicKey};
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

/// Run a round strategy with every node on loopback QUIC, in this process.
pub fn run_over_loopback(config: &RunConfig, strategy: Strategy, split: &Split, limits: Limits) -> Result<RunResult, RunError> {
    check_networkable(config, &strategy, split)?;
    runtime(config.sites)?.block_on(run_async(config, strategy, split, limits))
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
/// compute is not reported across processes yet.
#[allow(clippy::too_many_arguments)]
pub fn serve_coordinator(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    identity: Arc<Identity>,
    site_keys: Vec<PublicKey>,
    listen: SocketAddr,
    limits: Limits,
    listening: impl FnOnce(SocketAddr) -> Result<(), RunError>,
) -> Result<RunResult, RunError> {
    check_networkable(config, &strategy, split)?;
    if site_keys.len() != config.sites {
        return Err(RunError::InvalidConfig { field: "site_keys", reason: format!("{} keys for {} sites", site_keys.len(), config.sites) });
    }
    runtime(config.sites)?.block_on(async {
        let started = Instant::now();
        let common = Common::new(config, strategy.clone(), split)?;
        let initial = common.initial_params();
        let coordinator = Coordinator::new(coordinator_config(config, &strategy, initial.len()), initial)?;
        let allowed: AllowList = Arc::new(std::sync::RwLock::new(site_keys.iter().copied().collect()));
        let node = Node::listen(identity.clone(), listen, allowed, limits)?;
        listening(node.local_addr()?)?;
        let (mut common, coordinator, sample_packets) = coordinate(common, coordinator, &node, &identity, &site_keys, strategy.inner_steps, started).await?;
        node.close();
        common.compute_seconds = started.elapsed().as_secs_f64() - common.communication_seconds;
        finish_rounds(common, &coordinator, sample_packets)
    })
}

/// A site process: site `site` of the run, connecting to the coordinator at `coordinator`;
/// `connected` is called once the coordinator has accepted it.
#[allow(clippy::too_many_arguments)]
pub fn serve_site(config: &RunConfig, strategy: Strategy, split: &Split, site: u32, identity: Arc<Identity>, coordinator: (SocketAddr, PublicKey), limits: Limits, connected: impl FnOnce() + Send) -> Result<(), RunError> {
    check_networkable(config, &strategy, split)?;
    let k = site as usize;
    if k >= config.sites {
        return Err(RunError::InvalidConfig { field: "site", reason: format!("site {site} of a {}-site run", config.sites) });
    }
    let model = lowband_engine::preset(&config.preset)?.model;
    let initial = lowband_engine::Gpt::new(model, config.seed)?.params().to_vec();
    let state = new_site(config, &initial, strategy.compression, k)?;
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
        limits,
    };
    runtime(2)?.block_on(site_task(state, job, connected)).map(|_| ())
}

fn coordinator_config(config: &RunConfig, strategy: &Strategy, params: usize) -> CoordinatorConfig {
    let outer = strategy.outer.unwrap_or_else(|| config.outer(false));
    CoordinatorConfig { quorum: config.sites, sites_max: config.sites, compression: strategy.compression, sites_start_synced: true, robustness: strategy.robustness(config.aggregator), ..CoordinatorConfig::new(params, outer) }
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
}

async fn run_async(config: &RunConfig, strategy: Strategy, split: &Split, limits: Limits) -> Result<RunResult, RunError> {
    let started = Instant::now();
    let common = Common::new(config, strategy.clone(), split)?;
    let initial = common.initial_params();
    let n = initial.len();
    let compression = strategy.compression;
    let coordinator = Coordinator::new(coordinator_config(config, &strategy, n), initial.clone())?;
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
        };
        site_tasks.push(tokio::spawn(site_task(site, job, || {})));
    }

    let (mut common, coordinator, sample_packets) = coordinate(common, coordinator, &node, &coordinator_identity, &site_keys, strategy.inner_steps, started).await?;
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

/// The coordinator's side over the network: admit every site (by key), then run rounds until
/// `steps` inner steps are done, every packet signed and checked. Returns the run's state for
/// `finish_rounds`.
async fn coordinate<'a>(
    mut common: Common<'a>,
    mut coordinator: Coordinator,
    node: &Node,
    identity: &Identity,
    site_keys: &[PublicKey],
    inner_steps: u64,
    started: Instant,
) -> Result<(Common<'a>, Coordinator, Vec<(String, Vec<u8>)>), RunError> {
    let steps = common.config.steps;
    let ids: BTreeMap<PublicKey, u32> = site_keys.iter().enumerate().map(|(k, key)| (*key, k as u32)).collect();
    // Every site connects; each connection gets a reader that forwards (site, message).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u32, Result<Vec<u8>, NetError>)>();
    let mut peers = BTreeMap::new();
    let join_deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(JOIN_TIMEOUT_MS);
    while peers.len() < site_keys.len() {
        let accepted = tokio::time::timeout_at(join_deadline, node.accept()).await.map_err(|_| RunError::Protocol(format!("{} of {} sites joined within {} s", peers.len(), site_keys.len(), JOIN_TIMEOUT_MS / 1000)))?;
        match accepted {
            Some(Ok(peer)) => {
                let Some(&id) = ids.get(&peer.key()) else { continue };
                let (reader, tx) = (peer.clone(), tx.clone());
                tokio::spawn(async move {
                    loop {
                        let message = reader.recv().await;
                        let closed = matches!(message, Err(NetError::Closed(_)));
                        if tx.send((id, message)).is_err() || closed {
                            return;
                        }
                    }
                });
                peers.insert(id, peer);
            }
            Some(Err(_)) => continue,
            None => return Err(RunError::Protocol("the coordinator's endpoint closed".into())),
        }
    }
    let now_ms = || started.elapsed().as_millis() as u64;
    for k in 0..site_keys.len() as u32 {
        coordinator.handle(now_ms(), Event::SiteJoined { site: k });
    }
    let mut sends = absorb(coordinator.start(now_ms()), &mut common, &coordinator, 0)?;
    let mut step = 0u64;
    let mut sample_packets: Vec<(String, Vec<u8>)> = Vec::new();
    while step < steps {
        let round = coordinator.round();
        let (mut down_bytes, mut up_bytes) = (0u64, 0u64);
        for (to, bytes) in std::mem::take(&mut sends) {
            let sealed = seal(identity, &bytes);
            down_bytes = down_bytes.max(sealed.len() as u64);
            common.ledger.record(round, Endpoint::Coordinator, Endpoint::Site(to), sealed.len() as u64);
            if to == 0 {
                sample_packets = vec![("global".into(), bytes)];
            }
            if let Some(peer) = peers.get(&to) {
                // A site that cannot be reached has left: the round goes on without it.
                if let Err(e) = peer.send(&sealed).await {
                    common.metrics.push(Metric::Refused { round, site: to, reason: format!("unreachable: {e}") });
                    let actions = coordinator.handle(now_ms(), Event::SiteLeft { site: to });
                    sends.extend(absorb(actions, &mut common, &coordinator, step)?);
                }
            }
        }
        step += inner_steps.min(steps - step);
        // Updates until the round closes (every member reported, refused, or left).
        while coordinator.round() == round {
            let (from, message) = rx.recv().await.ok_or_else(|| RunError::Protocol("every site connection closed".into()))?;
            let sealed = match message {
                Ok(bytes) => bytes,
                Err(NetError::Closed(reason)) => {
                    sends.extend(absorb(coordinator.handle(now_ms(), Event::SiteLeft { site: from }), &mut common, &coordinator, step)?);
                    common.metrics.push(Metric::Refused { round, site: from, reason: format!("connection closed: {reason}") });
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
                // Not signed by the site that sent it: logged as such, and handed to the protocol
                // as an empty (malformed) packet, which refuses and scores it, so that it cannot
                // stall the round.
                Err(e) => {
                    common.metrics.push(Metric::Refused { round, site: from, reason: e.to_string() });
                    let actions = coordinator.handle(now_ms(), Event::PacketArrived { from, bytes: &[] });
                    let actions = actions.into_iter().filter(|a| !matches!(a, lowband_protocol::Action::Rejected { .. })).collect();
                    sends.extend(absorb(actions, &mut common, &coordinator, step)?);
                    continue;
                }
            };
            if from == 0 {
                sample_packets.retain(|(kind, _)| kind != "update");
                sample_packets.push(("update".into(), packet.to_vec()));
            }
            sends.extend(absorb(coordinator.handle(now_ms(), Event::PacketArrived { from, bytes: packet }), &mut common, &coordinator, step)?);
        }
        common.communication_seconds += common.config.link.transfer_seconds(down_bytes) + common.config.link.transfer_seconds(up_bytes);
        common.peak_sync_bytes = common.peak_sync_bytes.max(down_bytes + up_bytes);
    }
    Ok((common, coordinator, sample_packets))
}

/// One site: connect, then per round: the coordinator's packet, H inner steps, the update.
/// Returns its training seconds per round.
async fn site_task(mut site: SiteRuntime, job: SiteJob, connected: impl FnOnce()) -> Result<Vec<f64>, RunError> {
    let node = Node::client(job.identity.clone(), "127.0.0.1:0".parse().expect("loopback"), job.limits.clone())?;
    let peer = node.connect(job.coordinator.0, job.coordinator.1).await?;
    connected();
    let (mut step, mut inputs, mut targets, mut seconds) = (0u64, Vec::new(), Vec::new(), Vec::new());
    while step < job.steps {
        let sealed = match peer.recv().await {
            Ok(sealed) => sealed,
            // The coordinator ended the run, or excluded this site: nothing more to do.
            Err(NetError::Closed(_)) => return Ok(seconds),
            Err(e) => return Err(e.into()),
        };
        let packet = open(job.coordinator.1, &sealed)?;
        let round = match site.site.handle(SiteEvent::PacketArrived(packet))?.as_slice() {
            [lowband_protocol::SiteAction::Train { round }] => *round,
            other => return Err(RunError::Protocol(format!("site answered a global message with {other:?}"))),
        };
        let h = job.inner_steps.min(job.steps - step);
        let mut losses = vec![0.0f32; h as usize];
        site.trainer.params_mut().copy_from_slice(site.site.round_start());
        seconds.push(tokio::task::block_in_place(|| train_steps(&mut site, &job.shard, job.batch, &job.schedule, step, &mut losses, (&mut inputs, &mut targets)))?);
        let update = site.update(round, 0..job.params, &job.uplink)?;
        peer.send(&seal(&job.identity, &update)).await?;
        step += h;
    }
    Ok(seconds)
}
