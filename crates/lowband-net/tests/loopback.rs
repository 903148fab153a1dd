//! The transport on loopback: who gets in, what gets through, and what cannot stall a node.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lowband_net::{AllowList, Identity, Limits, NetError, Node};

const LOOPBACK: &str = "127.0.0.1:0";

fn limits() -> Limits {
    Limits {
        message_bytes_max: 64 * 1024,
        streams_per_peer_max: 4,
        idle_timeout_ms: 5_000,
        keep_alive_ms: 1_000,
        bbr: true,
    }
}

struct Cluster {
    coordinator: Arc<Node>,
    coordinator_key: lowband_net::PublicKey,
    address: SocketAddr,
    allowed: AllowList,
}

fn coordinator() -> Cluster {
    let identity = Arc::new(Identity::generate().unwrap());
    let allowed: AllowList = Arc::new(RwLock::new(BTreeSet::new()));
    let coordinator_key = identity.public_key();
    let node = Node::listen(
        identity,
        LOOPBACK.parse().unwrap(),
        allowed.clone(),
        limits(),
    )
    .unwrap();
    let address = node.local_addr().unwrap();
    Cluster {
        coordinator: Arc::new(node),
        coordinator_key,
        address,
        allowed,
    }
}

fn site(cluster: &Cluster, admitted: bool) -> (Node, lowband_net::PublicKey) {
    let identity = Arc::new(Identity::generate().unwrap());
    let key = identity.public_key();
    if admitted {
        cluster.allowed.write().unwrap().insert(key);
    }
    (
        Node::client(identity, LOOPBACK.parse().unwrap(), limits()).unwrap(),
        key,
    )
}

/// The coordinator's accept loop, as a real one runs: every handshake result into a channel.
fn accept_all(
    cluster: &Cluster,
) -> tokio::sync::mpsc::UnboundedReceiver<Result<lowband_net::Peer, NetError>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let node = cluster.coordinator.clone();
    tokio::spawn(async move {
        while let Some(result) = node.accept().await {
            if tx.send(result).is_err() {
                return;
            }
        }
    });
    rx
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("bounded in time")
}

#[tokio::test]
async fn an_admitted_site_and_the_coordinator_exchange_messages_both_ways() {
    let cluster = coordinator();
    let (site, site_key) = site(&cluster, true);
    let accepting = {
        let c = cluster.coordinator.clone();
        tokio::spawn(async move { c.accept().await.unwrap().unwrap() })
    };
    let to_coordinator = within(site.connect(cluster.address, cluster.coordinator_key))
        .await
        .unwrap();
    let to_site = within(accepting).await.unwrap();
    assert_eq!(
        to_site.key(),
        site_key,
        "the coordinator knows who connected"
    );
    assert_eq!(to_coordinator.key(), cluster.coordinator_key);
    let payload: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
    let sending = {
        let p = to_coordinator.clone();
        let m = payload.clone();
        tokio::spawn(async move { p.send(&m).await })
    };
    assert_eq!(within(to_site.recv()).await.unwrap(), payload);
    within(sending).await.unwrap().unwrap();
    let replying = {
        let p = to_site.clone();
        tokio::spawn(async move { p.send(b"global for round 1").await })
    };
    assert_eq!(
        within(to_coordinator.recv()).await.unwrap(),
        b"global for round 1"
    );
    within(replying).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_key_not_in_the_cluster_is_refused_and_the_coordinator_goes_on() {
    let cluster = coordinator();
    let mut accepted = accept_all(&cluster);
    let (stranger, _) = site(&cluster, false);
    let refused = within(stranger.connect(cluster.address, cluster.coordinator_key)).await;
    // The refusal may surface at the handshake or at first use, depending on timing; either
    // way it is a handshake error (final: a site stops instead of reconnecting in a loop).
    let error = match refused {
        Ok(peer) => within(peer.recv())
            .await
            .expect_err("a refused peer gets nothing"),
        Err(e) => e,
    };
    assert!(matches!(error, NetError::Handshake(_)), "{error:?}");
    let failed = within(accepted.recv()).await.unwrap();
    assert!(
        matches!(failed, Err(NetError::Handshake(ref e)) if e.contains("not in this cluster")),
        "{:?}",
        failed.err()
    );
    // An admitted site still gets in.
    let (site, _) = site(&cluster, true);
    within(site.connect(cluster.address, cluster.coordinator_key))
        .await
        .unwrap();
    within(accepted.recv()).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_site_refuses_a_coordinator_with_another_key() {
    let cluster = coordinator();
    let _accepted = accept_all(&cluster);
    let (site, _) = site(&cluster, true);
    let impostor = Identity::generate().unwrap().public_key();
    let error = within(site.connect(cluster.address, impostor))
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("not the expected"), "{error}");
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_connection_stays_up() {
    let cluster = coordinator();
    let (site, _) = site(&cluster, true);
    let accepting = {
        let c = cluster.coordinator.clone();
        tokio::spawn(async move { c.accept().await.unwrap().unwrap() })
    };
    let to_coordinator = within(site.connect(cluster.address, cluster.coordinator_key))
        .await
        .unwrap();
    let to_site = within(accepting).await.unwrap();
    // The sender's own check.
    assert!(matches!(
        within(to_coordinator.send(&vec![0u8; 64 * 1024 + 1])).await,
        Err(NetError::TooLarge { .. })
    ));
    // A sender without that check (a hostile site whose own limit is larger) is stopped by the
    // receiver's.
    let identity = Arc::new(Identity::generate().unwrap());
    cluster
        .allowed
        .write()
        .unwrap()
        .insert(identity.public_key());
    let hostile = Node::client(
        identity,
        LOOPBACK.parse().unwrap(),
        Limits {
            message_bytes_max: 1 << 20,
            ..limits()
        },
    )
    .unwrap();
    let accepting = {
        let c = cluster.coordinator.clone();
        tokio::spawn(async move { c.accept().await.unwrap().unwrap() })
    };
    let from_hostile = within(hostile.connect(cluster.address, cluster.coordinator_key))
        .await
        .unwrap();
    let to_hostile = within(accepting).await.unwrap();
    let oversized = {
        let p = from_hostile.clone();
        tokio::spawn(async move { p.send(&vec![1u8; 200_000]).await })
    };
    assert!(matches!(
        within(to_hostile.recv()).await,
        Err(NetError::TooLarge { .. })
    ));
    assert!(
        matches!(within(oversized).await.unwrap(), Err(NetError::Refused(_))),
        "the sender sees its message refused"
    );
    let after = {
        let p = from_hostile.clone();
        tokio::spawn(async move { p.send(b"small again").await })
    };
    assert_eq!(
        within(to_hostile.recv()).await.unwrap(),
        b"small again",
        "the connection stays up"
    );
    within(after).await.unwrap().unwrap();
    let normal = {
        let p = to_coordinator.clone();
        tokio::spawn(async move { p.send(b"still here").await })
    };
    assert_eq!(within(to_site.recv()).await.unwrap(), b"still here");
    within(normal).await.unwrap().unwrap();
}

#[tokio::test]
async fn garbage_datagrams_on_the_port_do_not_stop_the_coordinator() {
    let cluster = coordinator();
    let socket = UdpSocket::bind(LOOPBACK).unwrap();
    let mut state = 7u64;
    for size in [1usize, 20, 1200, 1500, 65_000] {
        let datagram: Vec<u8> = (0..size)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                (state >> 56) as u8
            })
            .collect();
        let _ = socket.send_to(&datagram, cluster.address);
    }
    let (site, _) = site(&cluster, true);
    let accepting = {
        let c = cluster.coordinator.clone();
        tokio::spawn(async move {
            loop {
                if let Some(Ok(peer)) = c.accept().await {
                    return peer;
                }
            }
        })
    };
    let to_coordinator = within(site.connect(cluster.address, cluster.coordinator_key))
        .await
        .unwrap();
    let to_site = within(accepting).await.unwrap();
    let sending = {
        let p = to_coordinator.clone();
        tokio::spawn(async move { p.send(b"after the garbage").await })
    };
    assert_eq!(within(to_site.recv()).await.unwrap(), b"after the garbage");
    within(sending).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_slow_peer_holding_streams_open_does_not_stall_another() {
    let cluster = coordinator();
    let (slow, slow_key) = site(&cluster, true);
    let (fast, _) = site(&cluster, true);
    let accepting = {
        let c = cluster.coordinator.clone();
        tokio::spawn(async move {
            (
                c.accept().await.unwrap().unwrap(),
                c.accept().await.unwrap().unwrap(),
            )
        })
    };
    let slow_peer = within(slow.connect(cluster.address, cluster.coordinator_key))
        .await
        .unwrap();
    let fast_peer = within(fast.connect(cluster.address, cluster.coordinator_key))
        .await
        .unwrap();
    let (first, second) = within(accepting).await.unwrap();
    let (from_slow, from_fast) = if first.key() == slow_key {
        (first, second)
    } else {
        (second, first)
    };
    // The slow peer starts messages it never finishes (slow-loris), up to its stream limit.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = within(slow_peer.connection().open_uni()).await.unwrap();
        stream.write_all(b"partial").await.unwrap();
        held.push(stream);
    }
    let reading_slow = tokio::spawn(async move { from_slow.recv().await });
    let sending = {
        let p = fast_peer.clone();
        tokio::spawn(async move { p.send(b"on time").await })
    };
    assert_eq!(within(from_fast.recv()).await.unwrap(), b"on time");
    within(sending).await.unwrap().unwrap();
    // Its fifth stream waits for the peer's permission (the stream limit), it cannot force one.
    assert!(tokio::time::timeout(
        Duration::from_millis(300),
        slow_peer.connection().open_uni()
    )
    .await
    .is_err());
    reading_slow.abort();
}
