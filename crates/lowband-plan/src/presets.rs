//! Public hardware and link classes, each with its source. Prices move: every preset is a
//! starting point that a plan file overrides field by field.

use crate::{invalid, Hardware, Link, PlanError, Relay};

pub const HARDWARE_NAMES: &[&str] = &["h100", "a100"];
pub const LINK_NAMES: &[&str] = &["intra-dc", "metro", "transatlantic", "consumer"];

/// A hardware preset, one accelerator per site (set `accelerators`).
pub fn hardware(name: &str) -> Result<Hardware, PlanError> {
    match name {
        // NVIDIA H100 SXM: 989 TFLOP/s dense BF16 (NVIDIA datasheet; also the spec table of
        // pricegpu.pages.dev/blog/h100-vs-a100-cloud-price). MFU 0.40: INTELLECT-1 measured
        // 36.2-41.4% (arXiv 2412.01152). $2.99/h: the middle of the $2.49-3.99 on-demand range
        // for an H100 SXM in early 2026 (same pricegpu page). Fabric 3,200 Gbit/s per GPU,
        // effective: an HGX/DGX H100 node has eight 400 Gbit/s ConnectX-7 ports and NVLink
        // inside; a hierarchical all-reduce sends 1/8 of the payload over each port, so the ring
        // formula sees 8 × 400 Gbit/s per accelerator.
        "h100" => Ok(Hardware {
            peak_flops_per_second: 989e12,
            mfu: 0.40,
            accelerators: 1,
            dollars_per_accelerator_hour: 2.99,
            fabric_gbit_per_second: 3200.0,
        }),
        // NVIDIA A100 SXM 80GB: 312 TFLOP/s dense BF16 (NVIDIA datasheet; pricegpu page above).
        // MFU as for the H100 (an assumption). $1.99/h: the middle of $1.49-2.49 (pricegpu, early
        // 2026). Fabric 1,600 Gbit/s per GPU, effective: a DGX A100 has eight 200 Gbit/s HDR
        // InfiniBand ports (hierarchical all-reduce, as for the H100).
        "a100" => Ok(Hardware {
            peak_flops_per_second: 312e12,
            mfu: 0.40,
            accelerators: 1,
            dollars_per_accelerator_hour: 1.99,
            fabric_gbit_per_second: 1600.0,
        }),
        other => Err(invalid(
            "hardware",
            format!(
                "unknown preset {other:?}; known: {}",
                HARDWARE_NAMES.join(", ")
            ),
        )),
    }
}

/// A link-class preset (per site uplink).
pub fn link(name: &str) -> Result<Link, PlanError> {
    match name {
        // Sites in one data centre joined by its fabric: one 400 Gbit/s port per site,
        // sub-millisecond round trips, no egress charge inside a zone.
        "intra-dc" => Ok(Link {
            bandwidth_gbit_per_second: 400.0,
            rtt_ms: 0.05,
            egress_dollars_per_gb: 0.0,
        }),
        // Sites in one metro area (e.g. two availability zones of a region): 10 Gbit/s, 2 ms,
        // $0.01/GB (the usual cloud charge for cross-zone traffic).
        "metro" => Ok(Link {
            bandwidth_gbit_per_second: 10.0,
            rtt_ms: 2.0,
            egress_dollars_per_gb: 0.01,
        }),
        // Cross-ocean cloud regions (US-EU): 1 Gbit/s per site, 80 ms round trip, $0.05/GB (the
        // middle of the $0.02-0.09 cloud range; lowband compare's default link profile,
        // shared/design.md).
        "transatlantic" => Ok(Link {
            bandwidth_gbit_per_second: 1.0,
            rtt_ms: 80.0,
            egress_dollars_per_gb: 0.05,
        }),
        // A participant at home: 100 Mbit/s uplink (the low end of design.md's 0.1-10 Gbit/s
        // range), 100 ms to the others, no per-byte charge on residential lines.
        "consumer" => Ok(Link {
            bandwidth_gbit_per_second: 0.1,
            rtt_ms: 100.0,
            egress_dollars_per_gb: 0.0,
        }),
        other => Err(invalid(
            "link",
            format!(
                "unknown link class {other:?}; known: {}",
                LINK_NAMES.join(", ")
            ),
        )),
    }
}

/// The relay (lowband's coordinator) by default: a general-purpose cloud machine with a
/// 25 Gbit/s port, egress as the sites' links, $1 per hour (an assumption, small next to any
/// accelerator bill).
pub fn relay(egress_dollars_per_gb: f64) -> Relay {
    Relay {
        bandwidth_gbit_per_second: 25.0,
        egress_dollars_per_gb,
        dollars_per_hour: 1.0,
    }
}

/// Global batch in tokens per step for an N-parameter model trained by K sites: the fit of the
/// best global batch in Charles et al. 2025 ("Communication-Efficient Language Model Training
/// Scales Reliably and Robustly: Scaling Laws for DiLoCo", Table 10), 0.00709 × N^0.4695 ×
/// K^0.3399 sequences of 2,048 tokens, as used by A. Douillard's DiLoCo simulator
/// (arthurdouillard.com/diloco).
pub fn batch_tokens(params: f64, sites: usize) -> f64 {
    let sequences = 0.00709 * params.powf(0.4695) * (sites.max(1) as f64).powf(0.3399);
    sequences.max(1.0).round() * 2048.0
}

/// Bits per token of the training data when shipped: a token ID of a 128K-entry vocabulary,
/// about 17 bits (shared/design.md's "sending the raw token IDs").
pub const DATA_BITS_PER_TOKEN: f64 = 17.0;

/// DDP's gradient all-reduce in BF16 (16 bits per parameter), as the published simulators
/// assume (Douillard's simulator: "assumes bfloat16").
pub const DDP_BITS_PER_PARAM: f64 = 16.0;

/// A plan set up like INTELLECT-1 (Jaghouar et al. 2024, arXiv 2412.01152): a 10B model on up to
/// 14 nodes of 8 H100, int8 ring all-reduce of the pseudo-gradient every H = 100 inner steps,
/// about 38 minutes of compute per round (22.8 s per inner step), 1T tokens. The report gives the
/// median all-reduce time (103 s inside the USA, 469 s across the globe), not link bandwidths:
/// the links here get the bandwidth at which the ring model takes `all_reduce_seconds` with
/// `rtt_ms` round trips (an assumption; docs/economics.md).
pub fn intellect_1(
    all_reduce_seconds: f64,
    rtt_ms: f64,
) -> Result<(crate::Scenario, crate::Strategy), PlanError> {
    let sites = 14usize;
    let params = 10e9;
    let payload_bytes = params; // int8: one byte per parameter
    let latency_seconds = 2.0 * (sites as f64 - 1.0) * rtt_ms / 2000.0;
    if all_reduce_seconds <= latency_seconds {
        return Err(invalid("all_reduce_seconds", format!("{all_reduce_seconds} s is shorter than the ring's latency alone ({latency_seconds} s)")));
    }
    let bytes_per_second = 2.0 * (sites as f64 - 1.0) / sites as f64 * payload_bytes
        / (all_reduce_seconds - latency_seconds);
    let mut node = hardware("h100")?;
    node.accelerators = 8;
    let link = Link {
        bandwidth_gbit_per_second: bytes_per_second * 8.0 / 1e9,
        rtt_ms,
        egress_dollars_per_gb: 0.0,
    };
    let scenario = crate::Scenario {
        params,
        tokens: 1e12,
        // Only sets how many rounds there are; utilization does not depend on it.
        batch_tokens: 8.0 * 1024.0 * 1024.0,
        sites: vec![
            crate::Site {
                hardware: node.clone(),
                link
            };
            sites
        ],
        relay: relay(0.0),
        central: Hardware {
            accelerators: 8 * sites as u32,
            ..node
        },
        ddp_bits_per_param: DDP_BITS_PER_PARAM,
        data_bits_per_token: DATA_BITS_PER_TOKEN,
        law: crate::LossLaw::chinchilla(),
        step_seconds: Some(38.0 * 60.0 / 100.0),
    };
    let strategy = crate::Strategy {
        name: "intellect-1 (int8 all-reduce, H=100)".into(),
        inner_steps: 100,
        bits_per_param_up: 8.0,
        bits_per_param_down: None,
        pattern: crate::Pattern::AllReduce,
        fragments: 1,
        overlap_steps: 0.0,
        loss_gap: 0.0,
    };
    Ok((scenario, strategy))
}

/// Streaming DiLoCo's Table 4 (Douillard et al. 2025, arXiv 2501.18512): the Gbit/s each method
/// needs to reach 50, 80, 90, 95 and 99% compute utilization, per model size: (parameters,
/// layers, step seconds of pure compute, [(method, Gbit/s per target)]). Read from the paper's
/// HTML table as transcribed in deep-diver/ai-paper-reviewer
/// (content/paper-reviews/2501.18512/index.md).
pub const STREAMING_DILOCO_TABLE_4: [Table4Size; 3] = [
    (
        1e9,
        24,
        0.1,
        [
            ("Data-Parallel", [86.8, 152.6, 184.2, 222.3, 569.0]),
            ("Vanilla DiLoCo", [1.4, 6.2, 13.3, 23.3, 86.8]),
            ("Streaming DiLoCo", [1.4, 5.2, 9.1, 16.0, 28.1]),
            (
                "Streaming DiLoCo w/ overlapped com.",
                [1.4, 4.3, 6.2, 9.1, 11.0],
            ),
            (
                "Streaming DiLoCo w/ overlapped FP4 com.",
                [0.4, 0.9, 1.7, 2.0, 3.0],
            ),
        ],
    ),
    (
        1e10,
        48,
        0.8,
        [
            ("Data-Parallel", [104.8, 222.3, 222.3, 268.3, 471.5]),
            ("Vanilla DiLoCo", [1.7, 7.5, 16.0, 33.9, 104.8]),
            ("Streaming DiLoCo", [1.7, 5.2, 9.1, 13.3, 19.3]),
            (
                "Streaming DiLoCo w/ overlapped com.",
                [1.7, 3.6, 5.2, 6.2, 7.5],
            ),
            (
                "Streaming DiLoCo w/ overlapped FP4 com.",
                [0.4, 0.9, 1.4, 1.4, 1.7],
            ),
        ],
    ),
    (
        1e11,
        108,
        4.9,
        [
            ("Data-Parallel", [184.2, 323.8, 390.7, 390.7, 471.5]),
            ("Vanilla DiLoCo", [3.0, 11.0, 23.3, 49.4, 184.2]),
            ("Streaming DiLoCo", [2.4, 6.2, 9.1, 11.0, 19.3]),
            (
                "Streaming DiLoCo w/ overlapped com.",
                [1.7, 3.6, 4.3, 5.2, 5.2],
            ),
            (
                "Streaming DiLoCo w/ overlapped FP4 com.",
                [0.5, 0.9, 1.1, 1.1, 1.4],
            ),
        ],
    ),
];

/// One method's row of Table 4: its name and the Gbit/s for each target.
pub type Table4Row = (&'static str, [f64; 5]);
/// One model size of Table 4: parameters, layers, step seconds, the five methods' rows.
pub type Table4Size = (f64, u32, f64, [Table4Row; 5]);

/// The compute-utilization targets of [`STREAMING_DILOCO_TABLE_4`].
pub const TABLE_4_TARGETS: [f64; 5] = [0.5, 0.8, 0.9, 0.95, 0.99];

/// Streaming DiLoCo's simulation set up as its Table 4 states it: the given pure-compute step
/// time, H = 100, fragments of 3 layers, BF16 (16-bit) exchanges except the FP4 variant. Where the
/// caption is silent: two workers, no latency; every sync (gradients, outer gradients, fragments)
/// overlaps one backward pass, as A. Douillard's simulator states for all methods
/// (arthurdouillard.com/diloco: "the reduction of gradients or outer gradients is overlapped over
/// the backward pass computation"), and "overlapped" adds one full step (τ = 1, as the paper's
/// Table 1 caption allows). The strategies come in the table's order.
pub fn streaming_diloco_table_4(
    params: f64,
    layers: u32,
    step_seconds: f64,
) -> Result<(crate::Scenario, Vec<crate::Strategy>), PlanError> {
    let workers = 2usize;
    let worker = hardware("h100")?;
    let scenario = crate::Scenario {
        params,
        tokens: 20.0 * params,
        batch_tokens: batch_tokens(params, workers),
        sites: vec![
            crate::Site {
                hardware: worker.clone(),
                link: Link {
                    bandwidth_gbit_per_second: 1.0,
                    rtt_ms: 0.0,
                    egress_dollars_per_gb: 0.0
                }
            };
            workers
        ],
        relay: relay(0.0),
        central: Hardware {
            accelerators: workers as u32,
            ..worker
        },
        ddp_bits_per_param: DDP_BITS_PER_PARAM,
        data_bits_per_token: DATA_BITS_PER_TOKEN,
        law: crate::LossLaw::chinchilla(),
        step_seconds: Some(step_seconds),
    };
    let fragments = (layers / 3).max(1);
    let strategy = |name: &str, inner_steps, bits, fragments, overlap_steps| crate::Strategy {
        name: name.into(),
        inner_steps,
        bits_per_param_up: bits,
        bits_per_param_down: None,
        pattern: crate::Pattern::AllReduce,
        fragments,
        overlap_steps,
        loss_gap: 0.0,
    };
    let bf16 = DDP_BITS_PER_PARAM;
    let backward = crate::BACKWARD_STEPS;
    Ok((
        scenario,
        vec![
            strategy("Data-Parallel", 1, bf16, 1, backward),
            strategy("Vanilla DiLoCo", 100, bf16, 1, backward),
            strategy("Streaming DiLoCo", 100, bf16, fragments, backward),
            strategy(
                "Streaming DiLoCo w/ overlapped com.",
                100,
                bf16,
                fragments,
                1.0 + backward,
            ),
            strategy(
                "Streaming DiLoCo w/ overlapped FP4 com.",
                100,
                4.0,
                fragments,
                1.0 + backward,
            ),
        ],
    ))
}
