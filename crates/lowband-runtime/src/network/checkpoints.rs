//! The networked coordinator's checkpoints, written on a thread of their own so that rounds never
//! wait for the disk (a 1B-parameter coordinator writes 12 GB per checkpoint: θ, the outer
//! momentum and θ_sites; 2.1 s per 1.2 GB on this machine's disk). At most one write at a time:
//! a checkpoint that falls due while the last one is still being written is skipped (the next
//! covers it), and the run's end writes the final state before it returns.
//!
//! A coordinator killed mid-write resumes from the last complete checkpoint, possibly rounds
//! behind its sites: a site then cannot apply the resumed coordinator's change, rejoins, and
//! takes the parameters it is sent in full with their older round (`lowband_protocol::Site`).

use std::thread::JoinHandle;

use lowband_protocol::Coordinator;

use crate::driver::Common;
use crate::state::RunState;
use crate::{Persistence, RunError, Strategy};

/// A networked coordinator's saved state of `strategy` under `options.state_dir`, to resume from
/// when `options.resume` asks; without it a saved state is forgotten (lowband's own files only)
/// and the run starts over. Also the persistence the run saves with.
pub(super) fn saved_to_resume(
    options: &super::NetworkOptions,
    strategy: &Strategy,
) -> Result<(Persistence, Option<RunState>), RunError> {
    let persistence = Persistence {
        observer: None,
        state_dir: options.state_dir.clone(),
        stop_after_rounds: None,
    };
    let saved = match crate::state::load(&persistence, strategy)? {
        Some(saved) if options.resume => {
            let round = saved.round();
            tracing::info!(
                "resuming {} from its saved state at round {round}",
                strategy.name()
            );
            Some(saved)
        }
        Some(_) => {
            let dir = (options.state_dir.as_ref())
                .expect("a state was loaded from it")
                .join(strategy.dir_name());
            crate::state::forget_saved_state(&dir)?;
            None
        }
        None if options.resume => {
            let name = strategy.name();
            tracing::info!("no saved state of {name} to resume: starting at round 0");
            None
        }
        None => None,
    };
    Ok((persistence, saved))
}

#[derive(Default)]
pub(super) struct Checkpoints {
    writing: Option<JoinHandle<Result<(), RunError>>>,
    /// The step of the last checkpoint that fell due, if it was skipped (not yet written).
    skipped: Option<u64>,
}

impl Checkpoints {
    /// A checkpoint is due at `step`: start writing it unless a write is under way.
    pub(super) fn due(
        &mut self,
        common: &Common,
        step: u64,
        coordinator: &Coordinator,
        persistence: &Persistence,
    ) -> Result<(), RunError> {
        if self.writing.as_ref().is_some_and(|w| !w.is_finished()) {
            self.skipped = Some(step);
            return Ok(());
        }
        self.wait()?;
        self.skipped = None;
        let state = RunState::of_coordinator(common, step, coordinator);
        let (persistence, strategy): (Persistence, Strategy) =
            (persistence.clone(), common.strategy.clone());
        let writer = std::thread::Builder::new()
            .name("lowband-checkpoint".into())
            .spawn(move || state.save(&persistence, &strategy))
            .map_err(|e| RunError::State(format!("starting the checkpoint writer: {e}")))?;
        self.writing = Some(writer);
        Ok(())
    }

    /// The write under way, finished (its error, if it failed).
    fn wait(&mut self) -> Result<(), RunError> {
        match self.writing.take() {
            Some(writer) => writer
                .join()
                .unwrap_or_else(|_| Err(RunError::State("the checkpoint writer panicked".into()))),
            None => Ok(()),
        }
    }

    /// The run's end: the write under way finished, and a skipped last checkpoint written.
    pub(super) fn finish(
        &mut self,
        common: &Common,
        coordinator: &Coordinator,
        persistence: &Persistence,
    ) -> Result<(), RunError> {
        self.wait()?;
        if let Some(step) = self.skipped.take() {
            RunState::of_coordinator(common, step, coordinator)
                .save(persistence, &common.strategy)?;
        }
        Ok(())
    }
}
