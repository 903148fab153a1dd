//! Aggregators: merge the decoded deltas of a round into one, and say whose influence they cut.
//!
//! Every aggregator works on what the coordinator has after decoding: one dense delta per
//! contributing site, all of the round's fragment length, in site-id order. That is the same for
//! every codec, so robustness never depends on the compression; what differs is what the zeros
//! of a sparse packet mean.
//!
//! **Sparse updates** (top-k, random-k) are mostly exact zeros, and a coordinate-wise statistic
//! over zeros would throw the signal away (with 1.56% density a median of four sites is zero
//! almost everywhere). The coordinate-wise aggregators therefore work per coordinate over its
//! **support**, the m sites whose decoded value there is not zero, and scale the result by m / n
//! (n contributors), exactly as the mean of sparse deltas is (the mean over the support) x m / n.
//! For dense codecs every value is non-zero and the rule is the textbook one. A site alone on
//! a coordinate passes its value there at weight 1/n, as in the mean: the checks before
//! aggregation (`crate::trust`) bound how much that can carry (the norm check) and refuse an
//! update that agrees with no other (the direction check: noise on random positions). Dropping
//! coordinates sent by at most b sites instead was measured and rejected: honest top-k picks
//! overlap too little (sparseloco, tiny preset, K = 4: the honest median run lost 2.6%, and the
//! noise and sign-flip attacks did more harm, not less). The vector aggregators (centered clip,
//! clipped mean) need no special case.
//!
//! Cost, for n contributors and P parameters: the mean O(nP) time and no extra memory; median and
//! trimmed mean O(nP log n) time (a sort of at most n values per coordinate, in parallel) and
//! O(n) scratch per thread; centered clip one median plus O(L n P) for L iterations and O(P)
//! extra memory; clipped mean O(nP). All are deterministic for a given input order.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

/// Which aggregator merges a round, with its parameter. Written as text (`trimmed-mean:trim=0.25`)
/// in configs.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AggregatorSpec {
    /// The plain mean. Tolerates no bad site.
    Mean,
    /// Coordinate-wise median over the support (the mean of the two middle values when m is
    /// even). Tolerates fewer than half bad sites.
    Median,
    /// Coordinate-wise: drop the b = ⌊trim·n⌋ largest and b smallest values of the support
    /// (fewer when the support has at most 2b values: then the median), average the rest.
    /// Tolerates b bad sites.
    TrimmedMean { trim: f32 },
    /// Centered clipping (Karimireddy, He and Jaggi, 2021, "Learning from History for
    /// Byzantine Robust Optimization"; Hivemind's CenteredClip): start at the coordinate-wise
    /// median v, radius τ = the median distance ‖δᵢ − v‖; then `iterations` times
    /// v ← v + (1/n) Σ (δᵢ − v)·min(1, τ/‖δᵢ − v‖). Each bad site moves v by at most τ/n per
    /// iteration, so it tolerates fewer than half bad sites as long as the honest updates lie
    /// within about τ of each other (the median distance is an honest one when most are honest).
    CenteredClip { iterations: u32 },
    /// Scale each update to at most the median update norm c, then average: each site moves the
    /// result by at most c/n. It bounds a bad site's influence but does not remove a bad
    /// direction: it tolerates no bad site in the strict sense.
    ClippedMean,
}

/// Default trimmed fraction: one site in four from each end (b = 1 at K = 4, 2 at K = 8).
pub const TRIM_DEFAULT: f32 = 0.25;
/// Default centered-clipping iterations (Karimireddy et al. find 1-3 enough).
pub const CENTERED_CLIP_ITERATIONS_DEFAULT: u32 = 3;
const ITERATIONS_MAX: u32 = 100;

impl AggregatorSpec {
    /// Every name the parser accepts.
    pub const NAMES: [&'static str; 5] = [
        "mean",
        "median",
        "trimmed-mean",
        "centered-clip",
        "clipped-mean",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            AggregatorSpec::Mean => "mean",
            AggregatorSpec::Median => "median",
            AggregatorSpec::TrimmedMean { .. } => "trimmed-mean",
            AggregatorSpec::CenteredClip { .. } => "centered-clip",
            AggregatorSpec::ClippedMean => "clipped-mean",
        }
    }

    /// How many bad inputs of `n` it is designed to withstand (see each variant).
    pub fn tolerates(&self, n: usize) -> usize {
        match self {
            AggregatorSpec::Mean | AggregatorSpec::ClippedMean => 0,
            AggregatorSpec::Median | AggregatorSpec::CenteredClip { .. } => n.saturating_sub(1) / 2,
            AggregatorSpec::TrimmedMean { trim } => trim_count(*trim, n),
        }
    }

    pub fn is_mean(&self) -> bool {
        *self == AggregatorSpec::Mean
    }
}

/// b = ⌊trim·n⌋, at most (n − 1)/2 so that one value is always kept.
fn trim_count(trim: f32, n: usize) -> usize {
    ((trim as f64 * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
}

impl fmt::Display for AggregatorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AggregatorSpec::TrimmedMean { trim } if *trim != TRIM_DEFAULT => {
                write!(f, "trimmed-mean:trim={trim}")
            }
            AggregatorSpec::CenteredClip { iterations }
                if *iterations != CENTERED_CLIP_ITERATIONS_DEFAULT =>
            {
                write!(f, "centered-clip:iterations={iterations}")
            }
            other => f.write_str(other.name()),
        }
    }
}

impl TryFrom<String> for AggregatorSpec {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<AggregatorSpec> for String {
    fn from(spec: AggregatorSpec) -> String {
        spec.to_string()
    }
}

impl FromStr for AggregatorSpec {
    type Err = String;

    /// `mean`, `median`, `trimmed-mean[:trim=F]` (0 ≤ F < 0.5), `centered-clip[:iterations=L]`
    /// (1 ≤ L ≤ 100), `clipped-mean`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, parameter) = match text.split_once(':') {
            Some((name, parameter)) => (name.trim(), Some(parameter.trim())),
            None => (text.trim(), None),
        };
        let value = |key: &str| -> Result<Option<&str>, String> {
            match parameter {
                None => Ok(None),
                Some(p) => match p.split_once('=') {
                    Some((k, v)) if k.trim() == key => Ok(Some(v.trim())),
                    _ => Err(format!("aggregator `{text}`: {name} takes only `{key}=`")),
                },
            }
        };
        let no_parameter = || {
            if parameter.is_some() {
                Err(format!("aggregator `{text}`: {name} takes no parameter"))
            } else {
                Ok(())
            }
        };
        match name {
            "mean" => no_parameter().map(|_| AggregatorSpec::Mean),
            "median" => no_parameter().map(|_| AggregatorSpec::Median),
            "clipped-mean" => no_parameter().map(|_| AggregatorSpec::ClippedMean),
            "trimmed-mean" => {
                let trim = match value("trim")? {
                    None => TRIM_DEFAULT,
                    Some(v) => v
                        .parse::<f32>()
                        .ok()
                        .filter(|t| (0.0..0.5).contains(t))
                        .ok_or_else(|| {
                            format!("aggregator `{text}`: trim must be a number in [0, 0.5)")
                        })?,
                };
                Ok(AggregatorSpec::TrimmedMean { trim })
            }
            "centered-clip" => {
                let iterations = match value("iterations")? {
                    None => CENTERED_CLIP_ITERATIONS_DEFAULT,
                    Some(v) => v
                        .parse::<u32>()
                        .ok()
                        .filter(|i| (1..=ITERATIONS_MAX).contains(i))
                        .ok_or_else(|| {
                            format!("aggregator `{text}`: iterations must be 1 to {ITERATIONS_MAX}")
                        })?,
                };
                Ok(AggregatorSpec::CenteredClip { iterations })
            }
            _ => Err(format!(
                "unknown aggregator `{name}` (known: {})",
                AggregatorSpec::NAMES.join(", ")
            )),
        }
    }
}

/// Merges one delta per contributing site (in site-id order, all of one length, at least one).
/// Returns, per input, whether the aggregator cut that input's influence hard (the site scores
/// count it): see [`build`] for each aggregator's rule.
pub trait Aggregator: Send {
    fn spec(&self) -> AggregatorSpec;
    fn aggregate(&mut self, deltas: &[&[f32]], out: &mut [f32]) -> Vec<bool>;
}

/// The aggregator for `spec`. "Cut hard" means: for the coordinate-wise ones, the input was left
/// out on more coordinates of its support than halfway between what chance gives (2b/n) and
/// all of them; for the clipping ones, it was scaled by less than one half.
pub fn build(spec: AggregatorSpec) -> Box<dyn Aggregator> {
    match spec {
        AggregatorSpec::Mean => Box::new(Mean),
        other => Box::new(Robust {
            spec: other,
            scratch: Vec::new(),
        }),
    }
}

/// The plain mean, summed in site-id order (deterministic). Tolerates no bad site.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mean;

impl Aggregator for Mean {
    fn spec(&self) -> AggregatorSpec {
        AggregatorSpec::Mean
    }

    fn aggregate(&mut self, deltas: &[&[f32]], out: &mut [f32]) -> Vec<bool> {
        assert!(!deltas.is_empty(), "a round closes with at least one delta");
        let scale = 1.0 / deltas.len() as f32;
        out.copy_from_slice(deltas[0]);
        for d in &deltas[1..] {
            assert_eq!(d.len(), out.len());
            for (o, v) in out.iter_mut().zip(d.iter()) {
                *o += v;
            }
        }
        for o in out.iter_mut() {
            *o *= scale;
        }
        vec![false; deltas.len()]
    }
}

struct Robust {
    spec: AggregatorSpec,
    scratch: Vec<f32>,
}

impl Aggregator for Robust {
    fn spec(&self) -> AggregatorSpec {
        self.spec
    }

    fn aggregate(&mut self, deltas: &[&[f32]], out: &mut [f32]) -> Vec<bool> {
        assert!(!deltas.is_empty(), "a round closes with at least one delta");
        assert!(
            deltas.iter().all(|d| d.len() == out.len()),
            "deltas of one round have one length"
        );
        let n = deltas.len();
        match self.spec {
            AggregatorSpec::Mean => Mean.aggregate(deltas, out),
            AggregatorSpec::Median => coordinatewise(deltas, out, (n - 1) / 2),
            AggregatorSpec::TrimmedMean { trim } => {
                coordinatewise(deltas, out, trim_count(trim, n))
            }
            AggregatorSpec::CenteredClip { iterations } => {
                centered_clip(deltas, out, iterations, &mut self.scratch)
            }
            AggregatorSpec::ClippedMean => clipped_mean(deltas, out),
        }
    }
}

/// Centered clipping (Karimireddy et al. 2021): from the coordinate-wise median, `iterations`
/// steps towards every delta, each clipped to the median distance. Returns which deltas were cut
/// to less than half.
fn centered_clip(
    deltas: &[&[f32]],
    out: &mut [f32],
    iterations: u32,
    scratch: &mut Vec<f32>,
) -> Vec<bool> {
    let n = deltas.len();
    coordinatewise(deltas, out, (n - 1) / 2);
    let mut distances: Vec<f64> = deltas.iter().map(|d| distance(d, out)).collect();
    let radius = median(&distances);
    let mut factors = vec![1.0f64; n];
    if radius > 0.0 && radius.is_finite() {
        scratch.resize(out.len(), 0.0);
        for _ in 0..iterations {
            for (f, d) in factors.iter_mut().zip(&distances) {
                *f = if *d > radius { radius / d } else { 1.0 };
            }
            let weights: Vec<f32> = factors.iter().map(|f| (*f / n as f64) as f32).collect();
            // v += Σ wᵢ (δᵢ − v), per coordinate in input order.
            out.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let first = c * CHUNK;
                    for (j, v) in chunk.iter_mut().enumerate() {
                        let mut step = 0.0f32;
                        for (d, w) in deltas.iter().zip(&weights) {
                            step += w * (d[first + j] - *v);
                        }
                        *v += step;
                    }
                });
            for (dist, d) in distances.iter_mut().zip(deltas) {
                *dist = distance(d, out);
            }
        }
    }
    factors.iter().map(|f| *f < 0.5).collect()
}

/// The mean of the deltas, each scaled down to the median norm if above it. Returns which deltas
/// were cut to less than half.
fn clipped_mean(deltas: &[&[f32]], out: &mut [f32]) -> Vec<bool> {
    let n = deltas.len();
    let norms: Vec<f64> = deltas
        .iter()
        .map(|d| {
            d.iter()
                .map(|v| (*v as f64) * (*v as f64))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let bound = median(&norms);
    let factors: Vec<f64> = norms
        .iter()
        .map(|m| {
            if *m > bound && *m > 0.0 {
                bound / m
            } else {
                1.0
            }
        })
        .collect();
    let weights: Vec<f32> = factors.iter().map(|f| (*f / n as f64) as f32).collect();
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first = c * CHUNK;
            for (j, o) in chunk.iter_mut().enumerate() {
                let mut sum = 0.0f32;
                for (d, w) in deltas.iter().zip(&weights) {
                    sum += w * d[first + j];
                }
                *o = sum;
            }
        });
    factors.iter().map(|f| *f < 0.5).collect()
}

/// Coordinates per parallel task.
const CHUNK: usize = 4096;

/// Per coordinate over the support (non-zero values, m of them): sort, drop min(trim, (m−1)/2)
/// from each end, average the rest, scale by m/n. Returns which inputs were left out on more
/// of their support than halfway between chance (2·trim/n) and always.
fn coordinatewise(deltas: &[&[f32]], out: &mut [f32], trim: usize) -> Vec<bool> {
    let n = deltas.len();
    let (left_out, support) = out
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            let first = c * CHUNK;
            let mut left_out = vec![0u64; n];
            let mut support = vec![0u64; n];
            let mut values: Vec<(f32, usize)> = Vec::with_capacity(n);
            for (j, o) in chunk.iter_mut().enumerate() {
                values.clear();
                values.extend(
                    deltas
                        .iter()
                        .enumerate()
                        .map(|(i, d)| (d[first + j], i))
                        .filter(|(v, _)| *v != 0.0),
                );
                let m = values.len();
                if m == 0 {
                    *o = 0.0;
                    continue;
                }
                values.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let t = trim.min((m - 1) / 2);
                let kept = &values[t..m - t];
                let sum: f32 = kept.iter().map(|(v, _)| v).sum();
                *o = sum / kept.len() as f32 * (m as f32 / n as f32);
                for (position, (_, i)) in values.iter().enumerate() {
                    support[*i] += 1;
                    if position < t || position >= m - t {
                        left_out[*i] += 1;
                    }
                }
            }
            (left_out, support)
        })
        .reduce(
            || (vec![0u64; n], vec![0u64; n]),
            |(mut a, mut b), (c, d)| {
                a.iter_mut().zip(c).for_each(|(x, y)| *x += y);
                b.iter_mut().zip(d).for_each(|(x, y)| *x += y);
                (a, b)
            },
        );
    let chance = 2.0 * trim as f64 / n as f64;
    let threshold = (1.0 + chance) / 2.0;
    left_out
        .iter()
        .zip(&support)
        .map(|(l, s)| *s > 0 && trim > 0 && *l as f64 / *s as f64 > threshold)
        .collect()
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The median (mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let m = sorted.len();
    if m % 2 == 1 {
        sorted[m / 2]
    } else {
        (sorted[m / 2 - 1] + sorted[m / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: &str, deltas: &[&[f32]]) -> (Vec<f32>, Vec<bool>) {
        let mut out = vec![f32::NAN; deltas[0].len()];
        let flags = build(spec.parse().unwrap()).aggregate(deltas, &mut out);
        (out, flags)
    }

    #[test]
    fn mean_of_hand_computed_cases() {
        let mut out = [0.0f32; 3];
        Mean.aggregate(&[&[1.0, 2.0, -3.0], &[3.0, 2.0, 3.0]], &mut out);
        assert_eq!(out, [2.0, 2.0, 0.0]);
        Mean.aggregate(&[&[5.0, 5.0, 5.0]], &mut out);
        assert_eq!(out, [5.0, 5.0, 5.0]);
        let one: &[f32] = &[1.0, 1.0, 1.0];
        Mean.aggregate(&[one; 4], &mut out);
        assert_eq!(out, [1.0, 1.0, 1.0], "all-equal inputs give that value");
    }

    #[test]
    fn median_of_hand_computed_cases() {
        // Odd count: the middle; even count: mean of the middle two; ties; one huge outlier.
        let (out, _) = run(
            "median",
            &[&[1.0, 5.0, 2.0], &[3.0, 5.0, 2.0], &[1000.0, -7.0, 2.0]],
        );
        assert_eq!(out, [3.0, 5.0, 2.0]);
        let (out, _) = run("median", &[&[1.0], &[2.0], &[4.0], &[100.0]]);
        assert_eq!(out, [3.0]);
        let same: &[f32] = &[-2.5, 7.0];
        assert_eq!(
            run("median", &[same; 5]).0,
            vec![-2.5, 7.0],
            "all-equal inputs give that value"
        );
    }

    #[test]
    fn median_withstands_its_claimed_number_of_bad_inputs() {
        // n = 5 tolerates 2: two inputs at ±1e30 do not move the result out of the honest range.
        let honest: [&[f32]; 3] = [&[1.0, 2.0], &[1.5, 2.5], &[2.0, 3.0]];
        let spec: AggregatorSpec = "median".parse().unwrap();
        assert_eq!(spec.tolerates(5), 2);
        let (out, _) = run(
            "median",
            &[
                honest[0],
                honest[1],
                &[1e30, -1e30],
                honest[2],
                &[1e30, 1e30],
            ],
        );
        assert_eq!(
            out,
            vec![2.0, 2.5],
            "coordinate 0: 1, 1.5, 2, 1e30, 1e30; coordinate 1: -1e30, 2, 2.5, 3, 1e30"
        );
        // Over many coordinates the outliers are left out everywhere (flagged); honest inputs,
        // each the middle one a third of the time, are not.
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|i| {
                (0..300)
                    .map(|j| {
                        if i < 3 {
                            ((i + j) % 3) as f32 + 1.0
                        } else if i == 3 {
                            -1e30
                        } else {
                            1e30
                        }
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let (out, flags) = run("median", &refs);
        assert!(out.iter().all(|v| *v == 2.0), "the honest middle");
        assert_eq!(flags, vec![false, false, false, true, true]);
    }

    #[test]
    fn trimmed_mean_of_hand_computed_cases() {
        // n = 4, trim 0.25: b = 1 from each end, the middle two averaged.
        let (out, _) = run(
            "trimmed-mean",
            &[&[1.0, 0.5], &[2.0, 0.5], &[3.0, 0.5], &[-50.0, 0.5]],
        );
        assert_eq!(out, vec![1.5, 0.5]);
        // n = 8, b = 2 tolerates two bad inputs at any size.
        let spec: AggregatorSpec = "trimmed-mean".parse().unwrap();
        assert_eq!(spec.tolerates(8), 2);
        let rows: Vec<Vec<f32>> = vec![
            vec![1.0],
            vec![2.0],
            vec![3.0],
            vec![4.0],
            vec![5.0],
            vec![6.0],
            vec![1e9],
            vec![-1e9],
        ];
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        assert_eq!(run("trimmed-mean", &refs).0, vec![3.5]);
        // trim=0 is the mean.
        assert_eq!(
            run("trimmed-mean:trim=0", &[&[1.0], &[2.0], &[6.0]]).0,
            vec![3.0]
        );
    }

    #[test]
    fn sparse_inputs_are_aggregated_over_their_support() {
        // Coordinate 0: only site 0 sent it: its value at weight 1/n, as in the mean.
        // Coordinate 1: sites 0, 1, 2 sent it (median 2), scaled by 3/4.
        // Coordinate 2: nobody: 0.
        let deltas: [&[f32]; 4] = [
            &[4.0, 1.0, 0.0],
            &[0.0, 2.0, 0.0],
            &[0.0, 9.0, 0.0],
            &[0.0, 0.0, 0.0],
        ];
        let (out, _) = run("median", &deltas);
        assert_eq!(out, vec![1.0, 1.5, 0.0]);
        // Dense median would have thrown coordinate 1's signal away (median of 0, 1, 2, 9 is 1.5
        // too here, but of 0, 0, 0, 4 is 0): the mean agrees on coordinate 0.
        let mut mean = [0.0f32; 3];
        Mean.aggregate(&deltas, &mut mean);
        assert_eq!(mean[0], out[0]);
    }

    #[test]
    fn centered_clip_pulls_in_an_outlier_and_keeps_agreeing_inputs() {
        let same: &[f32] = &[0.3, -0.1, 2.0];
        assert_eq!(
            run("centered-clip", &[same; 4]).0,
            same.to_vec(),
            "all-equal inputs give that value"
        );
        // Three honest inputs near (1, 1), one at (-100, -100): the result stays near (1, 1).
        let (out, flags) = run(
            "centered-clip",
            &[&[1.0, 1.0], &[1.1, 0.9], &[0.9, 1.1], &[-100.0, -100.0]],
        );
        assert!(out.iter().all(|v| (v - 1.0).abs() < 0.1), "{out:?}");
        assert_eq!(flags, vec![false, false, false, true]);
        // Hand-computed single iteration: inputs (1), (3), (11); median 3, distances 2, 0, 8,
        // radius 2; step = ((1−3)·1 + 0 + 8·(2/8)) / 3 = 0.
        assert_eq!(
            run("centered-clip:iterations=1", &[&[1.0], &[3.0], &[11.0]]).0,
            vec![3.0]
        );
    }

    #[test]
    fn clipped_mean_bounds_each_input_to_the_median_norm() {
        // Norms 1, 1, 100 (median 1): the third is scaled to norm 1.
        let (out, flags) = run("clipped-mean", &[&[1.0, 0.0], &[0.0, 1.0], &[100.0, 0.0]]);
        assert!(
            (out[0] - 2.0 / 3.0).abs() < 1e-6 && (out[1] - 1.0 / 3.0).abs() < 1e-6,
            "{out:?}"
        );
        assert_eq!(flags, vec![false, false, true]);
        let same: &[f32] = &[3.0, 4.0];
        assert_eq!(run("clipped-mean", &[same; 3]).0, same.to_vec());
    }

    #[test]
    fn ties_are_broken_deterministically_and_do_not_change_the_value() {
        // Equal values at the trim boundary: whichever copy is dropped, the result is the same,
        // and the input order does not matter.
        let a: [&[f32]; 5] = [&[2.0], &[2.0], &[2.0], &[5.0], &[-1.0]];
        let b: [&[f32]; 5] = [&[5.0], &[2.0], &[-1.0], &[2.0], &[2.0]];
        for name in ["median", "trimmed-mean", "trimmed-mean:trim=0.2"] {
            assert_eq!(run(name, &a).0, vec![2.0], "{name}");
            assert_eq!(run(name, &b).0, vec![2.0], "{name}");
        }
        // Even count with a tie in the middle: the mean of the two middle values.
        assert_eq!(
            run("median", &[&[1.0], &[3.0], &[3.0], &[9.0]]).0,
            vec![3.0]
        );
        // trimmed-mean at n = 4 keeps the middle two: (3 + 3) / 2.
        assert_eq!(
            run("trimmed-mean", &[&[1.0], &[3.0], &[3.0], &[9.0]]).0,
            vec![3.0]
        );
    }

    #[test]
    fn centered_clip_withstands_its_claimed_number_of_bad_inputs() {
        // n = 5 tolerates 2: two far-away inputs (in opposite and equal directions) move the
        // result by at most a fraction of the honest spread.
        let spec: AggregatorSpec = "centered-clip".parse().unwrap();
        assert_eq!(spec.tolerates(5), 2);
        for bad in [[1e3f32, 1e3], [1e3, -1e3]] {
            let (out, flags) = run(
                "centered-clip",
                &[
                    &[1.0, 1.0],
                    &[1.2, 0.8],
                    &[bad[0], bad[0]],
                    &[0.8, 1.2],
                    &[bad[1], bad[1]],
                ],
            );
            assert!(
                out.iter().all(|v| (v - 1.0).abs() < 0.25),
                "{bad:?}: {out:?}"
            );
            assert_eq!(flags, vec![false, false, true, false, true]);
        }
    }

    #[test]
    fn clipped_mean_bounds_but_does_not_remove_a_bad_input() {
        // It tolerates no bad input in the strict sense: one sign-flipped input of equal norm
        // is averaged in (the result halves), but a huge one moves the result by at most c/n.
        let (out, _) = run("clipped-mean", &[&[1.0], &[1.0], &[-1.0], &[1.0]]);
        assert_eq!(out, vec![0.5]);
        let (out, _) = run("clipped-mean", &[&[1.0], &[1.0], &[-1e9], &[1.0]]);
        assert_eq!(out, vec![0.5], "-1e9 is clipped to norm 1 (the median)");
    }

    #[test]
    fn one_input_is_returned_as_is() {
        for name in AggregatorSpec::NAMES {
            assert_eq!(
                run(name, &[&[1.0, -2.0, 0.0]]).0,
                vec![1.0, -2.0, 0.0],
                "{name}"
            );
        }
    }

    #[test]
    fn specs_parse_print_and_refuse() {
        for text in [
            "mean",
            "median",
            "trimmed-mean",
            "trimmed-mean:trim=0.1",
            "centered-clip",
            "centered-clip:iterations=5",
            "clipped-mean",
        ] {
            let spec: AggregatorSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
        for bad in [
            "avg",
            "median:x=1",
            "trimmed-mean:trim=0.5",
            "trimmed-mean:trim=-1",
            "centered-clip:iterations=0",
            "mean:trim=1",
            "trimmed-mean:iterations=2",
        ] {
            assert!(bad.parse::<AggregatorSpec>().is_err(), "{bad}");
        }
    }
}
