//! A site's side over the network: the round site (`site_task`), the streaming site
//! (`streaming_site_task`), reconnecting and leaving.

use std::net::SocketAddr;

use lowband_engine::Trainer;
use lowband_net::{open, seal, NetError, Node, Peer};
use lowband_protocol::wire::TrainingReport;
use lowband_protocol::SiteEvent;

use crate::driver::{train_steps, SiteRuntime};
use crate::RunError;

use super::{SiteJob, CLOSE_LEAVING, CLOSE_REFUSED, CLOSE_REJOIN, CLOSE_STOPPED};

/// One site: connect, then per packet from the coordinator: H inner steps from the parameters
/// it sent, and the update. A site that falls behind (packets queued while it trained) applies
/// them all and trains for the newest round only. Its training time and losses go to the
/// coordinator in a report before each update.
pub(super) async fn site_task(
    mut site: SiteRuntime,
    job: SiteJob,
    mut connected: impl FnMut(),
) -> Result<(), RunError> {
    // Any local address of the coordinator's family (a loopback-bound socket cannot reach
    // another host).
    let local: SocketAddr = if job.coordinator.0.is_ipv6() {
        "[::]:0".parse().expect("any IPv6")
    } else {
        "0.0.0.0:0".parse().expect("any IPv4")
    };
    let node = Node::client(job.identity.clone(), local, job.limits.clone())?;
    let last_round = job.steps.div_ceil(job.inner_steps).saturating_sub(1);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    // A site started before its coordinator keeps trying for `reconnect_ms` too.
    let mut budget = deadline_after(job.reconnect_ms);
    let mut peer = join(&node, &job, budget).await?;
    // The reconnect budget runs from the last message the coordinator sent: a connection that
    // is closed before it delivers anything (a refusal, a coordinator not ready) does not renew it.
    let mut heard_from_coordinator = false;
    // Ctrl-C is remembered even while the site trains: it leaves before the next round.
    let mut leave = leave_signal(job.leave_on_signal);
    loop {
        connected();
        let mut rx = read_from_coordinator(&peer);
        let open_round = |site: &mut SiteRuntime, sealed: Vec<u8>| -> Result<u64, RunError> {
            let packet = open(job.coordinator.1, &sealed)?;
            match site
                .site
                .handle(SiteEvent::PacketArrived(packet))?
                .as_slice()
            {
                [lowband_protocol::SiteAction::Train { round }] => Ok(*round),
                other => Err(RunError::Protocol(format!(
                    "site answered a global message with {other:?}"
                ))),
            }
        };
        let (mut closed, mut rejoin) = (false, false);
        while !closed {
            let received = if let Some(leave) = leave.as_mut() {
                tokio::select! {
                    message = rx.recv() => message,
                    _ = leave.changed() => {
                        leave_now(&node, &peer, &job).await;
                        return Ok(());
                    }
                }
            } else {
                rx.recv().await
            };
            let mut round = match received {
                Some(Ok(sealed)) => {
                    heard_from_coordinator = true;
                    open_round(&mut site, sealed)?
                }
                Some(Err(NetError::Ended {
                    code: CLOSE_REJOIN, ..
                })) => {
                    rejoin = true;
                    break;
                }
                Some(Err(e)) if is_refusal(&e) => return Err(refused(&job, e)),
                // The coordinator ended the run, or our part in it (excluded): nothing more to do.
                Some(Err(NetError::Ended { code, .. })) if code != CLOSE_STOPPED => return Ok(()),
                Some(Err(NetError::Closed(_))) | None => break,
                // The coordinator stopped (Ctrl-C, an error): it comes back with --resume.
                Some(Err(NetError::Ended {
                    code: CLOSE_STOPPED,
                    ..
                })) => break,
                Some(Err(e)) => return Err(e.into()),
            };
            // Catch up: every packet already here is applied; only the newest is trained on.
            loop {
                match rx.try_recv() {
                    Ok(Ok(sealed)) => round = open_round(&mut site, sealed)?,
                    // Asked to rejoin while it was away (a frozen process wakes to find this
                    // behind the packets it missed).
                    Ok(Err(NetError::Ended {
                        code: CLOSE_REJOIN, ..
                    })) => {
                        (rejoin, closed) = (true, true);
                        break;
                    }
                    Ok(Err(e)) if is_refusal(&e) => return Err(refused(&job, e)),
                    Ok(Err(NetError::Ended { code, .. })) if code != CLOSE_STOPPED => return Ok(()),
                    Ok(Err(
                        NetError::Closed(_)
                        | NetError::Ended {
                            code: CLOSE_STOPPED,
                            ..
                        },
                    )) => {
                        closed = true;
                        break;
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => break,
                }
            }
            // The connection is gone: whatever it trained now could not be sent.
            if closed {
                break;
            }
            // A round past the run's last means the run is over (and keeps the arithmetic below
            // from overflowing on a nonsense round number).
            if round > last_round {
                return Ok(());
            }
            let step = round * job.inner_steps;
            let h = job.inner_steps.min(job.steps - step);
            let mut losses = vec![0.0f32; h as usize];
            site.trainer
                .params_mut()
                .copy_from_slice(site.site.round_start());
            let took = tokio::task::block_in_place(|| {
                train_steps(
                    &mut site,
                    &job.shard,
                    job.batch,
                    &job.schedule,
                    step,
                    &mut losses,
                    (&mut inputs, &mut targets),
                )
            })?;
            let update = site.update(round, 0..job.params, &job.uplink)?;
            if let Some(dir) = &job.state_dir {
                crate::state::save_site(dir, &site, round, &job.run)?;
            }
            // The training report, then the update (the coordinator reads a connection's
            // messages in order, so the report is in before the update can close the round). A
            // send that fails means the connection is gone: reconnect below (unless the
            // coordinator ended it on purpose).
            let report = TrainingReport {
                seconds: took,
                losses,
            }
            .encode(round, site.site.id());
            let mut lost = false;
            for message in [report, update] {
                match peer.send(&seal(&job.identity, &message)).await {
                    Ok(()) => {}
                    Err(NetError::Ended {
                        code: CLOSE_REJOIN, ..
                    }) => {
                        rejoin = true;
                        lost = true;
                        break;
                    }
                    Err(e) if is_refusal(&e) => return Err(refused(&job, e)),
                    Err(NetError::Ended { code, .. }) if code != CLOSE_STOPPED => return Ok(()),
                    Err(_) => {
                        lost = true;
                        break;
                    }
                }
            }
            if lost {
                break;
            }
            if round >= last_round {
                return Ok(());
            }
        }
        // The coordinator went away before the last round: it ended the run without us (we were
        // dropped or excluded), or it crashed and is coming back from its checkpoint.
        // Asked to rejoin (it fell behind), it does so even when it would not retry otherwise.
        if job.reconnect_ms == 0 && !rejoin {
            return Ok(());
        }
        if heard_from_coordinator || rejoin {
            budget = deadline_after(if rejoin {
                job.reconnect_ms.max(REJOIN_MS)
            } else {
                job.reconnect_ms
            });
        } else {
            // Closed before the coordinator said anything: wait before the next try.
            tokio::time::sleep(std::time::Duration::from_millis(RETRY_MS)).await;
        }
        heard_from_coordinator = false;
        peer = join(&node, &job, budget).await?;
    }
}

/// A refusal is final: the coordinator does not list this key (TLS handshake), or refused its
/// join (other run settings, a bad join request). Retrying cannot change either.
fn is_refusal(e: &NetError) -> bool {
    matches!(
        e,
        NetError::Handshake(_)
            | NetError::Ended {
                code: CLOSE_REFUSED,
                ..
            }
    )
}

/// The error a refused site stops with: its configuration (the cluster file, its key) is what
/// the coordinator refused.
fn refused(job: &SiteJob, e: NetError) -> RunError {
    let (address, key) = (job.coordinator.0, job.identity.public_key());
    let reason = match e {
        NetError::Ended { reason, .. } => {
            format!("the coordinator at {address} refused this site (key {key}): {reason}")
        }
        NetError::Handshake(detail) => format!(
            "the coordinator at {address} refused this site's key {key} in the TLS handshake: this coordinator does not list your key (is it the coordinator your cluster file names, and is this key among its sites?) [{detail}]"
        ),
        other => format!("the coordinator at {address}: {other}"),
    };
    RunError::InvalidConfig {
        field: "cluster",
        reason,
    }
}

/// Between two attempts to reach the coordinator.
const RETRY_MS: u64 = 500;

fn deadline_after(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_millis(ms)
}

/// Connect to the coordinator and send the join request (the run settings this site was
/// started with), retrying every `RETRY_MS` until `deadline`, at least once. A refusal in the
/// TLS handshake is final.
async fn join(
    node: &Node,
    job: &SiteJob,
    deadline: tokio::time::Instant,
) -> Result<Peer, RunError> {
    let retry = std::time::Duration::from_millis(RETRY_MS);
    loop {
        // Every attempt gets at least one retry interval, even past the deadline.
        let attempt_until = deadline.max(tokio::time::Instant::now() + retry);
        let attempt = tokio::time::timeout_at(
            attempt_until,
            node.connect(job.coordinator.0, job.coordinator.1),
        )
        .await;
        let error = match attempt {
            Ok(Ok(peer)) => match peer.send(&seal(&job.identity, &job.join)).await {
                Ok(()) => return Ok(peer),
                Err(e) => e,
            },
            Ok(Err(e)) => e,
            Err(_) => NetError::Connect("timed out".into()),
        };
        if is_refusal(&error) {
            return Err(refused(job, error));
        }
        if tokio::time::Instant::now() + retry >= deadline {
            return Err(RunError::Protocol(format!(
                "could not reach the coordinator at {} before the reconnect budget ran out ({error}); is it running, and is --join its address?",
                job.coordinator.0
            )));
        }
        tokio::time::sleep(retry).await;
    }
}

/// Ctrl-C / SIGINT, when `enabled` (a site process): the receiver changes once it is pressed.
fn leave_signal(enabled: bool) -> Option<tokio::sync::watch::Receiver<()>> {
    enabled.then(|| {
        let (tx, rx) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(());
            }
        });
        rx
    })
}

/// A graceful leave: the coordinator learns it at once (no idle timeout).
async fn leave_now(node: &Node, peer: &Peer, job: &SiteJob) {
    peer.close_with(CLOSE_LEAVING as u32, "leaving");
    node.wait_closed(std::time::Duration::from_secs(2)).await;
    tracing::info!("site {}: left the run", job.identity.public_key());
}

/// What the coordinator sends a site, as it arrives, until the connection ends (a reader task,
/// so that the site's QUIC connection is served while it trains).
fn read_from_coordinator(
    peer: &Peer,
) -> tokio::sync::mpsc::UnboundedReceiver<Result<Vec<u8>, NetError>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = peer.clone();
    tokio::spawn(async move {
        loop {
            let message = reader.recv().await;
            let closed = matches!(message, Err(NetError::Closed(_) | NetError::Ended { .. }));
            if tx.send(message).is_err() || closed {
                return;
            }
        }
    });
    rx
}

/// How a streaming site's connection ended.
enum StreamingEnd {
    /// The run is over (or the coordinator ended this site's part in it).
    Done,
    /// The connection was lost; `rejoin`: the coordinator asked this site to come back;
    /// `heard`: the coordinator had sent something on it.
    Lost { rejoin: bool, heard: bool },
    /// Ctrl-C: leave the run.
    Leaving,
}

/// A streaming site: it trains step after step and never waits for a merge before it is due.
/// After step `end_step(r)` it sends its report and the update of fragment r and trains on; the
/// coordinator's broadcast with that merge is mixed in `overlap_steps` later (the site waits for
/// it only if it has not arrived by then), exactly when the in-memory driver mixes it, so the run
/// is bitwise the in-memory one. Then the P final syncs, back to back. A site that loses the
/// coordinator reconnects (for `reconnect_ms`, or when asked to rejoin) and starts again from the
/// parameters it is sent, at the first step of their round. With a state directory it saves its
/// own state (optimizer moments, data position, error feedback) after every sync, as a round
/// site does; Ctrl-C is a graceful leave.
pub(super) async fn streaming_site_task(
    mut site: SiteRuntime,
    job: SiteJob,
    mut connected: impl FnMut(),
) -> Result<(), RunError> {
    let local: SocketAddr = if job.coordinator.0.is_ipv6() {
        "[::]:0".parse().expect("any IPv6")
    } else {
        "0.0.0.0:0".parse().expect("any IPv4")
    };
    let node = Node::client(job.identity.clone(), local, job.limits.clone())?;
    let mut budget = deadline_after(job.reconnect_ms);
    let mut peer = join(&node, &job, budget).await?;
    let leave = leave_signal(job.leave_on_signal);
    loop {
        connected();
        // (Pressed while it reconnected: the clones below would take it as seen.)
        if leave
            .as_ref()
            .is_some_and(|l| l.has_changed().unwrap_or(false))
        {
            leave_now(&node, &peer, &job).await;
            return Ok(());
        }
        let (rejoin, heard) =
            match streaming_connection(&mut site, &job, &peer, leave.clone()).await? {
                StreamingEnd::Done => return Ok(()),
                StreamingEnd::Leaving => {
                    leave_now(&node, &peer, &job).await;
                    return Ok(());
                }
                StreamingEnd::Lost { rejoin, heard } => (rejoin, heard),
            };
        if job.reconnect_ms == 0 && !rejoin {
            return Ok(());
        }
        if heard || rejoin {
            budget = deadline_after(if rejoin {
                job.reconnect_ms.max(REJOIN_MS)
            } else {
                job.reconnect_ms
            });
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(RETRY_MS)).await;
        }
        peer = join(&node, &job, budget).await?;
    }
}

/// One connection of a streaming site, from the first message the coordinator sends it.
async fn streaming_connection(
    site: &mut SiteRuntime,
    job: &SiteJob,
    peer: &Peer,
    leave: Option<tokio::sync::watch::Receiver<()>>,
) -> Result<StreamingEnd, RunError> {
    let streaming = job.streaming.expect("a streaming job");
    let mut rx = read_from_coordinator(peer);
    // Ctrl-C, checked between steps (`pressed`) and while waiting for a merge (`waiting`).
    let (mut pressed, mut waiting) = (leave.clone(), leave);
    // The next broadcast, mixed in with `mix`: the round it opens, or how the connection ended.
    let mut next =
        async |site: &mut SiteRuntime, mix: f32| -> Result<Result<u64, StreamingEnd>, RunError> {
            let received = match waiting.as_mut() {
                Some(leave) => tokio::select! {
                    message = rx.recv() => message,
                    _ = leave.changed() => return Ok(Err(StreamingEnd::Leaving)),
                },
                None => rx.recv().await,
            };
            match received {
                Some(Ok(sealed)) => Ok(Ok(crate::driver::mix_in(
                    site,
                    open(job.coordinator.1, &sealed)?,
                    mix,
                )?)),
                Some(Err(NetError::Ended {
                    code: CLOSE_REJOIN, ..
                })) => Ok(Err(StreamingEnd::Lost {
                    rejoin: true,
                    heard: true,
                })),
                Some(Err(e)) if is_refusal(&e) => Err(refused(job, e)),
                Some(Err(NetError::Ended { code, .. })) if code != CLOSE_STOPPED => {
                    Ok(Err(StreamingEnd::Done))
                }
                Some(Err(
                    NetError::Closed(_)
                    | NetError::Ended {
                        code: CLOSE_STOPPED,
                        ..
                    },
                ))
                | None => Ok(Err(StreamingEnd::Lost {
                    rejoin: false,
                    heard: true,
                })),
                Some(Err(e)) => Err(e.into()),
            }
        };
    let send = async |message: Vec<u8>| -> Result<Result<(), StreamingEnd>, RunError> {
        match peer.send(&seal(&job.identity, &message)).await {
            Ok(()) => Ok(Ok(())),
            Err(NetError::Ended {
                code: CLOSE_REJOIN, ..
            }) => Ok(Err(StreamingEnd::Lost {
                rejoin: true,
                heard: true,
            })),
            Err(e) if is_refusal(&e) => Err(refused(job, e)),
            Err(NetError::Ended { code, .. }) if code != CLOSE_STOPPED => {
                Ok(Err(StreamingEnd::Done))
            }
            Err(_) => Ok(Err(StreamingEnd::Lost {
                rejoin: false,
                heard: true,
            })),
        }
    };
    let mut round = match next(site, streaming.mix).await? {
        Ok(round) => round,
        // Nothing came on this connection before it ended.
        Err(StreamingEnd::Lost { rejoin, .. }) => {
            return Ok(StreamingEnd::Lost {
                rejoin,
                heard: false,
            })
        }
        Err(end) => return Ok(end),
    };
    // What the coordinator sent first is what this site trains from (at the start of the run
    // these are its own initial parameters; after a rejoin, the cluster's, in full).
    site.trainer
        .params_mut()
        .copy_from_slice(site.site.round_start());
    let (rounds, last) = (job.rounds, job.rounds.rounds());
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let (mut step, mut due_step): (u64, Option<u64>) = (rounds.first_step(round), None);
    let (mut losses, mut seconds) = (Vec::new(), 0.0f64);
    while step < job.steps {
        if pressed
            .as_mut()
            .is_some_and(|leave| leave.has_changed().unwrap_or(false))
        {
            return Ok(StreamingEnd::Leaving);
        }
        if due_step.is_some_and(|due| due <= step) {
            due_step = None;
            if let Err(end) = next(site, streaming.mix).await? {
                return Ok(end);
            }
        }
        let mut loss = [0.0f32];
        seconds += tokio::task::block_in_place(|| {
            train_steps(
                site,
                &job.shard,
                job.batch,
                &job.schedule,
                step,
                &mut loss,
                (&mut inputs, &mut targets),
            )
        })?;
        losses.push(loss[0]);
        step += 1;
        if step != rounds.end_step(round) || step >= job.steps {
            continue;
        }
        // A merge still in flight is mixed in before the next sync (as in memory).
        if due_step.take().is_some() {
            if let Err(end) = next(site, streaming.mix).await? {
                return Ok(end);
            }
        }
        let report = TrainingReport {
            seconds,
            losses: std::mem::take(&mut losses),
        }
        .encode(round, site.site.id());
        seconds = 0.0;
        let update = site.update(round, site.site.fragment(round), &job.uplink)?;
        if let Some(dir) = &job.state_dir {
            crate::state::save_site(dir, site, round, &job.run)?;
        }
        for message in [report, update] {
            if let Err(end) = send(message).await? {
                return Ok(end);
            }
        }
        due_step = Some(step + streaming.overlap_steps);
        round += 1;
    }
    if due_step.is_some() {
        if let Err(end) = next(site, streaming.mix).await? {
            return Ok(end);
        }
    }
    // The final syncs: every fragment once more, so that no step is left out of the global model.
    if !losses.is_empty() {
        if let Err(end) =
            send(TrainingReport { seconds, losses }.encode(round, site.site.id())).await?
        {
            return Ok(end);
        }
    }
    while round < last {
        let update = site.update(round, site.site.fragment(round), &job.uplink)?;
        if let Err(end) = send(update).await? {
            return Ok(end);
        }
        round += 1;
        if round < last {
            if let Err(end) = next(site, 0.0).await? {
                return Ok(end);
            }
        }
    }
    Ok(StreamingEnd::Done)
}

/// How long a site asked to rejoin keeps trying (when its own `reconnect_ms` is shorter).
const REJOIN_MS: u64 = 10_000;
