//! A fault schedule for scheduled strategies (`async-diloco`, `[quorum=N]`): sites that go down
//! and come back, and sites that slow down, at fractions of the run's emulated duration (the
//! fastest site's budget of steps at its nominal step time).
//!
//! `--faults down:2@0.3-0.45,slow:1@0.5=0.5` or `random:SEED` (expanded once, with the run's site
//! count, into a list like the first and printed in the report):
//!
//! | fault | what happens |
//! |---|---|
//! | `down:SITE@FROM-TO` | the site stops at FROM: the steps it trained since its last update are lost and its updates still on the link are refused (its connection is gone); it comes back at TO with the optimizer state and data position it had (a site restarted from its own saved state) and waits for the parameters, sent to it in full with the next merge |
//! | `slow:SITE@FROM=FACTOR` | from FROM on, the site computes at FACTOR times its speed |

use std::fmt;
use std::str::FromStr;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One fault of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Fault {
    Down { site: u32, from: f64, to: f64 },
    Slow { site: u32, from: f64, factor: f64 },
}

impl Fault {
    pub fn site(&self) -> u32 {
        match self {
            Fault::Down { site, .. } | Fault::Slow { site, .. } => *site,
        }
    }

    /// The fault's place in the run and its site, checked against `sites`.
    pub fn validate(&self, sites: usize) -> Result<(), String> {
        let fraction = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if self.site() as usize >= sites {
            return Err(format!("`{self}`: site {} of {sites}", self.site()));
        }
        match *self {
            Fault::Down { from, to, .. } if !(fraction(from) && fraction(to) && from < to) => Err(
                format!("`{self}`: FROM-TO must be fractions of the run, FROM below TO"),
            ),
            Fault::Slow { from, factor, .. }
                if !(fraction(from) && factor.is_finite() && factor > 0.0 && factor <= 1000.0) =>
            {
                Err(format!(
                    "`{self}`: FROM is a fraction of the run and FACTOR a number above 0, at most 1000"
                ))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Down { site, from, to } => write!(f, "down:{site}@{from}-{to}"),
            Fault::Slow { site, from, factor } => write!(f, "slow:{site}@{from}={factor}"),
        }
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("fault `{text}`: expected down:SITE@FROM-TO or slow:SITE@FROM=FACTOR");
        let number = |v: &str| v.trim().parse::<f64>().map_err(|_| bad());
        let (kind, rest) = text.trim().split_once(':').ok_or_else(bad)?;
        let (site, when) = rest.split_once('@').ok_or_else(bad)?;
        let site: u32 = site.trim().parse().map_err(|_| bad())?;
        match kind.trim() {
            "down" => {
                let (from, to) = when.split_once('-').ok_or_else(bad)?;
                Ok(Fault::Down {
                    site,
                    from: number(from)?,
                    to: number(to)?,
                })
            }
            "slow" => {
                let (from, factor) = when.split_once('=').ok_or_else(bad)?;
                Ok(Fault::Slow {
                    site,
                    from: number(from)?,
                    factor: number(factor)?,
                })
            }
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for Fault {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Fault> for String {
    fn from(fault: Fault) -> String {
        fault.to_string()
    }
}

/// `random:SEED` for `sites` sites: a third of the sites (at least one) each go down once for
/// 5-15% of the run, starting between 10% and 75% of it, and one other site (when there is
/// one) slows to a factor between 0.3 and 0.7 from between 20% and 60% of the run. Fractions
/// are rounded to hundredths, so the printed schedule is the schedule.
pub fn random_schedule(seed: u64, sites: usize) -> Vec<Fault> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut next = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let hundredths = |x: f64| (x * 100.0).round() / 100.0;
    let mut order: Vec<u32> = (0..sites as u32).collect();
    for i in (1..order.len()).rev() {
        let j = (next() * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    let down = (sites / 3).max(1).min(sites);
    let mut faults = Vec::new();
    for &site in &order[..down] {
        let from = hundredths(0.10 + 0.65 * next());
        let to = hundredths(from + 0.05 + 0.10 * next());
        faults.push(Fault::Down { site, from, to });
    }
    if let Some(&site) = order.get(down) {
        let from = hundredths(0.20 + 0.40 * next());
        let factor = hundredths(0.3 + 0.4 * next());
        faults.push(Fault::Slow { site, from, factor });
    }
    faults
}

/// A `--faults` value: a comma-separated list, or `random:SEED`.
pub fn parse_schedule(text: &str, sites: usize) -> Result<Vec<Fault>, String> {
    if let Some(seed) = text.trim().strip_prefix("random:") {
        let seed = seed
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: random:SEED takes a whole number"))?;
        return Ok(random_schedule(seed, sites));
    }
    text.split(',')
        .filter(|f| !f.trim().is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_print_back_and_validate() {
        let faults = parse_schedule("down:2@0.3-0.45, slow:1@0.5=0.5", 4).unwrap();
        assert_eq!(
            faults.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
            ["down:2@0.3-0.45", "slow:1@0.5=0.5"]
        );
        for fault in &faults {
            fault.validate(4).unwrap();
        }
        assert!(faults[0].validate(2).is_err(), "site 2 of 2");
        for bad in [
            "down:1@0.5-0.4",
            "slow:1@0.5=0",
            "down:1@0.1-1.5",
            "slow:1@2=0.5",
        ] {
            let fault: Fault = bad.parse().unwrap();
            assert!(fault.validate(4).is_err(), "{bad}");
        }
        for bad in [
            "up:1@0.1-0.2",
            "down:x@0.1-0.2",
            "down:1",
            "slow:1@0.5",
            "down:1@-0.1-0.2",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_random_schedule_is_seeded_valid_and_printed_as_it_is() {
        let a = random_schedule(7, 4);
        assert_eq!(a, random_schedule(7, 4));
        assert_ne!(a, random_schedule(8, 4));
        for fault in &a {
            fault.validate(4).unwrap();
            assert_eq!(fault.to_string().parse::<Fault>().unwrap(), *fault);
        }
        assert!(a.iter().any(|f| matches!(f, Fault::Down { .. })));
        assert!(a.iter().any(|f| matches!(f, Fault::Slow { .. })));
    }
}
