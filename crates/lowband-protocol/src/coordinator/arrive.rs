//! An update's arrival: checked, decoded once, held by the open round (or refused with its
//! reason), and whether the round closes now.

use super::{Action, Coordinator, Held};
use crate::wire::{self, MessageKind};
use crate::{ProtocolError, SiteId};

impl Coordinator {
    /// The plain mean without a direction check merges one decoded update at a time (memory
    /// independent of K); robust aggregators and the direction check need every update at once.
    pub(super) fn merges_one_at_a_time(&self) -> bool {
        self.aggregator.spec() == crate::AggregatorSpec::Mean
            && self.config.robustness.cosine_ratio_min.is_none()
    }

    /// An update into the open round. Asynchronous rounds: a site's second update while its
    /// first is held closes the round first, then goes into the next.
    pub(super) fn accept(
        &mut self,
        now_ms: u64,
        from: SiteId,
        bytes: &[u8],
        actions: &mut Vec<Action>,
    ) -> Result<(), ProtocolError> {
        let result = self.accept_update(now_ms, from, bytes);
        if self.config.asynchronous.is_some()
            && matches!(result, Err(ProtocolError::Duplicate { .. }))
        {
            self.close_round(now_ms, actions);
            return self.accept_update(now_ms, from, bytes);
        }
        result
    }

    fn accept_update(
        &mut self,
        now_ms: u64,
        from: SiteId,
        bytes: &[u8],
    ) -> Result<(), ProtocolError> {
        let message = wire::decode(bytes, self.config.payload_bytes_max())?;
        if message.kind != MessageKind::Update {
            return Err(ProtocolError::WrongKind(message.kind));
        }
        if message.site != from {
            return Err(ProtocolError::SiteMismatch {
                claimed: message.site,
                from,
            });
        }
        if !self.members.contains(&from) {
            return Err(ProtocolError::UnknownSite(from));
        }
        let one_at_a_time = self.merges_one_at_a_time();
        let open = self.open.as_mut().ok_or(ProtocolError::NoOpenRound)?;
        let staleness = match &self.config.asynchronous {
            Some(rule) => {
                let staleness = rule.staleness(open.round, message.round)?;
                // (Any member's update is welcome in an asynchronous round, a new one's too.)
                open.expected.insert(from);
                staleness
            }
            None if message.round != open.round => {
                return Err(ProtocolError::WrongRound {
                    expected: open.round,
                    found: message.round,
                })
            }
            None => 0,
        };
        if !open.expected.contains(&from) {
            return Err(ProtocolError::NotInRound(from));
        }
        if open.received.contains_key(&from) {
            return Err(ProtocolError::Duplicate {
                site: from,
                round: open.round,
            });
        }
        let length =
            crate::fragment_of(&self.config.fragments, self.config.params, open.round).len();
        let held = if one_at_a_time {
            self.scratch.resize(length, 0.0);
            self.uplink.decode(message.payload, &mut self.scratch)?;
            let mut payload = self.spare_payloads.pop().unwrap_or_default();
            payload.clear();
            payload.extend_from_slice(message.payload);
            Held::Payload(payload)
        } else {
            let mut delta = self.spare_deltas.pop().unwrap_or_default();
            delta.resize(length, 0.0);
            if let Err(e) = self.uplink.decode(message.payload, &mut delta) {
                self.spare_deltas.push(delta);
                return Err(e.into());
            }
            Held::Decoded(delta)
        };
        open.received.insert(from, held);
        open.staleness.insert(from, staleness);
        open.first_arrival_ms.get_or_insert(now_ms);
        Ok(())
    }

    pub(super) fn maybe_close(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(open) = &self.open else { return };
        let everyone = !open.received.is_empty()
            && open.expected.iter().all(|s| open.received.contains_key(s));
        let deadline_passed = now_ms
            >= open
                .started_ms
                .saturating_add(self.config.round_deadline_ms);
        // The quorum counts the members still expected (an update from a site that left since
        // is merged, but does not stand in for a member the round still waits for), capped at
        // how many there are.
        let expected_in = open
            .received
            .keys()
            .filter(|s| open.expected.contains(s))
            .count();
        let quorum = expected_in >= self.config.quorum.min(open.expected.len().max(1));
        let close_now = match &self.config.asynchronous {
            Some(rule) => {
                everyone
                    || open
                        .first_arrival_ms
                        .is_some_and(|first| now_ms >= first.saturating_add(rule.grace_ms))
            }
            None => everyone || (deadline_passed && quorum && !open.received.is_empty()),
        };
        if close_now {
            self.close_round(now_ms, actions);
        } else if open.expected.is_empty() {
            // Every member left: start again with whoever is there.
            self.open = None;
            self.open_round(now_ms, actions);
        }
    }
}
