//! Scheduled runs over the network (`async-diloco`, `[quorum=N]`): the coordinator keeps the
//! emulated clock's schedule, exactly as in memory (`driver::scheduled`), and cues every site
//! step by step (`lowband_protocol::cue`); each site trains as cued and answers each step with
//! its loss and, when cued, its update. Why this is bitwise the in-memory run: the schedule
//! (which update reaches the coordinator when, which merge a site takes before which step) is a
//! function of the settings, the seed and the packets' sizes, never of when anything really
//! arrives; the coordinator takes each site's messages in the schedule's order (what comes early
//! waits in its queue), and a site's model runs the same code (`CuedSite`) on the same cues as
//! in memory. The sites still train in parallel: the schedule waits only for an update it
//! needs, and cues run ahead of it.
//!
//! A hostile site is refused and scored as in memory: whatever it sends where its update is due
//! (garbage, a packet it did not sign) goes to the protocol as its update. Not yet: a site whose
//! connection ends, one silent for the round deadline while the schedule waits for it, or a
//! coordinator stopped, ends the run (nothing of a networked scheduled run is saved to resume
//! from); every site joins before the run starts.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use lowband_net::{Message, Next, SiteClient, Switchboard};
use lowband_protocol::cue::Cue;
use lowband_protocol::wire::{self, MessageKind, TrainingReport};

use lowband_data::Split;
use lowband_net::Identity;

use crate::config::RunConfig;
use crate::driver::{train_steps, Common, CuedSite, Cues, SiteRuntime};
use crate::strategy::Strategy;
use crate::{RunError, RunResult};

use super::{join_site_threads, loopback_client, NetworkOptions, Served, SiteJob};

/// The switchboard as the schedule's way to its sites.
struct Board(Switchboard);

impl Cues for Board {
    fn send(&mut self, to: u32, message: &[u8]) -> usize {
        self.0.send(to, message)
    }

    fn next_from(&mut self, from: u32) -> Result<(Vec<u8>, usize), RunError> {
        let received = self.0.next_from(from)?;
        Ok((received.packet, received.sealed_bytes))
    }
}

/// Serve a scheduled run from `initial`: admit every site, run the schedule with them, and tell
/// them the run is over (or why it stopped).
pub(super) fn serve_scheduled(
    mut common: Common,
    initial: Vec<f32>,
    served: Served,
    options: NetworkOptions,
    stop_on_ctrl_c: bool,
    listening: impl FnOnce(SocketAddr) -> Result<(), RunError>,
) -> Result<RunResult, RunError> {
    if options.resume {
        return Err(RunError::InvalidConfig {
            field: "resume",
            reason: format!(
                "{} cannot be saved and resumed yet (its updates in flight are not saved): start it again without --resume",
                common.strategy.name()
            ),
        });
    }
    if let Some(dir) = &options.state_dir {
        tracing::warn!(
            "{}: a scheduled run saves no state (it cannot be resumed yet): nothing goes to {}",
            common.strategy.name(),
            dir.display()
        );
    }
    common.observe(
        options.observer.clone(),
        served.site_keys.iter().map(|k| k.to_string()).collect(),
        initial.len(),
    );
    let board = Switchboard::open(
        served.identity,
        &served.site_keys,
        &served.settings,
        served.listen,
        &options.limits,
        options.join_timeout_ms,
        stop_on_ctrl_c,
        listening,
    )?;
    // A site that goes silent while the schedule waits for it stops the run after the round
    // deadline (a hung process still answers QUIC's keep-alives).
    let mut board = Board(board.with_wait_ms(options.round_deadline_ms));
    match crate::driver::run_scheduled_remote(common, initial, &mut board) {
        Ok(result) => {
            board.0.finish();
            Ok(result)
        }
        Err(e) => {
            board.0.stop(&e.to_string());
            Err(e)
        }
    }
}

/// A site of a scheduled run: connect, then train as cued, in order, until the run is over.
pub(super) fn scheduled_site_task(
    site: SiteRuntime,
    job: SiteJob,
    mut connected: impl FnMut(),
) -> Result<(), RunError> {
    let mut client = SiteClient::connect(job.client.clone())?;
    connected();
    let asynchronous = job.asynchronous;
    let mut cued = CuedSite::new(site, asynchronous);
    let mut globals: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buffers = (Vec::new(), Vec::new());
    loop {
        let packet = match client.next_message()? {
            Message::Packet(packet) => packet,
            Message::Ended(Next::Leave) => {
                client.leave();
                return Ok(());
            }
            Message::Ended(Next::Finished { .. } | Next::Train { .. }) => return Ok(()),
            Message::Ended(Next::Lost) => {
                return Err(RunError::Protocol(
                    "lost the coordinator mid-run: a scheduled run cannot be resumed yet".into(),
                ))
            }
        };
        if wire::peek_kind(&packet) != Some(MessageKind::Cue) {
            globals.push_back(packet);
            continue;
        }
        let message = wire::decode(&packet, Cue::PAYLOAD_BYTES_MAX)
            .map_err(|e| RunError::Protocol(format!("a cue: {e}")))?;
        let mut take = |count: u32, cued: &mut CuedSite| -> Result<(), RunError> {
            for _ in 0..count {
                let global = globals.pop_front().ok_or_else(|| {
                    RunError::Protocol("cued to take a global message it was not sent".into())
                })?;
                cued.take(&global)?;
            }
            Ok(())
        };
        match Cue::decode(message.payload).map_err(|e| RunError::Protocol(e.to_string()))? {
            Cue::Start => {
                let global = globals.pop_front().ok_or_else(|| {
                    RunError::Protocol("cued to start before the parameters came".into())
                })?;
                cued.start(&global)?;
            }
            Cue::Take(count) => take(count, &mut cued)?,
            Cue::Down(revert) => {
                cued.down(revert);
                globals.clear();
            }
            Cue::Step {
                take: count,
                lr_step,
                send,
            } => {
                take(count, &mut cued)?;
                let messages = cued_step(&mut cued, &job, lr_step, send, &mut buffers)?;
                for message in messages {
                    if let Some(end) = client.send(message)? {
                        if end == Next::Leave {
                            client.leave();
                        }
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// One cued step: its report (one loss), then the update when cued to send one.
fn cued_step(
    cued: &mut CuedSite,
    job: &SiteJob,
    lr_step: u64,
    send: Option<u64>,
    buffers: &mut (Vec<u32>, Vec<u32>),
) -> Result<Vec<Vec<u8>>, RunError> {
    if lr_step >= job.steps {
        return Err(RunError::Protocol(format!(
            "cued to train step {lr_step} of a {}-step run",
            job.steps
        )));
    }
    let mut losses = [0.0f32];
    let seconds = train_steps(
        &mut cued.runtime,
        &job.shard,
        job.batch,
        &job.schedule,
        lr_step,
        &mut losses,
        (&mut buffers.0, &mut buffers.1),
    )?;
    let id = cued.runtime.site.id();
    let report = TrainingReport {
        seconds,
        losses: losses.to_vec(),
        ..TrainingReport::default()
    };
    let mut messages = vec![report.encode(send.unwrap_or(0), id)];
    if let Some(round) = send {
        messages.push(cued.update(round, &job.uplink)?);
    }
    Ok(messages)
}

/// A scheduled run with every node on loopback QUIC, in this process: a thread per site.
pub(super) fn run_loopback_scheduled(
    config: &RunConfig,
    strategy: Strategy,
    split: &Split,
    options: NetworkOptions,
) -> Result<RunResult, RunError> {
    let common = Common::new(config, strategy.clone(), split)?;
    let settings = super::join::join_settings(config, &strategy, Some(common.corpus));
    let initial = common.initial_params()?;
    let coordinator_identity = Arc::new(Identity::generate()?);
    let site_identities: Vec<Arc<Identity>> = (0..config.sites)
        .map(|_| Identity::generate().map(Arc::new))
        .collect::<Result<_, _>>()?;
    let served = Served {
        identity: coordinator_identity.clone(),
        site_keys: site_identities.iter().map(|i| i.public_key()).collect(),
        listen: "127.0.0.1:0".parse().expect("loopback"),
        settings: settings.clone(),
        sites_start_synced: true,
    };
    let limits = options.limits.clone();
    let mut site_threads = Vec::new();
    let start_sites = |address: SocketAddr| -> Result<(), RunError> {
        for (k, identity) in site_identities.iter().enumerate() {
            let coordinator = (address, coordinator_identity.public_key());
            let client = loopback_client(identity, coordinator, &limits, &settings, k);
            let job = SiteJob::of(config, &strategy, split, k, client, None)?;
            let site = crate::driver::strategy_site(config, &strategy, &initial, k)?;
            site_threads.push(std::thread::spawn(move || {
                scheduled_site_task(site, job, || {})
            }));
        }
        Ok(())
    };
    let served = serve_scheduled(common, initial.clone(), served, options, false, start_sites);
    // (The sites end with the coordinator's connection: joined before its error is reported.)
    let site_error = join_site_threads(site_threads);
    let result = served?;
    match site_error {
        Some(e) => Err(e),
        None => Ok(result),
    }
}
