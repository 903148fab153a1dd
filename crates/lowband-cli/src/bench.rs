//! `lowband bench engine`: time training steps of a preset and report throughput.

use std::time::Instant;

use anyhow::Result;
use lowband_engine::{preset, Batch, CpuTrainer, Gpt, OptimizerConfig, Trainer};
use serde::Serialize;

use crate::alloc_count::allocations;

#[derive(clap::Args, Debug)]
pub struct EngineBenchArgs {
    /// Model preset (tiny, small, ref).
    #[arg(long, default_value = "ref")]
    pub preset: String,
    /// Sequences per step (default: the preset's batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed steps (after the warm-up steps).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Seed of the model's initialization and of the benchmark's token stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the figures as JSON here; `-` prints them instead of the text.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct EngineBenchReport {
    preset: String,
    params: usize,
    batch: usize,
    seq_len: usize,
    threads: usize,
    steps: usize,
    ms_per_step: f64,
    ms_per_step_min: f64,
    forward_backward_ms: f64,
    optimizer_ms: f64,
    tokens_per_s: f64,
    gflops: f64,
    cpu_peak_gflops: Option<f64>,
    peak_fraction: Option<f64>,
    peak_rss_mib: Option<f64>,
    allocations_per_step: f64,
    final_loss: f32,
}

pub fn run(args: &EngineBenchArgs) -> Result<()> {
    let p = preset(&args.preset)?;
    anyhow::ensure!(args.steps > 0, "--steps: must be at least 1");
    let batch = args.batch.unwrap_or(p.batch_size);
    anyhow::ensure!(batch > 0, "--batch: must be at least 1");
    let t = p.model.context_length;
    let mut trainer = CpuTrainer::new(Gpt::new(p.model, args.seed)?, OptimizerConfig::default())?;
    // Token stream from a fixed LCG: timing does not depend on the data.
    let mut state = args.seed ^ 0x2545F4914F6CDD1D;
    let tokens: Vec<u32> = (0..batch * (t + 1))
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % p.model.vocab_size as u64) as u32
        })
        .collect();
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for row in tokens.chunks(t + 1) {
        inputs.extend_from_slice(&row[..t]);
        targets.extend_from_slice(&row[1..]);
    }
    let batch_ref = Batch {
        inputs: &inputs,
        targets: &targets,
        batch_size: batch,
        seq_len: t,
    };
    for _ in 0..args.warmup {
        trainer.step(&batch_ref, 1e-4)?;
    }
    let allocations_before = allocations();
    let (mut fb_total, mut opt_total, mut step_times) = (0.0, 0.0, Vec::with_capacity(args.steps));
    let mut loss = 0.0;
    for _ in 0..args.steps {
        let start = Instant::now();
        loss = trainer.compute_gradients(&batch_ref)?;
        let mid = Instant::now();
        trainer.apply_gradients(1e-4)?;
        let end = Instant::now();
        fb_total += (mid - start).as_secs_f64();
        opt_total += (end - mid).as_secs_f64();
        step_times.push((end - start).as_secs_f64());
    }
    let allocations_per_step = (allocations() - allocations_before) as f64 / args.steps as f64;
    let seconds: f64 = step_times.iter().sum();
    let step_s = seconds / args.steps as f64;
    let tokens_per_step = (batch * t) as f64;
    let gflops = p.model.training_flops_per_token(t) * tokens_per_step / step_s / 1e9;
    let cpu_peak = cpu_peak_gflops();
    let report = EngineBenchReport {
        preset: p.name.into(),
        params: p.model.parameter_count(),
        batch,
        seq_len: t,
        threads: rayon::current_num_threads(),
        steps: args.steps,
        ms_per_step: step_s * 1e3,
        ms_per_step_min: step_times.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
        forward_backward_ms: fb_total / args.steps as f64 * 1e3,
        optimizer_ms: opt_total / args.steps as f64 * 1e3,
        tokens_per_s: tokens_per_step / step_s,
        gflops,
        cpu_peak_gflops: cpu_peak,
        peak_fraction: cpu_peak.map(|peak| gflops / peak),
        peak_rss_mib: peak_rss_mib(),
        allocations_per_step,
        final_loss: loss,
    };
    if args.json.as_deref() != Some(std::path::Path::new("-")) {
        print_text(&report);
    }
    if let Some(path) = &args.json {
        crate::files::write_json(path, &report)?;
    }
    Ok(())
}

fn print_text(r: &EngineBenchReport) {
    println!(
        "engine benchmark: preset {} ({} params), batch {} x {} tokens, {} threads, {} steps",
        r.preset, r.params, r.batch, r.seq_len, r.threads, r.steps
    );
    println!(
        "  ms/step          {:>10.1}  (min {:.1}; forward+backward {:.1}, optimizer {:.1})",
        r.ms_per_step, r.ms_per_step_min, r.forward_backward_ms, r.optimizer_ms
    );
    println!("  tokens/s         {:>10.0}", r.tokens_per_s);
    println!("  GFLOP/s          {:>10.1}", r.gflops);
    match (r.cpu_peak_gflops, r.peak_fraction) {
        (Some(peak), Some(fraction)) => println!(
            "  fp32 peak        {:>10.1}  GFLOP/s ({:.0}% used)",
            peak,
            fraction * 100.0
        ),
        _ => println!("  fp32 peak        unknown on this CPU"),
    }
    if let Some(rss) = r.peak_rss_mib {
        println!("  peak RSS         {:>10.1}  MiB", rss);
    }
    println!(
        "  allocations/step {:>10.1}  (after warm-up)",
        r.allocations_per_step
    );
}

/// fp32 peak of the cores in use: threads x clock x FLOPs per cycle, where FLOPs per cycle are
/// 32 with AVX2 + FMA (two 256-bit FMA pipes, as on Zen 3 and Skylake) and 64 with AVX-512.
/// The clock is /proc/cpuinfo's current MHz, so boost can make the fraction read high.
fn cpu_peak_gflops() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    let flags = info.lines().find(|l| l.starts_with("flags"))?;
    let per_cycle = if flags.contains(" avx512f") {
        64.0
    } else if flags.contains(" avx2") && flags.contains(" fma") {
        32.0
    } else {
        return None;
    };
    Some(rayon::current_num_threads() as f64 * mhz / 1e3 * per_cycle)
}

/// Peak resident set size of this process (Linux: VmHWM).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
