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
//! (garbage, a packet it did not sign) goes to the protocol as its update. A site whose
//! connection ends, or one silent for the round deadline while the schedule waits for it, stops
//! the run; every site joins before the run starts. With a state directory the run is saved at
//! quiet moments (every site saves its own state when cued, then the coordinator commits its
//! own: `driver::scheduled::persist`); a coordinator started again with `resume` cues every site
//! to restore its save of that moment and goes on, bitwise the uninterrupted run. The sites
//! reconnect by themselves (a site process that died is started again with `--resume`).

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
    let strategy = common.strategy.clone();
    let (persistence, saved) = super::checkpoints::saved_to_resume(&options, &strategy)?;
    if let Some(saved) = &saved {
        // Refused before any site is admitted (the sites train elsewhere: 0 here).
        saved.check_scheduled(&common, 0, initial.len(), common.config.sites)?;
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
        lowband_net::Stops {
            on_ctrl_c: stop_on_ctrl_c,
            abort: options.abort.clone(),
        },
        listening,
    )?;
    // A site that goes silent while the schedule waits for it stops the run after the round
    // deadline (a hung process still answers QUIC's keep-alives).
    let mut board = Board(board.with_wait_ms(options.round_deadline_ms));
    match crate::driver::run_scheduled_remote(common, initial, &mut board, &persistence, saved) {
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
/// When the coordinator stops or dies mid-run the site reconnects (for its `reconnect_ms`): a
/// coordinator resumed from its last save cues it to restore its own save of that moment.
pub(super) fn scheduled_site_task(
    site: SiteRuntime,
    job: SiteJob,
    mut connected: impl FnMut(),
) -> Result<(), RunError> {
    let client = SiteClient::connect(job.client.clone())?;
    connected();
    let mut task = CuedTask {
        cued: CuedSite::new(site, job.asynchronous),
        client,
        globals: VecDeque::new(),
        buffers: (Vec::new(), Vec::new()),
        started: false,
        said_unsaved: false,
        job,
    };
    loop {
        let packet = match task.client.next_message()? {
            Message::Packet(packet) => packet,
            Message::Ended(Next::Leave) => {
                task.client.leave();
                return Ok(());
            }
            Message::Ended(Next::Finished { .. } | Next::Train { .. }) => return Ok(()),
            Message::Ended(Next::Lost) => {
                task.reconnect()?;
                continue;
            }
        };
        if wire::peek_kind(&packet) != Some(MessageKind::Cue) {
            task.globals.push_back(packet);
            continue;
        }
        let message = wire::decode(&packet, Cue::PAYLOAD_BYTES_MAX)
            .map_err(|e| RunError::Protocol(format!("a cue: {e}")))?;
        let cue = Cue::decode(message.payload).map_err(|e| RunError::Protocol(e.to_string()))?;
        match task.follow(cue, message.round)? {
            Flow::Going => {}
            Flow::Ended => return Ok(()),
            Flow::Lost => task.reconnect()?,
            Flow::Leave => {
                task.client.leave();
                return Ok(());
            }
        }
    }
}

/// What a site does after a cue: goes on, or its connection ended (the run is over, the
/// coordinator was lost, or it leaves: Ctrl-C).
#[derive(PartialEq)]
enum Flow {
    Going,
    Ended,
    Lost,
    Leave,
}

/// A scheduled site at work: its model side, its connection, the globals received and not yet
/// taken.
struct CuedTask {
    cued: CuedSite,
    client: SiteClient,
    globals: VecDeque<Vec<u8>>,
    buffers: (Vec<u32>, Vec<u32>),
    /// It has started (or restored a save): a second start means the coordinator began anew.
    started: bool,
    /// It said once that it cannot save (no `--state-dir`): not at every save cue.
    said_unsaved: bool,
    job: SiteJob,
}

impl CuedTask {
    fn follow(&mut self, cue: Cue, round: u64) -> Result<Flow, RunError> {
        match cue {
            Cue::Start => {
                if self.started {
                    return Err(RunError::Protocol("the coordinator started the run over (it was not resumed from its save): start this site again, without --resume".into()));
                }
                let global = self.globals.pop_front().ok_or_else(|| {
                    RunError::Protocol("cued to start before the parameters came".into())
                })?;
                self.cued.start(&global)?;
                self.started = true;
            }
            Cue::Take(count) => self.take(count)?,
            Cue::Down(revert) => {
                self.cued.down(revert);
                self.globals.clear();
            }
            Cue::Step {
                take: count,
                lr_step,
                send,
            } => {
                self.take(count)?;
                let messages =
                    cued_step(&mut self.cued, &self.job, lr_step, send, &mut self.buffers)?;
                for message in messages {
                    let flow = self.send(message)?;
                    if flow != Flow::Going {
                        return Ok(flow);
                    }
                }
            }
            Cue::Save { keep } => {
                let done = self.save(round, keep);
                return self.send(Cue::Answer(done).encode(round, self.cued.runtime.site.id()));
            }
            Cue::Restore => {
                self.globals.clear();
                let done = self.restore(round);
                self.started |= done;
                return self.send(Cue::Answer(done).encode(round, self.cued.runtime.site.id()));
            }
            Cue::Answer(_) => {
                return Err(RunError::Protocol(
                    "the coordinator sent a site's answer".into(),
                ))
            }
        }
        Ok(Flow::Going)
    }

    /// The coordinator stopped or died: reconnect (for the site's `reconnect_ms`). What the lost
    /// coordinator sent and this site did not take goes with it; a coordinator resumed from its
    /// last save cues it to restore its own save of that moment.
    fn reconnect(&mut self) -> Result<(), RunError> {
        self.client.reconnect()?;
        self.globals.clear();
        Ok(())
    }

    /// Take the next `count` globals received, in order.
    fn take(&mut self, count: u32) -> Result<(), RunError> {
        for _ in 0..count {
            let global = self.globals.pop_front().ok_or_else(|| {
                RunError::Protocol("cued to take a global message it was not sent".into())
            })?;
            self.cued.take(&global)?;
        }
        Ok(())
    }

    fn send(&mut self, message: Vec<u8>) -> Result<Flow, RunError> {
        Ok(match self.client.send(message)? {
            None => Flow::Going,
            Some(Next::Leave) => Flow::Leave,
            Some(Next::Lost) => Flow::Lost,
            Some(Next::Finished { .. } | Next::Train { .. }) => Flow::Ended,
        })
    }

    /// Save as round `round`'s (keeping `keep`'s): whether it was saved (why not is logged).
    fn save(&mut self, round: u64, keep: Option<u64>) -> bool {
        let site = self.cued.runtime.site.id();
        let Some(dir) = &self.job.state_dir else {
            if !std::mem::replace(&mut self.said_unsaved, true) {
                tracing::warn!("site {site}: cued to save its state, but it has no --state-dir: the run is not saved (said once; every later save cue is skipped the same way)");
            }
            return false;
        };
        let saved = crate::state::save_cued_site(dir, &self.cued, round, keep, self.job.cued_run());
        if let Err(e) = &saved {
            tracing::error!("site {site}: saving its state failed: {e}; the run is not saved");
        }
        saved.is_ok()
    }

    /// Continue from the save of round `round`: whether it did (why not is logged).
    fn restore(&mut self, round: u64) -> bool {
        let site = self.cued.runtime.site.id();
        let Some(dir) = self.job.state_dir.clone() else {
            tracing::error!("site {site}: cued to resume from its save of round {round}, but it has no --state-dir");
            return false;
        };
        let run = self.job.cued_run();
        match crate::state::restore_cued_site(&dir, &mut self.cued, round, run) {
            Ok(()) => {
                tracing::info!("site {site}: resumed from its save of round {round}");
                true
            }
            Err(e) => {
                tracing::error!("site {site}: cannot resume from its save of round {round}: {e}");
                false
            }
        }
    }
}

impl SiteJob {
    /// What a scheduled site's save belongs to: its join request (every run setting, the
    /// strategy, the corpus, the site) and the run's steps.
    fn cued_run(&self) -> crate::state::CuedRun {
        crate::state::CuedRun {
            join_crc32: crc32fast::hash(&self.client.join),
            steps: self.steps,
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
