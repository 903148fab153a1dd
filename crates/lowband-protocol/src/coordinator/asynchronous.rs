//! Asynchronous rounds (`async-diloco`): a round closes once every member's update is in, or a
//! grace window after its first update arrived, whichever comes first; an update trained from
//! an older round's parameters is merged with a weight that falls with its staleness, or refused
//! past a bound; the merge is weighted by the tokens each update trained.
//!
//! The rule, stated once: an update from site k, trained from the parameters of round b and
//! held by the open round r, has staleness s = r − b. It is refused (`TooStale`, not counted
//! against the site's trust: slowness is not hostility) when s > `staleness_max`, and otherwise
//! weighs w = tokens_k / (1 + s). The merged pseudo-gradient is Σ w_i δ_i / Σ tokens_i over the
//! accepted updates: the token-weighted mean when every update is fresh, and a stale update pulls
//! with a fraction of its weight instead of being rescaled up. A site's second update while its
//! first is still held closes the round first (a round holds one update per site).

use crate::{ProtocolError, SiteId};

/// The asynchronous merge rule (see the module's documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct AsyncMerge {
    /// Tokens site k trains per update, indexed by site id (a site beyond the list weighs 1).
    pub site_tokens: Vec<u64>,
    /// Largest staleness merged (in rounds); older updates are refused.
    pub staleness_max: u64,
    /// Time after a round's first update at which it closes with what it holds.
    pub grace_ms: u64,
}

impl AsyncMerge {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.site_tokens.contains(&0) {
            return Err("every site's tokens per update must be at least 1".into());
        }
        Ok(())
    }

    /// Site `site`'s tokens per update.
    pub fn tokens(&self, site: SiteId) -> u64 {
        self.site_tokens.get(site as usize).copied().unwrap_or(1)
    }

    /// An update for round `found` held by open round `open`: its staleness, or why it is refused.
    pub(super) fn staleness(&self, open: u64, found: u64) -> Result<u64, ProtocolError> {
        if found > open {
            return Err(ProtocolError::WrongRound {
                expected: open,
                found,
            });
        }
        let staleness = open - found;
        if staleness > self.staleness_max {
            return Err(ProtocolError::TooStale {
                round: found,
                open,
                staleness_max: self.staleness_max,
            });
        }
        Ok(staleness)
    }

    /// Each update's weight in the merge's sum (tokens over 1 + staleness), and the sum's
    /// divisor (the tokens of the accepted updates).
    pub(super) fn weight(&self, site: SiteId, staleness: u64) -> f32 {
        self.tokens(site) as f32 / (1 + staleness) as f32
    }
}
