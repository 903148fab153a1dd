//! The schedule's events in the order they happen: by emulated time, then by kind (at one
//! instant the coordinator hears its updates before it looks at its clock, and messages reach a
//! site before it begins a step), then in the order they were scheduled. Links are FIFO: a
//! message never arrives before one sent earlier on the same link.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

/// Something that happens at a time on the emulated clock.
#[derive(Debug)]
pub(super) enum Happening {
    /// An update reaches the coordinator (`wire_bytes`: its size as the ledger counts it).
    Update {
        from: u32,
        bytes: Vec<u8>,
        wire_bytes: u64,
    },
    /// The coordinator looks at its clock (a grace window may have ended).
    Tick,
    /// Fault `i` of the run's schedule begins.
    Fault(usize),
    /// Site k comes back after it was down.
    Rejoin(usize),
    /// A coordinator's message reaches site `to`.
    Message { to: usize, bytes: bytes::Bytes },
    /// Site k begins its next step.
    Step(usize),
}

impl Happening {
    fn rank(&self) -> u8 {
        match self {
            Happening::Update { .. } => 0,
            Happening::Tick => 1,
            Happening::Fault(_) | Happening::Rejoin(_) => 2,
            Happening::Message { .. } => 3,
            Happening::Step(_) => 4,
        }
    }
}

struct Entry {
    at: f64,
    rank: u8,
    order: u64,
    what: Happening,
}

impl Entry {
    fn key(&self, other: &Entry) -> Ordering {
        self.at
            .total_cmp(&other.at)
            .then(self.rank.cmp(&other.rank))
            .then(self.order.cmp(&other.order))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed: the heap pops the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.key(self)
    }
}

/// A directed link: (from, to), the coordinator as `u32::MAX`.
pub(super) type Link = (u32, u32);
pub(super) const COORDINATOR: u32 = u32::MAX;

#[derive(Default)]
pub(super) struct Queue {
    heap: BinaryHeap<Entry>,
    order: u64,
    /// Each link's latest arrival so far.
    link_arrival: BTreeMap<Link, f64>,
}

impl Queue {
    pub(super) fn push(&mut self, at: f64, what: Happening) {
        self.order += 1;
        self.heap.push(Entry {
            at,
            rank: what.rank(),
            order: self.order,
            what,
        });
    }

    pub(super) fn pop(&mut self) -> Option<(f64, Happening)> {
        self.heap.pop().map(|e| (e.at, e.what))
    }

    /// When a message sent at `sent` over `link`, taking `seconds` alone, arrives: never before
    /// the message sent before it on that link.
    pub(super) fn arrival(&mut self, link: Link, sent: f64, seconds: f64) -> f64 {
        let previous = self.link_arrival.get(&link).copied().unwrap_or(0.0);
        let at = (sent + seconds).max(previous);
        self.link_arrival.insert(link, at);
        at
    }

    /// Whether no update or message is on a link.
    pub(super) fn nothing_on_links(&self) -> bool {
        !(self.heap.iter())
            .any(|e| matches!(e.what, Happening::Update { .. } | Happening::Message { .. }))
    }

    /// The events to come (none on a link: see `nothing_on_links`), in their order.
    pub(super) fn pending(&self) -> Vec<crate::state::PendingEvent> {
        let mut entries: Vec<&Entry> = self.heap.iter().collect();
        entries.sort_by(|a, b| a.key(b));
        (entries.into_iter())
            .filter_map(|e| crate::state::PendingEvent::of(e.at, e.order, &e.what))
            .collect()
    }

    pub(super) fn order(&self) -> u64 {
        self.order
    }

    pub(super) fn link_arrivals(&self) -> Vec<(Link, f64)> {
        self.link_arrival.iter().map(|(l, at)| (*l, *at)).collect()
    }

    /// Back to a saved queue: its events (each with its place in the order), its order counter
    /// and its links' latest arrivals; sites and faults named by index must exist.
    pub(super) fn restore(
        &mut self,
        events: impl Iterator<Item = (f64, u64, Happening)>,
        order: u64,
        link_arrivals: &[(Link, f64)],
        sites: usize,
        faults: usize,
    ) -> Result<(), super::RunError> {
        let bad = |why: String| {
            Err(super::RunError::State(format!(
                "the saved schedule: {why}; rerun without --resume to start over"
            )))
        };
        self.heap.clear();
        for (at, event_order, what) in events {
            let in_range = match &what {
                Happening::Step(k) | Happening::Rejoin(k) => *k < sites,
                Happening::Fault(i) => *i < faults,
                _ => true,
            };
            if !(in_range && at.is_finite() && at >= 0.0) || event_order > order {
                return bad(format!("an event {what:?} at {at} s, order {event_order}"));
            }
            self.heap.push(Entry {
                at,
                rank: what.rank(),
                order: event_order,
                what,
            });
        }
        self.order = order;
        self.link_arrival = link_arrivals.iter().copied().collect();
        Ok(())
    }
}
