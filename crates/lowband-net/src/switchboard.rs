//! The coordinator's network for a scheduled run (asynchronous rounds, or a quorum on the
//! emulated clock): every site admitted before the run starts, then a blocking handle that sends
//! a site a message (signed, queued to its own writer: it never waits) and waits for the next
//! message of one particular site (its signature checked). In such a run the coordinator keeps
//! the schedule and takes each site's messages in the schedule's order, not as they come:
//! what another site sends meanwhile waits in its queue here.
//!
//! A site whose connection ends stops the run with the reason, as does Ctrl-C in a coordinator
//! process; the run continues from its last save when the coordinator is started again with
//! `--resume` (the runtime saves it: its sites save their own state when cued).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lowband_protocol::link::close;
use lowband_protocol::wire::JoinRequest;

use crate::door::{close_reason, Admission, Doorway};
use crate::serve::connection::{Inbound, SiteConnection};
use crate::{open, seal, Abort, AllowList, Identity, Limits, NetError, Node, PublicKey};

/// A message a site sent: opened (its signature checked), and its size on the wire.
pub struct Received {
    pub packet: Vec<u8>,
    pub sealed_bytes: usize,
}

/// The coordinator's side of a scheduled run's connections.
pub struct Switchboard {
    runtime: tokio::runtime::Runtime,
    node: Node,
    identity: Arc<Identity>,
    site_keys: Vec<PublicKey>,
    connections: BTreeMap<u32, SiteConnection>,
    inbound: tokio::sync::mpsc::UnboundedReceiver<Inbound>,
    /// Per site, what it sent and was not asked for yet, in order.
    received: Vec<VecDeque<Received>>,
    /// With `stop_on_ctrl_c`: becomes true once Ctrl-C is pressed. One listener for the whole
    /// run, from the sites' admission on, so that a Ctrl-C between two waits is not lost (a
    /// listener made anew in each wait missed those, and the run went on to its end).
    interrupted: Option<tokio::sync::watch::Receiver<bool>>,
    /// Stops the run from outside, with its reason.
    abort: Option<Abort>,
    /// How long `next_from` waits for a message (any site's) before the run stops.
    wait_ms: u64,
}

/// What stops a scheduled run besides its sites: Ctrl-C (a coordinator process) and an
/// [`Abort`] from another thread.
#[derive(Clone, Debug, Default)]
pub struct Stops {
    pub on_ctrl_c: bool,
    pub abort: Option<Abort>,
}

impl Switchboard {
    /// Listen on `listen` with `identity` and admit exactly `site_keys` (site k is the k-th) whose
    /// join request equals `settings`: every one of them, within `join_timeout_ms` (a scheduled
    /// run starts with all its sites). `listening` is told the bound address first.
    #[allow(clippy::too_many_arguments)]
    pub fn open<E: From<NetError>>(
        identity: Arc<Identity>,
        site_keys: &[PublicKey],
        settings: &JoinRequest,
        listen: SocketAddr,
        limits: &Limits,
        join_timeout_ms: u64,
        stops: Stops,
        listening: impl FnOnce(SocketAddr) -> Result<(), E>,
    ) -> Result<Switchboard, E> {
        let Stops { on_ctrl_c, abort } = stops;
        let runtime = crate::runtime(site_keys.len().clamp(2, 8), "lowband-coordinator-net")?;
        let allowed: AllowList =
            Arc::new(std::sync::RwLock::new(site_keys.iter().copied().collect()));
        let node = {
            let _entered = runtime.enter();
            Node::listen(identity.clone(), listen, allowed, limits.clone())?
        };
        listening(node.local_addr()?)?;
        let (inbound_tx, inbound) = tokio::sync::mpsc::unbounded_channel();
        let connections = runtime.block_on(async {
            tokio::select! {
                connections = admit_every_site(
                    &node,
                    site_keys,
                    settings,
                    limits,
                    join_timeout_ms,
                    inbound_tx,
                ) => connections,
                reason = crate::abort::aborted(abort.as_ref()) => Err(NetError::Stopped(reason)),
            }
        });
        let connections = match connections {
            Ok(connections) => connections,
            Err(e) => {
                node.close_with(close::STOPPED as u32, &close_reason(&e.to_string()));
                return Err(e.into());
            }
        };
        let interrupted = match on_ctrl_c.then(|| listen_for_ctrl_c(&runtime)) {
            Some(Err(e)) => {
                node.close_with(close::STOPPED as u32, &close_reason(&e.to_string()));
                return Err(e.into());
            }
            Some(Ok(interrupted)) => Some(interrupted),
            None => None,
        };
        Ok(Switchboard {
            runtime,
            node,
            identity,
            site_keys: site_keys.to_vec(),
            connections,
            inbound,
            received: site_keys.iter().map(|_| VecDeque::new()).collect(),
            interrupted,
            abort,
            wait_ms: u64::MAX / 4,
        })
    }

    /// `next_from` waits at most `wait_ms` for a message (any site's) before the run stops.
    pub fn with_wait_ms(mut self, wait_ms: u64) -> Switchboard {
        self.wait_ms = wait_ms;
        self
    }

    /// Sign `message` and queue it to site `to`; its size on the wire.
    pub fn send(&mut self, to: u32, message: &[u8]) -> usize {
        let sealed = Bytes::from(seal(&self.identity, message));
        let length = sealed.len();
        if let Some(connection) = self.connections.get(&to) {
            let _entered = self.runtime.enter();
            // (A writer that fails reports it through the site's inbound: `next_from` sees it.)
            connection.queue(sealed, usize::MAX);
        }
        length
    }

    /// The next message of site `from`, waiting for it as long as its connection lives and a
    /// message from some site comes within `wait_ms`.
    pub fn next_from(&mut self, from: u32) -> Result<Received, NetError> {
        loop {
            if let Some(received) = self.received[from as usize].pop_front() {
                return Ok(received);
            }
            let inbound = &mut self.inbound;
            let wait = Duration::from_millis(self.wait_ms);
            let stopped = || {
                NetError::Stopped(format!(
                    "site {from} sent nothing for {:.1} s while the schedule waited for it (a hung site would stall a scheduled run: it stops instead)",
                    wait.as_secs_f64()
                ))
            };
            let interrupted = self.interrupted.clone();
            let abort = self.abort.as_ref();
            let next = self.runtime.block_on(async {
                let recv = tokio::time::timeout(wait, inbound.recv());
                let pressed = async {
                    match interrupted {
                        // (A listener that ended without a Ctrl-C never fires.)
                        Some(mut interrupted) => match interrupted.wait_for(|p| *p).await {
                            Ok(_) => (),
                            Err(_) => std::future::pending().await,
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    next = recv => next.map_err(|_| stopped()),
                    () = pressed => Err(NetError::Stopped(
                        "interrupted (Ctrl-C): started again with --resume, a run with a state directory continues from its last save".into(),
                    )),
                    reason = crate::abort::aborted(abort) => Err(NetError::Stopped(reason)),
                }
            })?;
            let Some((site, _generation, message)) = next else {
                return Err(NetError::Closed("every site connection closed".into()));
            };
            let sealed = message.map_err(|e| {
                NetError::Stopped(format!(
                    "site {site}'s connection ended mid-run ({e}); a scheduled run needs every site: start it again (with --resume) and the coordinator with --resume to continue from the last save"
                ))
            })?;
            // Not signed by its site: handed on as an empty (malformed) packet, which the
            // protocol refuses and scores, as the coordinator's loop does.
            let packet = match open(self.site_keys[site as usize], &sealed) {
                Ok(packet) => packet.to_vec(),
                Err(e) => {
                    tracing::warn!("site {site} sent a message it did not sign: {e}");
                    Vec::new()
                }
            };
            self.received[site as usize].push_back(Received {
                packet,
                sealed_bytes: sealed.len(),
            });
        }
    }

    /// The run is over: every site learns it (its connection closes normally).
    pub fn finish(self) {
        self.node.close();
        self.runtime
            .block_on(self.node.wait_closed(Duration::from_secs(2)));
    }

    /// The run stopped with `reason`: every site learns it at once.
    pub fn stop(self, reason: &str) {
        self.node.close_with(
            close::STOPPED as u32,
            &close_reason(&format!("the coordinator stopped: {reason}")),
        );
        self.runtime
            .block_on(self.node.wait_closed(Duration::from_secs(2)));
    }
}

/// Admit every site (each once; a refused connection is closed with its reason and logged), or
/// say who is missing once `join_timeout_ms` has passed.
async fn admit_every_site(
    node: &Node,
    site_keys: &[PublicKey],
    settings: &JoinRequest,
    limits: &Limits,
    join_timeout_ms: u64,
    inbound: tokio::sync::mpsc::UnboundedSender<Inbound>,
) -> Result<BTreeMap<u32, SiteConnection>, NetError> {
    let ids: BTreeMap<PublicKey, u32> = site_keys
        .iter()
        .enumerate()
        .map(|(k, key)| (*key, k as u32))
        .collect();
    let mut door = Doorway::new(node, ids, settings.clone(), limits.keep_alive_ms);
    let mut connections = BTreeMap::new();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(join_timeout_ms);
    while connections.len() < site_keys.len() {
        let now_ms = started.elapsed().as_millis() as u64;
        let open = connections
            .iter()
            .map(|(site, c): (&u32, &SiteConnection)| (*site, c.peer.clone()))
            .collect();
        let admission = tokio::time::timeout_at(deadline.into(), door.next(now_ms, open)).await;
        match admission {
            Ok(Ok(Admission::Admitted(site, peer))) => {
                let connection = SiteConnection::open(peer, site, 0, inbound.clone());
                if let Some(old) = connections.insert(site, connection) {
                    old.peer.close();
                }
            }
            Ok(Ok(Admission::Pending | Admission::Refused(_))) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let missing: Vec<String> = (0..site_keys.len() as u32)
                    .filter(|k| !connections.contains_key(k))
                    .map(|k| k.to_string())
                    .collect();
                let refused = if door.refusals.latest.is_empty() {
                    String::new()
                } else {
                    format!("; refused: {}", door.refusals.summary())
                };
                return Err(NetError::Stopped(format!(
                    "a scheduled run starts with every site, and site(s) {} did not join within {} s{refused}",
                    missing.join(", "),
                    join_timeout_ms / 1000
                )));
            }
        }
    }
    Ok(connections)
}

/// A flag that becomes true when this process gets Ctrl-C, listened to from now on (on Unix the
/// SIGINT handler is registered before this returns).
fn listen_for_ctrl_c(
    runtime: &tokio::runtime::Runtime,
) -> Result<tokio::sync::watch::Receiver<bool>, NetError> {
    let (pressed, interrupted) = tokio::sync::watch::channel(false);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigint = {
            let _entered = runtime.enter();
            signal(SignalKind::interrupt()).map_err(|source| NetError::Io {
                path: "the Ctrl-C (SIGINT) handler".into(),
                source,
            })?
        };
        runtime.spawn(async move {
            if sigint.recv().await.is_some() {
                let _ = pressed.send(true);
            }
        });
    }
    #[cfg(not(unix))]
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = pressed.send(true);
        }
    });
    Ok(interrupted)
}
