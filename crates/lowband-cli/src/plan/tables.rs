//! The plans and break-even thresholds as markdown tables.

use super::*;

pub(super) fn human_duration(seconds: f64) -> String {
    match seconds {
        s if s >= 2.0 * 86400.0 => format!("{:.1} d", s / 86400.0),
        s if s >= 2.0 * 3600.0 => format!("{:.1} h", s / 3600.0),
        s if s >= 120.0 => format!("{:.1} min", s / 60.0),
        s => format!("{s:.1} s"),
    }
}

pub(super) fn dollars(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("${:.2}M", v / 1e6),
        v if v >= 1e4 => format!("${:.0}k", v / 1e3),
        v => format!("${v:.0}"),
    }
}

/// The plans as a markdown table, relative to the centralized plan (the first).
pub fn plans_table(plans: &[Plan]) -> String {
    let central = plans
        .iter()
        .find(|p| p.kind == PlanKind::Centralized)
        .map_or(f64::NAN, |p| p.total_dollars);
    let mut out = String::new();
    let _ = writeln!(out, "| plan | H | bits/param/sync (up) | loss gap | tokens for DDP's loss | wall time | utilization | WAN bytes | egress $ | compute $ | total $ | vs centralized |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in plans {
        let h = if p.kind == PlanKind::Strategy {
            p.inner_steps.to_string()
        } else {
            "-".into()
        };
        let bits = match p.kind {
            PlanKind::ShipData | PlanKind::Centralized => "-".into(),
            _ => format!("{:.3}", p.bits_per_param_up),
        };
        let _ = writeln!(
            out,
            "| {} | {h} | {bits} | {:+.1}% | {:+.0}% | {} | {:.1}% | {} | {} | {} | {} | {:.2}x |",
            p.name,
            p.loss_gap * 100.0,
            (p.token_factor - 1.0) * 100.0,
            human_duration(p.wall_seconds),
            p.utilization * 100.0,
            crate::summary_table::human_bytes(p.wan_bytes as u64),
            dollars(p.egress_dollars),
            dollars(p.compute_dollars),
            dollars(p.total_dollars),
            p.total_dollars / central,
        );
    }
    out
}

fn threshold(value: Threshold, unit: impl Fn(f64) -> String) -> String {
    match value {
        Threshold::Always => "always".into(),
        Threshold::Never => "never".into(),
        Threshold::At(x) => unit(x),
    }
}

pub fn break_even_table(rows: &[BreakEven]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| strategy | cheaper than centralized at WAN bandwidth >= | at egress <= | at accelerator discount >= |");
    let _ = writeln!(out, "|---|---|---|---|");
    for b in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            b.strategy,
            threshold(b.min_wan_gbit_per_second, |x| format!("{x:.3} Gbit/s")),
            threshold(b.max_egress_dollars_per_gb, |x| format!("${x:.4}/GB")),
            threshold(b.min_accelerator_discount, |x| format!("{:.1}%", x * 100.0)),
        );
    }
    out
}

pub(super) fn describe(scenario: &Scenario) -> String {
    let site = &scenario.sites[0];
    let uniform = scenario.sites.iter().all(|s| s == site);
    let sites = if uniform {
        format!(
            "{} sites of {} accelerators ({:.0} TFLOP/s peak, MFU {:.0}%, ${:.2}/h), each on {} Gbit/s, {} ms RTT, ${}/GB egress",
            scenario.sites.len(),
            site.hardware.accelerators,
            site.hardware.peak_flops_per_second / 1e12,
            site.hardware.mfu * 100.0,
            site.hardware.dollars_per_accelerator_hour,
            site.link.bandwidth_gbit_per_second,
            site.link.rtt_ms,
            site.link.egress_dollars_per_gb
        )
    } else {
        format!("{} sites (differing; see --json)", scenario.sites.len())
    };
    format!(
        "N = {:.3e} parameters, D = {:.3e} tokens, global batch {:.3e} tokens/step; {sites}; centralized: {} accelerators at ${:.2}/h, {} Gbit/s fabric each; loss law: {}.",
        scenario.params, scenario.tokens, scenario.batch_tokens, scenario.central.accelerators, scenario.central.dollars_per_accelerator_hour, scenario.central.fabric_gbit_per_second, scenario.law.source
    )
}
