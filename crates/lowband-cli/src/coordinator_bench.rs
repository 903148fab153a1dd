//! `lowband bench coordinator`: how the coordinator's time, memory and bytes per round grow with
//! the number of sites K (issue 5: it must not become the bottleneck). The coordinator is the
//! protocol code every driver runs; the sites are the protocol's own `Site`s with the strategy's
//! codecs, whose "training" is a fixed pseudo-random step (not timed), so K = 64 fits on one
//! machine. Only the coordinator's work is timed: decoding, checking and merging K updates, the
//! outer step, and encoding the broadcast.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use lowband_protocol::{
    Action, AggregatorSpec, Coordinator, CoordinatorConfig, Event, Site, SiteAction, SiteEvent,
};
use serde::Serialize;

use crate::alloc_count::{live_bytes, peak_bytes, reset_peak};

#[derive(clap::Args, Debug)]
pub struct CoordinatorBenchArgs {
    /// Site counts to measure (K), comma-separated.
    #[arg(long, default_value = "4,8,16,32,64", value_delimiter = ',')]
    site_counts: Vec<usize>,
    /// Strategies as compare takes them (their codecs and sync interval), comma-separated
    /// (commas inside brackets belong to the strategy).
    #[arg(long, default_value = "diloco,sparseloco", value_parser = crate::compare::parse_strategy_list)]
    strategies: crate::compare::StrategyList,
    /// Aggregators, comma-separated (mean, median, trimmed-mean, centered-clip, clipped-mean).
    #[arg(long, default_value = "mean,median", value_delimiter = ',')]
    aggregators: Vec<String>,
    /// Parameters in the flat buffer (default: the ref preset's).
    #[arg(long, default_value_t = 3_257_856)]
    params: usize,
    /// Timed rounds per cell (after one untimed warm-up round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the cells as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Plot coordinator time per round against K (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Serialize, Clone)]
struct Cell {
    strategy: String,
    aggregator: String,
    sites: usize,
    params: usize,
    /// Coordinator wall time per round (mean of the timed rounds).
    coordinator_ms_per_round: f64,
    bytes_in_per_round: u64,
    bytes_out_per_round: u64,
    /// Heap the coordinator keeps between rounds (measured by dropping it).
    retained_bytes: u64,
    /// Heap above that, at its peak while it handles a round.
    transient_peak_bytes: u64,
}

pub fn run(args: &CoordinatorBenchArgs) -> Result<()> {
    anyhow::ensure!(args.params > 0, "--params: at least 1");
    anyhow::ensure!(args.rounds > 0, "--rounds: at least 1");
    anyhow::ensure!(
        args.site_counts.iter().all(|&k| k > 0),
        "--site-counts: every count at least 1"
    );
    let strategies: Vec<lowband_runtime::Strategy> = args
        .strategies
        .0
        .iter()
        .map(|s| {
            lowband_runtime::Strategy::parse(s.trim(), 50)
                .map_err(|e| anyhow::anyhow!("--strategies: {e}"))
        })
        .collect::<Result<_>>()?;
    let aggregators: Vec<AggregatorSpec> = args
        .aggregators
        .iter()
        .map(|a| a.parse().map_err(|e| anyhow::anyhow!("--aggregators: {e}")))
        .collect::<Result<_>>()?;
    let threads = rayon::current_num_threads();
    println!(
        "coordinator cost per round: {} parameters, {} timed rounds per cell, {threads} threads\n",
        args.params, args.rounds
    );
    println!("| strategy | aggregator | K | coordinator ms/round | ms per site | bytes in/round | bytes out/round | retained MB | transient peak MB | MB per site |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut cells = Vec::new();
    for strategy in &strategies {
        anyhow::ensure!(
            strategy.kind == lowband_runtime::StrategyKind::Rounds && strategy.streaming.is_none(),
            "--strategies: {} is not a round strategy without fragments",
            strategy.name()
        );
        for aggregator in &aggregators {
            for &k in &args.site_counts {
                let cell = measure(strategy, *aggregator, k, args.params, args.rounds)?;
                let mb = |b: u64| b as f64 / 1e6;
                println!(
                    "| {} | {} | {k} | {:.1} | {:.2} | {} | {} | {:.1} | {:.1} | {:.2} |",
                    cell.strategy,
                    cell.aggregator,
                    cell.coordinator_ms_per_round,
                    cell.coordinator_ms_per_round / k as f64,
                    cell.bytes_in_per_round,
                    cell.bytes_out_per_round,
                    mb(cell.retained_bytes),
                    mb(cell.transient_peak_bytes),
                    mb(cell.retained_bytes + cell.transient_peak_bytes) / k as f64
                );
                cells.push(cell);
            }
        }
    }
    print_growth(&cells);
    if let Some(path) = &args.json {
        crate::files::write_json(path, &cells)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        plot_cells(path, &cells, args.params)?;
    }
    Ok(())
}

fn measure(
    strategy: &lowband_runtime::Strategy,
    aggregator: AggregatorSpec,
    k: usize,
    params: usize,
    rounds: usize,
) -> Result<Cell> {
    let (mut sites, mut coordinator, mut sends) = setup(strategy, aggregator, k, params)?;
    let (mut seconds, mut bytes_in, mut bytes_out, mut transient) = (0.0, 0u64, 0u64, 0u64);
    let mut trained = vec![0.0f32; params];
    for round in 0..=rounds {
        let timed = round > 0;
        let out: u64 = sends.iter().map(|(_, b)| b.len() as u64).sum();
        let updates = sites_round(&mut sites, &mut sends, &mut trained)?;
        let inbound: u64 = updates.iter().map(|(_, b)| b.len() as u64).sum();
        // The coordinator's work, timed.
        let live = live_bytes();
        reset_peak();
        let started = Instant::now();
        for (from, bytes) in &updates {
            let actions = coordinator.handle(1, Event::PacketArrived { from: *from, bytes });
            if let Some(Action::Rejected { from, reason }) = actions
                .iter()
                .find(|a| matches!(a, Action::Rejected { .. }))
            {
                anyhow::bail!("site {from}'s update was refused: {reason}");
            }
            collect(actions, &mut sends);
        }
        let took = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            sends.len() == k,
            "round {round} did not close ({} sends)",
            sends.len()
        );
        if timed {
            seconds += took;
            bytes_in += inbound;
            bytes_out += out;
            transient = transient.max(peak_bytes().saturating_sub(live));
        }
        drop(updates);
    }
    // What the coordinator keeps: the heap that goes when it goes.
    let with_coordinator = live_bytes();
    drop(coordinator);
    let retained = with_coordinator.saturating_sub(live_bytes());
    let r = rounds as f64;
    Ok(Cell {
        strategy: strategy.name(),
        aggregator: aggregator.to_string(),
        sites: k,
        params,
        coordinator_ms_per_round: seconds * 1e3 / r,
        bytes_in_per_round: (bytes_in as f64 / r) as u64,
        bytes_out_per_round: (bytes_out as f64 / r) as u64,
        retained_bytes: retained,
        transient_peak_bytes: transient,
    })
}

fn collect(actions: Vec<Action>, sends: &mut Vec<(u32, bytes::Bytes)>) {
    for action in actions {
        if let Action::Send { to, bytes } = action {
            sends.push((to, bytes));
        }
    }
}

/// Growth from the smallest K to the largest, per strategy and aggregator.
fn print_growth(cells: &[Cell]) {
    println!();
    for pair in cells.chunk_by(|a, b| a.strategy == b.strategy && a.aggregator == b.aggregator) {
        let (first, last) = (&pair[0], &pair[pair.len() - 1]);
        if last.sites > first.sites {
            let factor = last.sites as f64 / first.sites as f64;
            let grow = |a: f64, b: f64| (b / a).ln() / factor.ln();
            println!(
                "{} / {}: K {} → {}: time x{:.1} (K^{:.2}), memory x{:.1} (K^{:.2}), bytes in x{:.1}",
                first.strategy,
                first.aggregator,
                first.sites,
                last.sites,
                last.coordinator_ms_per_round / first.coordinator_ms_per_round,
                grow(first.coordinator_ms_per_round, last.coordinator_ms_per_round),
                (last.retained_bytes + last.transient_peak_bytes) as f64 / (first.retained_bytes + first.transient_peak_bytes) as f64,
                grow((first.retained_bytes + first.transient_peak_bytes) as f64, (last.retained_bytes + last.transient_peak_bytes) as f64),
                last.bytes_in_per_round as f64 / first.bytes_in_per_round as f64
            );
        }
    }
}

/// Coordinator time per round against K, one line per strategy and aggregator (SVG).
fn plot_cells(path: &std::path::Path, cells: &[Cell], params: usize) -> Result<()> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for pair in cells.chunk_by(|a, b| a.strategy == b.strategy && a.aggregator == b.aggregator) {
        series.push((
            format!("{} / {}", pair[0].strategy, pair[0].aggregator),
            pair.iter()
                .map(|c| (c.sites as f64, c.coordinator_ms_per_round))
                .collect(),
        ));
    }
    crate::plots::log_log(
        path,
        &format!(
            "coordinator time per round vs sites ({} parameters)",
            params
        ),
        "sites (K)",
        "coordinator ms per round",
        &series,
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The sites' side of a round (not timed): apply the broadcast, take one pseudo-random step
/// (a shared direction plus each site's own noise, like real updates), encode the update.
fn sites_round(
    sites: &mut [Site],
    sends: &mut Vec<(u32, bytes::Bytes)>,
    trained: &mut [f32],
) -> Result<Vec<(u32, Vec<u8>)>> {
    let mut updates = Vec::with_capacity(sites.len());
    for (to, bytes) in sends.drain(..) {
        let site = &mut sites[to as usize];
        let actions = site.handle(SiteEvent::PacketArrived(&bytes))?;
        let [SiteAction::Train { round }] = actions.as_slice() else {
            anyhow::bail!("site {to} did not train")
        };
        let round = *round;
        let mut state = 0x9E37_79B9u64 ^ ((to as u64) << 32) ^ round;
        for (t, p) in trained.iter_mut().zip(site.round_start()) {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *t = p - 1e-3 * (p.signum() + ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5));
        }
        let mut actions = site.handle(SiteEvent::TrainingDone {
            round,
            params: trained,
        })?;
        let Some(SiteAction::Send(update)) = actions.pop() else {
            anyhow::bail!("site {to} sent nothing")
        };
        updates.push((to, update));
    }
    Ok(updates)
}

/// K sites and a coordinator with the strategy's codecs and `aggregator`, joined, the first
/// round open (its sends).
type Sends = Vec<(u32, bytes::Bytes)>;
fn setup(
    strategy: &lowband_runtime::Strategy,
    aggregator: AggregatorSpec,
    k: usize,
    params: usize,
) -> Result<(Vec<Site>, Coordinator, Sends)> {
    let compression = strategy.compression_for(k);
    let outer = strategy
        .outer
        .unwrap_or(lowband_protocol::OuterConfig::DILOCO);
    let config = CoordinatorConfig {
        quorum: k,
        sites_max: k,
        compression,
        sites_start_synced: true,
        robustness: lowband_protocol::Robustness::with(aggregator),
        ..CoordinatorConfig::new(params, outer)
    };
    let initial: Vec<f32> = (0..params)
        .map(|i| ((i as f32) * 0.618).sin() * 0.02)
        .collect();
    let sites: Vec<Site> = (0..k as u32)
        .map(|s| Site::with_initial(s, initial.clone(), compression))
        .collect::<Result<_, _>>()
        .context("sites")?;
    let mut coordinator = Coordinator::new(config, initial.clone()).context("coordinator")?;
    let mut sends = Vec::new();
    for s in 0..k as u32 {
        coordinator.handle(0, Event::SiteJoined { site: s });
    }
    collect(coordinator.start(0), &mut sends);
    Ok((sites, coordinator, sends))
}
