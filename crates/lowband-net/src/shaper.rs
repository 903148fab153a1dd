//! A user-space link shaper: a UDP relay that puts a WAN between QUIC nodes on one machine
//! (kernel `netem` is not available here). Clients send to the shaper's address instead of the
//! server's; every datagram, in each direction separately, is
//! - **lost** with probability `loss` (seeded: the same arrivals give the same drops),
//! - **paced** at `bandwidth_bit_per_second` through a FIFO (serialization delay; a datagram that
//!   would wait longer than `queue_ms` is tail-dropped, as `tc tbf` does with its latency bound),
//! - **delayed** by `latency_ms` one way plus a uniform jitter in ±`jitter_ms` (so jitter larger
//!   than the spacing of datagrams reorders them, as real paths do).
//!
//! QUIC above sees real loss, queueing and reordering and recovers from them; the bytes the
//! nodes exchange are unchanged. Each client address gets its own upstream socket (a NAT-like
//! mapping), so several sites can share one shaper or each have their own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::NetError;

/// What the shaped link does to each datagram, per direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkShape {
    /// None: no pacing.
    pub bandwidth_bit_per_second: Option<f64>,
    pub latency_ms: f64,
    pub jitter_ms: f64,
    /// Probability in [0, 1) that a datagram is dropped.
    pub loss: f64,
    /// Longest a datagram may queue for the bandwidth before it is dropped.
    pub queue_ms: f64,
    pub seed: u64,
}

impl LinkShape {
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |what: &str| Err(NetError::Config(format!("link shape: {what}")));
        if let Some(b) = self.bandwidth_bit_per_second {
            if !(BANDWIDTH_BIT_PER_SECOND_MIN..=BANDWIDTH_BIT_PER_SECOND_MAX).contains(&b) {
                return bad(&format!(
                    "bandwidth must be between {} kbit/s and {} Tbit/s",
                    BANDWIDTH_BIT_PER_SECOND_MIN / 1e3,
                    BANDWIDTH_BIT_PER_SECOND_MAX / 1e12
                ));
            }
        }
        if !(0.0..=DELAY_MS_MAX).contains(&self.latency_ms) {
            return bad(&format!("latency must be between 0 and {DELAY_MS_MAX} ms"));
        }
        if !(self.jitter_ms.is_finite()
            && self.jitter_ms >= 0.0
            && self.jitter_ms <= self.latency_ms)
        {
            return bad("jitter must be in [0, latency]");
        }
        if !(0.0..1.0).contains(&self.loss) {
            return bad("loss must be in [0, 1)");
        }
        if !(self.queue_ms > 0.0 && self.queue_ms <= DELAY_MS_MAX) {
            return bad(&format!(
                "queue must be above 0 and at most {DELAY_MS_MAX} ms"
            ));
        }
        Ok(())
    }
}

/// Longest one-way delay or queue the shaper emulates (a minute: far past any real WAN, and
/// every time it computes then fits a `Duration`).
pub const DELAY_MS_MAX: f64 = 60_000.0;
/// Slowest and fastest link the shaper emulates: 1 kbit/s (a 1,500-byte datagram then takes 12 s)
/// to 1 Tbit/s.
pub const BANDWIDTH_BIT_PER_SECOND_MIN: f64 = 1e3;
pub const BANDWIDTH_BIT_PER_SECOND_MAX: f64 = 1e12;

/// Datagrams the shaper handled, for reports and tests.
#[derive(Default, Debug)]
pub struct ShaperCounts {
    pub delivered: AtomicU64,
    pub lost: AtomicU64,
    pub queue_dropped: AtomicU64,
}

/// One direction of one client's path: its pacing queue and its random stream.
struct Lane {
    busy_until: Instant,
    random: u64,
}

impl Lane {
    fn new(seed: u64) -> Lane {
        Lane {
            busy_until: Instant::now(),
            random: seed,
        }
    }

    /// SplitMix64, in [0, 1).
    fn unit(&mut self) -> f64 {
        self.random = self.random.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.random;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// When a datagram of `bytes` arriving now should come out, or None if it is dropped.
    fn admit(&mut self, shape: &LinkShape, bytes: usize, counts: &ShaperCounts) -> Option<Instant> {
        if self.unit() < shape.loss {
            counts.lost.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let now = Instant::now();
        let start = self.busy_until.max(now);
        if (start - now).as_secs_f64() * 1e3 > shape.queue_ms {
            counts.queue_dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let serialization = shape
            .bandwidth_bit_per_second
            .map_or(0.0, |b| bytes as f64 * 8.0 / b);
        let departed = start + Duration::from_secs_f64(serialization);
        self.busy_until = departed;
        let jitter = (self.unit() * 2.0 - 1.0) * shape.jitter_ms;
        let delay_ms = (shape.latency_ms + jitter).max(0.0);
        counts.delivered.fetch_add(1, Ordering::Relaxed);
        Some(departed + Duration::from_secs_f64(delay_ms / 1e3))
    }
}

/// A running shaper; dropping it stops it.
pub struct Shaper {
    local: SocketAddr,
    counts: Arc<ShaperCounts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shaper {
    /// Relay between clients that send to `listen` and the server at `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        shape: LinkShape,
    ) -> Result<Shaper, NetError> {
        shape.validate()?;
        let front = Arc::new(
            UdpSocket::bind(listen)
                .await
                .map_err(|source| NetError::Bind {
                    address: listen,
                    source,
                })?,
        );
        let local = front.local_addr().map_err(|source| NetError::Bind {
            address: listen,
            source,
        })?;
        let counts = Arc::new(ShaperCounts::default());
        let task = tokio::spawn(relay(front, upstream, shape, counts.clone()));
        Ok(Shaper {
            local,
            counts,
            task,
        })
    }

    /// Where clients send (the bound address: a port 0 becomes a real one).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn counts(&self) -> &ShaperCounts {
        &self.counts
    }
}

/// Run a shaper until the process ends, on its own runtime (for a command line): `report` is
/// called once listening, then every `report_every` with the counts so far.
pub fn run_blocking(
    listen: SocketAddr,
    upstream: SocketAddr,
    shape: LinkShape,
    report_every: Duration,
    mut report: impl FnMut(SocketAddr, &ShaperCounts),
) -> Result<(), NetError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| NetError::Config(format!("tokio runtime: {e}")))?;
    runtime.block_on(async {
        let shaper = Shaper::start(listen, upstream, shape).await?;
        report(shaper.local_addr(), shaper.counts());
        loop {
            tokio::time::sleep(report_every).await;
            report(shaper.local_addr(), shaper.counts());
        }
    })
}

/// Send `bytes` on `socket` to `to` at `at` (a task per datagram: jitter may reorder them).
fn send_at(socket: Arc<UdpSocket>, to: SocketAddr, bytes: Vec<u8>, at: Instant) {
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        let _ = socket.send_to(&bytes, to).await;
    });
}

async fn relay(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    shape: LinkShape,
    counts: Arc<ShaperCounts>,
) {
    let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, Arc<Mutex<Lane>>)> = HashMap::new();
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buffer).await else {
            continue;
        };
        let index = clients.len() as u64;
        let entry = match clients.get(&client) {
            Some(entry) => entry.clone(),
            None => {
                let any: SocketAddr = if upstream.is_ipv6() {
                    "[::]:0".parse().expect("any IPv6")
                } else {
                    "0.0.0.0:0".parse().expect("any IPv4")
                };
                let Ok(back) = UdpSocket::bind(any).await else {
                    continue;
                };
                let back = Arc::new(back);
                let up = Arc::new(Mutex::new(Lane::new(shape.seed ^ (index << 1))));
                let down = Lane::new(shape.seed ^ (index << 1) ^ 1);
                tokio::spawn(downstream(
                    back.clone(),
                    front.clone(),
                    client,
                    shape,
                    down,
                    counts.clone(),
                ));
                clients.insert(client, (back.clone(), up.clone()));
                (back, up)
            }
        };
        let (back, lane) = entry;
        let at = lane.lock().expect("lane lock").admit(&shape, n, &counts);
        if let Some(at) = at {
            send_at(back, upstream, buffer[..n].to_vec(), at);
        }
    }
}

/// Server → client for one client: what arrives on its upstream socket goes back through the
/// front socket, shaped.
async fn downstream(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    shape: LinkShape,
    mut lane: Lane,
    counts: Arc<ShaperCounts>,
) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((n, _)) = back.recv_from(&mut buffer).await else {
            continue;
        };
        if let Some(at) = lane.admit(&shape, n, &counts) {
            send_at(front.clone(), client, buffer[..n].to_vec(), at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(loss: f64) -> LinkShape {
        LinkShape {
            bandwidth_bit_per_second: None,
            latency_ms: 10.0,
            jitter_ms: 5.0,
            loss,
            queue_ms: 1000.0,
            seed: 7,
        }
    }

    #[tokio::test]
    async fn drops_follow_the_seed_and_the_loss_rate() {
        let counts = ShaperCounts::default();
        let pattern = |seed: u64| {
            let mut lane = Lane::new(seed);
            (0..2000)
                .map(|_| lane.admit(&shape(0.1), 1200, &counts).is_some())
                .collect::<Vec<bool>>()
        };
        assert_eq!(
            pattern(7),
            pattern(7),
            "the same seed drops the same datagrams"
        );
        assert_ne!(pattern(7), pattern(8));
        let dropped = pattern(7).iter().filter(|kept| !**kept).count();
        assert!((150..250).contains(&dropped), "{dropped} of 2000 at 10%");
    }

    #[tokio::test]
    async fn pacing_queues_and_tail_drops() {
        let counts = ShaperCounts::default();
        // 1 Mbit/s: a 1,250-byte datagram takes 10 ms; a 25 ms queue holds three behind the first.
        let shape = LinkShape {
            bandwidth_bit_per_second: Some(1e6),
            latency_ms: 0.0,
            jitter_ms: 0.0,
            loss: 0.0,
            queue_ms: 25.0,
            seed: 1,
        };
        let mut lane = Lane::new(1);
        let admitted: Vec<Option<Instant>> =
            (0..6).map(|_| lane.admit(&shape, 1250, &counts)).collect();
        let kept: Vec<Instant> = admitted.iter().flatten().copied().collect();
        assert_eq!(kept.len(), 3, "{admitted:?}");
        for pair in kept.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            assert!(
                (gap - 0.010).abs() < 1e-3,
                "serialization 10 ms apart, got {gap}"
            );
        }
        assert_eq!(counts.queue_dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(LinkShape {
            loss: 1.0,
            ..shape(0.0)
        }
        .validate()
        .is_err());
        assert!(LinkShape {
            jitter_ms: 20.0,
            ..shape(0.0)
        }
        .validate()
        .is_err());
        assert!(LinkShape {
            bandwidth_bit_per_second: Some(0.0),
            ..shape(0.0)
        }
        .validate()
        .is_err());
        assert!(shape(0.0).validate().is_ok());
    }

    #[test]
    fn shapes_whose_times_overflow_are_refused() {
        // Issue 17: `shape --latency-ms 1e300` panicked a worker on the first datagram.
        let ok = LinkShape {
            bandwidth_bit_per_second: Some(1e6),
            latency_ms: 50.0,
            jitter_ms: 5.0,
            loss: 0.01,
            queue_ms: 1000.0,
            seed: 0,
        };
        ok.validate().unwrap();
        for bad in [
            LinkShape {
                latency_ms: 1e300,
                ..ok
            },
            LinkShape {
                latency_ms: f64::NAN,
                ..ok
            },
            LinkShape {
                bandwidth_bit_per_second: Some(1e-300),
                ..ok
            },
            LinkShape {
                bandwidth_bit_per_second: Some(f64::INFINITY),
                ..ok
            },
            LinkShape {
                queue_ms: 1e300,
                ..ok
            },
            LinkShape {
                jitter_ms: 60.0,
                ..ok
            },
            LinkShape { loss: 1.0, ..ok },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // The extremes that pass still give finite times.
        let slowest = LinkShape {
            bandwidth_bit_per_second: Some(BANDWIDTH_BIT_PER_SECOND_MIN),
            latency_ms: DELAY_MS_MAX,
            jitter_ms: DELAY_MS_MAX,
            queue_ms: DELAY_MS_MAX,
            ..ok
        };
        slowest.validate().unwrap();
        let _ = Duration::from_secs_f64(
            1500.0 * 8.0 / BANDWIDTH_BIT_PER_SECOND_MIN + 2.0 * DELAY_MS_MAX / 1e3,
        );
    }
}
