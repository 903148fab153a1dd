//! Round strategies in memory: every packet through `Coordinator` and `Site`; a round is every
//! site training H steps from the broadcast, then every update to the coordinator in site order.

use super::*;

pub(super) fn run_rounds(
    mut common: Common,
    initial: Vec<f32>,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    let (config, strategy) = (common.config, common.strategy.clone());
    let n = initial.len();
    let coordinator_config = coordinator_config(config, &strategy, n, config.sites, 600_000);
    let mut coordinator = Coordinator::new(coordinator_config, initial.clone())?;
    let mut sites = new_sites(config, &strategy, &initial)?;
    let mut step = 0u64;
    if let Some(saved) = state::load(persistence, &strategy)? {
        step = saved.step;
        saved.restore_rounds(&mut common, &mut coordinator, &mut sites)?;
    }
    common.evaluate_initial(&initial)?;
    let mut sends = start_in_memory(&mut common, &mut coordinator, step)?;
    let mut losses = vec![0.0f32; strategy.inner_steps.min(config.steps) as usize];
    while step < config.steps {
        let h = strategy.inner_steps.min(config.steps - step);
        if sends.is_empty() {
            return Err(RunError::Protocol("the coordinator opened no round".into()));
        }
        let losses = &mut losses[..h as usize];
        losses.fill(0.0);
        let round = coordinator.round();
        let trained = train_round(
            &mut common,
            &mut sites,
            std::mem::take(&mut sends),
            (round, step),
            losses,
            progress,
        )?;
        common.push_steps(step, losses, trained.updates.len());
        step += h;
        common.compute_seconds += trained.slowest_seconds;
        common.add_sync(trained.sync, 0, step);
        sends = merge_round(&mut common, &mut coordinator, trained.updates, round, step)?;
        for (site, seconds) in trained.computed {
            common.credit(round, site, seconds);
        }
        after_round(
            persistence,
            coordinator.round(),
            step,
            || {
                RunState::of_rounds(&common, step, &coordinator, &sites)
                    .save(persistence, &strategy)
            },
            checkpoint_due(
                config.checkpoint_every_rounds,
                coordinator.round(),
                step >= config.steps,
            ),
        )?;
    }
    finish_rounds(common, &coordinator)
}

/// What a round's training produced.
struct Trained {
    updates: Vec<(u32, Vec<u8>)>,
    sync: SyncBytes,
    slowest_seconds: f64,
    /// Each site's compute on the emulated clock (credited once the round's refusals are known).
    computed: Vec<(u32, f64)>,
}

/// Every site that was sent a packet trains the round's steps from it and makes its update.
fn train_round(
    common: &mut Common,
    sites: &mut [SiteRuntime],
    sends: Sends,
    (round, step): (u64, u64),
    losses: &mut [f32],
    progress: &mut dyn FnMut(Progress),
) -> Result<Trained, RunError> {
    let config = common.config;
    let h = losses.len() as u64;
    let tokens_total = config.steps * common.tokens_per_site_step() * config.sites as u64;
    let uplink = common.strategy.compression_for(config.sites).uplink;
    let mut trained = Trained {
        updates: Vec::with_capacity(sends.len()),
        sync: SyncBytes::default(),
        slowest_seconds: 0.0,
        computed: Vec::new(),
    };
    for (to, bytes) in sends {
        common.record_bytes(
            round,
            Endpoint::Coordinator,
            Endpoint::Site(to),
            bytes.len() as u64,
        );
        trained.sync.down = trained.sync.down.max(bytes.len() as u64);
        if to == 0 {
            common.keep_sample("global", bytes.clone());
        }
        let site = &mut sites[to as usize];
        expect_train(site.site.handle(SiteEvent::PacketArrived(&bytes))?, round)?;
        site.trainer
            .params_mut()
            .copy_from_slice(site.site.round_start());
        let seconds = common.train_site(site, to as usize, step, losses)?;
        trained.slowest_seconds = trained.slowest_seconds.max(seconds);
        trained.computed.push((to, seconds));
        let params = site.trainer.params().len();
        let update = site.update(round, 0..params, &uplink)?;
        trained.sync.up = trained.sync.up.max(update.len() as u64);
        if to == 0 {
            common.keep_sample("update", bytes::Bytes::copy_from_slice(&update));
        }
        trained.updates.push((to, update));
        let done = trained.updates.len() as u64;
        progress(Progress {
            tokens: step * common.tokens_per_site_step() * config.sites as u64
                + h * common.tokens_per_site_step() * done,
            tokens_total,
            loss: losses[h as usize - 1] / done as f32,
        });
    }
    Ok(trained)
}

/// Every update to the coordinator, in site order; returns the next round's sends.
fn merge_round(
    common: &mut Common,
    coordinator: &mut Coordinator,
    updates: Vec<(u32, Vec<u8>)>,
    round: u64,
    step: u64,
) -> Result<Sends, RunError> {
    let now_ms = (common.emulated_seconds() * 1e3) as u64;
    let mut sends = Sends::new();
    for (from, bytes) in updates {
        common.record_bytes(
            round,
            Endpoint::Site(from),
            Endpoint::Coordinator,
            bytes.len() as u64,
        );
        let actions = coordinator.handle(
            now_ms,
            Event::PacketArrived {
                from,
                bytes: &bytes,
            },
        );
        sends.extend(absorb(actions, common, coordinator, step)?);
    }
    Ok(sends)
}

/// The result of a round strategy: the coordinator's θ is the global model.
pub(crate) fn finish_rounds(
    mut common: Common,
    coordinator: &Coordinator,
) -> Result<RunResult, RunError> {
    let aggregator = common
        .strategy
        .robustness(common.config.aggregator)
        .aggregator
        .to_string();
    let (peak_sync_bytes, telemetry_bytes) = (common.peak_sync_bytes, common.telemetry_bytes);
    let sample_packets = std::mem::take(&mut common.sample_packets);
    let mut result = common.finish(coordinator.round(), coordinator.global().to_vec())?;
    result.telemetry_bytes = telemetry_bytes;
    result.sample_packets = sample_packets;
    result.peak_sync_bytes_per_site = peak_sync_bytes;
    result.site_scores = coordinator
        .scores()
        .iter()
        .map(|(k, s)| (*k, s.clone()))
        .collect();
    result.aggregator = aggregator;
    Ok(result)
}
