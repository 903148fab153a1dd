//! SVG plots: validation loss against tokens and against inter-site bytes (log), of one comparison
//! or of several runs' metrics together (`lowband plot`); robustness, cost and scaling charts.

use std::path::Path;

use anyhow::{anyhow, Result};
use lowband_runtime::{Metric, RunResult};
use plotters::prelude::*;

use crate::report::eval_points;

type Canvas<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// A white SVG canvas of `size` pixels at `path`, and the error mapper of every drawing call.
fn canvas(
    path: &Path,
    size: (u32, u32),
) -> Result<(
    Canvas<'_>,
    impl Fn(DrawingAreaErrorKind<std::io::Error>) -> anyhow::Error + Copy + '_,
)> {
    let root = SVGBackend::new(path, size).into_drawing_area();
    let e =
        move |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("plotting {}: {e}", path.display());
    root.fill(&WHITE).map_err(e)?;
    Ok((root, e))
}

/// Tableau 10: distinct for up to ten strategies on one chart.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
];

/// 2500000 → "2.5M".
fn si(value: f64) -> String {
    let (scaled, suffix) = match value.abs() {
        v if v >= 1e12 => (value / 1e12, "T"),
        v if v >= 1e9 => (value / 1e9, "G"),
        v if v >= 1e6 => (value / 1e6, "M"),
        v if v >= 1e3 => (value / 1e3, "k"),
        _ => (value, ""),
    };
    let text = format!("{scaled:.1}");
    format!("{}{suffix}", text.trim_end_matches(".0"))
}

/// One line of a loss chart: its label and its (tokens, inter-site bytes, validation loss) points.
pub type LossSeries = (String, Vec<(u64, u64, f64)>);

fn loss_range(series: &[LossSeries]) -> (f64, f64) {
    let losses = series.iter().flat_map(|s| s.1.iter().map(|p| p.2));
    let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| {
        (lo.min(l), hi.max(l))
    });
    if lo.is_finite() {
        (lo * 0.97, hi * 1.03)
    } else {
        (0.0, 1.0)
    }
}

/// A comparison's two charts, every strategy on each: validation loss, or, for an external
/// model's run (which the coordinator cannot evaluate), the training loss its sites reported.
pub fn loss_curves(results: &[RunResult], by_tokens: &Path, by_bytes: &Path) -> Result<()> {
    let training = results.iter().all(|r| eval_points(r).is_empty());
    let series: Vec<LossSeries> = results
        .iter()
        .map(|r| {
            let points = if training {
                round_training_points(r)
            } else {
                eval_points(r)
            };
            (r.strategy.name(), points)
        })
        .collect();
    let loss = if training {
        "training loss (sites' reports)"
    } else {
        "validation loss"
    };
    loss_curves_with(&series, by_tokens, by_bytes, loss)
}

/// Validation loss against emulated seconds (log), every strategy: what each reaches for the
/// same wall-clock time on the run's link (the start, at 0 s, is off a log axis).
pub fn loss_vs_time(results: &[RunResult], path: &Path) -> Result<()> {
    // (Milliseconds in the series' first slot, as the plot's points are integers there.)
    let series: Vec<LossSeries> = results
        .iter()
        .map(|r| {
            let points = r
                .metrics
                .iter()
                .filter_map(|m| match m {
                    Metric::Eval {
                        emulated_seconds,
                        val_loss,
                        ..
                    } => Some(((emulated_seconds * 1e3) as u64, 0, *val_loss)),
                    _ => None,
                })
                .collect();
            (r.strategy.name(), points)
        })
        .collect();
    let (lo, hi) = loss_range(&series);
    let longest = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0 as f64 / 1e3))
        .fold(1.0, f64::max);
    plot(
        path,
        (
            "validation loss vs emulated wall-clock time (log)",
            "seconds (compute + link)",
            "validation loss",
        ),
        0.1..longest * 1.5,
        lo..hi,
        &series,
        |p| (p.0 >= 100).then_some((p.0 as f64 / 1e3, p.2)),
        true,
    )
}

/// Per round: (tokens, inter-site bytes, the sites' mean training loss over the round's steps).
fn round_training_points(r: &RunResult) -> Vec<(u64, u64, f64)> {
    let steps: Vec<(u64, f32)> = r
        .metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Step { step, loss, .. } => Some((*step, *loss)),
            _ => None,
        })
        .collect();
    let total_steps = steps.iter().map(|s| s.0 + 1).max().unwrap_or(1);
    let tokens_per_step = r.tokens / total_steps;
    let mut first = 0;
    let mut points = Vec::new();
    for m in &r.metrics {
        if let Metric::Round {
            step,
            inter_site_bytes,
            ..
        } = m
        {
            let round: Vec<f64> = steps
                .iter()
                .filter(|(s, _)| (first..*step).contains(s))
                .map(|(_, l)| *l as f64)
                .collect();
            if !round.is_empty() {
                let mean = round.iter().sum::<f64>() / round.len() as f64;
                points.push((step * tokens_per_step, *inter_site_bytes, mean));
            }
            first = *step;
        }
    }
    points
}

/// Validation loss against tokens, and against inter-site bytes (log scale), one line per series.
pub fn loss_curves_of(series: &[LossSeries], by_tokens: &Path, by_bytes: &Path) -> Result<()> {
    loss_curves_with(series, by_tokens, by_bytes, "validation loss")
}

/// `loss` against tokens, and against inter-site bytes (log scale), one line per series.
fn loss_curves_with(
    series: &[LossSeries],
    by_tokens: &Path,
    by_bytes: &Path,
    loss: &str,
) -> Result<()> {
    let (lo, hi) = loss_range(series);
    let max_tokens = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    plot(
        by_tokens,
        (&format!("{loss} vs training tokens"), "tokens", loss),
        0.0..max_tokens,
        lo..hi,
        series,
        |p| Some((p.0 as f64, p.2)),
        false,
    )?;
    let max_bytes = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    // Log scale: points before the first byte was sent cannot be drawn.
    plot(
        by_bytes,
        (
            &format!("{loss} vs inter-site bytes (log)"),
            "inter-site bytes",
            loss,
        ),
        1e3..max_bytes * 2.0,
        lo..hi,
        series,
        |p| (p.1 >= 1000).then_some((p.1 as f64, p.2)),
        true,
    )
}

#[allow(clippy::too_many_arguments)]
fn plot(
    path: &Path,
    (title, x_label, y_label): (&str, &str, &str),
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    series: &[LossSeries],
    point: impl Fn((u64, u64, f64)) -> Option<(f64, f64)>,
    log_x: bool,
) -> Result<()> {
    let (root, e) = canvas(path, (760, 460))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(format!("{y_label} (nats/byte)"))
                .x_label_formatter(&|v| si(*v))
                .draw()
                .map_err(e)?;
            for (i, (label, points)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let points: Vec<(f64, f64)> = points.iter().copied().filter_map(&point).collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(e)?
                    .label(label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 3, color.filled())),
                    )
                    .map_err(e)?;
            }
            // Loss falls to the right: the upper right corner is where the lines are not.
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }};
    }
    if log_x {
        draw!(builder.build_cartesian_2d(x.log_scale(), y).map_err(e)?);
    } else {
        draw!(builder.build_cartesian_2d(x, y).map_err(e)?);
    }
    root.present().map_err(e)?;
    Ok(())
}

/// Gap to the honest run (%) for every attack (x) and aggregator (one line each), clamped to
/// [−10%, +50%] so a diverged mean does not flatten the rest; ±3% marked.
pub fn robustness_chart(
    path: &Path,
    title: &str,
    attacks: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> Result<()> {
    const LOW: f64 = -10.0;
    const HIGH: f64 = 50.0;
    let (root, e) = canvas(path, (820, 460))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5..attacks.len() as f64 - 0.5, LOW..HIGH)
        .map_err(e)?;
    let names = attacks.to_vec();
    chart
        .configure_mesh()
        .x_labels(attacks.len())
        .x_label_formatter(&move |v| {
            names
                .get(v.round() as usize)
                .filter(|_| (v - v.round()).abs() < 0.01)
                .cloned()
                .unwrap_or_default()
        })
        .y_desc("gap to the honest run, % (clamped to [-10, 50])")
        .draw()
        .map_err(e)?;
    for bound in [-3.0, 3.0] {
        chart
            .draw_series(LineSeries::new(
                vec![(-0.5, bound), (attacks.len() as f64 - 0.5, bound)],
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(e)?;
    }
    for (i, (name, gaps)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // Each aggregator a little to the side, so equal values stay visible.
        let offset = (i as f64 - (series.len() as f64 - 1.0) / 2.0) * 0.08;
        let points: Vec<(f64, f64)> = gaps
            .iter()
            .enumerate()
            .filter_map(|(x, g)| g.map(|g| (x as f64 + offset, g.clamp(LOW, HIGH))))
            .collect();
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Total dollars (log) against the slowest site's WAN bandwidth (log), one line per plan: where a
/// strategy's line crosses the centralized one is its bandwidth break-even.
pub fn cost_vs_bandwidth(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let points = series.iter().flat_map(|s| s.1.iter());
    let (x_lo, x_hi, y_lo, y_hi) = points.fold(
        (f64::INFINITY, 0f64, f64::INFINITY, 0f64),
        |(a, b, c, d), p| (a.min(p.0), b.max(p.0), c.min(p.1), d.max(p.1)),
    );
    if !(x_lo.is_finite() && y_lo.is_finite() && y_lo > 0.0) {
        return Err(anyhow!("plotting {}: nothing to plot", path.display()));
    }
    // Keep the chart readable when a plan is orders of magnitude dearer at low bandwidth.
    let y_hi = y_hi.min(y_lo * 1e3);
    let (root, e) = canvas(path, (820, 500))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_lo..x_hi).log_scale(),
            (y_lo * 0.9..y_hi * 1.1).log_scale(),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("WAN bandwidth of the slowest site (Gbit/s)")
        .y_desc("total $ (loss gap priced in)")
        .y_label_formatter(&|v| format!("${}", si(*v)))
        .draw()
        .map_err(e)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let clipped: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.1.min(y_hi * 1.1))).collect();
        chart
            .draw_series(LineSeries::new(clipped, color.stroke_width(2)))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Lines on log-log axes (one per series), with points.
pub fn log_log(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let points = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|p| p.0 > 0.0 && p.1 > 0.0);
    let (x_lo, x_hi, y_lo, y_hi) = points.fold(
        (f64::INFINITY, 0f64, f64::INFINITY, 0f64),
        |(a, b, c, d), p| (a.min(p.0), b.max(p.0), c.min(p.1), d.max(p.1)),
    );
    if !(x_lo.is_finite() && y_lo.is_finite()) {
        return Err(anyhow!("plotting {}: nothing to plot", path.display()));
    }
    let (root, e) = canvas(path, (820, 500))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_lo * 0.8..x_hi * 1.25).log_scale(),
            (y_lo * 0.8..y_hi * 1.25).log_scale(),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(e)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
