//! A site's connection to its coordinator, as a blocking handle any training loop can call:
//! lowband's own engine (the `site` process, `cluster`) and the Python package alike. It moves
//! bytes and reports what happened; every decision (how a connection ended, whether and until when
//! to reconnect, when a refusal is final) is `lowband_protocol::SiteLink`'s, so the seeded
//! simulation covers it.
//!
//! The handle owns a small tokio runtime (one worker thread), so the QUIC connection is served
//! (keep-alives answered, messages read into a queue) while the caller's thread trains.
//! [`SiteClient::next_round`] is the round site's whole network side: wait for the coordinator's
//! next message, apply every message already queued behind it (a site that fell behind catches up
//! and trains for the newest round only), and say which round to train.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lowband_protocol::link::close;
use lowband_protocol::{
    LinkDecision, LinkEnd, LinkPolicy, ProtocolError, Site, SiteAction, SiteEvent, SiteLink,
};
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver};

use crate::{open, seal, seal_in_place, Identity, Limits, NetError, Node, Peer, PublicKey};

/// How a site reaches its coordinator.
#[derive(Clone)]
pub struct ClientOptions {
    pub identity: Arc<Identity>,
    /// The coordinator's address and the key it must prove it holds.
    pub coordinator: (SocketAddr, PublicKey),
    pub limits: Limits,
    /// Keep trying to reach the coordinator this long (at the start, and after losing it).
    pub reconnect_ms: u64,
    /// The join request (unsealed: `lowband_protocol::wire::JoinRequest::encode`), sent first on
    /// every connection.
    pub join: Vec<u8>,
    /// Ctrl-C / SIGINT makes the site leave (a site process; not tasks of one process, nor a
    /// Python interpreter, which handles its own signals).
    pub leave_on_ctrl_c: bool,
}

/// Why a site stops with an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Final: the coordinator does not list this key, or refused its join request.
    #[error("{0}")]
    Refused(String),
    /// The coordinator could not be reached within the reconnect budget.
    #[error("could not reach the coordinator at {address} before the reconnect budget ran out ({detail}); is it running, and is this its address?")]
    Unreachable { address: SocketAddr, detail: String },
    /// A message from the coordinator that this site cannot use (bad signature, bad packet).
    #[error("the coordinator at {address} sent a message this site cannot use: {detail}")]
    BadMessage { address: SocketAddr, detail: String },
    #[error(transparent)]
    Net(#[from] NetError),
}

/// What the coordinator said (or what became of the connection).
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Train round `round` from `Site::round_start` (a round site), or mix this round's merge in
    /// (a streaming site). From `next_message`, `Packet` holds the opened packet instead.
    Train { round: u64 },
    /// The connection was lost; call [`SiteClient::reconnect`] (what was trained on it is lost).
    Lost,
    /// This site's part in the run is over (the run ended, it was excluded, or it does not
    /// reconnect).
    Finished { excluded: bool },
    /// Ctrl-C was pressed: call [`SiteClient::leave`].
    Leave,
}

/// A message from the coordinator, opened (its signature checked), or what ended the connection.
pub enum Message {
    Packet(Vec<u8>),
    Ended(Next),
}

/// What a site received from its coordinator over some time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Download {
    pub bytes: u64,
    /// From each message's first byte to its last, summed.
    pub seconds: f64,
}

/// A site's connection to its coordinator.
pub struct SiteClient {
    runtime: tokio::runtime::Runtime,
    node: Node,
    peer: Peer,
    inbox: UnboundedReceiver<Result<Vec<u8>, NetError>>,
    /// What arrived from the coordinator since `take_download` last asked.
    downloads: Arc<Mutex<Download>>,
    link: SiteLink,
    options: ClientOptions,
    started: Instant,
    leave: Option<tokio::sync::watch::Receiver<()>>,
    /// Set by `reconnect` until the caller has seen it (`take_reconnected`).
    reconnected: bool,
}

/// The transport's account of an end, as the link machine reads it.
fn link_end(e: &NetError) -> LinkEnd {
    match e {
        NetError::Handshake(_) => LinkEnd::KeyRefused,
        NetError::Ended { code, .. } => LinkEnd::Code(*code),
        _ => LinkEnd::Broken,
    }
}

impl SiteClient {
    /// Connect to the coordinator and join (retrying every `LinkPolicy::RETRY_MS` for
    /// `reconnect_ms`, at least once). A refusal is final.
    pub fn connect(options: ClientOptions) -> Result<SiteClient, ClientError> {
        let runtime = crate::runtime(1, "lowband-site-net")?;
        // Any local address of the coordinator's family (a loopback-bound socket cannot reach
        // another host).
        let local: SocketAddr = if options.coordinator.0.is_ipv6() {
            "[::]:0".parse().expect("any IPv6")
        } else {
            "0.0.0.0:0".parse().expect("any IPv4")
        };
        let node = {
            let _inside = runtime.enter();
            Node::client(options.identity.clone(), local, options.limits.clone())?
        };
        let started = Instant::now();
        let mut link = SiteLink::new(LinkPolicy::new(options.reconnect_ms), 0);
        let peer = runtime.block_on(join(&node, &options, &mut link, started))?;
        let downloads = Arc::new(Mutex::new(Download::default()));
        let inbox = {
            let _inside = runtime.enter();
            read_from_coordinator(&peer, downloads.clone())
        };
        let leave = options.leave_on_ctrl_c.then(|| {
            let (tx, rx) = tokio::sync::watch::channel(());
            runtime.spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = tx.send(());
                }
            });
            rx
        });
        Ok(SiteClient {
            runtime,
            node,
            peer,
            inbox,
            downloads,
            link,
            options,
            started,
            leave,
            reconnected: true,
        })
    }

    /// Bytes received from the coordinator, and the seconds they took from each message's first
    /// byte to its last, since the last call: what a site's training report says of its
    /// download (its measured rate, for the live view).
    pub fn take_download(&mut self) -> Download {
        std::mem::take(&mut *self.downloads.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The coordinator's address.
    pub fn coordinator(&self) -> SocketAddr {
        self.options.coordinator.0
    }

    /// Whether a new connection was made since the last call (true once after `connect`): what
    /// the coordinator sends on it starts from scratch (the parameters in full).
    pub fn take_reconnected(&mut self) -> bool {
        std::mem::take(&mut self.reconnected)
    }

    /// Whether Ctrl-C has been pressed (checked between steps; the site then calls `leave`).
    pub fn leave_requested(&self) -> bool {
        self.leave
            .as_ref()
            .is_some_and(|l| l.has_changed().unwrap_or(false))
    }

    /// What a connection's end means for this site.
    fn ended(&mut self, e: NetError) -> Result<Next, ClientError> {
        let now_ms = self.now_ms();
        match self.link.ended(link_end(&e), now_ms) {
            LinkDecision::Reconnect { until_ms, .. } => {
                tracing::info!(
                    "site: lost the coordinator at {} ({e}); reconnecting for up to {} s",
                    self.options.coordinator.0,
                    until_ms.saturating_sub(now_ms).div_ceil(1000)
                );
                Ok(Next::Lost)
            }
            LinkDecision::Finished { excluded } => Ok(Next::Finished { excluded }),
            LinkDecision::Refused => Err(refused(&self.options, e)),
            LinkDecision::GaveUp => Err(ClientError::Unreachable {
                address: self.options.coordinator.0,
                detail: e.to_string(),
            }),
        }
    }

    fn opened(&mut self, sealed: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.link.heard();
        let packet =
            open(self.options.coordinator.1, &sealed).map_err(|e| ClientError::BadMessage {
                address: self.options.coordinator.0,
                detail: e.to_string(),
            })?;
        Ok(packet.to_vec())
    }

    fn received(
        &mut self,
        message: Option<Result<Vec<u8>, NetError>>,
    ) -> Result<Message, ClientError> {
        match message {
            Some(Ok(sealed)) => Ok(Message::Packet(self.opened(sealed)?)),
            Some(Err(e)) => Ok(Message::Ended(self.ended(e)?)),
            None => Ok(Message::Ended(
                self.ended(NetError::Closed("the reader stopped".into()))?,
            )),
        }
    }

    /// The coordinator's next message, waiting for it (or for Ctrl-C).
    pub fn next_message(&mut self) -> Result<Message, ClientError> {
        let received = match self.leave.as_mut() {
            Some(leave) => {
                let inbox = &mut self.inbox;
                self.runtime.block_on(async {
                    tokio::select! {
                        message = inbox.recv() => Some(message),
                        _ = leave.changed() => None,
                    }
                })
            }
            None => Some(self.runtime.block_on(self.inbox.recv())),
        };
        match received {
            Some(message) => self.received(message),
            None => Ok(Message::Ended(Next::Leave)),
        }
    }

    /// The coordinator's next message, waiting at most `timeout` (None: nothing came): a caller
    /// that must stay responsive (a Python interpreter checking for Ctrl-C) calls it in a loop.
    pub fn next_message_within(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Message>, ClientError> {
        let inbox = &mut self.inbox;
        let waited = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, inbox.recv()).await });
        match waited {
            Ok(message) => self.received(message).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// A message already here, without waiting.
    pub fn try_next_message(&mut self) -> Result<Option<Message>, ClientError> {
        match self.inbox.try_recv() {
            Ok(message) => self.received(Some(message)).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => self.received(None).map(Some),
        }
    }

    /// A round site's next round: wait for the coordinator's next message and hand it to `site`;
    /// every message already queued behind it is applied too (a site that fell behind catches
    /// up), and the newest round is the one to train.
    pub fn next_round(&mut self, site: &mut Site) -> Result<Next, ClientError> {
        let message = self.next_message()?;
        self.catch_up(site, message)
    }

    /// `next_round`, waiting at most `timeout` for the coordinator's next message (None: nothing
    /// came): a caller that must stay responsive (a Python interpreter checking for Ctrl-C)
    /// calls it in a loop.
    pub fn next_round_within(
        &mut self,
        site: &mut Site,
        timeout: Duration,
    ) -> Result<Option<Next>, ClientError> {
        match self.next_message_within(timeout)? {
            Some(message) => self.catch_up(site, message).map(Some),
            None => Ok(None),
        }
    }

    /// Apply `first` and every message already queued behind it; the newest round to train.
    fn catch_up(&mut self, site: &mut Site, first: Message) -> Result<Next, ClientError> {
        let mut next = match first {
            Message::Packet(packet) => self.apply(site, &packet)?,
            Message::Ended(next) => return Ok(next),
        };
        while let Next::Train { .. } = next {
            match self.try_next_message()? {
                Some(Message::Packet(packet)) => next = self.apply(site, &packet)?,
                // The connection is gone: whatever it trained now could not be sent.
                Some(Message::Ended(end)) => return Ok(end),
                None => break,
            }
        }
        Ok(next)
    }

    /// Hand a packet from the coordinator to `site`: the round it opens (`Next::Train`), or
    /// `Next::Lost` when it is a change to parameters the site does not hold (see `resync`).
    pub fn apply(&mut self, site: &mut Site, packet: &[u8]) -> Result<Next, ClientError> {
        let bad = |detail: String| ClientError::BadMessage {
            address: self.options.coordinator.0,
            detail,
        };
        match site.handle(SiteEvent::PacketArrived(packet)) {
            Ok(actions) => match actions.as_slice() {
                [SiteAction::Train { round }] => Ok(Next::Train { round: *round }),
                other => Err(bad(format!("the site answered it with {other:?}"))),
            },
            Err(ProtocolError::NotSynced) => Ok(self.resync()),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// The coordinator sent a change to parameters this site does not hold (it restarted with
    /// only the seed's): close this connection and join again to get them in full. Returns
    /// `Next::Lost` (call `reconnect`).
    pub fn resync(&mut self) -> Next {
        let now_ms = self.now_ms();
        self.link.out_of_sync(now_ms);
        self.peer.close_with(
            close::REJOIN as u32,
            "out of sync: rejoining for the parameters",
        );
        tracing::info!("site: the coordinator's change needs parameters this site does not hold: rejoining for them in full");
        Next::Lost
    }

    /// Send `message` (unsealed: it is signed here). `Ok(None)`: delivered to the transport.
    /// Otherwise what became of the connection.
    pub fn send(&mut self, message: Vec<u8>) -> Result<Option<Next>, ClientError> {
        let mut sealed = message;
        seal_in_place(&self.options.identity, &mut sealed);
        match self.runtime.block_on(self.peer.send_bytes(sealed.into())) {
            Ok(()) => Ok(None),
            Err(e) => self.ended(e).map(Some),
        }
    }

    /// After `Next::Lost`: reconnect as the link machine decided (at once, or after a retry
    /// interval, for as long as the budget lasts). A refusal or a spent budget is an error.
    pub fn reconnect(&mut self) -> Result<(), ClientError> {
        self.peer.close();
        self.peer = self.runtime.block_on(join(
            &self.node,
            &self.options,
            &mut self.link,
            self.started,
        ))?;
        self.inbox = {
            let _inside = self.runtime.enter();
            read_from_coordinator(&self.peer, self.downloads.clone())
        };
        self.reconnected = true;
        tracing::info!(
            "site: reconnected to the coordinator at {}",
            self.options.coordinator.0
        );
        Ok(())
    }

    /// Leave the run gracefully: the coordinator learns it at once (no idle timeout).
    pub fn leave(mut self) {
        let code = self.link.leave();
        self.peer.close_with(code as u32, "leaving");
        self.runtime
            .block_on(self.node.wait_closed(Duration::from_secs(2)));
        tracing::info!("site {}: left the run", self.options.identity.public_key());
    }
}

/// Connect and send the join request, as `link` decides: at once, then every retry interval
/// until its budget runs out, at least once.
async fn join(
    node: &Node,
    options: &ClientOptions,
    link: &mut SiteLink,
    started: Instant,
) -> Result<Peer, ClientError> {
    let now_ms = || started.elapsed().as_millis() as u64;
    let at = |ms: u64| tokio::time::Instant::from_std(started + Duration::from_millis(ms));
    // (After a connection closed unheard, the first attempt waits one retry interval.)
    if let Some(at_ms) = link.next_attempt_ms() {
        tokio::time::sleep_until(at(at_ms)).await;
    }
    loop {
        let Some(until_ms) = link.attempt_until_ms(now_ms()) else {
            return Err(ClientError::Unreachable {
                address: options.coordinator.0,
                detail: "not connecting".into(),
            });
        };
        let attempt = tokio::time::timeout_at(
            at(until_ms),
            node.connect(options.coordinator.0, options.coordinator.1),
        )
        .await;
        let error = match attempt {
            Ok(Ok(peer)) => match peer.send(&seal(&options.identity, &options.join)).await {
                Ok(()) => {
                    link.connected();
                    return Ok(peer);
                }
                Err(e) => e,
            },
            Ok(Err(e)) => e,
            Err(_) => NetError::Connect("timed out".into()),
        };
        match link.attempt_failed(link_end(&error), now_ms()) {
            LinkDecision::Reconnect { at_ms, .. } => tokio::time::sleep_until(at(at_ms)).await,
            LinkDecision::Refused => return Err(refused(options, error)),
            _ => {
                return Err(ClientError::Unreachable {
                    address: options.coordinator.0,
                    detail: error.to_string(),
                })
            }
        }
    }
}

/// The error a refused site stops with: its configuration (the cluster file, its key) is what
/// the coordinator refused.
fn refused(options: &ClientOptions, e: NetError) -> ClientError {
    let (address, key) = (options.coordinator.0, options.identity.public_key());
    ClientError::Refused(match e {
        NetError::Ended { reason, .. } => {
            format!("the coordinator at {address} refused this site (key {key}): {reason}")
        }
        NetError::Handshake(detail) => format!(
            "the coordinator at {address} refused this site's key {key} in the TLS handshake: this coordinator does not list your key (is it the coordinator your cluster file names, and is this key among its sites?) [{detail}]"
        ),
        other => format!("the coordinator at {address}: {other}"),
    })
}

/// What the coordinator sends, as it arrives, until the connection ends (a reader task, so that
/// the connection is served while the site trains).
fn read_from_coordinator(
    peer: &Peer,
    downloads: Arc<Mutex<Download>>,
) -> UnboundedReceiver<Result<Vec<u8>, NetError>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = peer.clone();
    tokio::spawn(async move {
        loop {
            let message = reader.recv_timed().await.map(|(bytes, took)| {
                let mut download = downloads.lock().unwrap_or_else(|e| e.into_inner());
                download.bytes += bytes.len() as u64;
                download.seconds += took.as_secs_f64();
                bytes
            });
            let closed = matches!(message, Err(NetError::Closed(_) | NetError::Ended { .. }));
            if tx.send(message).is_err() || closed {
                return;
            }
        }
    });
    rx
}
