//! Codec speed: encode and decode GB/s of every codec on a 10M-parameter delta, next to a plain
//! copy of the same buffer (the physical limit). `cargo bench -p lowband-codec --bench codecs`.
//! After criterion's own report, prints one table of GB/s and the fraction of the copy's speed.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use lowband_codec::{build, CodecSpec};

const PARAMS: usize = 10_000_000;

const CODECS: &[(&str, &str)] = &[
    ("fp32", "fp32"),
    ("fp16", "fp16"),
    ("bf16", "bf16"),
    ("int8", "int8"),
    ("int4", "int4"),
    ("int2", "int2"),
    ("int8-stochastic", "int8:round=stochastic,seed=1"),
    ("topk-q2", "topk:k=64,chunk=4096,values=q2"),
    ("topk-f32", "topk:k=64,chunk=4096,values=f32"),
    ("randomk-q2", "randomk:k=64,chunk=4096,values=q2"),
    ("dct-sign", "dct:k=8,chunk=256,values=sign"),
];

/// A delta with the spread of a real pseudo-gradient: mostly small, a heavy tail.
fn delta() -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..PARAMS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * u * u * 1e-2
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let values = delta();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes((PARAMS * 4) as u64));
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(3));
    let mut copy = vec![0.0f32; PARAMS];
    group.bench_function("memcpy", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&values)))
    });
    for (name, spec) in CODECS {
        let spec: CodecSpec = spec.parse().unwrap();
        let mut codec = build(&spec).unwrap();
        let mut payload = Vec::with_capacity(spec.payload_bytes(PARAMS));
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                payload.clear();
                codec.encode(black_box(&values), &mut payload);
            })
        });
        // The packet to decode, also when a filter skipped the encode benchmark.
        payload.clear();
        codec.encode(&values, &mut payload);
        let mut out = vec![0.0f32; PARAMS];
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| codec.decode(black_box(&payload), &mut out).unwrap())
        });
    }
    group.finish();
}

/// Mean time of a benchmark from criterion's estimates file, in seconds.
fn mean_seconds(id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target").into());
    let path = format!("{dir}/criterion/codec/{id}/new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(json["mean"]["point_estimate"].as_f64()? * 1e-9)
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
    let gigabytes = (PARAMS * 4) as f64 / 1e9;
    let Some(copy) = mean_seconds("memcpy") else {
        return;
    };
    println!("\n10M-parameter delta (40 MB of f32); GB/s of input (encode) or output (decode)");
    println!("| codec | bits/param | encode GB/s | of memcpy | decode GB/s | of memcpy |\n|---|---|---|---|---|---|");
    println!("| memcpy | 32 | {:.2} | 100% | | |", gigabytes / copy);
    for (name, spec) in CODECS {
        let spec: CodecSpec = spec.parse().unwrap();
        let (Some(e), Some(d)) = (
            mean_seconds(&format!("encode_{name}")),
            mean_seconds(&format!("decode_{name}")),
        ) else {
            continue;
        };
        let bits = spec.payload_bytes(PARAMS) as f64 * 8.0 / PARAMS as f64;
        println!(
            "| {name} | {bits:.3} | {:.2} | {:.0}% | {:.2} | {:.0}% |",
            gigabytes / e,
            100.0 * copy / e,
            gigabytes / d,
            100.0 * copy / d
        );
    }
}
