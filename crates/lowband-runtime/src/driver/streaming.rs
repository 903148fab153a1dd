//! Streaming DiLoCo in memory: fragments in turn, merges mixed in `overlap_steps` later.

use super::*;

/// Streaming DiLoCo: fragment r mod P syncs at step ⌊(r + 1)·H/P⌋; sites keep training and mix the
/// merge in `overlap_steps` later. Every packet still goes through the protocol code; the link time
/// of a sync is hidden up to `overlap_steps` of the sites' compute.
pub(super) fn run_streaming(
    mut common: Common,
    initial: Vec<f32>,
    persistence: &Persistence,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunResult, RunError> {
    let (config, strategy) = (common.config, common.strategy.clone());
    let streaming = strategy
        .streaming
        .expect("run_streaming needs streaming settings");
    let (mut coordinator, mut sites, (first_step, due_step)) =
        start(&mut common, &initial, persistence)?;
    let mut in_flight: Option<(u64, Sends)> = Some((
        due_step,
        start_in_memory(&mut common, &mut coordinator, first_step)?,
    ));
    let tokens_total = config.steps * common.tokens_per_site_step() * config.sites as u64;
    let mut losses = [0.0f32];
    // Each site's compute since its last sync, credited once that sync's refusals are known.
    let mut pending = vec![0.0f64; config.sites];
    let p = streaming.fragments as u64;
    for step in first_step..config.steps {
        // A merge due now arrives before this step's training.
        if in_flight.as_ref().is_some_and(|(due, _)| *due <= step) {
            let (_, sends) = in_flight.take().expect("checked");
            deliver(&mut common, &mut sites, sends, streaming.mix, true)?;
        }
        let members = train_step(
            &mut common,
            &mut sites,
            &coordinator,
            step,
            &mut losses,
            &mut pending,
        )?;
        progress(Progress {
            tokens: (step + 1) * common.tokens_per_site_step() * config.sites as u64,
            tokens_total,
            loss: losses[0] / members.max(1) as f32,
        });
        let round = coordinator.round();
        let sync_step = ((round + 1) * strategy.inner_steps / p).max(round + 1);
        if step + 1 != sync_step || step + 1 >= config.steps {
            continue;
        }
        // Fragment `round` syncs: every site's update, then the coordinator's merge goes out.
        if let Some((_, sends)) = in_flight.take() {
            deliver(&mut common, &mut sites, sends, streaming.mix, true)?;
        }
        let (sends, sync) = sync_fragment(&mut common, &mut coordinator, &mut sites, step + 1)?;
        credit_pending(&mut common, round, &mut pending);
        // The sites compute on while the sync travels: `overlap_steps` of their step time hides it.
        common.add_sync(sync, streaming.overlap_steps, step + 1);
        in_flight = Some((step + 1 + streaming.overlap_steps, sends));
        after_round(
            persistence,
            coordinator.round(),
            step + 1,
            || {
                let due = step + 1 + streaming.overlap_steps;
                RunState::of_streaming(&common, step + 1, &coordinator, &sites, due)
                    .save(persistence, &strategy)
            },
            checkpoint_due(config.checkpoint_every_rounds, coordinator.round(), false),
        )?;
    }
    if let Some((_, sends)) = in_flight.take() {
        deliver(&mut common, &mut sites, sends, streaming.mix, true)?;
    }
    let round = coordinator.round();
    final_syncs(&mut common, &mut coordinator, &mut sites, p)?;
    credit_pending(&mut common, round, &mut pending);
    // The global model: the coordinator's θ (every fragment as last merged).
    finish_rounds(common, &coordinator)
}

/// The coordinator, the sites, and (first step, step the merge in flight is due).
type Started = (Coordinator, Vec<SiteRuntime>, (u64, u64));

/// The coordinator and the sites from `initial`, or from the saved state: and the step to
/// start at with the step the merge in flight is due. (A saved state is taken right after a
/// sync, with its merge in flight: the restored coordinator sends that merge again, and it
/// arrives at the step it was due.)
fn start(
    common: &mut Common,
    initial: &[f32],
    persistence: &Persistence,
) -> Result<Started, RunError> {
    let (config, strategy) = (common.config, common.strategy.clone());
    let coordinator_config =
        coordinator_config(config, &strategy, initial.len(), config.sites, 600_000);
    let mut coordinator = Coordinator::new(coordinator_config, initial.to_vec())?;
    let mut sites: Vec<SiteRuntime> = (0..config.sites)
        .map(|k| strategy_site(config, &strategy, initial, k))
        .collect::<Result<_, _>>()?;
    let (mut first_step, mut due_step) = (0u64, 0u64);
    if let Some(saved) = state::load(persistence, &strategy)? {
        first_step = saved.step;
        due_step = saved.restore_streaming(common, &mut coordinator, &mut sites)?;
    }
    common.evaluate_initial(initial)?;
    Ok((coordinator, sites, (first_step, due_step)))
}

/// Credit each site's compute since its last sync to `round` (the sync it went into).
fn credit_pending(common: &mut Common, round: u64, pending: &mut [f64]) {
    for (k, seconds) in pending.iter_mut().enumerate() {
        common.credit(round, k as u32, std::mem::take(seconds));
    }
}

/// One step of every member (an excluded site is out of the run), its loss summed into
/// `losses[0]`; the slowest site's time is the step's compute time. Returns the members.
fn train_step(
    common: &mut Common,
    sites: &mut [SiteRuntime],
    coordinator: &Coordinator,
    step: u64,
    losses: &mut [f32; 1],
    pending: &mut [f64],
) -> Result<usize, RunError> {
    losses[0] = 0.0;
    let mut slowest = 0.0f64;
    let members = coordinator.members();
    for (k, site) in sites
        .iter_mut()
        .enumerate()
        .filter(|(k, _)| members.contains(&(*k as u32)))
    {
        let seconds = common.train_site(site, k, step, losses)?;
        pending[k] += seconds;
        slowest = slowest.max(seconds);
    }
    common.compute_seconds += slowest;
    common.push_steps(step, losses, members.len());
    Ok(members.len())
}

/// The end: every fragment syncs once more, back to back and without overlap, so that no site's
/// last steps are left out of the global model (DiLoCo's last round does the same). These merges
/// only update the coordinator's model: no site trains after them, so, as after DiLoCo's last
/// round, their broadcasts are not counted (the sites still read them, to move to the next round
/// of the protocol).
fn final_syncs(
    common: &mut Common,
    coordinator: &mut Coordinator,
    sites: &mut [SiteRuntime],
    fragments: u64,
) -> Result<(), RunError> {
    let steps = common.config.steps;
    for _ in 0..fragments {
        let (sends, sync) = sync_fragment(common, coordinator, sites, steps)?;
        common.add_sync(SyncBytes { down: 0, ..sync }, 0, steps);
        deliver(common, sites, sends, 0.0, false)?;
    }
    Ok(())
}

/// One fragment sync: every site's update through the coordinator; returns the coordinator's
/// broadcast (not yet delivered) and the largest update and broadcast message, in bytes.
fn sync_fragment(
    common: &mut Common,
    coordinator: &mut Coordinator,
    sites: &mut [SiteRuntime],
    step: u64,
) -> Result<(Sends, SyncBytes), RunError> {
    let round = coordinator.round();
    let now_ms = (common.emulated_seconds() * 1e3) as u64;
    let (mut sends, mut up_bytes) = (Vec::new(), 0u64);
    let range = coordinator.fragment(round);
    let uplink = coordinator.uplink();
    let members = coordinator.members().clone();
    for (k, site) in sites
        .iter_mut()
        .enumerate()
        .filter(|(k, _)| members.contains(&(*k as u32)))
    {
        let update = site.update(round, range.clone(), &uplink)?;
        up_bytes = up_bytes.max(update.len() as u64);
        common.record_bytes(
            round,
            Endpoint::Site(k as u32),
            Endpoint::Coordinator,
            update.len() as u64,
        );
        sends.extend(absorb(
            coordinator.handle(
                now_ms,
                Event::PacketArrived {
                    from: k as u32,
                    bytes: &update,
                },
            ),
            common,
            coordinator,
            step,
        )?);
        if k == 0 {
            common.keep_sample("update", update.into());
        }
    }
    let down_bytes = sends.iter().map(|(_, b)| b.len() as u64).max().unwrap_or(0);
    Ok((
        sends,
        SyncBytes {
            down: down_bytes,
            up: up_bytes,
        },
    ))
}

/// Streaming: hand a site the coordinator's broadcast and mix the fragment it changed into the
/// site's training parameters (`mix` of its own, the rest the merged value). Returns the round
/// the broadcast opens.
pub(crate) fn mix_in(site: &mut SiteRuntime, bytes: &[u8], mix: f32) -> Result<u64, RunError> {
    let actions = site.site.handle(SiteEvent::PacketArrived(bytes))?;
    let round = match actions.as_slice() {
        [SiteAction::Train { round }] => *round,
        other => {
            return Err(RunError::Protocol(format!(
                "site answered a global message with {other:?}"
            )))
        }
    };
    let SiteRuntime { site, trainer, .. } = site;
    site.mix_changed(round, trainer.params_mut(), mix)?;
    Ok(round)
}

/// Deliver a broadcast to the sites and mix the fragment it changed into their parameters.
/// With `counted` false the broadcast is not counted in the ledger (the end-of-run syncs).
fn deliver(
    common: &mut Common,
    sites: &mut [SiteRuntime],
    sends: Sends,
    mix: f32,
    counted: bool,
) -> Result<(), RunError> {
    for (to, bytes) in sends {
        let site = sites
            .get_mut(to as usize)
            .ok_or_else(|| RunError::Protocol(format!("a packet for unknown site {to}")))?;
        if counted {
            // Counted under the round the broadcast opens (its envelope says which).
            let round = lowband_protocol::wire::decode(&bytes, bytes.len())
                .map(|m| m.round)
                .map_err(|e| {
                    RunError::Protocol(format!("the coordinator sent a malformed broadcast: {e}"))
                })?;
            common.record_bytes(
                round,
                Endpoint::Coordinator,
                Endpoint::Site(to),
                bytes.len() as u64,
            );
        }
        mix_in(site, &bytes, mix)?;
        if counted && to == 0 {
            common.keep_sample("global", bytes);
        }
    }
    Ok(())
}
