//! One sync: its time and bytes for each exchange pattern, and the ring all-reduce.

use super::*;

/// Seconds of a ring all-reduce of `payload_bytes` among `members` at `bytes_per_second` each,
/// with `one_way_seconds` of latency per hop: 2(n−1)/n × payload / bandwidth + 2(n−1) × latency.
pub fn ring_all_reduce_seconds(
    members: usize,
    payload_bytes: f64,
    bytes_per_second: f64,
    one_way_seconds: f64,
) -> f64 {
    if members <= 1 {
        return 0.0;
    }
    let n = members as f64;
    2.0 * (n - 1.0) / n * payload_bytes / bytes_per_second + 2.0 * (n - 1.0) * one_way_seconds
}

/// One sync: how long it takes and who sends how much.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Exchange {
    pub seconds: f64,
    /// Bytes each site sends (same order as the scenario's sites).
    pub site_bytes_sent: Vec<f64>,
    /// Bytes each site sends plus receives: the link's load.
    pub site_bytes_moved: Vec<f64>,
    pub relay_bytes_sent: f64,
}

impl Exchange {
    pub fn wan_bytes(&self) -> f64 {
        self.site_bytes_sent.iter().sum::<f64>() + self.relay_bytes_sent
    }
}

/// One sync of `up_bytes` per site (and `down_bytes` per site from the relay, for `relay`).
pub fn exchange(
    pattern: Pattern,
    sites: &[Site],
    relay: &Relay,
    up_bytes: f64,
    down_bytes: f64,
) -> Exchange {
    let k = sites.len();
    let n = k as f64;
    let slowest = sites
        .iter()
        .map(|s| s.link.bytes_per_second())
        .fold(f64::INFINITY, f64::min);
    let longest_one_way = sites
        .iter()
        .map(|s| s.link.one_way_seconds())
        .fold(0.0, f64::max);
    match pattern {
        Pattern::AllReduce => {
            let sent = if k > 1 {
                2.0 * (n - 1.0) / n * up_bytes
            } else {
                0.0
            };
            Exchange {
                seconds: ring_all_reduce_seconds(k, up_bytes, slowest, longest_one_way),
                site_bytes_sent: vec![sent; k],
                site_bytes_moved: vec![2.0 * sent; k],
                relay_bytes_sent: 0.0,
            }
        }
        Pattern::AllGather => {
            let sent = (n - 1.0) * up_bytes;
            Exchange {
                seconds: if k > 1 {
                    sent / slowest + longest_one_way
                } else {
                    0.0
                },
                site_bytes_sent: vec![sent; k],
                site_bytes_moved: vec![2.0 * sent; k],
                relay_bytes_sent: 0.0,
            }
        }
        Pattern::Relay => {
            let upload = sites
                .iter()
                .map(|s| up_bytes / s.link.bytes_per_second())
                .fold(n * up_bytes / relay.bytes_per_second(), f64::max);
            let download = sites
                .iter()
                .map(|s| down_bytes / s.link.bytes_per_second())
                .fold(n * down_bytes / relay.bytes_per_second(), f64::max);
            Exchange {
                seconds: upload + download + 2.0 * longest_one_way,
                site_bytes_sent: vec![up_bytes; k],
                site_bytes_moved: vec![up_bytes + down_bytes; k],
                relay_bytes_sent: n * down_bytes,
            }
        }
    }
}
