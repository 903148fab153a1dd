//! `lowband plot`: one pair of loss charts from the metrics of several run directories, for
//! strategies that ran as separate commands (the long benchmarks do, so that each can start when
//! its settings are known) but are judged side by side.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::plots::LossSeries;

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run directories (each holds the metrics.jsonl that compare, train or cluster wrote).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Directory for loss_vs_tokens.svg and loss_vs_bytes.svg (created if missing).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &PlotArgs) -> Result<()> {
    // (strategy's series, run name)
    let mut series: Vec<(LossSeries, String)> = Vec::new();
    for dir in &args.runs {
        let run = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        series.extend(
            eval_series(&dir.join("metrics.jsonl"))?
                .into_iter()
                .map(|s| (s, run.clone())),
        );
    }
    // A strategy that appears in more than one run is labelled with its run as well.
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for ((strategy, _), _) in &series {
        *seen.entry(strategy.as_str()).or_default() += 1;
    }
    let labelled: Vec<LossSeries> = series
        .iter()
        .map(|((strategy, points), run)| {
            (
                if seen[strategy.as_str()] > 1 {
                    format!("{strategy} ({run})")
                } else {
                    strategy.clone()
                },
                points.clone(),
            )
        })
        .collect();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (by_tokens, by_bytes) = (
        args.out.join("loss_vs_tokens.svg"),
        args.out.join("loss_vs_bytes.svg"),
    );
    crate::plots::loss_curves_of(&labelled, &by_tokens, &by_bytes)?;
    for (label, points) in &labelled {
        let last = points.last().expect("a series has points");
        println!("{label}: {} evaluations, last at {} tokens, {} inter-site bytes: validation loss {:.4}", points.len(), last.0, last.1, last.2);
    }
    println!("wrote {} and {}", by_tokens.display(), by_bytes.display());
    Ok(())
}

/// Every strategy's evaluations (tokens, inter-site bytes, validation loss) in a metrics file, in
/// the order the strategies first appear.
fn eval_series(path: &Path) -> Result<Vec<LossSeries>> {
    let text = crate::files::read_text(path, crate::files::METRICS_BYTES_MAX)
        .with_context(|| format!("reading {} (is it a run directory?)", path.display()))?;
    let mut series: Vec<LossSeries> = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let record: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON metric", path.display(), number + 1))?;
        if record["kind"] != "eval" {
            continue;
        }
        let field = |name: &str| {
            record[name]
                .as_f64()
                .filter(|v| v.is_finite())
                .with_context(|| {
                    format!(
                        "{}:{}: eval record without a finite `{name}`",
                        path.display(),
                        number + 1
                    )
                })
        };
        let strategy = record["strategy"].as_str().with_context(|| {
            format!(
                "{}:{}: eval record without `strategy`",
                path.display(),
                number + 1
            )
        })?;
        let point = (
            field("tokens")? as u64,
            field("inter_site_bytes")? as u64,
            field("val_loss")?,
        );
        match series.iter_mut().find(|(name, _)| name == strategy) {
            Some((_, points)) => points.push(point),
            None => series.push((strategy.to_string(), vec![point])),
        }
    }
    if series.is_empty() {
        bail!("{}: no evaluations recorded", path.display());
    }
    Ok(series)
}
