//! A site's side over the network, on lowband's engine: the round site (`site_task`) and the
//! streaming site (`streaming_site_task`). The connection, its reconnects and its close codes are
//! `lowband_net::SiteClient`'s (whose decisions are `lowband_protocol::SiteLink`'s); this file
//! only trains and decides what to send.

use lowband_engine::Trainer;
use lowband_net::{ClientError, Message, Next, SiteClient};
use lowband_protocol::wire::TrainingReport;

use crate::driver::{train_steps, SiteRuntime};
use crate::RunError;

use super::SiteJob;

impl From<ClientError> for RunError {
    fn from(e: ClientError) -> Self {
        match e {
            // What the coordinator refused is this site's configuration (its cluster file, key).
            ClientError::Refused(reason) => RunError::InvalidConfig {
                field: "cluster",
                reason,
            },
            other => RunError::Protocol(other.to_string()),
        }
    }
}

/// One site: connect, then per packet from the coordinator: H inner steps from the parameters
/// it sent, and the update. A site that falls behind (packets queued while it trained) applies
/// them all and trains for the newest round only (`SiteClient::next_round`). Its training time
/// and losses go to the coordinator in a report before each update.
pub(super) fn site_task(
    mut site: SiteRuntime,
    job: SiteJob,
    mut connected: impl FnMut(),
) -> Result<(), RunError> {
    let mut client = SiteClient::connect(job.client.clone())?;
    let last_round = job.steps.div_ceil(job.inner_steps).saturating_sub(1);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    loop {
        if client.take_reconnected() {
            connected();
        }
        let round = match client.next_round(&mut site.site)? {
            Next::Train { round } => round,
            Next::Lost => {
                client.reconnect()?;
                continue;
            }
            Next::Finished { .. } => return Ok(()),
            Next::Leave => {
                client.leave();
                return Ok(());
            }
        };
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
        let took = train_steps(
            &mut site,
            &job.shard,
            job.batch,
            &job.schedule,
            step,
            &mut losses,
            (&mut inputs, &mut targets),
        )?;
        let update = site.update(round, 0..job.params, &job.uplink)?;
        if let Some(dir) = &job.state_dir {
            crate::state::save_site(dir, &site, round, &job.run)?;
        }
        // The training report, then the update (the coordinator reads a connection's messages
        // in order, so the report is in before the update can close the round).
        let received = client.take_download();
        let report = TrainingReport {
            seconds: took,
            losses,
            received_bytes: received.bytes,
            received_seconds: received.seconds,
        }
        .encode(round, site.site.id());
        match send_all(&mut client, [report, update])? {
            // (The connection stays up until the client is dropped: the coordinator may still
            // be closing the round with this update.)
            None if round >= last_round => return Ok(()),
            None => {}
            Some(Next::Lost) => client.reconnect()?,
            Some(Next::Leave) => {
                client.leave();
                return Ok(());
            }
            Some(Next::Finished { .. } | Next::Train { .. }) => return Ok(()),
        }
    }
}

/// Send messages in order; stop at the first that finds the connection ended.
fn send_all<const N: usize>(
    client: &mut SiteClient,
    messages: [Vec<u8>; N],
) -> Result<Option<Next>, RunError> {
    for message in messages {
        if let Some(end) = client.send(message)? {
            return Ok(Some(end));
        }
    }
    Ok(None)
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
pub(super) fn streaming_site_task(
    mut site: SiteRuntime,
    job: SiteJob,
    mut connected: impl FnMut(),
) -> Result<(), RunError> {
    let mut client = SiteClient::connect(job.client.clone())?;
    loop {
        if client.take_reconnected() {
            connected();
        }
        // (Pressed while it reconnected.)
        if client.leave_requested() {
            client.leave();
            return Ok(());
        }
        match streaming_connection(&mut site, &job, &mut client)? {
            Next::Lost => client.reconnect()?,
            Next::Leave => {
                client.leave();
                return Ok(());
            }
            Next::Finished { .. } | Next::Train { .. } => return Ok(()),
        }
    }
}

/// The next broadcast, mixed in with `mix`: the round it opens, or how the connection ended.
fn next_merge(
    client: &mut SiteClient,
    site: &mut SiteRuntime,
    mix: f32,
) -> Result<Result<u64, Next>, RunError> {
    match client.next_message()? {
        // (A change to parameters it does not hold: it rejoins for them in full.)
        Message::Packet(packet) if site.site.needs_full_parameters(&packet) => {
            Ok(Err(client.resync()))
        }
        Message::Packet(packet) => Ok(Ok(crate::driver::mix_in(site, &packet, mix)?)),
        Message::Ended(end) => Ok(Err(end)),
    }
}

/// One connection of a streaming site, from the first message the coordinator sends it; returns
/// how it ended (`Finished` also when the run is done).
fn streaming_connection(
    site: &mut SiteRuntime,
    job: &SiteJob,
    client: &mut SiteClient,
) -> Result<Next, RunError> {
    let streaming = job.streaming.expect("a streaming job");
    let mut round = match next_merge(client, site, streaming.mix)? {
        Ok(round) => round,
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
        if client.leave_requested() {
            return Ok(Next::Leave);
        }
        if due_step.is_some_and(|due| due <= step) {
            due_step = None;
            if let Err(end) = next_merge(client, site, streaming.mix)? {
                return Ok(end);
            }
        }
        let mut loss = [0.0f32];
        seconds += train_steps(
            site,
            &job.shard,
            job.batch,
            &job.schedule,
            step,
            &mut loss,
            (&mut inputs, &mut targets),
        )?;
        losses.push(loss[0]);
        step += 1;
        if step != rounds.end_step(round) || step >= job.steps {
            continue;
        }
        // A merge still in flight is mixed in before the next sync (as in memory).
        if due_step.take().is_some() {
            if let Err(end) = next_merge(client, site, streaming.mix)? {
                return Ok(end);
            }
        }
        let received = client.take_download();
        let report = TrainingReport {
            seconds,
            losses: std::mem::take(&mut losses),
            received_bytes: received.bytes,
            received_seconds: received.seconds,
        }
        .encode(round, site.site.id());
        seconds = 0.0;
        let update = site.update(round, site.site.fragment(round), &job.uplink)?;
        if let Some(dir) = &job.state_dir {
            crate::state::save_site(dir, site, round, &job.run)?;
        }
        if let Some(end) = send_all(client, [report, update])? {
            return Ok(end);
        }
        due_step = Some(step + streaming.overlap_steps);
        round += 1;
    }
    if due_step.is_some() {
        if let Err(end) = next_merge(client, site, streaming.mix)? {
            return Ok(end);
        }
    }
    final_syncs(site, job, client, (round, last), (seconds, losses))
}

/// The final syncs: every fragment once more, so that no step is left out of the global model
/// (the report of the last steps first); how the connection ended, `Finished` when done.
fn final_syncs(
    site: &mut SiteRuntime,
    job: &SiteJob,
    client: &mut SiteClient,
    (mut round, last): (u64, u64),
    (seconds, losses): (f64, Vec<f32>),
) -> Result<Next, RunError> {
    if !losses.is_empty() {
        let received = client.take_download();
        let report = TrainingReport {
            seconds,
            losses,
            received_bytes: received.bytes,
            received_seconds: received.seconds,
        }
        .encode(round, site.site.id());
        if let Some(end) = send_all(client, [report])? {
            return Ok(end);
        }
    }
    while round < last {
        let update = site.update(round, site.site.fragment(round), &job.uplink)?;
        if let Some(end) = send_all(client, [update])? {
            return Ok(end);
        }
        round += 1;
        if round < last {
            if let Err(end) = next_merge(client, site, 0.0)? {
                return Ok(end);
            }
        }
    }
    Ok(Next::Finished { excluded: false })
}
