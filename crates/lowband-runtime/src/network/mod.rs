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

use std::net::SocketAddr;
use std::sync::Arc;

use lowband_codec::CodecSpec;
use lowband_data::Split;
use lowband_net::{Identity, Limits, NetError, PublicKey};
use lowband_protocol::{Coordinator, CoordinatorConfig};

use crate::config::RunConfig;
use crate::driver::{finish_rounds, BatchShape, Common, SiteRuntime};
use crate::strategy::{Strategy, StrategyKind};
use crate::{RunError, RunResult};

mod checkpoints;
mod coordinator;
mod external;
pub mod join;
mod round_steps;
mod scheduled;
mod site;

pub use external::{external_site, serve_external_coordinator, ExternalSite};
pub use round_steps::RoundSteps;

use coordinator::NetworkBooks;
use site::{site_task, streaming_site_task};

impl From<NetError> for RunError {
    fn from(e: NetError) -> Self {
        match e {
            // The coordinator's own account of why it stopped.
            NetError::Stopped(reason) => RunError::Protocol(reason),
            other => RunError::Protocol(format!("network: {other}")),
        }
    }
}

/// The transport's limits for a run: its idle timeout (keep-alives at a quarter of it), and
/// messages up to the parameters in fp32 and then some (at least 1 GiB).
pub fn limits(config: &RunConfig) -> Limits {
    let idle_timeout_ms = config.network.idle_timeout_ms;
    let params = match &config.model {
        Some(model) => model.params,
        None => lowband_engine::preset(&config.preset).map_or(0, |p| p.model.parameter_count()),
    };
    Limits {
        idle_timeout_ms,
        keep_alive_ms: (idle_timeout_ms / 4).max(50),
        message_bytes_max: Limits::default()
            .message_bytes_max
            .max(params.saturating_mul(4).saturating_add(1 << 20)),
        ..Limits::default()
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
    /// The live view's observer (metrics, ledger entries, the sites' reports and updates as
    /// they arrive).
    pub observer: Option<crate::Observer>,
    /// Stops the coordinator from outside with a reason (`cluster`: every site process died).
    pub abort: Option<lowband_net::Abort>,
}

impl NetworkOptions {
    /// The run's `[network]` settings, no state directory.
    pub fn of(config: &RunConfig, limits: Limits) -> Self {
        NetworkOptions {
            limits,
            quorum: config.network.quorum,
            round_deadline_ms: config.network.round_deadline_ms,
            join_timeout_ms: config.network.join_timeout_ms,
            state_dir: None,
            resume: false,
            observer: None,
            abort: None,
        }
    }
}

/// Run a round strategy with every node on loopback QUIC, in this process.
pub fn run_over_loopback(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    limits: Limits,
    observer: Option<crate::Observer>,
) -> Result<RunResult, RunError> {
    check_networkable(config, &strategy, split)?;
    let options = NetworkOptions {
        observer,
        ..NetworkOptions::of(config, limits)
    };
    if strategy.scheduled() {
        return scheduled::run_loopback_scheduled(config, strategy, split, options);
    }
    run_loopback(config, strategy, split, options)
}

fn check_networkable(
    config: &RunConfig,
    strategy: &Strategy,
    split: &Split,
) -> Result<(), RunError> {
    check_rounds(config, strategy)?;
    crate::driver::refuse_external(config)?;
    if split.shards.len() != config.sites {
        return Err(RunError::InvalidConfig {
            field: "sites",
            reason: format!("{} shards for {} sites", split.shards.len(), config.sites),
        });
    }
    Ok(())
}

/// A valid run of a round, streaming or scheduled strategy.
fn check_rounds(config: &RunConfig, strategy: &Strategy) -> Result<(), RunError> {
    config
        .validate()
        .map_err(|(field, reason)| RunError::InvalidConfig { field, reason })?;
    if strategy.kind != StrategyKind::Rounds {
        return Err(RunError::InvalidConfig { field: "strategy", reason: format!("{}: the networked driver runs round and streaming strategies (DDP runs in memory, as the reference)", strategy.name()) });
    }
    if !config.faults.is_empty() && !strategy.scheduled() {
        return Err(RunError::InvalidConfig { field: "faults", reason: format!("{}: an emulated fault schedule applies to the strategies on the emulated clock's schedule (async-diloco, [quorum=N]); over the network, kill and restart the processes themselves", strategy.name()) });
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
    let common = Common::new(config, strategy.clone(), split)?;
    let initial = common.initial_params()?;
    let settings = join::join_settings(config, &strategy, Some(common.corpus));
    let coordinator = Served {
        identity,
        site_keys,
        listen,
        settings,
        sites_start_synced: true,
    };
    if strategy.scheduled() {
        return scheduled::serve_scheduled(common, initial, coordinator, options, true, listening);
    }
    serve_books(common, initial, coordinator, options, listening)
}

/// A coordinator's node: its key, the sites it admits, where it listens, what a site's join
/// request must say, and whether the sites start from the seed's parameters (an engine run) or
/// are sent them (an external model).
struct Served {
    identity: Arc<Identity>,
    site_keys: Vec<PublicKey>,
    listen: SocketAddr,
    settings: lowband_protocol::wire::JoinRequest,
    sites_start_synced: bool,
}

/// Serve a run's rounds from `initial` with `common` as its books (resuming from a saved state
/// when asked), then finish the run.
fn serve_books(
    mut common: Common,
    initial: Vec<f32>,
    served: Served,
    options: NetworkOptions,
    listening: impl FnOnce(SocketAddr) -> Result<(), RunError>,
) -> Result<RunResult, RunError> {
    let (config, strategy) = (common.config, common.strategy.clone());
    if served.site_keys.len() != config.sites {
        return Err(RunError::InvalidConfig {
            field: "site_keys",
            reason: format!("{} keys for {} sites", served.site_keys.len(), config.sites),
        });
    }
    let mut coordinator = Coordinator::new(
        CoordinatorConfig {
            sites_start_synced: served.sites_start_synced,
            ..coordinator_config(config, &strategy, initial.len(), &options)
        },
        initial,
    )?;
    if let (_, Some(saved)) = checkpoints::saved_to_resume(&options, &strategy)? {
        saved.restore_coordinator(&mut common, &mut coordinator)?;
    }
    common.observe(
        options.observer.clone(),
        served.site_keys.iter().map(|k| k.to_string()).collect(),
        coordinator.global().len(),
    );
    common.evaluate_initial(coordinator.global())?;
    let mut books = NetworkBooks::new(common, options.state_dir.clone(), coordinator.round());
    let serve_options = lowband_net::ServeOptions {
        final_parameters: !served.sites_start_synced,
        ..serve_options(config, &strategy, &options, true)
    };
    let served = lowband_net::serve(
        &mut coordinator,
        &mut books,
        served.identity,
        &served.site_keys,
        &served.settings,
        served.listen,
        &serve_options,
        listening,
    );
    // Whatever ended the serving, the checkpoint under way is finished first.
    let written = books.finish_checkpoints(&coordinator);
    served?;
    written?;
    finish_rounds(books.common, &coordinator)
}

/// The network shell's options for this run.
fn serve_options(
    config: &RunConfig,
    strategy: &Strategy,
    options: &NetworkOptions,
    stop_on_ctrl_c: bool,
) -> lowband_net::ServeOptions {
    lowband_net::ServeOptions {
        limits: options.limits.clone(),
        quorum: if options.quorum == 0 {
            config.sites
        } else {
            options.quorum.min(config.sites)
        },
        round_deadline_ms: options.round_deadline_ms,
        join_timeout_ms: options.join_timeout_ms,
        report_steps_max: strategy.inner_steps as usize,
        stop_on_ctrl_c,
        final_parameters: false,
        abort: options.abort.clone(),
    }
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
        return Err(RunError::InvalidConfig {
            field: "site",
            reason: format!("site {site} of a {}-site run", config.sites),
        });
    }
    let model = lowband_engine::preset(&config.preset)?.model;
    let initial = lowband_engine::Gpt::new(model, config.seed)?
        .params()
        .to_vec();
    let mut state = crate::driver::strategy_site(config, &strategy, &initial, k)?;
    let site_run = crate::state::SiteRun {
        corpus: split.fingerprint(),
        steps: config.steps,
        rounds: RoundSteps::of(config, &strategy).rounds(),
    };
    if let Some(dir) = &options.state_dir {
        if options.resume && strategy.scheduled() {
            tracing::info!(
                "site {site}: keeps its saves; the coordinator cues which to resume from"
            );
        } else if options.resume {
            match crate::state::restore_site(dir, &mut state, &site_run)? {
                Some(round) => tracing::info!("site {site}: resuming from its saved state after round {round} (optimizer, data position, error feedback)"),
                None => tracing::info!("site {site}: no saved state to resume: starting fresh"),
            }
        } else {
            // Only lowband's own state files go; the directory and anything else in it stay.
            crate::state::forget_saved_state(dir)?;
        }
    }
    let client = lowband_net::ClientOptions {
        identity,
        coordinator,
        limits: options.limits,
        reconnect_ms: options.reconnect_ms,
        join: join::join_settings(config, &strategy, Some(site_run.corpus)).encode(site),
        leave_on_ctrl_c: true,
    };
    let job = SiteJob::of(config, &strategy, split, k, client, options.state_dir)?;
    any_site_task(state, job, connected)
}

fn any_site_task(site: SiteRuntime, job: SiteJob, connected: impl FnMut()) -> Result<(), RunError> {
    if job.scheduled {
        scheduled::scheduled_site_task(site, job, connected)
    } else if job.streaming.is_some() {
        streaming_site_task(site, job, connected)
    } else {
        site_task(site, job, connected)
    }
}

fn coordinator_config(
    config: &RunConfig,
    strategy: &Strategy,
    params: usize,
    options: &NetworkOptions,
) -> CoordinatorConfig {
    let quorum = if options.quorum == 0 {
        config.sites
    } else {
        options.quorum.min(config.sites)
    };
    crate::driver::coordinator_config(config, strategy, params, quorum, options.round_deadline_ms)
}

/// What a site task needs besides its state.
struct SiteJob {
    /// How it reaches the coordinator (key, address, join request, reconnect budget, Ctrl-C).
    client: lowband_net::ClientOptions,
    shard: Arc<Vec<u8>>,
    batch: BatchShape,
    schedule: lowband_engine::LrSchedule,
    steps: u64,
    inner_steps: u64,
    params: usize,
    uplink: CodecSpec,
    /// Where the site saves its own state after every update it sends (scheduled: when cued).
    state_dir: Option<std::path::PathBuf>,
    /// Streaming DiLoCo's fragments, delay and mix (None: whole-model rounds).
    streaming: Option<crate::strategy::Streaming>,
    rounds: RoundSteps,
    /// What the site's saved state must agree with.
    run: crate::state::SiteRun,
    /// A scheduled run (the coordinator cues every step), and an asynchronous one.
    scheduled: bool,
    asynchronous: bool,
}

impl SiteJob {
    /// Site k's job in a run: its shard, batches, schedule, rounds and codec; how it reaches
    /// the coordinator (`client`) and where it saves its state.
    fn of(
        config: &RunConfig,
        strategy: &Strategy,
        split: &Split,
        k: usize,
        client: lowband_net::ClientOptions,
        state_dir: Option<std::path::PathBuf>,
    ) -> Result<SiteJob, RunError> {
        let model = lowband_engine::preset(&config.preset)?.model;
        let rounds = RoundSteps::of(config, strategy);
        Ok(SiteJob {
            client,
            shard: Arc::new(split.shards[k].clone()),
            batch: BatchShape {
                site_batch: config.site_batch,
                context: model.context_length,
            },
            schedule: lowband_engine::LrSchedule::reference(config.optimizer.lr, config.steps),
            steps: config.steps,
            inner_steps: strategy.inner_steps,
            params: model.parameter_count(),
            uplink: strategy.compression_for(config.sites).uplink,
            state_dir,
            streaming: strategy.streaming,
            rounds,
            run: crate::state::SiteRun {
                corpus: split.fingerprint(),
                steps: config.steps,
                rounds: rounds.rounds(),
            },
            scheduled: strategy.scheduled(),
            asynchronous: strategy.asynchronous.is_some(),
        })
    }
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

fn run_loopback(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    options: NetworkOptions,
) -> Result<RunResult, RunError> {
    let limits = options.limits.clone();
    let mut common = Common::new(config, strategy.clone(), split)?;
    let settings = join::join_settings(config, &strategy, Some(common.corpus));
    let initial = common.initial_params()?;
    let mut coordinator = Coordinator::new(
        coordinator_config(config, &strategy, initial.len(), &options),
        initial.clone(),
    )?;
    let mut sites: Vec<Option<SiteRuntime>> = (0..config.sites)
        .map(|k| crate::driver::strategy_site(config, &strategy, &initial, k).map(Some))
        .collect::<Result<_, _>>()?;

    // Keys: the coordinator's, and one per site on its allow-list.
    let coordinator_identity = Arc::new(Identity::generate()?);
    let site_identities: Vec<Arc<Identity>> = (0..config.sites)
        .map(|_| Identity::generate().map(Arc::new))
        .collect::<Result<_, _>>()?;
    let site_keys: Vec<PublicKey> = site_identities.iter().map(|i| i.public_key()).collect();
    common.observe(
        options.observer.clone(),
        site_keys.iter().map(|k| k.to_string()).collect(),
        initial.len(),
    );
    common.evaluate_initial(&initial)?;
    let mut books = NetworkBooks::new(common, None, coordinator.round());
    let mut site_threads = Vec::new();
    // Once the coordinator listens: a thread per site (it trains while its client's own runtime
    // serves the connection).
    let start_sites = |address: SocketAddr| -> Result<(), RunError> {
        for (k, site) in sites.iter_mut().enumerate() {
            let coordinator = (address, coordinator_identity.public_key());
            let client = loopback_client(&site_identities[k], coordinator, &limits, &settings, k);
            let job = SiteJob::of(config, &strategy, split, k, client, None)?;
            let site = site.take().expect("each site starts once");
            site_threads.push(std::thread::spawn(move || any_site_task(site, job, || {})));
        }
        Ok(())
    };
    let served = lowband_net::serve(
        &mut coordinator,
        &mut books,
        coordinator_identity.clone(),
        &site_keys,
        &settings,
        "127.0.0.1:0".parse().expect("loopback"),
        &serve_options(config, &strategy, &options, false),
        start_sites,
    );
    // (The sites end with the coordinator's connection: joined before its error is reported.)
    let site_error = join_site_threads(site_threads);
    served?;
    if let Some(e) = site_error {
        return Err(e);
    }
    finish_rounds(books.common, &coordinator)
}

/// Site k's connection in a loopback run (no reconnects, no Ctrl-C of its own).
fn loopback_client(
    identity: &Arc<Identity>,
    coordinator: (SocketAddr, PublicKey),
    limits: &Limits,
    settings: &lowband_protocol::wire::JoinRequest,
    k: usize,
) -> lowband_net::ClientOptions {
    lowband_net::ClientOptions {
        identity: identity.clone(),
        coordinator,
        limits: limits.clone(),
        reconnect_ms: 0,
        join: settings.encode(k as u32),
        leave_on_ctrl_c: false,
    }
}

/// Wait for a loopback run's site threads; the first error of any.
fn join_site_threads(
    threads: Vec<std::thread::JoinHandle<Result<(), RunError>>>,
) -> Option<RunError> {
    let mut site_error = None;
    for thread in threads {
        let outcome = thread
            .join()
            .unwrap_or_else(|_| Err(RunError::Protocol("a site thread panicked".into())));
        if let Err(e) = outcome {
            site_error = site_error.or(Some(e));
        }
    }
    site_error
}
