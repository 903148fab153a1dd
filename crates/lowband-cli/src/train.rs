//! `lowband train`: train one model with one strategy (same settings as `compare`), save its
//! checkpoint, show a sample.

use std::path::PathBuf;

use anyhow::Result;
use lowband_data::{read_corpus, Split, SyntheticLanguage, SyntheticSpec};
use lowband_engine::{checkpoint, Gpt};

use crate::compare::{self, CompareArgs, RunArgs};
use crate::engine_cmds::sample_text;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The strategy: ddp, diloco, fedavg, optionally NAME@H (`--sites 1 --strategy ddp` is plain
    /// single-site training).
    #[arg(long, default_value = "diloco")]
    pub strategy: String,
    #[command(flatten)]
    pub run: RunArgs,
    /// Continue from the run directory's saved state instead of starting over.
    #[arg(long)]
    pub resume: bool,
}

/// The run's corpus (`corpus`, or the generated language of `corpus_bytes`; with `tuning`, its
/// training split only) and, for the generated one, its entropy rate in nats per byte.
pub fn load_corpus(config: &lowband_runtime::RunConfig) -> Result<(Vec<u8>, String, Option<f64>)> {
    let (mut bytes, source, floor) = read_or_generate(config.corpus.as_ref(), config.corpus_bytes)?;
    match config.tuning.then_some(config.validation_fraction) {
        None => Ok((bytes, source, floor)),
        // `--tuning`: only the training split is read on (its own last part is held out).
        Some(validation_fraction) => {
            let total = bytes.len();
            bytes.truncate(Split::train_len(total, validation_fraction));
            let note = format!("{source}, its training split only ({} of {total} bytes: --tuning sets the validation split aside)", bytes.len());
            Ok((bytes, note, floor))
        }
    }
}

fn read_or_generate(
    path: Option<&PathBuf>,
    generated_bytes: usize,
) -> Result<(Vec<u8>, String, Option<f64>)> {
    match path {
        Some(path) => {
            let corpus = read_corpus(path)?;
            Ok((corpus.bytes, corpus.source, None))
        }
        None => {
            lowband_runtime::config::check_corpus_bytes(generated_bytes)
                .map_err(|e| anyhow::anyhow!("corpus_bytes: {e}"))?;
            let language = SyntheticLanguage::new(SyntheticSpec::default());
            let floor = language.entropy_rate_bits_per_byte() * std::f64::consts::LN_2;
            Ok((
                language.generate(generated_bytes, 1),
                "synthetic language (seeded, generated)".into(),
                Some(floor),
            ))
        }
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let mut settings = CompareArgs {
        strategies: Some(crate::compare::StrategyList(vec![args.strategy.clone()])),
        run: args.run.clone(),
        resume: args.resume,
        stop_after_rounds: None,
        dashboard: None,
    };
    settings.run.name = Some(
        settings
            .run
            .name
            .clone()
            .unwrap_or_else(|| format!("train-{}", args.strategy.replace('@', "-h"))),
    );
    let outcome = compare::run_with(&settings)?;
    let result = &outcome.results[0];
    let dir = outcome.run_dir.join("checkpoint");
    let model = lowband_engine::preset(&outcome.config.preset)?.model;
    checkpoint::save(
        &dir,
        &model,
        &result.final_params,
        None,
        serde_json::json!({ "strategy": result.strategy.name(), "steps": outcome.config.steps, "seed": outcome.config.seed }),
    )
    .map_err(|e| crate::failure::ran(e.into()))?;
    println!("checkpoint: {}", dir.display());
    let mut gpt = Gpt::from_params(model, result.final_params.clone())?;
    let prompt = sample_prompt(&outcome.split);
    println!(
        "sample: {prompt}|{}",
        sample_text(&mut gpt, &prompt, 120, 0.8, 40, 0)?.replace('\n', " ")
    );
    Ok(())
}

fn sample_prompt(split: &Split) -> String {
    String::from_utf8_lossy(&split.validation[..48.min(split.validation.len())]).replace('\n', " ")
}
