//! Aggregators: merge the decoded deltas of a round into one.

/// Merges one delta per contributing site (given in site-id order, all of one length).
pub trait Aggregator: Send {
    fn name(&self) -> &'static str;
    fn aggregate(&mut self, deltas: &[&[f32]], out: &mut [f32]);
}

/// The plain mean, summed in site-id order (deterministic). Tolerates no bad site.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mean;

impl Aggregator for Mean {
    fn name(&self) -> &'static str {
        "mean"
    }

    fn aggregate(&mut self, deltas: &[&[f32]], out: &mut [f32]) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
