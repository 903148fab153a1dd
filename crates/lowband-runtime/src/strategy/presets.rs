//! The presets' defaults: each name's kind, codecs and outer optimizer (the table in `mod.rs`).

use lowband_codec::{CodecSpec, Range, Rounding, ValueCoding};
use lowband_protocol::{Compression, OuterConfig};

use super::StrategyKind;

pub(super) const PRESETS: &str = "ddp, diloco, fedavg, diloco-int8, diloco-4bit, sparseloco, frugal, demo-dct, streaming, async-diloco";

/// `frugal`'s round length, outer learning rate and inner Muon, picked with `--tuning` on the
/// long benchmark's corpus (docs/results.md, "Compression that costs nothing").
pub(super) const FRUGAL_INNER_STEPS: u64 = 14;
pub(super) const FRUGAL_LR_OUTER: f32 = 4.0;
pub(super) const FRUGAL_MUON: lowband_engine::MuonConfig = lowband_engine::MuonConfig {
    lr: 0.0075,
    momentum: 0.95,
    ns_steps: 5,
};

type Defaults = (StrategyKind, Compression, Option<OuterConfig>);

/// What a preset sets beside its codecs: its own H (None: the run's `inner_steps`) and its
/// sites' optimizer (None: the run's), as `Strategy::inner_muon` holds it.
pub(super) fn preset_inner(
    name: &str,
) -> (Option<u64>, Option<Option<lowband_engine::MuonConfig>>) {
    match name {
        "frugal" => (Some(FRUGAL_INNER_STEPS), Some(Some(FRUGAL_MUON))),
        _ => (None, None),
    }
}

/// A preset's kind, compression and outer optimizer (None: the run's DiLoCo outer step).
pub(super) fn preset_defaults(name: &str) -> Result<Defaults, String> {
    let fedavg = Some(OuterConfig::FEDAVG);
    let both_ways = |codec, feedback_decay| Compression {
        uplink: codec,
        downlink: codec,
        feedback_decay,
    };
    Ok(match name {
        "ddp" => (StrategyKind::Ddp, Compression::default(), None),
        "diloco" | "async-diloco" => (StrategyKind::Rounds, Compression::default(), None),
        "fedavg" => (StrategyKind::Rounds, Compression::default(), fedavg),
        "diloco-int8" => (StrategyKind::Rounds, both_ways(int(8), None), None),
        "diloco-4bit" | "streaming" => (StrategyKind::Rounds, both_ways(int(4), Some(1.0)), None),
        "sparseloco" | "frugal" | "demo-dct" => sparse_preset(name),
        other => {
            return Err(format!(
                "unknown strategy {other:?}; known: {PRESETS} (optionally NAME@H and [overrides])"
            ))
        }
    })
}

pub(super) fn int(bits: u8) -> CodecSpec {
    CodecSpec::Int {
        bits,
        chunk: 4096,
        range: Range::MinMax,
        rounding: Rounding::Nearest,
        seed: 0,
    }
}

/// The sparse presets. Their downlink keeps 4x the uplink's density as written here (for K = 4;
/// `Strategy::compression_for` scales it with K): the merge of K = 4 sparse updates has up to
/// 4k entries, and re-sparsifying it to k lost most of the quality (docs/results.md).
fn sparse_preset(name: &str) -> Defaults {
    let topk = |k, chunk| CodecSpec::TopK {
        k,
        chunk,
        values: ValueCoding::Q2,
    };
    let dct = |k| CodecSpec::DctTopK {
        k,
        chunk: 256,
        values: ValueCoding::Sign,
    };
    let (uplink, downlink, feedback_decay, lr) = match name {
        "sparseloco" => (topk(64, 4096), topk(256, 4096), 0.95, 1.0),
        // The long benchmark's pick (docs/results.md, issue 19); its H and Muon: `preset_inner`.
        "frugal" => (topk(16, 8192), topk(64, 8192), 0.95, FRUGAL_LR_OUTER),
        _ => (dct(8), dct(32), 1.0, 1.0),
    };
    let compression = Compression {
        uplink,
        downlink,
        feedback_decay: Some(feedback_decay),
    };
    let outer = OuterConfig {
        lr,
        ..OuterConfig::FEDAVG
    };
    (StrategyKind::Rounds, compression, Some(outer))
}
