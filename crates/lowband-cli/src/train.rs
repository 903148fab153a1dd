//! `lowband train`: train one model at one site (the default run until rounds across sites land).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use lowband_data::{read_corpus, Sampler, ShardMode, Split, SyntheticLanguage, SyntheticSpec};
use lowband_engine::{checkpoint, preset, Batch, CpuTrainer, Gpt, LrSchedule, OptimizerConfig, Trainer};

use crate::engine_cmds::sample_text;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Model preset (tiny, small, ref).
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Text file or directory to train on (default: the generated synthetic language).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Size of the generated corpus when no --corpus is given.
    #[arg(long, default_value_t = 8 << 20)]
    pub corpus_bytes: usize,
    /// Inner steps.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    /// Sequences per step (default: the preset's batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate (warmup then cosine to 10%).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the final checkpoint goes.
    #[arg(long, default_value = "runs/train/checkpoint")]
    pub out: PathBuf,
}

/// The corpus to use and, for the generated one, its entropy rate in nats per byte.
pub fn load_corpus(path: Option<&PathBuf>, generated_bytes: usize) -> Result<(Vec<u8>, String, Option<f64>)> {
    match path {
        Some(path) => {
            let corpus = read_corpus(path)?;
            Ok((corpus.bytes, corpus.source, None))
        }
        None => {
            anyhow::ensure!(generated_bytes >= 4096, "--corpus-bytes: must be at least 4096");
            let language = SyntheticLanguage::new(SyntheticSpec::default());
            let floor = language.entropy_rate_bits_per_byte() * std::f64::consts::LN_2;
            Ok((language.generate(generated_bytes, 1), "synthetic language (seeded, generated)".into(), Some(floor)))
        }
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let p = preset(&args.preset)?;
    anyhow::ensure!(args.steps > 0, "--steps: must be at least 1");
    anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr: must be a positive number");
    let batch = args.batch.unwrap_or(p.batch_size);
    anyhow::ensure!(batch > 0, "--batch: must be at least 1");
    let t = p.model.context_length;
    let (bytes, source, floor) = load_corpus(args.corpus.as_ref(), args.corpus_bytes)?;
    let split = Split::new(&bytes, 0.05, 1, ShardMode::NonIid, t)?;
    println!("lowband train: preset {} ({} params), {} steps x {} sequences x {} bytes", p.name, p.model.parameter_count(), args.steps, batch, t);
    println!("corpus: {source}, {} bytes train, {} held out", split.train_bytes, split.validation.len());
    let optimizer = OptimizerConfig { lr: args.lr, ..OptimizerConfig::default() };
    let mut trainer = CpuTrainer::new(Gpt::new(p.model, args.seed)?, optimizer)?;
    let schedule = LrSchedule::reference(args.lr, args.steps);
    let mut sampler = Sampler::new(args.seed.wrapping_mul(1000));
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let bar = ProgressBar::new(args.steps).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}")?,
    );
    let start = Instant::now();
    let mut smoothed = None::<f32>;
    for step in 0..args.steps {
        sampler.fill(&split.shards[0], batch, t, &mut inputs, &mut targets);
        let b = Batch { inputs: &inputs, targets: &targets, batch_size: batch, seq_len: t };
        let (loss, _) = trainer.step(&b, schedule.lr_at(step))?;
        let s = smoothed.map_or(loss, |s| 0.9 * s + 0.1 * loss);
        smoothed = Some(s);
        bar.set_message(format!("loss {s:.3}"));
        bar.inc(1);
    }
    bar.finish();
    let train_seconds = start.elapsed().as_secs_f64();
    let (v_in, v_t, windows) = split.validation_windows(t);
    let validation = trainer.model.mean_loss(&v_in, &v_t, windows, 32)?;
    println!("trained in {train_seconds:.1} s ({:.0} tokens/s)", (args.steps as usize * batch * t) as f64 / train_seconds);
    print!("validation loss {validation:.4} nats/byte ({:.4} bits/byte)", validation / std::f64::consts::LN_2);
    match floor {
        Some(f) => println!("; the language's entropy rate is {f:.4}, {:+.1}% away", (validation / f - 1.0) * 100.0),
        None => println!(),
    }
    checkpoint::save(&args.out, &p.model, trainer.params(), Some(trainer.optimizer()), serde_json::json!({ "preset": p.name, "steps": args.steps, "seed": args.seed }))?;
    println!("checkpoint: {}", args.out.display());
    let prompt = String::from_utf8_lossy(&split.validation[..48.min(split.validation.len())]).into_owned();
    println!("sample: {prompt}|{}", sample_text(&mut trainer.model, &prompt, 120, 0.8, 40, 0)?.replace('\n', " "));
    Ok(())
}
