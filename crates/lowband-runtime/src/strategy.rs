//! Strategies: named combinations of how often sites sync and how the merge is applied.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Every step, the sites' gradients are averaged (ring all-reduce of fp32), one AdamW step.
    Ddp,
    /// H inner AdamW steps per site, then outer Nesterov SGD on the mean delta.
    Diloco,
    /// H inner steps per site, then the plain mean of the sites' parameters.
    Fedavg,
}

/// A strategy with its sync interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Strategy {
    pub kind: StrategyKind,
    /// Inner steps per round (1 for DDP).
    pub inner_steps: u64,
}

impl Strategy {
    /// Parse `ddp`, `diloco`, `fedavg`, optionally with `@H` (e.g. `diloco@10`); without it,
    /// round strategies use `default_inner_steps`.
    pub fn parse(text: &str, default_inner_steps: u64) -> Result<Strategy, String> {
        let (name, h) = match text.split_once('@') {
            Some((name, h)) => {
                let h: u64 = h.parse().map_err(|_| format!("strategy {text:?}: H after '@' must be a whole number"))?;
                if h == 0 {
                    return Err(format!("strategy {text:?}: H must be at least 1"));
                }
                (name, Some(h))
            }
            None => (text, None),
        };
        let kind = match name {
            "ddp" => StrategyKind::Ddp,
            "diloco" => StrategyKind::Diloco,
            "fedavg" => StrategyKind::Fedavg,
            other => return Err(format!("unknown strategy {other:?}; known: ddp, diloco, fedavg (optionally NAME@H)")),
        };
        if kind == StrategyKind::Ddp && h.is_some_and(|h| h != 1) {
            return Err("ddp synchronises every step; it takes no @H".into());
        }
        let inner_steps = if kind == StrategyKind::Ddp { 1 } else { h.unwrap_or(default_inner_steps) };
        Ok(Strategy { kind, inner_steps })
    }

    /// The name used in reports: `ddp`, `diloco@50`.
    pub fn name(&self) -> String {
        match self.kind {
            StrategyKind::Ddp => "ddp".into(),
            StrategyKind::Diloco => format!("diloco@{}", self.inner_steps),
            StrategyKind::Fedavg => format!("fedavg@{}", self.inner_steps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_intervals() {
        assert_eq!(Strategy::parse("ddp", 50).unwrap(), Strategy { kind: StrategyKind::Ddp, inner_steps: 1 });
        assert_eq!(Strategy::parse("diloco", 50).unwrap().name(), "diloco@50");
        assert_eq!(Strategy::parse("fedavg@10", 50).unwrap().name(), "fedavg@10");
        assert!(Strategy::parse("ddp@5", 50).is_err());
        assert!(Strategy::parse("diloco@0", 50).is_err());
        assert!(Strategy::parse("diloco@x", 50).is_err());
        assert!(Strategy::parse("gossip", 50).unwrap_err().contains("unknown strategy"));
    }
}
