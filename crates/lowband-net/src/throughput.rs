//! A measurement for benchmarks (`lowband bench site`): how fast one QUIC connection carries
//! lowband's messages over loopback on this machine (both ends in this process, TLS and the
//! message framing included, no signatures).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Identity, Limits, NetError, Node};

/// Send `messages` messages of `message_bytes` bytes from a client to a listener on 127.0.0.1
/// over one connection, each read in full at the other end; the time from the first send to the
/// last byte read.
pub fn loopback_transfer(message_bytes: usize, messages: usize) -> Result<Duration, NetError> {
    let runtime = crate::runtime(2, "lowband-throughput")?;
    runtime.block_on(async {
        let limits = Limits {
            message_bytes_max: message_bytes.max(1),
            ..Limits::default()
        };
        let server = Arc::new(Identity::generate()?);
        let client = Arc::new(Identity::generate()?);
        let allowed: crate::AllowList = Arc::new(std::sync::RwLock::new(
            [client.public_key()].into_iter().collect(),
        ));
        let listener = Node::listen(
            server.clone(),
            "127.0.0.1:0".parse().expect("loopback"),
            allowed,
            limits.clone(),
        )?;
        let address = listener.local_addr()?;
        let sender = Node::client(client, "127.0.0.1:0".parse().expect("loopback"), limits)?;
        let reader = tokio::spawn(async move {
            let peer = match listener.accept().await {
                Some(peer) => peer?,
                None => return Err(NetError::Closed("the listener closed".into())),
            };
            for _ in 0..messages {
                peer.recv().await?;
            }
            Ok(Instant::now())
        });
        let peer = sender.connect(address, server.public_key()).await?;
        let message = bytes::Bytes::from(vec![7u8; message_bytes]);
        let started = Instant::now();
        for _ in 0..messages {
            peer.send_bytes(message.clone()).await?;
        }
        let finished = reader
            .await
            .map_err(|e| NetError::Closed(format!("the reader failed: {e}")))??;
        Ok(finished.duration_since(started))
    })
}
