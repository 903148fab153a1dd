//! The schedule's events: a site's step (and its update when due), an update reaching the
//! coordinator, the coordinator's actions, the run's end.

use super::*;

impl Schedule<'_, '_> {
    /// Site k begins a step at `at`: it takes what has arrived, trains one step, sends its
    /// update when due, and schedules its next step (or waits, or has finished).
    pub(super) fn step(&mut self, at: f64, k: usize) -> Result<(), RunError> {
        if self.sites[k].down {
            self.sites[k].idle = true;
            return Ok(());
        }
        let take = self.sites[k].take_inbox()?;
        let Some((round, lr_step, due)) = self.next_step(at, k) else {
            if take > 0 {
                self.cue(k, Cue::Take(take));
            }
            self.sites[k].idle = true;
            return Ok(());
        };
        if let Some(body) = &mut self.sites[k].body {
            let mut losses = [0.0f32];
            self.common
                .train_site(&mut body.runtime, k, lr_step, &mut losses)?;
            self.sites[k].last_loss = Some(losses[0]);
        }
        let deadline = self.deadline * (1.0 + 1e-9);
        let asynchronous = self.grace_seconds.is_some();
        let site = &mut self.sites[k];
        site.busy_unsent += site.step_seconds;
        site.steps_done += 1;
        site.since_send += 1;
        let end = at + site.step_seconds;
        // An asynchronous site's last step: the next would end past the run's time.
        site.finished = asynchronous && end + site.step_seconds > deadline;
        self.compute_end = self.compute_end.max(end);
        if k == self.pacer {
            self.pacer_stepped(lr_step);
        }
        let send = self.update_due(k, end, due).then_some(round);
        self.cue(
            k,
            Cue::Step {
                take,
                lr_step,
                send,
            },
        );
        if let Some(round) = send {
            self.send(end, k, round)?;
        }
        let site = &mut self.sites[k];
        if site.finished {
            site.idle = true;
        } else {
            self.queue.push(end, Happening::Step(k));
        }
        Ok(())
    }

    /// Cue site k, if it trains over the network (a site trained here needs no cue).
    fn cue(&mut self, k: usize, cue: Cue) {
        if let Some(remote) = &mut self.remote {
            let round = self.coordinator.round();
            remote.cue(&mut self.common, k, round, cue);
        }
    }

    /// Whether site k's step ending at `end` ends an update. Synchronous: its round's `due`
    /// steps are done. Asynchronous: its last step, or the step that ends nearest the next
    /// mark of the time budget (every H steps of the fastest site), so that every site's
    /// updates of one mark arrive together, whatever the speeds.
    fn update_due(&mut self, k: usize, end: f64, due: u64) -> bool {
        let (Some(_), mark) = (self.grace_seconds, self.mark_seconds) else {
            return self.sites[k].since_send == due;
        };
        let site = &mut self.sites[k];
        let marks_passed = ((end + site.step_seconds / 2.0) / mark).floor() as u64;
        if marks_passed > site.marks_sent || site.finished {
            site.marks_sent = marks_passed;
            return true;
        }
        false
    }

    /// What site k trains next from `at`: (the round it trains for, the learning rate's step,
    /// steps per update for synchronous rounds), or None when it waits or has finished.
    fn next_step(&mut self, at: f64, k: usize) -> Option<(u64, u64, u64)> {
        let steps = self.common.config.steps;
        let nominal_step = self.deadline / steps as f64;
        let site = &mut self.sites[k];
        let held = site.held_round?;
        if self.grace_seconds.is_some() {
            if site.finished {
                return None;
            }
            // The learning rate follows the emulated clock: the fastest site's step by then.
            let lr_step = ((at / nominal_step + 1e-6) as u64).min(steps - 1);
            return Some((held, lr_step, 0));
        }
        if site.training.is_none() {
            let fresh = site.sent_round.is_none_or(|sent| held > sent);
            if !fresh || held >= self.rounds_total {
                return None;
            }
            let h = site.interval.min(steps - held * site.interval);
            site.training = Some((held, h));
        }
        let (round, h) = site.training?;
        Some((round, round * site.interval + site.since_send, h))
    }

    /// The run's step `step` is done (its pacer's): the sites' latest losses, and progress.
    fn pacer_stepped(&mut self, step: u64) {
        // (A pacer slowed down by a fault may take two steps in one of the run's.)
        if self.last_step_metric.is_some_and(|last| last >= step) {
            return;
        }
        self.last_step_metric = Some(step);
        let lr = self.common.schedule.lr_at(step);
        let mean = match &mut self.remote {
            // The sites' losses come with their reports: recorded once they are in.
            Some(remote) => {
                let done: Vec<u64> = self.sites.iter().map(|s| s.steps_done).collect();
                remote.step_metric(&mut self.common, step, lr, &done);
                remote.last_mean
            }
            None => {
                let losses: Vec<f32> = self.sites.iter().filter_map(|s| s.last_loss).collect();
                let mean = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
                self.common.record_metric(Metric::Step {
                    step,
                    loss: mean,
                    lr,
                });
                mean
            }
        };
        let tokens_per_step = self.common.tokens_per_site_step();
        let done: u64 = self.sites.iter().map(|s| s.steps_done).sum();
        let total: u64 = match self.grace_seconds {
            Some(_) => self.sites.iter().map(|s| s.steps_total).sum(),
            None => self.common.config.steps * self.sites.len() as u64,
        };
        self.common.tokens_trained = Some(done * tokens_per_step);
        (self.progress)(Progress {
            tokens: (done * tokens_per_step).min(total * tokens_per_step),
            tokens_total: total * tokens_per_step,
            loss: mean,
        });
    }

    /// Site k's update for `round`, sent at `at`, reaches the coordinator after its transfer.
    fn send(&mut self, at: f64, k: usize, round: u64) -> Result<(), RunError> {
        let uplink = self
            .common
            .strategy
            .compression_for(self.sites.len())
            .uplink;
        let (bytes, wire_bytes) = match (&mut self.sites[k].body, &mut self.remote) {
            (Some(body), _) => {
                let bytes = body.update(round, &uplink)?;
                let length = bytes.len() as u64;
                (bytes, length)
            }
            (None, Some(remote)) => remote.update_from(&mut self.common, k)?,
            (None, None) => unreachable!("a site trains here or is cued"),
        };
        let site = &mut self.sites[k];
        if !site.asynchronous {
            site.training = None;
            site.sent_round = Some(round);
        }
        site.since_send = 0;
        site.in_flight
            .push_back(std::mem::take(&mut site.busy_unsent));
        if k == 0 {
            let sample = bytes::Bytes::copy_from_slice(&bytes);
            self.common.keep_sample("update", sample);
        }
        let seconds = self.common.config.link.transfer_seconds(bytes.len() as u64);
        let arrival = self.queue.arrival((k as u32, COORDINATOR), at, seconds);
        let from = k as u32;
        self.queue.push(
            arrival,
            Happening::Update {
                from,
                bytes,
                wire_bytes,
            },
        );
        Ok(())
    }

    /// An update reaches the coordinator: counted, handed over, and its compute held for
    /// credit unless it was refused on arrival.
    pub(super) fn update_arrives(
        &mut self,
        at: f64,
        from: u32,
        bytes: Vec<u8>,
        wire_bytes: u64,
    ) -> Result<(), RunError> {
        let round = self.coordinator.round();
        self.common.record_bytes(
            round,
            Endpoint::Site(from),
            Endpoint::Coordinator,
            wire_bytes,
        );
        let credit = self.sites[from as usize]
            .in_flight
            .pop_front()
            .unwrap_or(0.0);
        let event = Event::PacketArrived {
            from,
            bytes: &bytes,
        };
        let actions = self.coordinator.handle(Self::ms(at), event);
        self.absorb(at, actions, Some((from, credit)))?;
        if let Some(grace) = self.grace_seconds {
            self.queue.push(at + grace, Happening::Tick);
            // A site whose last update is in leaves: no round waits for it any more.
            let site = &self.sites[from as usize];
            if site.finished && site.in_flight.is_empty() {
                let actions = self
                    .coordinator
                    .handle(Self::ms(at), Event::SiteLeft { site: from });
                self.absorb(at, actions, None)?;
            }
        }
        Ok(())
    }

    /// The coordinator's actions: its messages onto the links, closed rounds into the books,
    /// refusals logged with their reasons. `arriving`: the update just handed over and its
    /// compute, held for credit unless it was refused on arrival.
    pub(super) fn absorb(
        &mut self,
        at: f64,
        actions: Vec<Action>,
        arriving: Option<(u32, f64)>,
    ) -> Result<(), RunError> {
        let closing = actions.iter().find_map(|a| match a {
            Action::RoundClosed(r) => Some(r.round),
            _ => None,
        });
        let round_of_refusal = closing.unwrap_or_else(|| self.coordinator.round());
        // Held before the actions: the update may close its round at once (the last one in).
        if let Some((from, credit)) = arriving {
            self.held.entry(from).or_default().push_back(credit);
        }
        let (mut refused_at_close, mut rejections) = (Vec::new(), 0usize);
        for action in actions {
            match action {
                Action::Send { to, bytes } => {
                    let seconds = self.common.config.link.transfer_seconds(bytes.len() as u64);
                    let arrival = self.queue.arrival((COORDINATOR, to), at, seconds);
                    let to = to as usize;
                    self.queue.push(arrival, Happening::Message { to, bytes });
                }
                Action::RoundClosed(report) => {
                    refused_at_close.extend(report.refused.iter().copied());
                    self.round_closed(at, report)?;
                }
                Action::Checkpoint { .. } => {}
                Action::Rejected { from, reason } => {
                    rejections += usize::from(arriving.is_some_and(|(s, _)| s == from));
                    self.common.refused.insert((round_of_refusal, from));
                    self.common
                        .record_metric(Metric::refused(round_of_refusal, from, &reason));
                }
                Action::Excluded { site, reason } => self.common.record_metric(Metric::Excluded {
                    round: round_of_refusal,
                    site,
                    reason,
                }),
            }
        }
        if let Some((from, _)) = arriving {
            if rejections > usize::from(refused_at_close.contains(&from)) {
                // Refused on arrival: it was never held.
                self.held.entry(from).or_default().pop_back();
            }
        }
        Ok(())
    }

    /// A closed round: merged updates' compute credited, refused ones' dropped, missing members
    /// logged, the round's metric, and an evaluation when due.
    fn round_closed(
        &mut self,
        at: f64,
        report: lowband_protocol::RoundReport,
    ) -> Result<(), RunError> {
        // A site's oldest held update is the one its round merged or refused.
        for site in &report.contributors {
            if let Some(seconds) = self.held.get_mut(site).and_then(|h| h.pop_front()) {
                self.common.site_busy_seconds[*site as usize] += seconds;
            }
        }
        for site in &report.refused {
            self.held.get_mut(site).and_then(|h| h.pop_front());
        }
        for site in &report.missing {
            let (round, site) = (report.round, *site);
            self.common.record_metric(Metric::Missed { round, site });
        }
        self.last_close = at;
        let step = match self.grace_seconds {
            // The run's steps by then: the fastest site's, at its nominal speed.
            Some(_) => ((at * self.common.config.steps as f64 / self.deadline + 1e-6) as u64)
                .min(self.common.config.steps),
            None => {
                (self.coordinator.round() * self.sites[0].interval).min(self.common.config.steps)
            }
        };
        let tokens: u64 = self.sites.iter().map(|s| s.steps_done).sum();
        self.common.tokens_trained = Some(tokens * self.common.tokens_per_site_step());
        self.common.record_metric(Metric::Round {
            round: report.round,
            step,
            inter_site_bytes: self.common.ledger.total_bytes(),
            delta_norm: report.delta_norm,
            update_norms: report.update_norms,
            update_cosines: report.update_cosines,
            update_staleness: report.update_staleness,
        });
        self.common.maybe_evaluate(step, self.coordinator.global())
    }

    /// The run's end (its last round closed): compute until the last step, the rest the link's.
    pub(super) fn finish(mut self) -> Result<RunResult, RunError> {
        if let Some(remote) = &mut self.remote {
            remote.collect_all(&mut self.common)?;
        }
        let end = self.last_close;
        let compute = self.compute_end.min(end);
        self.common.compute_seconds = compute;
        self.common.communication_seconds = end - compute;
        finish_rounds(self.common, &self.coordinator)
    }
}
