//! The decisions of a site's connection to its coordinator, sans IO: how a connection ended
//! (read from its close code once, here), whether and until when the site tries again, and when a
//! refusal is final. The network shell (`lowband_net::SiteClient`) only moves bytes and reports
//! what happened; time is an argument (milliseconds on any clock the shell keeps), so the seeded
//! simulation drives this same machine without sleeping.
//!
//! The rules:
//! - A site tries to reach its coordinator (connect, then send its join request) every
//!   `retry_ms` until its budget runs out, at least once. The budget is `reconnect_ms` from the
//!   start, and renewed only after the coordinator has said something on a connection: a
//!   connection closed before it delivered anything (a refusal, a coordinator not ready) does not
//!   buy more time, so a site cannot retry forever against a coordinator that never answers.
//! - A refusal is final (the coordinator does not list the key, or refused the join request):
//!   retrying cannot change it.
//! - Asked to rejoin (it fell behind), a site reconnects even when it would not retry otherwise,
//!   for at least `rejoin_ms`.
//! - Excluded, or the run ended: the site stops. The coordinator stopped (Ctrl-C, an error) or
//!   the connection broke: the site reconnects within its budget (a coordinator resumed from its
//!   state), or stops at once when `reconnect_ms` is 0.

/// Close codes: what a coordinator or a site means by ending a connection on purpose.
pub mod close {
    /// Excluded for its updates: the site stops.
    pub const EXCLUDED: u64 = 1;
    /// The site leaves (Ctrl-C): the coordinator drops it at once, without an idle timeout.
    pub const LEAVING: u64 = 2;
    /// It fell too far behind: it reconnects and gets the current parameters in full.
    pub const REJOIN: u64 = 3;
    /// Refused at its join (not a site of this run, a bad join request, other run settings;
    /// the reason names them). Final.
    pub const REFUSED: u64 = 4;
    /// The coordinator stopped before the run's end (Ctrl-C, an error); its state after the last
    /// closed round is saved and the sites keep trying to reconnect for it to resume.
    pub const STOPPED: u64 = 5;
}

/// How a connection (or an attempt to open one) ended, as the transport saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// The peer closed it on purpose with this code (0: the run is over).
    Code(u64),
    /// The connection broke, timed out or could not be made.
    Broken,
    /// The coordinator refused this site's key in the TLS handshake.
    KeyRefused,
}

impl LinkEnd {
    /// A refusal cannot be changed by trying again.
    pub fn is_refusal(self) -> bool {
        matches!(self, LinkEnd::KeyRefused | LinkEnd::Code(close::REFUSED))
    }
}

/// What the site does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkDecision {
    /// Try to connect at `at_ms`, and keep trying until `until_ms`.
    Reconnect { at_ms: u64, until_ms: u64 },
    /// The site's part in the run is over: the run ended, it was excluded, or it does not
    /// reconnect (`reconnect_ms` 0). `excluded`: the coordinator excluded it.
    Finished { excluded: bool },
    /// The coordinator refused this site: stop with an error (the shell has the reason).
    Refused,
    /// The budget ran out without reaching the coordinator.
    GaveUp,
}

/// The timing of a site's retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkPolicy {
    /// After losing the coordinator (or before it is up), keep trying this long.
    pub reconnect_ms: u64,
    /// Between two attempts to reach the coordinator.
    pub retry_ms: u64,
    /// The least time a site asked to rejoin keeps trying.
    pub rejoin_ms: u64,
}

impl LinkPolicy {
    pub const RETRY_MS: u64 = 500;
    pub const REJOIN_MS: u64 = 10_000;

    pub fn new(reconnect_ms: u64) -> LinkPolicy {
        LinkPolicy {
            reconnect_ms,
            retry_ms: Self::RETRY_MS,
            rejoin_ms: Self::REJOIN_MS,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Trying to connect (and send the join request) from `at_ms` until `until_ms`.
    Connecting { at_ms: u64, until_ms: u64 },
    /// Joined; `heard`: the coordinator has sent something on this connection; `until_ms`: the
    /// budget of the attempts that made it (what a connection closed unheard retries within).
    Connected { heard: bool, until_ms: u64 },
    /// Stopped for good (finished, refused, gave up, left).
    Stopped,
}

/// One site's connection decisions.
#[derive(Clone, Debug)]
pub struct SiteLink {
    policy: LinkPolicy,
    state: State,
    /// Connections made so far (the first one included).
    pub connections: u64,
}

impl SiteLink {
    /// A site starting at `now_ms`: it tries to connect for `reconnect_ms` (a site started
    /// before its coordinator waits for it), at least once.
    pub fn new(policy: LinkPolicy, now_ms: u64) -> SiteLink {
        debug_assert!(policy.retry_ms > 0, "a retry interval of 0 would spin");
        SiteLink {
            policy,
            state: State::Connecting {
                at_ms: now_ms,
                until_ms: now_ms.saturating_add(policy.reconnect_ms),
            },
            connections: 0,
        }
    }

    pub fn policy(&self) -> LinkPolicy {
        self.policy
    }

    /// Until when an attempt started at `now_ms` may take (at least one retry interval, even
    /// past the budget, so that every attempt gets a fair chance), or None when not connecting.
    pub fn attempt_until_ms(&self, now_ms: u64) -> Option<u64> {
        match self.state {
            State::Connecting { until_ms, .. } => {
                Some(until_ms.max(now_ms.saturating_add(self.policy.retry_ms)))
            }
            _ => None,
        }
    }

    /// When the next attempt to connect is due, or None when not connecting.
    pub fn next_attempt_ms(&self) -> Option<u64> {
        match self.state {
            State::Connecting { at_ms, .. } => Some(at_ms),
            _ => None,
        }
    }

    /// The connection is up and the join request sent.
    pub fn connected(&mut self) {
        let State::Connecting { until_ms, .. } = self.state else {
            debug_assert!(false, "connected while {:?}", self.state);
            return;
        };
        self.state = State::Connected {
            heard: false,
            until_ms,
        };
        self.connections += 1;
    }

    /// The coordinator sent something on the open connection: the next loss renews the budget.
    pub fn heard(&mut self) {
        if let State::Connected { heard, .. } = &mut self.state {
            *heard = true;
        }
    }

    /// An attempt to connect (or to send the join request) failed at `now_ms`.
    pub fn attempt_failed(&mut self, end: LinkEnd, now_ms: u64) -> LinkDecision {
        let State::Connecting { until_ms, .. } = self.state else {
            debug_assert!(false, "an attempt failed while {:?}", self.state);
            return LinkDecision::GaveUp;
        };
        if end.is_refusal() {
            self.state = State::Stopped;
            return LinkDecision::Refused;
        }
        let next_ms = now_ms.saturating_add(self.policy.retry_ms);
        if next_ms >= until_ms {
            self.state = State::Stopped;
            return LinkDecision::GaveUp;
        }
        self.state = State::Connecting {
            at_ms: next_ms,
            until_ms,
        };
        LinkDecision::Reconnect {
            at_ms: next_ms,
            until_ms,
        }
    }

    /// The open connection ended at `now_ms` (on a receive or a send).
    pub fn ended(&mut self, end: LinkEnd, now_ms: u64) -> LinkDecision {
        let (heard, budget_ms) = match self.state {
            State::Connected { heard, until_ms } => (heard, until_ms),
            // (Already decided: the same end reported twice, by the reader and a send.)
            State::Connecting { at_ms, until_ms } => {
                return LinkDecision::Reconnect { at_ms, until_ms }
            }
            State::Stopped => return LinkDecision::Finished { excluded: false },
        };
        let decision = self.decide(end, heard, budget_ms, now_ms);
        self.state = match decision {
            LinkDecision::Reconnect { at_ms, until_ms } => State::Connecting { at_ms, until_ms },
            _ => State::Stopped,
        };
        decision
    }

    fn decide(&self, end: LinkEnd, heard: bool, budget_ms: u64, now_ms: u64) -> LinkDecision {
        let policy = self.policy;
        match end {
            LinkEnd::KeyRefused | LinkEnd::Code(close::REFUSED) => LinkDecision::Refused,
            LinkEnd::Code(close::REJOIN) => LinkDecision::Reconnect {
                at_ms: now_ms,
                until_ms: now_ms.saturating_add(policy.reconnect_ms.max(policy.rejoin_ms)),
            },
            LinkEnd::Code(close::STOPPED) | LinkEnd::Broken => {
                if policy.reconnect_ms == 0 {
                    LinkDecision::Finished { excluded: false }
                } else if heard {
                    LinkDecision::Reconnect {
                        at_ms: now_ms,
                        until_ms: now_ms.saturating_add(policy.reconnect_ms),
                    }
                } else {
                    // Closed before the coordinator said anything: wait, within the old budget.
                    let until_ms = budget_ms;
                    let at_ms = now_ms.saturating_add(policy.retry_ms);
                    if at_ms >= until_ms {
                        LinkDecision::GaveUp
                    } else {
                        LinkDecision::Reconnect { at_ms, until_ms }
                    }
                }
            }
            LinkEnd::Code(close::EXCLUDED) => LinkDecision::Finished { excluded: true },
            // The run is over (0), or any code this site does not know: the coordinator ended
            // its part on purpose.
            LinkEnd::Code(_) => LinkDecision::Finished { excluded: false },
        }
    }

    /// The coordinator sent a change to parameters this site does not hold (it restarted and
    /// holds only the seed's, and a coordinator restored from its state still counted it as
    /// synced): the site closes this connection and joins again at once, for at least
    /// `rejoin_ms`, to get the parameters in full (a rejoining site always does).
    pub fn out_of_sync(&mut self, now_ms: u64) -> LinkDecision {
        if !matches!(self.state, State::Connected { .. }) {
            debug_assert!(false, "out of sync while {:?}", self.state);
        }
        self.state = State::Connected {
            heard: true,
            until_ms: now_ms,
        };
        self.ended(LinkEnd::Code(close::REJOIN), now_ms)
    }

    /// The site leaves (Ctrl-C): it closes with `close::LEAVING` and stops.
    pub fn leave(&mut self) -> u64 {
        self.state = State::Stopped;
        close::LEAVING
    }

    pub fn is_stopped(&self) -> bool {
        self.state == State::Stopped
    }
}
