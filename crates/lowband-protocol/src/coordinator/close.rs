//! Closing a round, one concern at a time: collect the held updates, measure them (norms, their
//! sum), check their norms, check their directions, merge the accepted ones (the mean one update
//! at a time, or the aggregator), guard the range and apply the outer step, report.

use lowband_codec::Codec;
use rayon::prelude::*;

use super::{Action, Coordinator, Held, OpenRound, RoundReport};
use crate::trust::TrustState;
use crate::{ProtocolError, SiteId};

/// A round being closed: its updates as held, in site order.
struct Closing {
    round: u64,
    /// The fragment it synchronizes (all of θ without fragments), and that fragment's number.
    range: std::ops::Range<usize>,
    fragment: usize,
    sites: Vec<SiteId>,
    missing: Vec<SiteId>,
    /// Payloads (the plain mean: decoded again in each pass) or decoded deltas; see `Held`.
    payloads: Vec<Vec<u8>>,
    dense: Vec<Vec<f32>>,
    /// Asynchronous rounds: each update's staleness, weight in the merge's sum and tokens (see
    /// `AsyncMerge`), in site order; empty for synchronous rounds.
    staleness: Vec<u64>,
    weights: Vec<f32>,
    tokens: Vec<f32>,
    /// Asynchronous rounds: the budget, the fewest tokens the merge's divisor counts (0 else).
    budget: f32,
}

impl Closing {
    fn collect(open: OpenRound, coordinator: &Coordinator) -> Closing {
        let config = &coordinator.config;
        let range = crate::fragment_of(&config.fragments, config.params, open.round);
        let fragment = if config.fragments.is_empty() {
            0
        } else {
            (open.round % config.fragments.len() as u64) as usize
        };
        let sites: Vec<SiteId> = open.received.keys().copied().collect();
        let missing: Vec<SiteId> = open
            .expected
            .iter()
            .filter(|s| !open.received.contains_key(s))
            .copied()
            .collect();
        let (mut staleness, mut weights, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
        let budget = config
            .asynchronous
            .as_ref()
            .map_or(0.0, |r| r.budget() as f32);
        if let Some(rule) = &config.asynchronous {
            for site in &sites {
                let stale = open.staleness.get(site).copied().unwrap_or(0);
                staleness.push(stale);
                weights.push(rule.weight(stale));
                tokens.push(rule.tokens(*site) as f32);
            }
        }
        let (mut payloads, mut dense) = (Vec::new(), Vec::new());
        for (_, held) in open.received {
            match held {
                Held::Payload(payload) => payloads.push(payload),
                Held::Decoded(delta) => dense.push(delta),
            }
        }
        debug_assert!(
            payloads.is_empty() || dense.is_empty(),
            "a round holds one kind"
        );
        debug_assert_eq!(payloads.len() + dense.len(), sites.len());
        debug_assert!(dense.iter().all(|d| d.len() == range.len()));
        Closing {
            round: open.round,
            range,
            fragment,
            sites,
            missing,
            payloads,
            dense,
            staleness,
            weights,
            tokens,
            budget,
        }
    }

    /// The weight of update `i` in the merge's sum (1 in synchronous rounds).
    fn weight(&self, i: usize) -> f32 {
        self.weights.get(i).copied().unwrap_or(1.0)
    }

    /// The plain mean merges one update at a time (nothing decoded was kept).
    fn one_at_a_time(&self) -> bool {
        self.dense.is_empty()
    }

    /// Update `i`, decoded again into `scratch` or as held.
    fn update<'a>(&'a self, uplink: &mut dyn Codec, scratch: &'a mut [f32], i: usize) -> &'a [f32] {
        held_update(uplink, scratch, &self.payloads, &self.dense, i)
    }
}

/// The checks' outcome: accepted updates (index into the round's sites, norm) and refused ones.
struct Verdicts {
    accepted: Vec<(usize, f32)>,
    refused: Vec<(SiteId, ProtocolError)>,
}

/// What the merge did.
struct Merge {
    applied: bool,
    downweighted: Vec<SiteId>,
}

impl Coordinator {
    pub(super) fn close_round(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let open = self.open.take().expect("close_round needs an open round");
        let mut closing = Closing::collect(open, self);
        let (norms, sum) = self.measure(&closing);
        let mut verdicts = self.check_norms(&closing, &norms);
        self.check_directions(&closing, &mut verdicts);
        debug_assert_eq!(
            verdicts.accepted.len() + verdicts.refused.len(),
            closing.sites.len(),
            "every update is accepted or refused"
        );
        let (cosines, merged_count) = self.cosines_and_mean_sum(&closing, &verdicts, &sum);
        drop(sum);
        let merge = self.merge_and_apply(&mut closing, &mut verdicts, merged_count);
        self.report(closing, verdicts, merge, norms, cosines, actions);
        self.open_round(now_ms, actions);
    }

    /// Every update's L2 norm, and their sum (for each update's cosine with the rest).
    fn measure(&mut self, closing: &Closing) -> (Vec<f32>, Vec<f64>) {
        self.scratch.resize(closing.range.len(), 0.0);
        let mut norms = Vec::with_capacity(closing.sites.len());
        // A lone update has no others to be compared with (its cosine is 0): no sum.
        let lone = closing.sites.len() == 1;
        let mut sum = vec![0.0f64; if lone { 0 } else { closing.range.len() }];
        for i in 0..closing.sites.len() {
            let delta = closing.update(self.uplink.as_mut(), &mut self.scratch, i);
            norms.push(crate::par::norm(delta));
            if lone {
                continue;
            }
            // The first update is written, not added: a fresh buffer's pages read before their
            // first write are copied on that write, each a TLB shootdown across the threads.
            if i == 0 {
                crate::par::zip_apply(&mut sum, delta, |s, v| *s = *v as f64);
            } else {
                crate::par::zip_apply(&mut sum, delta, |s, v| *s += *v as f64);
            }
        }
        (norms, sum)
    }

    /// The norm check, against this round's median norm (recent rounds' when it has fewer than
    /// 3 updates).
    fn check_norms(&self, closing: &Closing, norms: &[f32]) -> Verdicts {
        let robustness = self.config.robustness;
        let reference = self.trust.reference_norm(closing.fragment, norms);
        let mut verdicts = Verdicts {
            accepted: Vec::with_capacity(norms.len()),
            refused: Vec::new(),
        };
        for (i, norm) in norms.iter().enumerate() {
            if TrustState::norm_ok(*norm, reference, robustness.norm_ratio_max) {
                verdicts.accepted.push((i, *norm));
            } else {
                verdicts.refused.push((
                    closing.sites[i],
                    ProtocolError::UpdateNorm {
                        norm: *norm,
                        reference,
                        ratio_max: robustness.norm_ratio_max.unwrap_or(f32::INFINITY),
                    },
                ));
            }
        }
        verdicts
    }

    /// The direction check, among the updates the norm check kept (it needs them decoded).
    fn check_directions(&self, closing: &Closing, verdicts: &mut Verdicts) {
        let Some(ratio_min) = self.config.robustness.cosine_ratio_min else {
            return;
        };
        let deltas: Vec<&[f32]> = verdicts
            .accepted
            .iter()
            .map(|(i, _)| closing.dense[*i].as_slice())
            .collect();
        let cosines = crate::trust::leave_one_out_cosines(&deltas);
        let Some(reference) = TrustState::cosine_reference(&cosines) else {
            return;
        };
        let mut kept = Vec::with_capacity(verdicts.accepted.len());
        for (update, cosine) in std::mem::take(&mut verdicts.accepted)
            .into_iter()
            .zip(cosines)
        {
            if cosine >= ratio_min * reference {
                kept.push(update);
            } else {
                verdicts.refused.push((
                    closing.sites[update.0],
                    ProtocolError::UpdateDirection {
                        cosine,
                        reference,
                        ratio_min,
                    },
                ));
            }
        }
        verdicts.accepted = kept;
        verdicts.refused.sort_by_key(|(site, _)| *site);
    }

    /// The cosine of every update with the sum of the others (reported, accepted or not), and,
    /// for the plain mean, the sum of the accepted ones into `merged`, one at a time in site
    /// order (as `aggregate::Mean` sums). Returns the cosines and how many were summed.
    fn cosines_and_mean_sum(
        &mut self,
        closing: &Closing,
        verdicts: &Verdicts,
        sum: &[f64],
    ) -> (Vec<f32>, usize) {
        let mut cosines = Vec::with_capacity(closing.sites.len());
        self.merged.resize(closing.range.len(), 0.0);
        let mut merged_count = 0usize;
        for i in 0..closing.sites.len() {
            let delta = closing.update(self.uplink.as_mut(), &mut self.scratch, i);
            cosines.push(if sum.is_empty() {
                0.0
            } else {
                crate::trust::cosine_with_rest(delta, sum)
            });
            if closing.one_at_a_time() && verdicts.accepted.iter().any(|(a, _)| *a == i) {
                // (A synchronous round's weight is 1: x · 1 is x, bit for bit.)
                let weight = closing.weight(i);
                if merged_count == 0 {
                    crate::par::zip_apply(&mut self.merged, delta, |m, v| *m = weight * v);
                } else {
                    crate::par::zip_apply(&mut self.merged, delta, |m, v| *m += weight * v);
                }
                merged_count += 1;
            }
        }
        (cosines, merged_count)
    }

    /// Merge the accepted updates (the mean's sum scaled, or the aggregator), score them, and
    /// apply the outer step unless the merge would leave the parameters' range: then θ and the
    /// momentum are kept and the update that held the largest value there is refused.
    fn merge_and_apply(
        &mut self,
        closing: &mut Closing,
        verdicts: &mut Verdicts,
        merged_count: usize,
    ) -> Merge {
        let mut merge = Merge {
            applied: false,
            downweighted: Vec::new(),
        };
        if verdicts.accepted.is_empty() {
            return merge;
        }
        let robustness = self.config.robustness;
        let range = closing.range.clone();
        let flags = self.merge(closing, verdicts, merged_count);
        debug_assert_eq!(flags.len(), verdicts.accepted.len());
        // A merge of finite values can still overflow, or carry θ where no forward pass
        // survives; never let it into θ (nor into the outer momentum). The culprit is neither
        // scored as accepted nor kept in the norm history.
        let culprit = self
            .outer
            .first_out_of_range(
                &self.global,
                &self.merged,
                range.clone(),
                self.config.parameter_abs_max,
            )
            .map(|(parameter, merged_value)| {
                let (i, update_value) =
                    self.largest_at(closing, &verdicts.accepted, parameter - range.start);
                (i, parameter, merged_value, update_value)
            });
        for ((i, _), flag) in verdicts.accepted.iter().zip(&flags) {
            if culprit.is_some_and(|c| c.0 == *i) {
                continue;
            }
            self.trust
                .record_accepted(closing.sites[*i], *flag, &robustness);
            if *flag {
                merge.downweighted.push(closing.sites[*i]);
            }
        }
        let norms = verdicts
            .accepted
            .iter()
            .filter(|(i, _)| culprit.is_none_or(|c| c.0 != *i))
            .map(|(_, n)| *n)
            .collect();
        self.trust
            .record_norms(closing.fragment, norms, robustness.norm_history_rounds);
        merge.applied = culprit.is_none();
        match culprit {
            Some((i, parameter, merged_value, update_value)) => {
                verdicts.accepted.retain(|(a, _)| *a != i);
                verdicts.refused.push((
                    closing.sites[i],
                    ProtocolError::MergeOutOfRange {
                        parameter,
                        merged_value,
                        update_value,
                        limit: self.config.parameter_abs_max,
                    },
                ));
            }
            None => {
                self.outer
                    .step_range(&mut self.global, &self.merged, range.clone());
                debug_assert!(
                    self.global[range].iter().all(|v| v.is_finite()),
                    "an applied merge leaves θ finite"
                );
            }
        }
        merge
    }

    /// The accepted updates merged into `self.merged`: the mean's sum scaled, or the aggregator.
    /// Returns which of them the aggregator cut hard (the mean cuts none).
    fn merge(
        &mut self,
        closing: &mut Closing,
        verdicts: &Verdicts,
        merged_count: usize,
    ) -> Vec<bool> {
        // Asynchronous rounds divide the weighted sum by the accepted updates' tokens, at least
        // one budget's (`AsyncMerge`).
        let tokens: f32 = verdicts
            .accepted
            .iter()
            .map(|(i, _)| closing.tokens.get(*i).copied().unwrap_or(0.0))
            .sum::<f32>()
            .max(closing.budget);
        let weighted = !closing.weights.is_empty();
        if closing.one_at_a_time() {
            debug_assert_eq!(merged_count, verdicts.accepted.len());
            let scale = if weighted {
                1.0 / tokens
            } else {
                1.0 / merged_count as f32
            };
            self.merged
                .par_iter_mut()
                .with_min_len(crate::par::PIECE)
                .for_each(|m| *m *= scale);
            vec![false; verdicts.accepted.len()]
        } else {
            if weighted {
                // An aggregator weighs its inputs alike: each is scaled so that the mean of
                // the scaled updates is the weighted merge above.
                let count = verdicts.accepted.len() as f32;
                for (i, _) in &verdicts.accepted {
                    let scale = count * closing.weights[*i] / tokens;
                    closing.dense[*i].iter_mut().for_each(|v| *v *= scale);
                }
            }
            let deltas: Vec<&[f32]> = verdicts
                .accepted
                .iter()
                .map(|(i, _)| closing.dense[*i].as_slice())
                .collect();
            self.aggregator.aggregate(&deltas, &mut self.merged)
        }
    }

    /// The round's report, the refusals (scored; a site refused too often is excluded), the
    /// checkpoint, and the next round's number. Buffers go back to the spares.
    fn report(
        &mut self,
        closing: Closing,
        verdicts: Verdicts,
        merge: Merge,
        norms: Vec<f32>,
        cosines: Vec<f32>,
        actions: &mut Vec<Action>,
    ) {
        let Closing {
            round,
            sites,
            missing,
            payloads,
            dense,
            staleness,
            ..
        } = closing;
        self.spare_deltas.extend(dense);
        self.spare_payloads.extend(payloads);
        let delta_norm = if merge.applied {
            crate::par::norm(&self.merged)
        } else {
            0.0
        };
        let contributors: Vec<SiteId> = verdicts.accepted.iter().map(|(i, _)| sites[*i]).collect();
        let refused_sites: Vec<SiteId> = verdicts.refused.iter().map(|(s, _)| *s).collect();
        debug_assert!(
            contributors.iter().all(|c| !refused_sites.contains(c)),
            "no update is both merged and refused"
        );
        debug_assert!(merge.applied || contributors.is_empty() || !refused_sites.is_empty());
        let update_staleness = sites.iter().copied().zip(staleness).collect();
        let update_norms = sites.iter().copied().zip(norms).collect();
        let update_cosines = sites.iter().copied().zip(cosines).collect();
        for (site, reason) in verdicts.refused {
            self.refuse(site, reason, actions);
        }
        actions.push(Action::RoundClosed(RoundReport {
            round,
            contributors,
            missing,
            refused: refused_sites,
            downweighted: merge.downweighted,
            update_norms,
            update_cosines,
            update_staleness,
            delta_norm,
            applied: merge.applied,
        }));
        debug_assert_eq!(self.round, round, "the closed round is the open one");
        self.round = round + 1;
        actions.push(Action::Checkpoint { round: self.round });
    }

    /// Among the accepted updates (index into the round's sites), the one with the largest
    /// magnitude at `offset` of the fragment, and its value there: the update that caused a
    /// refused merge.
    fn largest_at(
        &mut self,
        closing: &Closing,
        accepted: &[(usize, f32)],
        offset: usize,
    ) -> (usize, f32) {
        debug_assert!(!accepted.is_empty(), "a merge has at least one update");
        let mut largest = (accepted[0].0, 0.0f32);
        for &(i, _) in accepted {
            let delta = closing.update(self.uplink.as_mut(), &mut self.scratch, i);
            let value = delta[offset];
            // A NaN counts as the largest.
            if value.is_nan() || value.abs() > largest.1.abs() {
                largest = (i, value);
            }
        }
        largest
    }
}

/// Update `i` of a closing round: decoded again from its payload into `scratch` (the mean held
/// payloads) or as held (decoded on arrival).
fn held_update<'a>(
    uplink: &mut dyn Codec,
    scratch: &'a mut [f32],
    payloads: &[Vec<u8>],
    dense: &'a [Vec<f32>],
    i: usize,
) -> &'a [f32] {
    if dense.is_empty() {
        uplink
            .decode(&payloads[i], scratch)
            .expect("decoded once when it arrived");
        scratch
    } else {
        &dense[i]
    }
}
