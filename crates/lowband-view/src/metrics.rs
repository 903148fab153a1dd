//! The Prometheus text format (version 0.0.4) of a view's state: every name prefixed
//! `lowband_`, labelled by strategy (and site, direction), so an operator's Prometheus can scrape
//! a coordinator like any other service.

use std::fmt::Write;

use crate::state::{SiteState, SiteView, StrategyView, ViewState};

/// A label value escaped as the format says (backslash, double quote, newline).
fn escaped(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Samples of one strategy: (labels, value) pairs.
type Samples = Vec<(String, f64)>;

/// A metric family: its name, help, type, and its samples for one strategy (`strategy` is the
/// strategy's label, ready to use).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: fn(&StrategyView, &str, &mut Samples),
}

const FAMILIES: &[Family] = &[
    Family {
        name: "lowband_rounds_total",
        help: "Rounds closed.",
        kind: "counter",
        samples: |v, l, out| out.push((l.into(), v.rounds as f64)),
    },
    Family {
        name: "lowband_steps_total",
        help: "Inner steps done by every site.",
        kind: "counter",
        samples: |v, l, out| out.push((l.into(), v.step as f64)),
    },
    Family {
        name: "lowband_bytes_total",
        help: "Inter-site bytes as the ledger counts them.",
        kind: "counter",
        samples: |v, l, out| {
            for site in &v.site_views {
                for (direction, bytes) in [("up", site.bytes_up), ("down", site.bytes_down)] {
                    out.push((
                        format!("{l},site=\"{}\",direction=\"{direction}\"", site.site),
                        bytes as f64,
                    ));
                }
            }
        },
    },
    Family {
        name: "lowband_egress_dollars_total",
        help: "Egress dollars of the bytes so far at the link profile's price.",
        kind: "counter",
        samples: |v, l, out| out.push((l.into(), v.egress_dollars)),
    },
    Family {
        name: "lowband_train_loss",
        help: "Mean training loss of the sites at the latest step.",
        kind: "gauge",
        samples: |v, l, out| out.extend(v.train.last().map(|p| (l.into(), p.loss))),
    },
    Family {
        name: "lowband_val_loss",
        help: "Validation loss of the global model at the latest evaluation.",
        kind: "gauge",
        samples: |v, l, out| out.extend(v.val.last().map(|p| (l.into(), p.loss))),
    },
    Family {
        name: "lowband_eta_seconds",
        help: "Seconds to the end of the strategy at its rate so far.",
        kind: "gauge",
        samples: |v, l, out| out.extend(v.eta_seconds.map(|eta| (l.into(), eta))),
    },
    Family {
        name: "lowband_finished",
        help: "1 once the strategy's run is over.",
        kind: "gauge",
        samples: |v, l, out| out.push((l.into(), if v.finished { 1.0 } else { 0.0 })),
    },
    Family {
        name: "lowband_site_up",
        help: "1 while a site takes part (not gone, not excluded).",
        kind: "gauge",
        samples: |v, l, out| {
            per_site(v, l, out, |site| {
                let up = !matches!(site.state, SiteState::Gone | SiteState::Excluded);
                if up {
                    1.0
                } else {
                    0.0
                }
            })
        },
    },
    Family {
        name: "lowband_site_refused_total",
        help: "A site's updates the coordinator refused.",
        kind: "counter",
        samples: |v, l, out| per_site(v, l, out, |site| site.refused as f64),
    },
    Family {
        name: "lowband_site_accepted_total",
        help: "A site's updates the coordinator merged.",
        kind: "counter",
        samples: |v, l, out| per_site(v, l, out, |site| site.accepted as f64),
    },
    Family {
        name: "lowband_site_compute_seconds_total",
        help: "Seconds a site reported training.",
        kind: "counter",
        samples: |v, l, out| per_site(v, l, out, |site| site.compute_seconds),
    },
];

/// One sample per site of `v`: `value` of it, labelled with its number.
fn per_site(v: &StrategyView, l: &str, out: &mut Samples, value: impl Fn(&SiteView) -> f64) {
    for site in &v.site_views {
        out.push((format!("{l},site=\"{}\"", site.site), value(site)));
    }
}

/// `/metrics`: the state in the Prometheus text format.
pub fn prometheus(state: &ViewState) -> String {
    let mut out = String::new();
    for family in FAMILIES {
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
        let mut samples = Samples::new();
        for view in &state.strategies {
            let label = format!("strategy=\"{}\"", escaped(&view.name));
            (family.samples)(view, &label, &mut samples);
        }
        for (labels, value) in samples {
            let _ = writeln!(out, "{}{{{labels}}} {value}", family.name);
        }
    }
    out
}
