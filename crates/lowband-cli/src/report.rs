//! The comparison report: the table on stdout, and `runs/<name>/` with metrics.jsonl,
//! summary.json, report.md and plots (SVG).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use lowband_engine::checkpoint::write_atomic;
use lowband_runtime::{Endpoint, Metric, RunConfig, RunResult, StrategyKind};
use serde::{Deserialize, Serialize};

use crate::equal_time::{equal_time_seconds, equal_tokens, loss_by, loss_by_tokens};
use crate::summary_table::table;

pub struct Comparison<'a> {
    pub config: &'a RunConfig,
    pub results: &'a [RunResult],
    pub corpus: &'a str,
    /// Entropy rate of the corpus (nats per byte), when known.
    pub floor: Option<f64>,
    pub name: &'a str,
    /// What happened to the nodes (a site process that died, restarts): one line each.
    pub events: &'a [String],
}

/// A number JSON wrote as null (serde_json writes NaN so): NaN again.
fn nan_when_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// One strategy's line of summary.json: written by the report, read back by `plan --from-run`
/// and the report's own snapshot test (the one definition of the format). Fields added after
/// the first summaries default when absent.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StrategySummary {
    pub strategy: String,
    pub inner_steps: u64,
    /// NaN (null in the file) for an external model: the coordinator cannot run it.
    #[serde(deserialize_with = "nan_when_null")]
    pub final_val_loss: f64,
    /// An external model's: the sites' mean training loss over the run's last round (what
    /// they reported), in place of a validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_train_loss: Option<f64>,
    /// (loss − DDP's) / DDP's, when DDP ran.
    pub loss_gap_vs_ddp: Option<f64>,
    pub inter_site_bytes: u64,
    /// DDP's bytes / this strategy's bytes, when DDP ran.
    pub bytes_ratio_vs_ddp: Option<f64>,
    pub tokens: u64,
    pub rounds: u64,
    pub params: usize,
    /// Bits a site sends per token it trains on (mean over sites).
    pub bits_per_token: f64,
    /// Bits a site sends per parameter per round (mean over sites; DDP: per step).
    pub bits_per_param_per_round: f64,
    /// Every inter-site bit (up and down), per site, per parameter, per inner step (absent in
    /// summaries older than the codecs: derived from the bytes then).
    pub bits_per_param_per_step: Option<f64>,
    /// Most bytes one site moved (up + down) in one sync: the link's peak load.
    #[serde(default)]
    pub peak_sync_bytes_per_site: u64,
    pub emulated_seconds: f64,
    pub compute_seconds: f64,
    pub communication_seconds: f64,
    pub egress_dollars: f64,
    #[serde(default)]
    pub validation_windows: usize,
    /// The coordinator's aggregator ("mean" for DDP's all-reduce).
    #[serde(default)]
    pub aggregator: String,
    /// The codecs this run used (the sparse presets' downlink follows K); none for DDP.
    #[serde(default)]
    pub uplink: Option<String>,
    #[serde(default)]
    pub downlink: Option<String>,
    /// Per site: updates accepted, refused, cut hard by the aggregator; exclusion reason.
    #[serde(default)]
    pub site_scores: Vec<SiteScoreSummary>,
    /// Over a network: bytes of the sites' training reports (losses, compute seconds), beside
    /// `inter_site_bytes` and not in it; 0 in memory.
    #[serde(default)]
    pub telemetry_bytes: u64,
    /// Streaming: fragments synced in turn per round, and inner steps each sync overlaps.
    #[serde(default)]
    pub fragments: Option<usize>,
    #[serde(default)]
    pub overlap_steps: Option<u64>,
    /// The comparison at equal time on the emulated link: when the fastest strategy of the run
    /// finished (its emulated seconds), this strategy's latest validation loss measured by then
    /// and the step it was measured at (None: no validation loss, an external model's run).
    #[serde(default)]
    pub equal_time_seconds: Option<f64>,
    #[serde(default)]
    pub val_loss_at_equal_time: Option<f64>,
    #[serde(default)]
    pub step_at_equal_time: Option<u64>,
    /// Where strategies trained different token totals: the fewest (None otherwise), and this
    /// strategy's latest validation loss measured by then.
    #[serde(default)]
    pub equal_tokens: Option<u64>,
    #[serde(default)]
    pub val_loss_at_equal_tokens: Option<f64>,
    /// The share of the sites' emulated time that went into merged updates (not waiting for
    /// slower sites, not refused): the sites' mean, and each site's.
    #[serde(default)]
    pub goodput: Option<f64>,
    #[serde(default)]
    pub site_goodput: Vec<f64>,
}

impl StrategySummary {
    /// Whether this line is DDP: its name parsed into the typed strategy (the name is canonical),
    /// not compared as a string.
    pub fn is_ddp(&self) -> bool {
        lowband_runtime::Strategy::parse(&self.strategy, 1)
            .is_ok_and(|s| s.kind == lowband_runtime::StrategyKind::Ddp)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SiteScoreSummary {
    pub site: u32,
    pub accepted: u64,
    pub refused: u64,
    pub downweighted: u64,
    pub excluded: Option<String>,
}

/// A run's summary.json.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Summary {
    pub name: String,
    pub corpus: String,
    pub entropy_rate_nats_per_byte: Option<f64>,
    pub config: RunConfig,
    pub strategies: Vec<StrategySummary>,
}

/// The mean training loss over the run's last round (its last H step metrics).
fn last_round_train_loss(r: &RunResult) -> Option<f64> {
    let losses: Vec<f64> = r
        .metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Step { loss, .. } => Some(*loss as f64),
            _ => None,
        })
        .collect();
    let last = &losses[losses.len().saturating_sub(r.strategy.inner_steps as usize)..];
    (!last.is_empty()).then(|| last.iter().sum::<f64>() / last.len() as f64)
}

fn summarize(c: &Comparison) -> Vec<StrategySummary> {
    let ddp = c
        .results
        .iter()
        .find(|r| r.strategy.kind == StrategyKind::Ddp);
    let equal_time = equal_time_seconds(c.results);
    let fewest_tokens = equal_tokens(c.results);
    c.results
        .iter()
        .map(|r| {
            let sites = c.config.sites;
            let sent: u64 = (0..sites as u32)
                .map(|k| r.ledger.bytes_sent_by(Endpoint::Site(k)))
                .sum();
            let codecs = (r.strategy.kind == StrategyKind::Rounds)
                .then(|| r.strategy.compression_for(sites));
            StrategySummary {
                strategy: r.strategy.name(),
                inner_steps: r.strategy.inner_steps,
                final_val_loss: r.final_val_loss,
                final_train_loss: c
                    .config
                    .model
                    .is_some()
                    .then(|| last_round_train_loss(r))
                    .flatten(),
                loss_gap_vs_ddp: ddp.map(|d| r.final_val_loss / d.final_val_loss - 1.0),
                inter_site_bytes: r.ledger.total_bytes(),
                bytes_ratio_vs_ddp: ddp
                    .filter(|_| r.ledger.total_bytes() > 0)
                    .map(|d| d.ledger.total_bytes() as f64 / r.ledger.total_bytes() as f64),
                tokens: r.tokens,
                rounds: r.rounds,
                params: r.params,
                bits_per_token: r.bits_per_token(sites),
                bits_per_param_per_round: sent as f64 * 8.0
                    / (sites as f64 * r.params as f64 * r.rounds.max(1) as f64),
                peak_sync_bytes_per_site: r.peak_sync_bytes_per_site,
                bits_per_param_per_step: Some(
                    r.ledger.total_bytes() as f64 * 8.0
                        / (sites as f64 * r.params as f64 * c.config.steps.max(1) as f64),
                ),
                emulated_seconds: r.emulated_seconds(),
                compute_seconds: r.compute_seconds,
                communication_seconds: r.communication_seconds,
                egress_dollars: c.config.link.dollars(r.ledger.total_bytes()),
                validation_windows: r.validation_windows,
                telemetry_bytes: r.telemetry_bytes,
                aggregator: r.aggregator.clone(),
                uplink: codecs.map(|c| c.uplink.to_string()),
                downlink: codecs.map(|c| c.downlink.to_string()),
                site_scores: r
                    .site_scores
                    .iter()
                    .map(|(site, s)| SiteScoreSummary {
                        site: *site,
                        accepted: s.accepted,
                        refused: s.refused,
                        downweighted: s.downweighted,
                        excluded: s.excluded.clone(),
                    })
                    .collect(),
                fragments: r.strategy.streaming.as_ref().map(|s| s.fragments),
                overlap_steps: r.strategy.streaming.as_ref().map(|s| s.overlap_steps),
                equal_time_seconds: equal_time,
                val_loss_at_equal_time: equal_time
                    .and_then(|t| loss_by(r, t))
                    .map(|(_, loss)| loss),
                step_at_equal_time: equal_time.and_then(|t| loss_by(r, t)).map(|(step, _)| step),
                equal_tokens: fewest_tokens,
                val_loss_at_equal_tokens: fewest_tokens
                    .and_then(|t| loss_by_tokens(r, t))
                    .map(|(_, loss)| loss),
                goodput: (!r.site_goodput.is_empty()).then(|| r.goodput()),
                site_goodput: r.site_goodput.clone(),
            }
        })
        .collect()
}

/// Who attacked, and what the coordinator made of every site (when there is anything to say).
fn trust_section(c: &Comparison, rows: &[StrategySummary]) -> String {
    let mut out = String::new();
    let eventful = |r: &StrategySummary| {
        r.site_scores
            .iter()
            .any(|s| s.refused > 0 || s.downweighted > 0 || s.excluded.is_some())
    };
    if c.config.attacks.is_empty() && rows.iter().all(|r| r.aggregator == "mean" && !eventful(r)) {
        return out;
    }
    let attacks: Vec<String> = c.config.attacks.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(out, "Untrusted sites: attacks {} (DDP runs honest). Per site: updates accepted / refused / cut hard by the aggregator.
", if attacks.is_empty() { "none".into() } else { attacks.join(", ") });
    let _ = writeln!(
        out,
        "| strategy | aggregator | {} |",
        (0..c.config.sites)
            .map(|k| format!("site {k}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(c.config.sites));
    for r in rows.iter().filter(|r| !r.site_scores.is_empty()) {
        let cells: Vec<String> = (0..c.config.sites as u32)
            .map(|k| match r.site_scores.iter().find(|s| s.site == k) {
                Some(s) => format!(
                    "{} / {} / {}{}",
                    s.accepted,
                    s.refused,
                    s.downweighted,
                    if s.excluded.is_some() {
                        " **excluded**"
                    } else {
                        ""
                    }
                ),
                None => "-".into(),
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            r.strategy,
            r.aggregator,
            cells.join(" | ")
        );
    }
    for r in rows {
        for s in r.site_scores.iter().filter(|s| s.excluded.is_some()) {
            let _ = writeln!(
                out,
                "
- {}: site {} excluded: {}",
                r.strategy,
                s.site,
                s.excluded.as_deref().unwrap_or("")
            );
        }
    }
    out
}

/// Who left, was lost, rejoined or missed rounds (networked runs), and what happened to site
/// processes: empty when membership never changed.
fn membership_section(c: &Comparison) -> String {
    use lowband_runtime::Metric;
    let mut out = String::new();
    for r in c.results {
        let mut lines: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
        let mut missed: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
        // Round 0's joins are the start of the run, not a change.
        let mut seen_left = std::collections::BTreeSet::new();
        for m in &r.metrics {
            match m {
                Metric::Left {
                    round,
                    site,
                    reason,
                } => {
                    seen_left.insert(*site);
                    lines
                        .entry(*site)
                        .or_default()
                        .push(format!("left at round {round} ({reason})"));
                }
                Metric::Joined { round, site } if *round > 0 || seen_left.contains(site) => {
                    lines
                        .entry(*site)
                        .or_default()
                        .push(format!("joined at round {round}"));
                }
                Metric::Missed { round, site } => missed.entry(*site).or_default().push(*round),
                Metric::Refused {
                    round,
                    site,
                    reason,
                    ..
                } if reason.starts_with("join refused") => {
                    lines
                        .entry(*site)
                        .or_default()
                        .push(format!("{reason} (round {round})"));
                }
                _ => {}
            }
        }
        for (site, rounds) in &missed {
            lines.entry(*site).or_default().push(format!(
                "missed {} round(s) closed without it, on a quorum or a grace window ({})",
                rounds.len(),
                compact_rounds(rounds)
            ));
        }
        let name = r.strategy.name();
        let events: Vec<&String> = c
            .events
            .iter()
            .filter(|e| e.starts_with(&format!("{name}: ")))
            .collect();
        if lines.is_empty() && events.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "Membership of {name} (the sites that were not there for the whole run):"
        );
        for (site, what) in &lines {
            let _ = writeln!(out, "- site {site}: {}", what.join("; "));
        }
        for event in events {
            let _ = writeln!(out, "- {}", &event[name.len() + 2..]);
        }
        out.push('\n');
    }
    out
}

/// 3, 4, 5, 9 → "3-5, 9".
fn compact_rounds(rounds: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < rounds.len() {
        let mut j = i;
        while j + 1 < rounds.len() && rounds[j + 1] == rounds[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            rounds[i].to_string()
        } else {
            format!("{}-{}", rounds[i], rounds[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// The notes of an external model's run (PyTorch sites).
fn external_notes(rows: &[StrategySummary]) -> String {
    let mut out = String::new();
    let train = rows
        .first()
        .and_then(|r| r.final_train_loss)
        .map_or("not reported".into(), |l| format!("{l:.4}"));
    let _ = writeln!(out, "- An external model (PyTorch sites): the coordinator cannot run it, so it has no validation loss; the sites evaluate their own. Final training loss (the sites' mean over the last round, as they reported it): {train}.");
    let _ = writeln!(out, "- Bytes, rounds and dollars are the coordinator's ledger (every envelope with its signature); emulated time is the sites' reported compute plus the link profile's time.");
    out
}

fn notes(c: &Comparison) -> String {
    let link = c.config.link;
    let mut out = String::new();
    let _ = writeln!(out, "- Same corpus, model, seed and tokens for every strategy; validation loss in nats per byte over the whole held-out split.");
    let _ = writeln!(out, "- Shipping the training data itself would cost 8 bits per token (one byte each): strategies above that send more than the data.");
    for r in c
        .results
        .iter()
        .filter(|r| r.strategy.kind == StrategyKind::Rounds)
    {
        let codecs = r.strategy.compression_for(c.config.sites);
        if codecs != lowband_protocol::Compression::default() {
            let _ = writeln!(
                out,
                "- {}: up `{}`, down `{}`.",
                r.strategy.name(),
                codecs.uplink,
                codecs.downlink
            );
        }
    }
    let _ = writeln!(out, "- Emulated time: each inner step's FLOPs at {} GFLOP/s per site (over its speed; a round waits for its slowest site) + link time on {} Gbit/s per site, {} ms one way; egress at ${}/GB.", c.config.site_gflop_per_second, link.bandwidth_gbit_per_s, link.latency_ms, link.price_per_gb);
    let speeds = &c.config.site_speeds;
    let speeds = if speeds.is_empty() {
        "every site at the same speed".to_string()
    } else {
        format!(
            "site speeds {} (each site's step time is the nominal one over its speed)",
            speeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if !c.config.faults.is_empty() {
        let faults: Vec<String> = c.config.faults.iter().map(|f| f.to_string()).collect();
        let _ = writeln!(out, "- Faults (fractions of the run's emulated time; `down`: the site's steps since its last update are lost, it comes back with its own state and waits for the parameters; `slow`: its speed times the factor): {}.", faults.join(", "));
    }
    for line in crate::staleness::staleness_notes(c.results) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "- Goodput: the share of the sites' emulated time (compute + link) that went into updates that were merged, not into waiting for the slowest site or the link, nor into refused updates; {speeds}.");
    for line in crate::equal_time::notes(c.results, c.config.eval_every_steps) {
        let _ = writeln!(out, "{line}");
    }
    if let Some(floor) = c.floor {
        let best = c
            .results
            .iter()
            .map(|r| r.final_val_loss)
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(out, "- The synthetic language's entropy rate is {floor:.4} nats/byte: no model can go below it (best here {:+.0}% above).", (best / floor - 1.0) * 100.0);
    }
    let _ = writeln!(
        out,
        "- A run of a few minutes is far too short for full-precision DiLoCo to match DDP: at this length fewer rounds cost loss (see docs/results.md and shared/facts.md); the gap shrinks with training length. Closing it at a large traffic saving is the codecs' job."
    );
    out
}

pub fn write_all(c: &Comparison, run_dir: &Path, json: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let rows = summarize(c);
    let table = table(&rows);
    let notes = if c.config.model.is_some() {
        external_notes(&rows)
    } else {
        notes(c)
    };
    let trust = trust_section(c, &rows) + &membership_section(c);
    println!(
        "\n{table}\n{trust}{}{notes}",
        if trust.is_empty() { "" } else { "\n" }
    );
    let summary = Summary {
        name: c.name.to_string(),
        corpus: c.corpus.to_string(),
        entropy_rate_nats_per_byte: c.floor,
        config: c.config.clone(),
        strategies: rows,
    };
    let summary_json = serde_json::to_vec_pretty(&summary)?;
    write_atomic(&run_dir.join("summary.json"), &summary_json)?;
    // The planner on this run's own figures, projected to sizes worth paying for.
    let projection = if c.config.model.is_some() {
        String::new()
    } else {
        crate::plan::projection(&summary_json)
            .unwrap_or_else(|error| format!("(no cost projection: {error:#})\n"))
    };
    if !projection.is_empty() {
        println!("{projection}");
    }
    if let Some(path) = json {
        write_atomic(path, &summary_json)?;
    }
    // The report next, before anything else that may fail (metrics, packets, charts).
    let config_toml = toml::to_string(c.config).unwrap_or_default();
    let report = format!(
        "# lowband compare: {}\n\nCorpus: {}\n\n{table}\n{trust}\n{notes}\n{projection}\n![loss vs tokens](loss_vs_tokens.svg)\n![loss vs bytes](loss_vs_bytes.svg)\n![loss vs time](loss_vs_time.svg)\n\n## Settings\n\n```toml\n{config_toml}```\n",
        c.name, c.corpus
    );
    write_atomic(&run_dir.join("report.md"), report.as_bytes())?;
    let mut lines = Vec::new();
    for r in c.results {
        for m in &r.metrics {
            let mut value = serde_json::to_value(m)?;
            value["strategy"] = serde_json::Value::String(r.strategy.name());
            lines.extend(serde_json::to_vec(&value)?);
            lines.push(b'\n');
        }
    }
    write_atomic(&run_dir.join("metrics.jsonl"), &lines)?;
    // The last round's packets of site 0, for `lowband inspect packet`.
    for r in c.results {
        for (kind, bytes) in &r.sample_packets {
            let dir = run_dir.join("packets");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            write_atomic(
                &dir.join(format!("{}.{kind}.bin", r.strategy.dir_name())),
                bytes,
            )?;
        }
    }
    crate::plots::loss_curves(
        c.results,
        &run_dir.join("loss_vs_tokens.svg"),
        &run_dir.join("loss_vs_bytes.svg"),
    )?;
    if c.config.model.is_none() {
        crate::plots::loss_vs_time(c.results, &run_dir.join("loss_vs_time.svg"))?;
    }
    println!("wrote {}/ (report.md, summary.json, metrics.jsonl, events.jsonl, loss_vs_tokens.svg, loss_vs_bytes.svg, loss_vs_time.svg, packets/)", run_dir.display());
    Ok(())
}

/// Evaluation points of a run: (tokens, bytes, loss).
pub fn eval_points(r: &RunResult) -> Vec<(u64, u64, f64)> {
    r.metrics
        .iter()
        .filter_map(|m| {
            if let Metric::Eval {
                tokens,
                inter_site_bytes,
                val_loss,
                ..
            } = m
            {
                Some((*tokens, *inter_site_bytes, *val_loss))
            } else {
                None
            }
        })
        .collect()
}
