//! One site's connection at the coordinator: a reader task forwarding what arrives, a writer
//! task sending its queue in order, and the bytes queued but not yet read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::{NetError, Peer};

/// What a connection's reader forwards: the site, the connection's generation, the message. A
/// writer that cannot deliver forwards its error the same way.
pub(crate) type Inbound = (u32, u64, Result<Vec<u8>, NetError>);

/// A site's connection: the queue its writer sends in order. Every site has its own writer, so
/// sends to K sites go out at once and a slow one delays only itself.
pub(crate) struct SiteConnection {
    pub(crate) peer: Peer,
    /// The membership's generation of this connection (`Membership::admitted`).
    pub(crate) generation: u64,
    outbox: tokio::sync::mpsc::UnboundedSender<Bytes>,
    /// Bytes queued or in flight, not yet read by the site.
    queued_bytes: Arc<AtomicUsize>,
}

impl SiteConnection {
    pub(crate) fn open(
        peer: Peer,
        site: u32,
        generation: u64,
        inbound: tokio::sync::mpsc::UnboundedSender<Inbound>,
    ) -> SiteConnection {
        spawn_reader(peer.clone(), site, generation, inbound.clone());
        let (outbox, mut queue) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let (writer, queued) = (peer.clone(), queued_bytes.clone());
        tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                let length = message.len();
                let sent = writer.send_bytes(message).await;
                queued.fetch_sub(length, Ordering::Relaxed);
                if let Err(e) = sent {
                    // The site is gone (or refused what it was sent): it leaves the round.
                    let e = match e {
                        e @ (NetError::Closed(_) | NetError::Ended { .. }) => e,
                        other => NetError::Closed(format!("unreachable: {other}")),
                    };
                    let _ = inbound.send((site, generation, Err(e)));
                    return;
                }
            }
        });
        SiteConnection {
            peer,
            generation,
            outbox,
            queued_bytes,
        }
    }

    /// Queue `sealed`; false if the site already has `budget` bytes waiting (it is behind).
    pub(crate) fn queue(&self, sealed: Bytes, budget: usize) -> bool {
        let waiting = self.queued_bytes.load(Ordering::Relaxed);
        if waiting > 0 && waiting + sealed.len() > budget {
            return false;
        }
        self.queued_bytes.fetch_add(sealed.len(), Ordering::Relaxed);
        // A closed queue means the writer has stopped; its error is on its way as an Inbound.
        let _ = self.outbox.send(sealed);
        true
    }
}

fn spawn_reader(
    peer: Peer,
    site: u32,
    generation: u64,
    tx: tokio::sync::mpsc::UnboundedSender<Inbound>,
) {
    tokio::spawn(async move {
        loop {
            let message = peer.recv().await;
            let closed = matches!(message, Err(NetError::Closed(_) | NetError::Ended { .. }));
            if tx.send((site, generation, message)).is_err() || closed {
                return;
            }
        }
    });
}
