//! QUIC through the user-space shaper: loss, jitter (reordering) and a bandwidth limit on the
//! path, and every message still arrives whole and in order.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lowband_net::{AllowList, Identity, Limits, LinkShape, Node, Shaper};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_recovers_every_message_across_a_lossy_jittery_narrow_link() {
    let limits = Limits {
        message_bytes_max: 1 << 20,
        idle_timeout_ms: 20_000,
        keep_alive_ms: 2_000,
        ..Limits::default()
    };
    let server_identity = Arc::new(Identity::generate().unwrap());
    let client_identity = Arc::new(Identity::generate().unwrap());
    let allowed: AllowList = Arc::new(RwLock::new(BTreeSet::from([client_identity.public_key()])));
    let server = Node::listen(
        server_identity.clone(),
        "127.0.0.1:0".parse().unwrap(),
        allowed,
        limits.clone(),
    )
    .unwrap();
    // 20 Mbit/s, 20 ms ± 10 ms one way, 3% loss each way.
    let shape = LinkShape {
        bandwidth_bit_per_second: Some(20e6),
        latency_ms: 20.0,
        jitter_ms: 10.0,
        loss: 0.03,
        queue_ms: 500.0,
        seed: 42,
    };
    let shaper = Shaper::start(
        "127.0.0.1:0".parse().unwrap(),
        server.local_addr().unwrap(),
        shape,
    )
    .await
    .unwrap();
    let client = Node::client(client_identity, "127.0.0.1:0".parse().unwrap(), limits).unwrap();
    let work = async {
        let accepting = tokio::spawn(async move {
            let peer = server.accept().await.unwrap().unwrap();
            let mut received = Vec::new();
            for _ in 0..20 {
                received.push(peer.recv().await.unwrap());
            }
            // Keep the connection up until the sender has seen its last message acknowledged.
            (received, peer, server)
        });
        let started = Instant::now();
        let peer = client
            .connect(shaper.local_addr(), server_identity.public_key())
            .await
            .unwrap();
        let messages: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                (0..100_000u32)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
                    .collect()
            })
            .collect();
        for m in &messages {
            peer.send(m).await.unwrap();
        }
        let (received, _peer, _server) = accepting.await.unwrap();
        (started.elapsed(), messages, received)
    };
    let (elapsed, sent, received) = tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("bounded in time");
    assert_eq!(received, sent, "every message whole and in order");
    // 2 MB cannot cross a 20 Mbit/s link in less than 0.8 s: the pacing holds (a lower bound,
    // so a slow machine cannot fail it).
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    let counts = shaper.counts();
    assert!(
        counts.lost.load(Ordering::Relaxed) > 0,
        "the link lost datagrams and QUIC recovered them"
    );
    assert!(counts.delivered.load(Ordering::Relaxed) > 1_000);
}
