//! The options beside the presets' codecs: when rounds close on the emulated clock (`quorum`,
//! `grace`, `stale`) and the sites' inner optimizer (`inner`, `muon_lr`).

use super::Strategy;

impl Strategy {
    /// The overrides added with asynchronous rounds and Muon.
    /// `muon_lr_given`: whether `muon_lr` is among the overrides already read.
    pub(super) fn apply_late_override(
        &mut self,
        key: &str,
        value: &str,
        muon_lr_given: bool,
    ) -> Result<(), String> {
        match key {
            "inner" | "muon_lr" => self.apply_inner_override(key, value, muon_lr_given),
            _ => self.apply_schedule_override(key, value),
        }
    }

    /// `quorum`, `grace` or `stale`: when rounds close on the emulated clock.
    fn apply_schedule_override(&mut self, key: &str, value: &str) -> Result<(), String> {
        let whole = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{key}=`{v}` is not a whole number"))
        };
        if key == "quorum" {
            if self.streaming.is_some() || self.asynchronous.is_some() {
                return Err("`quorum` applies to synchronous round strategies (not streaming, not async-diloco)".into());
            }
            let quorum = whole(value)?;
            if quorum == 0 {
                return Err("quorum must be at least 1".into());
            }
            self.quorum = Some(quorum as usize);
            return Ok(());
        }
        let asynchronous = self
            .asynchronous
            .as_mut()
            .ok_or_else(|| format!("`{key}` applies to async-diloco only"))?;
        if key == "grace" {
            let grace: f32 = value
                .parse()
                .map_err(|_| format!("grace=`{value}` is not a number"))?;
            if !(grace.is_finite() && (0.0..=100.0).contains(&grace)) {
                return Err(format!("grace {grace} is not in [0, 100] round intervals"));
            }
            asynchronous.grace = grace;
        } else {
            asynchronous.staleness_max = whole(value)?;
        }
        Ok(())
    }

    /// `inner=adamw|muon` or `muon_lr=X` (Muon with that peak learning rate).
    /// A preset's own Muon (`frugal`) gives way to `inner=adamw`; an explicit `muon_lr` does not.
    fn apply_inner_override(
        &mut self,
        key: &str,
        value: &str,
        muon_lr_given: bool,
    ) -> Result<(), String> {
        let muon = lowband_engine::MuonConfig::default();
        match (key, value) {
            ("inner", "adamw") if !muon_lr_given => self.inner_muon = Some(None),
            ("inner", "muon") => {
                self.inner_muon
                    .get_or_insert(Some(muon))
                    .get_or_insert(muon);
            }
            ("inner", other) if other != "adamw" => {
                return Err(format!("inner=`{other}`: adamw or muon"))
            }
            ("muon_lr", _) if self.inner_muon != Some(None) => {
                let lr: f32 = value
                    .parse()
                    .map_err(|_| format!("muon_lr=`{value}` is not a number"))?;
                let inner = self
                    .inner_muon
                    .get_or_insert(Some(muon))
                    .get_or_insert(muon);
                inner.lr = lr;
                inner
                    .validate()
                    .map_err(|e| format!("muon_lr=`{value}`: {e}"))?;
            }
            _ => return Err("inner=adamw contradicts muon_lr".into()),
        }
        Ok(())
    }

    /// The sites' optimizer under this strategy, given the run's.
    pub fn inner_optimizer(
        &self,
        run: lowband_engine::OptimizerConfig,
    ) -> lowband_engine::OptimizerConfig {
        match self.inner_muon {
            Some(muon) => lowband_engine::OptimizerConfig { muon, ..run },
            None => run,
        }
    }

    /// Whether rounds run on the emulated clock's schedule (asynchronous, or with a quorum).
    pub fn scheduled(&self) -> bool {
        self.asynchronous.is_some() || self.quorum.is_some()
    }
}
