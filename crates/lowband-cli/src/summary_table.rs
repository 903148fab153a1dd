//! The comparison's table: one row per strategy, as `compare` prints it, report.md shows it and
//! the README quotes it (a snapshot test keeps the README's true).

use std::fmt::Write as _;

use crate::report::StrategySummary;

/// 1234567 → "1.2 MB" (SI units).
pub(crate) fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// The comparison table as markdown (printed and put in report.md).
pub fn table(rows: &[StrategySummary]) -> String {
    let mut out = String::new();
    let equal_time = rows
        .iter()
        .find_map(|r| r.equal_time_seconds)
        .map_or("-".to_string(), |t| format!("{t:.1} s"));
    let _ = writeln!(out, "| strategy | val loss | gap vs DDP | val loss at {equal_time} (equal time) | inter-site bytes | DDP bytes / bytes | bits/token | bits/param/round (up) | bits/param/step (all) | rounds | emulated time | goodput | egress $ |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let gap = r
            .loss_gap_vs_ddp
            .map_or("-".into(), |g| format!("{:+.1}%", g * 100.0));
        let ratio = r
            .bytes_ratio_vs_ddp
            .map_or("-".into(), |x| format!("{x:.1}x"));
        let loss = if r.final_val_loss.is_nan() {
            "-".to_string()
        } else {
            format!("{:.4}", r.final_val_loss)
        };
        let at_equal_time = match (r.val_loss_at_equal_time, r.step_at_equal_time) {
            (Some(loss), Some(step)) => format!("{loss:.4} (step {step})"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.3} | {:.4} | {} | {:.1} s | {} | {:.4} |",
            r.strategy,
            loss,
            gap,
            at_equal_time,
            human_bytes(r.inter_site_bytes),
            ratio,
            r.bits_per_token,
            r.bits_per_param_per_round,
            r.bits_per_param_per_step.unwrap_or(f64::NAN),
            r.rounds,
            r.emulated_seconds,
            r.goodput
                .map_or("-".into(), |g| format!("{:.0}%", g * 100.0)),
            r.egress_dollars
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::report::Summary;

    /// README.md shows the default run's table; it is rendered here from that run's summary
    /// (docs/default-run-summary.json), so the README cannot drift from what `cargo run
    /// --release` prints. After a change to the default run or the table: run `cargo run
    /// --release`, copy `runs/<name>/summary.json` to docs/default-run-summary.json and the
    /// printed table into the README.
    #[test]
    fn the_readme_shows_the_table_the_default_run_prints() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let summary: Summary = serde_json::from_str(
            &std::fs::read_to_string(root.join("docs/default-run-summary.json")).unwrap(),
        )
        .unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let shown: String = readme
            .lines()
            .skip_while(|l| !l.starts_with("| strategy | val loss"))
            .take_while(|l| l.starts_with('|'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(shown, table(&summary.strategies));
    }
}
