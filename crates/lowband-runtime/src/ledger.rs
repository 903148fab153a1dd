//! The ledger: the exact bytes of every packet on every inter-site link, per round (or per step
//! for DDP). Reports read traffic from here, never from an estimate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One end of an inter-site link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Coordinator,
    Site(u32),
}

/// One row of a saved ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkRecord {
    pub round: u64,
    pub from: Endpoint,
    pub to: Endpoint,
    pub packets: u64,
    pub bytes: u64,
}

/// Bytes on every directed link in every round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "Vec<LinkRecord>", from = "Vec<LinkRecord>")]
pub struct Ledger {
    /// (round, from, to) → (packets, bytes).
    links: BTreeMap<(u64, Endpoint, Endpoint), (u64, u64)>,
    total_bytes: u64,
    total_packets: u64,
}

impl From<Ledger> for Vec<LinkRecord> {
    fn from(ledger: Ledger) -> Self {
        ledger
            .links
            .into_iter()
            .map(|((round, from, to), (packets, bytes))| LinkRecord {
                round,
                from,
                to,
                packets,
                bytes,
            })
            .collect()
    }
}

impl From<Vec<LinkRecord>> for Ledger {
    fn from(records: Vec<LinkRecord>) -> Self {
        let mut ledger = Ledger::default();
        for r in records {
            ledger.record_many(r.round, r.from, r.to, 0, 0);
            let entry = ledger.links.entry((r.round, r.from, r.to)).or_default();
            entry.0 += r.packets;
            entry.1 += r.bytes;
            ledger.total_packets += r.packets;
            ledger.total_bytes += r.bytes;
        }
        ledger
    }
}

impl Ledger {
    pub fn record(&mut self, round: u64, from: Endpoint, to: Endpoint, bytes: u64) {
        let entry = self.links.entry((round, from, to)).or_default();
        entry.0 += 1;
        entry.1 += bytes;
        self.total_bytes += bytes;
        self.total_packets += 1;
    }

    /// Record `count` identical packets at once (DDP's all-reduce over many steps).
    pub fn record_many(
        &mut self,
        round: u64,
        from: Endpoint,
        to: Endpoint,
        bytes_each: u64,
        count: u64,
    ) {
        let entry = self.links.entry((round, from, to)).or_default();
        entry.0 += count;
        entry.1 += bytes_each * count;
        self.total_bytes += bytes_each * count;
        self.total_packets += count;
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
    pub fn total_packets(&self) -> u64 {
        self.total_packets
    }

    /// Bytes sent by `from` over all rounds.
    pub fn bytes_sent_by(&self, from: Endpoint) -> u64 {
        self.links
            .iter()
            .filter(|((_, f, _), _)| *f == from)
            .map(|(_, (_, b))| b)
            .sum()
    }

    /// Bytes received by `to` over all rounds.
    pub fn bytes_received_by(&self, to: Endpoint) -> u64 {
        self.links
            .iter()
            .filter(|((_, _, t), _)| *t == to)
            .map(|(_, (_, b))| b)
            .sum()
    }

    /// Per directed link, over all rounds: (from, to, packets, bytes).
    pub fn per_link(&self) -> Vec<(Endpoint, Endpoint, u64, u64)> {
        let mut sums: BTreeMap<(Endpoint, Endpoint), (u64, u64)> = BTreeMap::new();
        for ((_, from, to), (p, b)) in &self.links {
            let e = sums.entry((*from, *to)).or_default();
            e.0 += p;
            e.1 += b;
        }
        sums.into_iter()
            .map(|((f, t), (p, b))| (f, t, p, b))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_per_link_and_per_endpoint() {
        let mut l = Ledger::default();
        l.record(0, Endpoint::Coordinator, Endpoint::Site(0), 100);
        l.record(0, Endpoint::Site(0), Endpoint::Coordinator, 40);
        l.record(1, Endpoint::Coordinator, Endpoint::Site(0), 100);
        l.record_many(1, Endpoint::Site(1), Endpoint::Site(0), 7, 3);
        assert_eq!(l.total_bytes(), 261);
        assert_eq!(l.total_packets(), 6);
        assert_eq!(l.bytes_sent_by(Endpoint::Coordinator), 200);
        assert_eq!(l.bytes_received_by(Endpoint::Site(0)), 221);
        let links = l.per_link();
        assert_eq!(links.iter().map(|x| x.3).sum::<u64>(), l.total_bytes());
    }
}
