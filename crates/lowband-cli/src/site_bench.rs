//! `lowband bench site`: lowband's own time per round on a site (issue 22's overhead check):
//! encoding the site's update (δ = θ_start − θ_trained through the uplink codec and its error
//! feedback, in the envelope, signed) and decoding the coordinator's broadcast into θ (its
//! signature checked; the fp32 parameters, or the compressed downlink's change added to them),
//! for a flat buffer of N parameters, as a PyTorch site's Rust core does it; the transfer each
//! way at the loopback QUIC throughput measured in the same run; and the copies between the
//! model and the flat buffer (none for a CPU float32 model synced in place; one memcpy each way
//! otherwise, measured). The coordinator is not in the timing (it runs elsewhere); its broadcast
//! is made each round, untimed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lowband_codec::{build, Codec, Fp32};
use lowband_net::Identity;
use lowband_protocol::wire::{self, MessageKind};
use lowband_protocol::{Site, SiteAction, SiteEvent};

#[derive(clap::Args, Debug)]
pub struct SiteBenchArgs {
    /// Parameters in the flat buffer, comma-separated.
    #[arg(long, default_value = "100000000", value_delimiter = ',')]
    params: Vec<usize>,
    /// Strategies as compare takes them (their codecs), comma-separated.
    #[arg(long, default_value = "diloco,sparseloco", value_parser = crate::compare::parse_strategy_list)]
    strategies: crate::compare::StrategyList,
    /// Sites in the run (the sparse presets' downlink follows K).
    #[arg(long, default_value_t = 4)]
    sites: usize,
    /// Timed rounds per cell (after one untimed round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// One cell's medians, in seconds, and its message sizes.
struct Cell {
    encode: f64,
    decode: f64,
    up_bytes: usize,
    down_bytes: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A deterministic, cheap stand-in for training: θ + a small wave (not timed).
fn train(start: &[f32], trained: &mut [f32], round: usize) {
    let phase = round as f32 * 0.37;
    for (i, (t, s)) in trained.iter_mut().zip(start).enumerate() {
        *t = s + 1e-3 * ((i as f32) * 1e-3 + phase).sin();
    }
}

fn cell(
    params: usize,
    strategy: &lowband_runtime::Strategy,
    sites: usize,
    rounds: usize,
) -> Result<Cell> {
    let compression = strategy.compression_for(sites);
    let mut site = Site::unsynced(0, params, compression)?;
    let mut trained: Vec<f32> = (0..params)
        .map(|i| 0.02 * ((i as f32) * 1e-3).sin())
        .collect();
    // The initial parameters in full, as a PyTorch site gets them (untimed).
    let mut payload = Vec::new();
    Fp32.encode(&trained, &mut payload);
    site.handle(SiteEvent::PacketArrived(&wire::encode(
        MessageKind::Global,
        0,
        wire::EVERY_SITE,
        &payload,
    )))?;
    drop(payload);
    // The coordinator's broadcast of each round (untimed, made the way the coordinator makes
    // it: written into its envelope): the change in the downlink codec, or θ in fp32 (then
    // decoding it is reading it in full).
    let compressed = compression.sends_changes();
    let mut downlink = build(&compression.downlink)?;
    let (mut encode, mut decode) = (Vec::new(), Vec::new());
    let mut up_bytes = 0;
    let mut down_bytes = 0;
    // The site signs its update, and checks the coordinator's signature on the broadcast.
    let site_identity = Identity::generate().context("a site key")?;
    let coordinator_identity = Identity::generate().context("a coordinator key")?;
    for round in 0..=rounds {
        train(site.round_start(), &mut trained, round);
        let t0 = Instant::now();
        let actions = site.handle(SiteEvent::TrainingDone {
            round: round as u64,
            params: &trained,
        })?;
        let Ok([SiteAction::Send(mut update)]) = <[SiteAction; 1]>::try_from(actions) else {
            bail!("the site did not answer its training with one update");
        };
        lowband_net::seal_in_place(&site_identity, &mut update);
        let t1 = Instant::now();
        up_bytes = update.len();
        drop(update);
        let mut message = broadcast(&site, downlink.as_mut(), compressed, &mut trained, round);
        lowband_net::seal_in_place(&coordinator_identity, &mut message);
        down_bytes = message.len();
        let t2 = Instant::now();
        let packet = lowband_net::open(coordinator_identity.public_key(), &message)?;
        site.handle(SiteEvent::PacketArrived(packet))?;
        let t3 = Instant::now();
        if round > 0 {
            encode.push((t1 - t0).as_secs_f64());
            decode.push((t3 - t2).as_secs_f64());
        }
    }
    Ok(Cell {
        encode: median(encode),
        decode: median(decode),
        up_bytes,
        down_bytes,
    })
}

/// The coordinator's broadcast opening the round after `round` (untimed, made the way the
/// coordinator makes it: written into its envelope): a change in the downlink codec (a made-up
/// one, in `scratch`), or θ in fp32 (then decoding it is reading it in full).
fn broadcast(
    site: &Site,
    downlink: &mut dyn Codec,
    compressed: bool,
    scratch: &mut [f32],
    round: usize,
) -> Vec<u8> {
    let (next, params) = (round as u64 + 1, scratch.len());
    if compressed {
        for (i, v) in scratch.iter_mut().enumerate() {
            *v = 1e-3 * ((i as f32) * 7e-4 + round as f32).cos();
        }
        let capacity = downlink.payload_bytes(params);
        wire::encode_with(
            MessageKind::GlobalDelta,
            next,
            wire::EVERY_SITE,
            capacity,
            |out| downlink.encode(scratch, out),
        )
    } else {
        let capacity = Fp32.payload_bytes(params);
        wire::encode_with(
            MessageKind::Global,
            next,
            wire::EVERY_SITE,
            capacity,
            |out| Fp32.encode(site.round_start(), out),
        )
    }
}

/// Seconds to copy `params` floats once (a model to its flat buffer), median of 3.
fn copy_seconds(params: usize) -> f64 {
    let from = vec![1.0f32; params];
    let mut to = vec![0.0f32; params];
    median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                to.copy_from_slice(&from);
                std::hint::black_box(&to);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

pub fn run(args: &SiteBenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    // Loopback QUIC: 4 messages of 256 MiB over one connection.
    let message_bytes = 256 << 20;
    let took: Duration = lowband_net::throughput::loopback_transfer(message_bytes, 4)
        .context("measuring loopback QUIC")?;
    let bytes_per_second = (4 * message_bytes) as f64 / took.as_secs_f64();
    println!(
        "lowband bench site: {threads} threads; loopback QUIC, one connection: {:.2} Gbit/s (4 x 256 MiB in {:.2} s)\n",
        bytes_per_second * 8.0 / 1e9,
        took.as_secs_f64()
    );
    println!("| params | strategy | encode s | decode s | up bytes | down bytes | transfer s (loopback) | copies s (GPU / bf16 path) | site total s (CPU fp32, in place) | site total s (with copies) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &params in &args.params {
        let copy = copy_seconds(params);
        for name in &args.strategies.0 {
            let strategy = lowband_runtime::Strategy::parse(name.trim(), 50)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let c = cell(params, &strategy, args.sites, args.rounds.max(1))?;
            let transfer = (c.up_bytes + c.down_bytes) as f64 / bytes_per_second;
            let total = c.encode + c.decode + transfer;
            println!(
                "| {params} | {} | {:.3} | {:.3} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                strategy.name(),
                c.encode,
                c.decode,
                c.up_bytes,
                c.down_bytes,
                transfer,
                2.0 * copy,
                total,
                total + 2.0 * copy
            );
        }
    }
    Ok(())
}
