//! The coordinator's door: new connections until they are admitted. A site's first message is
//! a signed join request (`wire::JoinRequest`): the settings of the run it was started for, the
//! corpus fingerprint among them. The coordinator admits it only if the request is the site's own
//! (its key signed it, it names its own site number) and every setting equals the coordinator's;
//! otherwise it closes the connection with `close::REFUSED` and a reason that names every
//! differing field, and the site stops with that reason (a refusal is final: retrying cannot
//! change the settings). Refusals are logged, at most one line every `REFUSAL_LOG_INTERVAL_MS`
//! with a count of the ones not shown.

use std::collections::BTreeMap;

use lowband_protocol::link::close;
use lowband_protocol::wire::{self, JoinRequest, MessageKind};

use crate::{open, NetError, Peer, PublicKey};

/// How long a new connection has to send its join request.
pub const JOIN_REQUEST_MS: u64 = 10_000;

/// At most one refusal line per this interval (the rest are counted).
const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;

/// Longest close reason sent (a QUIC close frame must fit one datagram).
const CLOSE_REASON_BYTES_MAX: usize = 1000;

/// A connection's first message, checked: the site it is, or why it is refused.
pub fn admit(
    peer_key: PublicKey,
    first: Result<Vec<u8>, NetError>,
    ids: &BTreeMap<PublicKey, u32>,
    ours: &JoinRequest,
) -> Result<u32, Refusal> {
    let Some(&site) = ids.get(&peer_key) else {
        return Err(Refusal::new(
            None,
            format!("key {peer_key} is not a site of this run"),
        ));
    };
    let refuse = |reason: String| Err(Refusal::new(Some(site), reason));
    let sealed = match first {
        Ok(sealed) => sealed,
        Err(e) => return refuse(format!("no join request: {e}")),
    };
    let packet = match open(peer_key, &sealed) {
        Ok(packet) => packet,
        Err(e) => return refuse(format!("join request: {e}")),
    };
    let message = match wire::decode(packet, wire::JOIN_BYTES_MAX) {
        Ok(message) if message.kind == MessageKind::Join => message,
        Ok(message) => return refuse(format!("sent a {:?} message before joining", message.kind)),
        Err(e) => return refuse(format!("join request: {e}")),
    };
    if message.site != site {
        return refuse(format!("its join request claims site {}", message.site));
    }
    let theirs = match JoinRequest::decode(message.payload) {
        Ok(theirs) => theirs,
        Err(e) => return refuse(e.to_string()),
    };
    let differences = ours.differences(&theirs);
    if !differences.is_empty() {
        return refuse(format!(
            "its run settings differ from the coordinator's (is it started from another cluster file?): {}",
            differences.join("; ")
        ));
    }
    Ok(site)
}

/// Why a connection was not admitted.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub site: Option<u32>,
    pub reason: String,
}

impl Refusal {
    fn new(site: Option<u32>, reason: String) -> Self {
        Refusal { site, reason }
    }

    /// End the connection saying why (the site reads it as a final error).
    pub fn close(&self, peer: &Peer) {
        peer.close_with(close::REFUSED as u32, &close_reason(&self.reason));
    }
}

/// `reason`, cut to what a QUIC close frame carries.
pub fn close_reason(reason: &str) -> String {
    if reason.len() <= CLOSE_REASON_BYTES_MAX {
        return reason.to_string();
    }
    let mut end = CLOSE_REASON_BYTES_MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

/// Refusals as log lines, at most one per interval: a misconfigured or hostile node that
/// reconnects in a loop cannot flood the coordinator's output.
#[derive(Debug, Default)]
pub struct RefusalLog {
    last_shown_ms: Option<u64>,
    not_shown: u64,
    /// The newest reason per site (for the error when too few sites join).
    pub latest: BTreeMap<Option<u32>, String>,
}

impl RefusalLog {
    /// The line to print for a refusal at `now_ms`, if one is due.
    pub fn record(&mut self, now_ms: u64, refusal: &str, site: Option<u32>) -> Option<String> {
        self.latest.insert(site, refusal.to_string());
        let due = self
            .last_shown_ms
            .is_none_or(|last| now_ms >= last.saturating_add(REFUSAL_LOG_INTERVAL_MS));
        if !due {
            self.not_shown += 1;
            return None;
        }
        self.last_shown_ms = Some(now_ms);
        let more = std::mem::take(&mut self.not_shown);
        let who = site.map_or("a connection".to_string(), |s| format!("site {s}"));
        Some(if more > 0 {
            format!(
                "coordinator: refused {who}: {refusal} (and {more} more refusals in the last {} s)",
                REFUSAL_LOG_INTERVAL_MS / 1000
            )
        } else {
            format!("coordinator: refused {who}: {refusal}")
        })
    }

    /// The latest refusal of each site, one line each.
    pub fn summary(&self) -> String {
        self.latest
            .iter()
            .map(|(site, reason)| match site {
                Some(site) => format!("site {site}: {reason}"),
                None => format!("unknown: {reason}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What came through the door.
pub enum Admission {
    /// A listed site with the run's settings, on a new connection.
    Admitted(u32, Peer),
    /// A connection refused (closed with the reason, logged at most once an interval).
    Refused(Refusal),
    /// A connection accepted, its join request not in yet.
    Pending,
}

/// QUIC's accept in flight (see `Doorway`).
type Accepting<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<Result<Peer, NetError>>> + Send + 'a>,
>;
/// A new connection and its first message (the join request, or why none came).
type Joining = (Peer, Result<Vec<u8>, NetError>);
/// A site admitted while another connection with its key was open, and whether that one is
/// alive.
type Probed = (u32, Peer, bool);

/// New connections until they are admitted: QUIC's accept (one at a time, kept across the
/// coordinator's loop turns: it completes the handshake, and dropping it half-way would drop
/// that connection), a task per join request, the decision, refusals closed and logged.
/// `next` may be cancelled at any point without losing a connection.
pub struct Doorway<'a> {
    node: &'a crate::Node,
    accept: Accepting<'a>,
    joins_tx: tokio::sync::mpsc::UnboundedSender<Joining>,
    joins: tokio::sync::mpsc::UnboundedReceiver<Joining>,
    ids: BTreeMap<PublicKey, u32>,
    settings: JoinRequest,
    pub refusals: RefusalLog,
    probed_tx: tokio::sync::mpsc::UnboundedSender<Probed>,
    probed: tokio::sync::mpsc::UnboundedReceiver<Probed>,
    /// How long to watch an open connection for signs of life (two keep-alive intervals).
    probe: std::time::Duration,
}

impl<'a> Doorway<'a> {
    pub fn new(
        node: &'a crate::Node,
        ids: BTreeMap<PublicKey, u32>,
        settings: JoinRequest,
        keep_alive_ms: u64,
    ) -> Self {
        let (joins_tx, joins) = tokio::sync::mpsc::unbounded_channel();
        let (probed_tx, probed) = tokio::sync::mpsc::unbounded_channel();
        Doorway {
            node,
            accept: Box::pin(node.accept()),
            joins_tx,
            joins,
            ids,
            settings,
            refusals: RefusalLog::default(),
            probed_tx,
            probed,
            probe: std::time::Duration::from_millis(2 * keep_alive_ms + PROBE_MARGIN_MS),
        }
    }

    /// The next thing that happens at the door (`now_ms` times the refusal log). `connected`:
    /// the sites' open connections. A site whose key already has an open connection is admitted
    /// only once that connection shows no sign of life for two keep-alive intervals (a process
    /// restarted after a crash, before its old connection timed out); while it lives, the
    /// newcomer is refused: a second process never replaces a running one.
    pub async fn next(
        &mut self,
        now_ms: u64,
        connected: BTreeMap<u32, Peer>,
    ) -> Result<Admission, NetError> {
        tokio::select! {
            accepted = &mut self.accept => {
                self.accept = Box::pin(self.node.accept());
                match accepted {
                    Some(Ok(peer)) => {
                        await_join(peer, self.joins_tx.clone());
                        Ok(Admission::Pending)
                    }
                    Some(Err(e)) => Ok(Admission::Refused(self.refuse(now_ms, None, Refusal::new(None, e.to_string())))),
                    None => Err(NetError::Closed("the coordinator's endpoint closed".into())),
                }
            }
            Some((peer, first)) = self.joins.recv() => match admit(peer.key(), first, &self.ids, &self.settings) {
                Ok(site) => match connected.get(&site).filter(|old| old.close_reason().is_none()) {
                    Some(old) => {
                        probe(old.clone(), peer, site, self.probe, self.probed_tx.clone());
                        Ok(Admission::Pending)
                    }
                    None => Ok(Admission::Admitted(site, peer)),
                },
                Err(refusal) => Ok(Admission::Refused(self.refuse(now_ms, Some(&peer), refusal))),
            },
            Some((site, peer, alive)) = self.probed.recv() => {
                if alive {
                    let refusal = Refusal::new(Some(site), "another process with this site's key is connected and alive; stop it first (a restarted site is let in once its old connection is silent)".into());
                    Ok(Admission::Refused(self.refuse(now_ms, Some(&peer), refusal)))
                } else {
                    Ok(Admission::Admitted(site, peer))
                }
            }
        }
    }

    fn refuse(&mut self, now_ms: u64, peer: Option<&Peer>, refusal: Refusal) -> Refusal {
        if let Some(peer) = peer {
            refusal.close(peer);
        }
        if let Some(line) = self.refusals.record(now_ms, &refusal.reason, refusal.site) {
            tracing::warn!("{line}");
        }
        refusal
    }
}

/// Beyond two keep-alive intervals, when watching an open connection for signs of life.
const PROBE_MARGIN_MS: u64 = 250;

/// Watch `old` for `wait` (in a task of its own): alive if it is still open and received
/// something (a live peer acknowledges our keep-alives).
fn probe(
    old: Peer,
    new: Peer,
    site: u32,
    wait: std::time::Duration,
    probed: tokio::sync::mpsc::UnboundedSender<Probed>,
) {
    tokio::spawn(async move {
        let before = old.datagrams_received();
        tokio::time::sleep(wait).await;
        let alive = old.close_reason().is_none() && old.datagrams_received() > before;
        let _ = probed.send((site, new, alive));
    });
}

/// Wait (in a task of its own, so that a silent newcomer holds up nobody) for a new connection's
/// first message, and hand both to the coordinator's loop.
fn await_join(peer: Peer, joins: tokio::sync::mpsc::UnboundedSender<Joining>) {
    tokio::spawn(async move {
        let first = tokio::time::timeout(
            std::time::Duration::from_millis(JOIN_REQUEST_MS),
            peer.recv(),
        )
        .await
        .unwrap_or_else(|_| {
            Err(NetError::Closed(format!(
                "nothing within {} s",
                JOIN_REQUEST_MS / 1000
            )))
        });
        let _ = joins.send((peer, first));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_once_an_interval_with_a_count() {
        let mut log = RefusalLog::default();
        assert!(log.record(0, "a", Some(1)).is_some());
        for t in 1..1000 {
            assert!(log.record(t, "a", Some(1)).is_none());
        }
        let line = log.record(10_000, "b", None).unwrap();
        assert!(line.contains("999 more"), "{line}");
        assert_eq!(log.summary(), "unknown: b; site 1: a");
    }
}
