//! The coordinator's decisions about its sites' connections, sans IO: which connection is a
//! site's current one (a site that reconnects gets a new generation; what an old connection still
//! delivers is ignored), when the rounds start (every site joined, or a quorum once the join
//! timeout passed), which connection to close and with which code (excluded, fallen behind,
//! replaced), and when a run whose sites are all gone stops. The network shell
//! (`lowband_net`'s coordinator loop) only moves bytes; the in-memory simulation drives this same
//! machine. Time is an argument.

use std::collections::BTreeMap;

use crate::link::close;
use crate::SiteId;

/// What the shell does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberAction {
    /// Close this connection of `site` with `code`, saying `reason`.
    Close {
        site: SiteId,
        generation: u64,
        code: u64,
        reason: String,
    },
    /// The site is a member from now on (`Event::SiteJoined` to the coordinator). `late`: it
    /// joined after the rounds started (a `Joined` line in the run's record).
    Joined { site: SiteId, late: bool },
    /// The site left the round (`Event::SiteLeft`; a `Left` line with the reason).
    Left { site: SiteId, reason: String },
    /// Open the first round: enough sites are here.
    Start,
    /// Stop the run with this error.
    Stop(String),
}

/// The coordinator's view of its sites' connections.
#[derive(Clone, Debug)]
pub struct Membership {
    sites: usize,
    quorum: usize,
    join_timeout_ms: u64,
    /// Every site's current connection: its generation.
    current: BTreeMap<SiteId, u64>,
    generation: u64,
    /// Before the first round: until when the coordinator waits for every site.
    gathering_until_ms: Option<u64>,
    /// Since when no site is connected and no member is left (the run waits for one to come
    /// back for at most `join_timeout_ms`).
    alone_since_ms: Option<u64>,
}

impl Membership {
    /// A coordinator of `sites` sites that starts with `quorum` of them after `join_timeout_ms`
    /// (all of them sooner), starting to wait at `now_ms`.
    pub fn new(sites: usize, quorum: usize, join_timeout_ms: u64, now_ms: u64) -> Membership {
        debug_assert!(quorum >= 1 && quorum <= sites, "quorum {quorum} of {sites}");
        Membership {
            sites,
            quorum,
            join_timeout_ms,
            current: BTreeMap::new(),
            generation: 0,
            gathering_until_ms: Some(now_ms.saturating_add(join_timeout_ms)),
            alone_since_ms: None,
        }
    }

    /// Whether the rounds have started.
    pub fn started(&self) -> bool {
        self.gathering_until_ms.is_none()
    }

    /// The sites with a connection.
    pub fn connected(&self) -> impl Iterator<Item = SiteId> + '_ {
        self.current.keys().copied()
    }

    pub fn is_connected(&self, site: SiteId) -> bool {
        self.current.contains_key(&site)
    }

    /// Whether `generation` is `site`'s current connection (what others deliver is ignored).
    pub fn is_current(&self, site: SiteId, generation: u64) -> bool {
        self.current.get(&site) == Some(&generation)
    }

    /// A site was admitted on a new connection: its generation, and what follows. A site that
    /// was still connected (a restarted process, back before its old connection timed out) leaves
    /// on the old one first.
    pub fn admitted(&mut self, site: SiteId) -> (u64, Vec<MemberAction>) {
        debug_assert!(
            (site as usize) < self.sites,
            "site {site} of {}",
            self.sites
        );
        self.generation += 1;
        let generation = self.generation;
        let mut actions = Vec::new();
        if let Some(old) = self.current.insert(site, generation) {
            actions.push(MemberAction::Close {
                site,
                generation: old,
                code: 0,
                reason: "replaced by a new connection".into(),
            });
            if self.started() {
                actions.push(MemberAction::Left {
                    site,
                    reason:
                        "a new connection with its key replaced the old one (a restarted process)"
                            .into(),
                });
            }
        }
        if self.started() {
            actions.push(MemberAction::Joined { site, late: true });
        } else if self.current.len() == self.sites {
            actions.extend(self.start());
        }
        self.alone_since_ms = None;
        (generation, actions)
    }

    fn start(&mut self) -> Vec<MemberAction> {
        self.gathering_until_ms = None;
        let mut actions: Vec<MemberAction> = self
            .current
            .keys()
            .map(|&site| MemberAction::Joined { site, late: false })
            .collect();
        actions.push(MemberAction::Start);
        actions
    }

    /// A connection ended (closed, broken, or its writer could not deliver).
    pub fn ended(&mut self, site: SiteId, generation: u64, reason: String) -> Vec<MemberAction> {
        if !self.is_current(site, generation) {
            return Vec::new();
        }
        self.current.remove(&site);
        if self.started() {
            vec![MemberAction::Left { site, reason }]
        } else {
            Vec::new()
        }
    }

    /// The coordinator excluded `site` (its updates): its connection is closed with the reason,
    /// and it does not try again. (The coordinator already dropped it from its members.)
    pub fn excluded(&mut self, site: SiteId, reason: &str) -> Vec<MemberAction> {
        match self.current.remove(&site) {
            Some(generation) => vec![MemberAction::Close {
                site,
                generation,
                code: close::EXCLUDED,
                reason: format!("excluded: {reason}"),
            }],
            None => Vec::new(),
        }
    }

    /// `site` has more queued than it may (a hung process, a far slower link): it is asked to
    /// rejoin, and leaves the round meanwhile.
    pub fn fell_behind(&mut self, site: SiteId, reason: String) -> Vec<MemberAction> {
        let Some(generation) = self.current.remove(&site) else {
            return Vec::new();
        };
        vec![
            MemberAction::Close {
                site,
                generation,
                code: close::REJOIN,
                reason: "fell too far behind: rejoin".into(),
            },
            MemberAction::Left { site, reason },
        ]
    }

    /// Time passed. `members`: how many members the coordinator has. Starts the rounds with a
    /// quorum once the join timeout has passed (or stops the run with too few), and stops a run
    /// whose sites have all been gone for the join timeout.
    pub fn tick(&mut self, now_ms: u64, members: usize) -> Vec<MemberAction> {
        if let Some(until_ms) = self.gathering_until_ms {
            if now_ms < until_ms {
                return Vec::new();
            }
            if self.current.len() >= self.quorum {
                return self.start();
            }
            return vec![MemberAction::Stop(format!(
                "{} of {} sites joined within {} s (a quorum is {})",
                self.current.len(),
                self.sites,
                self.join_timeout_ms / 1000,
                self.quorum
            ))];
        }
        if members > 0 || !self.current.is_empty() {
            self.alone_since_ms = None;
            return Vec::new();
        }
        let since = *self.alone_since_ms.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) >= self.join_timeout_ms {
            return vec![MemberAction::Stop(format!(
                "every site is gone (excluded, left or lost) and none came back within {} s",
                self.join_timeout_ms / 1000
            ))];
        }
        Vec::new()
    }

    /// When the next `tick` can change something (the join deadline, or the end of the wait
    /// for a site to come back), if any.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.gathering_until_ms.or_else(|| {
            self.alone_since_ms
                .map(|since| since.saturating_add(self.join_timeout_ms))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rounds_start_with_every_site_or_with_a_quorum_after_the_timeout() {
        let mut m = Membership::new(3, 2, 1_000, 0);
        assert!(m.admitted(0).1.is_empty());
        assert!(m.admitted(2).1.is_empty());
        assert!(m.tick(999, 0).is_empty());
        assert_eq!(
            m.tick(1_000, 0),
            vec![
                MemberAction::Joined {
                    site: 0,
                    late: false
                },
                MemberAction::Joined {
                    site: 2,
                    late: false
                },
                MemberAction::Start
            ]
        );
        assert!(m.started());
        // (Only one site: the quorum of 2 is not met.)
        let mut m = Membership::new(3, 2, 1_000, 0);
        m.admitted(0);
        assert!(matches!(m.tick(1_000, 0)[..], [MemberAction::Stop(_)]));
        let mut m = Membership::new(2, 2, 1_000, 0);
        m.admitted(1);
        let (_, actions) = m.admitted(0);
        assert_eq!(
            actions,
            vec![
                MemberAction::Joined {
                    site: 0,
                    late: false
                },
                MemberAction::Joined {
                    site: 1,
                    late: false
                },
                MemberAction::Start
            ]
        );
    }

    #[test]
    fn an_old_connection_is_closed_and_ignored_after_a_reconnect() {
        let mut m = Membership::new(1, 1, 1_000, 0);
        let (first, _) = m.admitted(0);
        let (second, actions) = m.admitted(0);
        assert!(
            matches!(actions[0], MemberAction::Close { generation, code: 0, .. } if generation == first)
        );
        assert!(matches!(actions[1], MemberAction::Left { site: 0, .. }));
        assert_eq!(
            actions[2],
            MemberAction::Joined {
                site: 0,
                late: true
            }
        );
        assert!(m.ended(0, first, "late".into()).is_empty());
        assert!(m.is_current(0, second));
        assert_eq!(m.ended(0, second, "gone".into()).len(), 1);
        // Alone: the run stops after the join timeout, not before.
        assert!(m.tick(5_000, 0).is_empty());
        assert!(m.tick(5_999, 0).is_empty());
        assert!(matches!(m.tick(6_000, 0)[..], [MemberAction::Stop(_)]));
    }
}
