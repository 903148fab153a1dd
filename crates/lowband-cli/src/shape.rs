//! `lowband shape`: a user-space WAN between nodes on one machine (lowband-net's `Shaper`).

use std::path::PathBuf;

use anyhow::Result;
use lowband_engine::checkpoint::write_atomic;
use lowband_net::LinkShape;

#[derive(clap::Args, Debug)]
pub struct ShapeArgs {
    /// Where clients send (e.g. the address sites `--join`).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// The server behind the link (e.g. the coordinator's address).
    #[arg(long)]
    to: std::net::SocketAddr,
    /// Bandwidth each way (default: unlimited).
    #[arg(long)]
    bandwidth_mbit: Option<f64>,
    /// One-way latency each way.
    #[arg(long, default_value_t = 0.0)]
    latency_ms: f64,
    /// Uniform jitter in ±ms around the latency (at most the latency).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Probability that a datagram is lost, each way.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Longest a datagram queues for the bandwidth before it is dropped.
    #[arg(long, default_value_t = 1000.0)]
    queue_ms: f64,
    /// Seed of the loss and jitter draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the bound address here once listening.
    #[arg(long)]
    address_file: Option<PathBuf>,
}

pub fn run(args: &ShapeArgs) -> Result<()> {
    let shape = LinkShape {
        bandwidth_bit_per_second: args.bandwidth_mbit.map(|m| m * 1e6),
        latency_ms: args.latency_ms,
        jitter_ms: args.jitter_ms,
        loss: args.loss,
        queue_ms: args.queue_ms,
        seed: args.seed,
    };
    shape.validate()?;
    let mut first = true;
    let relayed = lowband_net::shaper::run_blocking(
        args.listen,
        args.to,
        shape,
        std::time::Duration::from_secs(10),
        |address, counts| {
            use std::io::Write;
            use std::sync::atomic::Ordering::Relaxed;
            if first {
                first = false;
                println!(
                    "shaping {address} -> {}: {}, {} ms ± {} ms one way, {}% loss each way",
                    args.to,
                    args.bandwidth_mbit
                        .map_or("unlimited".into(), |m| format!("{m} Mbit/s")),
                    args.latency_ms,
                    args.jitter_ms,
                    args.loss * 100.0
                );
                if let Some(path) = &args.address_file {
                    if let Err(e) = write_atomic(path, address.to_string().as_bytes()) {
                        eprintln!("error: {e}");
                        std::process::exit(2);
                    }
                }
            } else {
                println!(
                    "delivered {} datagrams, lost {}, dropped at the queue {}",
                    counts.delivered.load(Relaxed),
                    counts.lost.load(Relaxed),
                    counts.queue_dropped.load(Relaxed)
                );
            }
            let _ = std::io::stdout().flush();
        },
    );
    relayed.map_err(|e| crate::failure::ran(e.into()))
}
