//! Engine commands: init, eval, export hf, import hf, sample.

use std::path::PathBuf;

use anyhow::{bail, Result};
use lowband_engine::checkpoint::{self, Checkpoint};
use lowband_engine::sample::{generate, SampleConfig};
use lowband_engine::{hf, preset, Gpt};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Model preset (tiny, small, ref).
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Seed of the initialization.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint directory to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn init(args: &InitArgs) -> Result<()> {
    let p = preset(&args.preset)?;
    let model = Gpt::new(p.model, args.seed)?;
    checkpoint::save(
        &args.out,
        &p.model,
        model.params(),
        None,
        serde_json::json!({ "preset": p.name, "seed": args.seed }),
    )?;
    println!(
        "wrote {} ({} parameters, preset {}, seed {})",
        args.out.display(),
        p.model.parameter_count(),
        p.name,
        args.seed
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory to evaluate.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text file to evaluate on (its bytes are the tokens).
    #[arg(long)]
    pub data: PathBuf,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Write the result as JSON here (loss, bits per byte, windows, tokens); `-` prints it
    /// instead of the text line.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct EvalReport {
    /// Mean next-byte cross-entropy, nats.
    loss: f64,
    bits_per_byte: f64,
    windows: usize,
    tokens: usize,
}

pub fn load_model(dir: &std::path::Path) -> Result<Gpt> {
    let Checkpoint { config, params, .. } = checkpoint::load(dir)?;
    Ok(Gpt::from_params(config, params)?)
}

pub fn byte_level(model: &Gpt) -> Result<()> {
    if model.config().vocab_size != 256 {
        bail!("this command reads text as bytes and needs a byte-level model (vocab_size 256), not {}", model.config().vocab_size);
    }
    Ok(())
}

/// Largest file `eval` reads: its windows become token buffers of 8 bytes per byte (2 GiB here).
const EVAL_BYTES_MAX: u64 = 256 << 20;

pub fn eval(args: &EvalArgs) -> Result<()> {
    anyhow::ensure!(args.batch > 0, "--batch: must be at least 1");
    let mut model = load_model(&args.checkpoint)?;
    byte_level(&model)?;
    // (The error names the path.)
    let bytes = lowband_data::corpus::read_bounded(&args.data, EVAL_BYTES_MAX)?;
    let context = model.config().context_length;
    let (inputs, targets, windows) = lowband_data::corpus::windows(&bytes, context);
    if windows == 0 {
        bail!(
            "{}: {} bytes is shorter than one window of {} bytes (context + 1)",
            args.data.display(),
            bytes.len(),
            context + 1
        );
    }
    let loss = model.mean_loss(&inputs, &targets, windows, args.batch)?;
    if !loss.is_finite() {
        bail!(
            "{}: the loss over {} is {loss}: the checkpoint's weights overflow in the forward pass (its values are finite but too large); not a usable model",
            args.checkpoint.display(),
            args.data.display()
        );
    }
    let report = EvalReport {
        loss,
        bits_per_byte: loss / std::f64::consts::LN_2,
        windows,
        tokens: windows * context,
    };
    if args.json.as_deref() != Some(std::path::Path::new("-")) {
        println!(
            "loss {:.4} nats/byte ({:.4} bits/byte) over {} windows of {} bytes",
            report.loss, report.bits_per_byte, windows, context
        );
    }
    if let Some(path) = &args.json {
        crate::files::write_json(path, &report)?;
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint directory to export.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Directory to write config.json and model.safetensors into.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn export_hf(args: &ExportArgs) -> Result<()> {
    let Checkpoint { config, params, .. } = checkpoint::load(&args.checkpoint)?;
    hf::export(&args.out, &config, &params)?;
    println!(
        "wrote {} (Hugging Face GPT-2 layout: GPT2LMHeadModel.from_pretrained loads it)",
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// A Hugging Face GPT-2 directory (config.json + model.safetensors, f32).
    #[arg(long)]
    pub from: PathBuf,
    /// Checkpoint directory to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn import_hf(args: &ImportArgs) -> Result<()> {
    let (config, params) = hf::import(&args.from)?;
    checkpoint::save(
        &args.out,
        &config,
        &params,
        None,
        serde_json::json!({ "imported_from": args.from.display().to_string() }),
    )?;
    println!(
        "wrote {} ({} parameters)",
        args.out.display(),
        config.parameter_count()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Checkpoint directory to sample from.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text the generation continues.
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely bytes (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn sample(args: &SampleArgs) -> Result<()> {
    let mut model = load_model(&args.checkpoint)?;
    byte_level(&model)?;
    let text = sample_text(
        &mut model,
        &args.prompt,
        args.tokens,
        args.temperature,
        args.top_k,
        args.seed,
    )?;
    println!("{}{}", args.prompt, text);
    Ok(())
}

/// Continue `prompt` (bytes) and return the new text (lossy UTF-8).
pub fn sample_text(
    model: &mut Gpt,
    prompt: &str,
    tokens: usize,
    temperature: f32,
    top_k: usize,
    seed: u64,
) -> Result<String> {
    let prompt: Vec<u32> = if prompt.is_empty() {
        vec![b'\n' as u32]
    } else {
        prompt.bytes().map(u32::from).collect()
    };
    let config = SampleConfig {
        max_new_tokens: tokens,
        temperature,
        top_k,
        seed,
    };
    let new = generate(model, &prompt, &config)?;
    let bytes: Vec<u8> = new.iter().map(|&t| t as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
