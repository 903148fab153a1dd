//! Exit codes a script can use: 0 done; 1 the run failed (I/O, the network, a node, an
//! interruption, a run stopped on request); 2 the command line does not parse (clap's usage
//! errors); 3 refused input (a setting, file, key, corpus or saved state that cannot be right:
//! nothing ran, or nothing was changed). An error is a refused input unless it is marked as a
//! run failure with [`ran`] (compare, cluster, train, coordinator, site, shape and the robustness
//! grid mark theirs; the engine and coordinator benchmarks, which only compute, do not).

use lowband_runtime::RunError;

pub const EXIT_FAILED: i32 = 1;
pub const EXIT_REFUSED: i32 = 3;

/// The mark of an error that happened while a run ran (a context with no text of its own).
#[derive(Debug)]
pub struct RunFailed;

impl std::fmt::Display for RunFailed {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

/// `error` happened while running: marked as a run failure, unless it is a refusal of the run's
/// own settings or saved state (which changes nothing and exits as refused input).
pub fn ran(error: anyhow::Error) -> anyhow::Error {
    let refused = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<RunError>(),
            Some(RunError::InvalidConfig { .. } | RunError::State(_) | RunError::Data(_))
        )
    });
    if refused {
        error
    } else {
        error.context(RunFailed)
    }
}

/// The exit code of a failed command.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    if error.downcast_ref::<RunFailed>().is_some() {
        EXIT_FAILED
    } else {
        EXIT_REFUSED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_failures_and_refused_inputs_exit_differently() {
        let network = anyhow::Error::from(RunError::Protocol("connection closed".into()));
        assert_eq!(exit_code(&ran(network)), EXIT_FAILED);
        let state = anyhow::Error::from(RunError::State("altered".into()));
        assert_eq!(exit_code(&ran(state)), EXIT_REFUSED);
        assert_eq!(
            exit_code(&anyhow::anyhow!("--threads: too many")),
            EXIT_REFUSED
        );
        // A context added on top keeps the mark.
        let marked = ran(anyhow::anyhow!("disk full")).context("writing the report");
        assert_eq!(exit_code(&marked), EXIT_FAILED);
    }
}
