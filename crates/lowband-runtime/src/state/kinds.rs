//! A run's state for each driver: made from (`of_*`) and restored into (`restore_*`) DDP, round
//! and streaming runs in memory and a networked coordinator.

use super::*;

impl RunState {
    pub(crate) fn of_ddp(
        common: &Common,
        step: u64,
        trainer: &CpuTrainer,
        samplers: &[Sampler],
    ) -> Self {
        let params = trainer.params().to_vec();
        let n = params.len();
        RunState::new(
            common,
            step,
            step,
            n,
            samplers.iter().collect(),
            vec![trainer.optimizer()],
            vec![("params".into(), params)],
        )
    }

    pub(crate) fn of_rounds(
        common: &Common,
        step: u64,
        coordinator: &Coordinator,
        sites: &[SiteRuntime],
    ) -> Self {
        let sites: Vec<&SiteRuntime> = sites.iter().collect();
        Self::of_round_sites(common, step, coordinator, &sites)
    }

    /// `of_rounds` over sites held anywhere.
    pub(super) fn of_round_sites(
        common: &Common,
        step: u64,
        coordinator: &Coordinator,
        sites: &[&SiteRuntime],
    ) -> Self {
        let state = coordinator.state();
        let n = state.global.len();
        let mut tensors = vec![
            ("global".into(), state.global),
            ("momentum".into(), state.momentum_buffer),
        ];
        if !state.shared.is_empty() {
            tensors.push(("shared".into(), state.shared));
        }
        for (k, site) in sites.iter().enumerate() {
            if let Some(residual) = site.site.feedback_residual() {
                tensors.push((format!("site{k}.residual"), residual));
            }
            if let Some(stale) = site.attacker.as_ref().and_then(|a| a.stale.clone()) {
                tensors.push((format!("site{k}.stale"), stale));
            }
        }
        let mut saved = RunState::new(
            common,
            step,
            state.round,
            n,
            sites.iter().map(|s| &s.sampler).collect(),
            sites.iter().map(|s| s.trainer.optimizer()).collect(),
            tensors,
        );
        saved.manifest.trust = Some(state.trust);
        saved.manifest.site_codec_random =
            sites.iter().map(|s| s.site.codec_random_state()).collect();
        saved.manifest.downlink_random = state.downlink_random;
        saved
    }

    /// A networked coordinator's state: θ, the outer momentum, θ_sites, trust, and the run's
    /// metrics and ledger (the sites keep their own optimizer state).
    pub(crate) fn of_coordinator(common: &Common, step: u64, coordinator: &Coordinator) -> Self {
        let state = coordinator.state();
        let n = state.global.len();
        let mut tensors = vec![
            ("global".into(), state.global),
            ("momentum".into(), state.momentum_buffer),
        ];
        if !state.shared.is_empty() {
            tensors.push(("shared".into(), state.shared));
        }
        let mut saved = RunState::new(
            common,
            step,
            state.round,
            n,
            Vec::new(),
            Vec::new(),
            tensors,
        );
        saved.manifest.trust = Some(state.trust);
        saved.manifest.downlink_random = state.downlink_random;
        saved
    }

    /// Back into a fresh coordinator. No site holds θ_sites yet: every site that (re)joins gets it
    /// in full.
    pub(crate) fn restore_coordinator(
        mut self,
        common: &mut Common,
        coordinator: &mut Coordinator,
    ) -> Result<(), RunError> {
        self.check(0, coordinator.global().len())?;
        self.restore_common(common)?;
        let shared = self.optional_tensor("shared")?.unwrap_or_default();
        let trust = self.manifest.trust.take().unwrap_or_default();
        let state = CoordinatorState {
            round: self.manifest.round,
            global: self.tensor("global")?,
            momentum_buffer: self.tensor("momentum")?,
            shared,
            synced: Vec::new(),
            trust,
            downlink_random: self.manifest.downlink_random,
        };
        coordinator.restore(state)?;
        Ok(())
    }

    /// AdamW state `k` of the saved run into `trainer`.
    pub(super) fn restore_optimizer(
        &mut self,
        k: usize,
        trainer: &mut CpuTrainer,
    ) -> Result<(), RunError> {
        let step = *self
            .manifest
            .optimizer_steps
            .get(k)
            .ok_or_else(|| RunError::State(format!("saved state lacks optimizer {k}")))?;
        let (m, v) = (
            self.tensor(&format!("site{k}.m"))?,
            self.tensor(&format!("site{k}.v"))?,
        );
        let opt = trainer.optimizer_mut();
        (opt.m, opt.v, opt.step) = (m, v, step);
        Ok(())
    }

    /// The data streams, continued where they stopped (lengths were checked).
    pub(super) fn restore_samplers<'s>(&self, samplers: impl Iterator<Item = &'s mut Sampler>) {
        for (sampler, &(seed, drawn)) in samplers.zip(&self.manifest.samplers) {
            *sampler = Sampler::resume(seed, drawn);
        }
    }

    pub(crate) fn restore_ddp(
        mut self,
        common: &mut Common,
        trainer: &mut CpuTrainer,
        samplers: &mut [Sampler],
    ) -> Result<(), RunError> {
        self.check(samplers.len(), trainer.params().len())?;
        self.restore_common(common)?;
        trainer
            .params_mut()
            .copy_from_slice(&self.tensor("params")?);
        self.restore_optimizer(0, trainer)?;
        self.restore_samplers(samplers.iter_mut());
        Ok(())
    }

    /// Streaming: a round strategy's state plus every site's own parameters (they differ from
    /// the global ones between syncs) and where the in-flight merge is due.
    pub(crate) fn of_streaming(
        common: &Common,
        step: u64,
        coordinator: &Coordinator,
        sites: &[SiteRuntime],
        due_step: u64,
    ) -> Self {
        let mut saved = RunState::of_rounds(common, step, coordinator, sites);
        for (k, site) in sites.iter().enumerate() {
            saved
                .tensors
                .push((format!("site{k}.params"), site.trainer.params().to_vec()));
        }
        // (The second number is the run's summed step time, which the compute time already
        // holds; kept so that the state format stays the same.)
        saved.manifest.streaming = Some((due_step, common.compute_seconds));
        saved
    }

    /// Returns the step the in-flight merge is due.
    pub(crate) fn restore_streaming(
        mut self,
        common: &mut Common,
        coordinator: &mut Coordinator,
        sites: &mut [SiteRuntime],
    ) -> Result<u64, RunError> {
        let streaming = self
            .manifest
            .streaming
            .ok_or_else(|| RunError::State("the saved state is not a streaming run's".into()))?;
        self.check(sites.len(), coordinator.global().len())?;
        let mut params = Vec::with_capacity(sites.len());
        for k in 0..sites.len() {
            let name = format!("site{k}.params");
            let at = self
                .tensors
                .iter()
                .position(|(n, _)| *n == name)
                .ok_or_else(|| RunError::State(format!("saved state lacks {name}")))?;
            params.push(self.tensors.remove(at).1);
        }
        self.restore_rounds(common, coordinator, sites)?;
        for (site, p) in sites.iter_mut().zip(params) {
            site.trainer.params_mut().copy_from_slice(&p);
        }
        Ok(streaming.0)
    }

    /// Site k's optimizer, codec stream and (a hostile site's) stale update; its error-feedback
    /// residual, if one was saved, for the caller to restore with the parameters it holds.
    pub(super) fn restore_site_parts(
        &mut self,
        k: usize,
        site: &mut SiteRuntime,
    ) -> Result<Option<Vec<f32>>, RunError> {
        self.restore_optimizer(k, &mut site.trainer)?;
        if let Some(Some(random)) = self.manifest.site_codec_random.get(k) {
            site.site.set_codec_random_state(*random);
        }
        let stale = self.optional_tensor(&format!("site{k}.stale"))?;
        if let Some(attacker) = site.attacker.as_mut() {
            attacker.stale = stale.or(attacker.stale.take());
        }
        self.optional_tensor(&format!("site{k}.residual"))
    }

    pub(crate) fn restore_rounds(
        mut self,
        common: &mut Common,
        coordinator: &mut Coordinator,
        sites: &mut [SiteRuntime],
    ) -> Result<(), RunError> {
        self.check(sites.len(), coordinator.global().len())?;
        self.restore_common(common)?;
        let shared = self.optional_tensor("shared")?;
        let has_shared = shared.is_some();
        let shared = shared.unwrap_or_default();
        let synced = if has_shared {
            (0..sites.len() as u32).collect()
        } else {
            Vec::new()
        };
        let trust = self.manifest.trust.take().unwrap_or_default();
        let state = CoordinatorState {
            round: self.manifest.round,
            global: self.tensor("global")?,
            momentum_buffer: self.tensor("momentum")?,
            shared: shared.clone(),
            synced,
            trust,
            downlink_random: self.manifest.downlink_random,
        };
        coordinator.restore(state)?;
        for (k, site) in sites.iter_mut().enumerate() {
            let residual = self.restore_site_parts(k, site)?;
            if has_shared || residual.is_some() {
                let start = if has_shared {
                    shared.clone()
                } else {
                    site.site.round_start().to_vec()
                };
                site.site.restore(&start, residual.as_deref())?;
            }
        }
        self.restore_samplers(sites.iter_mut().map(|s| &mut s.sampler));
        Ok(())
    }
}
