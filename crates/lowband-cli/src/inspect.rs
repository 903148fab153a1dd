//! `lowband inspect packet FILE`: what a packet says about itself, checked.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lowband_codec::{decode_any, describe};
use lowband_protocol::wire;

#[derive(clap::Args, Debug)]
pub struct PacketArgs {
    /// The packet file.
    pub file: PathBuf,
}

/// Largest packet file we read: the envelope's own limit.
const PACKET_BYTES_MAX: u64 = 1 << 32;
/// Largest value count we decode (1 GiB of f32): a header may claim up to 2^32.
const VALUES_MAX: usize = 1 << 28;

pub fn packet(args: &PacketArgs) -> Result<()> {
    let bytes = lowband_engine::checkpoint::read_limited(&args.file, PACKET_BYTES_MAX)?;
    println!("file: {} ({} bytes)", args.file.display(), bytes.len());
    let Some(payload) = envelope(&bytes)? else {
        return Ok(());
    };
    if payload.is_empty() {
        println!("payload: empty (a global delta with no change)");
        return Ok(());
    }
    let info = describe(payload).context("payload header")?;
    println!(
        "codec: {} (layout version {})",
        info.spec,
        lowband_codec::PAYLOAD_VERSION
    );
    println!("values: {}", info.count);
    println!(
        "payload: {} bytes; formula {} bytes; {:.4} bits per parameter",
        payload.len(),
        info.payload_bytes,
        info.bits_per_param
    );
    if let Some(bits) = info.spec.sparse_bits(info.count) {
        println!(
            "kept: {} entries, {:.2} bits per kept entry (positions {:.2}, value {:.2}, chunk scales {:.2}, header and padding {:.2})",
            bits.kept,
            bits.per_kept_entry(),
            bits.position_bits as f64 / bits.kept.max(1) as f64,
            bits.value_bits as f64 / bits.kept.max(1) as f64,
            bits.scale_bits as f64 / bits.kept.max(1) as f64,
            (bits.header_bits + bits.padding_bits) as f64 / bits.kept.max(1) as f64
        );
    }
    if payload.len() != info.payload_bytes {
        bail!(
            "payload is {} bytes, its header implies {}",
            payload.len(),
            info.payload_bytes
        );
    }
    if info.count > VALUES_MAX {
        bail!(
            "the payload claims {} values; inspect decodes at most {VALUES_MAX}",
            info.count
        );
    }
    value_statistics(payload, info.count)
}

/// The envelope's fields, if the file has one; the codec payload inside (None: a training
/// report, printed whole).
fn envelope(bytes: &[u8]) -> Result<Option<&[u8]>> {
    if bytes.starts_with(&wire::MAGIC) {
        let message = wire::decode(bytes, u32::MAX as usize).context("envelope")?;
        println!(
            "envelope: version {}, kind {:?}, round {}, site {}, payload {} bytes, checksum ok",
            wire::WIRE_VERSION,
            message.kind,
            message.round,
            message.site,
            message.payload.len()
        );
        if message.kind == wire::MessageKind::Report {
            let report = wire::TrainingReport::decode(message.payload, u32::MAX as usize)
                .context("training report")?;
            let mean = report.losses.iter().map(|l| *l as f64).sum::<f64>()
                / report.losses.len().max(1) as f64;
            println!(
                "training report: {:.3} s, {} steps, mean loss {mean:.4}",
                report.seconds,
                report.losses.len()
            );
            return Ok(None);
        }
        Ok(Some(message.payload))
    } else {
        println!("envelope: none (a bare codec payload)");
        Ok(Some(bytes))
    }
}

/// Decode the payload and print what its values look like.
fn value_statistics(payload: &[u8], count: usize) -> Result<()> {
    let mut values = vec![0.0f32; count];
    decode_any(payload, &mut values).context("decoding the payload")?;
    let nonzero = values.iter().filter(|v| **v != 0.0).count();
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let l2 = values
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let mean_abs = values.iter().map(|v| v.abs() as f64).sum::<f64>() / values.len().max(1) as f64;
    println!("decoded: {nonzero} non-zero ({:.3}%), min {min:.4e}, max {max:.4e}, L2 norm {l2:.4e}, mean |v| {mean_abs:.4e}", 100.0 * nonzero as f64 / values.len().max(1) as f64);
    Ok(())
}
