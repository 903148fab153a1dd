//! The run's fault schedule (`crate::faults`) on the emulated clock: a site goes down (its
//! unsent steps lost, the coordinator told it left) and comes back (joins again and waits for
//! the parameters), or slows down.

use super::*;
use crate::Fault;
use lowband_protocol::cue::Cue;

impl Schedule<'_, '_> {
    /// Every fault onto the queue, at its fraction of the run's time.
    pub(super) fn schedule_faults(&mut self) {
        for (i, fault) in self.faults.iter().enumerate() {
            let (Fault::Down { from, .. } | Fault::Slow { from, .. }) = fault;
            self.queue.push(from * self.deadline, Happening::Fault(i));
        }
    }

    pub(super) fn fault(&mut self, at: f64, i: usize) -> Result<(), RunError> {
        match self.faults[i] {
            Fault::Down { site, to, .. } => {
                self.go_down(at, site as usize)?;
                self.queue
                    .push(to * self.deadline, Happening::Rejoin(site as usize));
                Ok(())
            }
            Fault::Slow { site, factor, .. } => {
                let site = &mut self.sites[site as usize];
                site.step_seconds = site.base_step_seconds / factor;
                Ok(())
            }
        }
    }

    /// Site k stops: what it trained since its last update is lost (its parameters go back to
    /// where that update began), and the coordinator learns it is gone.
    fn go_down(&mut self, at: f64, k: usize) -> Result<(), RunError> {
        let site = &mut self.sites[k];
        site.down = true;
        let revert = site.revert();
        match (&mut site.body, &mut self.remote) {
            (Some(body), _) => body.down(revert),
            (None, Some(remote)) => {
                let round = self.coordinator.round();
                remote.cue(&mut self.common, k, round, Cue::Down(revert));
            }
            (None, None) => unreachable!("a site trains here or is cued"),
        }
        let site = &mut self.sites[k];
        site.since_send = 0;
        site.busy_unsent = 0.0;
        site.held_round = None;
        site.inbox.clear();
        let actions = self
            .coordinator
            .handle(Self::ms(at), Event::SiteLeft { site: k as u32 });
        self.absorb(at, actions, None)
    }

    /// Site k comes back with the optimizer state and data position it had, joins again, and
    /// waits for the parameters (its first update is due at the next mark of the time budget).
    pub(super) fn rejoin(&mut self, at: f64, k: usize) -> Result<(), RunError> {
        let mark = self.mark_seconds;
        let site = &mut self.sites[k];
        site.down = false;
        if mark > 0.0 {
            site.marks_sent = (at / mark).floor() as u64;
        }
        let actions = self
            .coordinator
            .handle(Self::ms(at), Event::SiteJoined { site: k as u32 });
        self.absorb(at, actions, None)
    }
}
