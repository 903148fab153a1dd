//! Link profiles: bandwidth, latency and price of an inter-site link, real or emulated, and the
//! time a transfer takes on one.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
/// In a settings file, a field left out keeps its default (a `[link]` table may set one).
#[serde(default, deny_unknown_fields)]
pub struct LinkProfile {
    /// Bandwidth of each site's link, each direction.
    pub bandwidth_gbit_per_s: f64,
    /// One-way latency.
    pub latency_ms: f64,
    /// Egress price per GB (1e9 bytes) sent between sites.
    pub price_per_gb: f64,
}

impl Default for LinkProfile {
    /// A cross-region cloud link: 1 Gbit/s per site, 40 ms one way (about 80 ms round trip, as
    /// between US and EU regions), $0.05/GB egress (the middle of the $0.02-0.09 cloud range).
    fn default() -> Self {
        LinkProfile {
            bandwidth_gbit_per_s: 1.0,
            latency_ms: 40.0,
            price_per_gb: 0.05,
        }
    }
}

impl LinkProfile {
    pub fn validate(&self) -> Result<(), String> {
        // Bounds far past any real link, so that every time and price computed from them stays
        // a finite, printable number.
        if !(1e-6..=1e6).contains(&self.bandwidth_gbit_per_s) {
            return Err("link.bandwidth_gbit_per_s must be between 1e-6 (1 kbit/s) and 1e6".into());
        }
        if !(0.0..=600_000.0).contains(&self.latency_ms) {
            return Err("link.latency_ms must be between 0 and 600000 (10 minutes)".into());
        }
        if !(0.0..=1e6).contains(&self.price_per_gb) {
            return Err("link.price_per_gb must be between 0 and 1e6 dollars".into());
        }
        Ok(())
    }

    /// Seconds to move `bytes` in one message: latency + serialisation.
    pub fn transfer_seconds(&self, bytes: u64) -> f64 {
        self.latency_ms / 1e3 + bytes as f64 * 8.0 / (self.bandwidth_gbit_per_s * 1e9)
    }

    /// Seconds of a ring all-reduce of `bytes` over `sites` sites: 2(K − 1) steps, each moving
    /// bytes / K to the next site (all links busy at once).
    pub fn ring_all_reduce_seconds(&self, bytes: u64, sites: usize) -> f64 {
        if sites <= 1 {
            return 0.0;
        }
        let chunk = bytes.div_ceil(sites as u64);
        2.0 * (sites as f64 - 1.0) * self.transfer_seconds(chunk)
    }

    pub fn dollars(&self, bytes: u64) -> f64 {
        bytes as f64 / 1e9 * self.price_per_gb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_and_all_reduce_times_by_hand() {
        let link = LinkProfile {
            bandwidth_gbit_per_s: 1.0,
            latency_ms: 10.0,
            price_per_gb: 0.05,
        };
        assert!(
            (link.transfer_seconds(125_000_000) - 1.01).abs() < 1e-12,
            "1 Gbit takes 1 s plus 10 ms"
        );
        // 4 sites, 400 MB: 6 steps of 100 MB (0.8 s + 10 ms each).
        assert!((link.ring_all_reduce_seconds(400_000_000, 4) - 6.0 * 0.81).abs() < 1e-9);
        assert_eq!(link.ring_all_reduce_seconds(400, 1), 0.0);
        assert!((link.dollars(2_000_000_000) - 0.1).abs() < 1e-12);
    }
}
