//! [`Abort`]: stopping a coordinator's loop from outside it, with the reason. `lowband cluster`'s
//! supervisor uses it when every site process it started has died: without it the coordinator
//! waited for them until its join timeout (two minutes by default) and then said only that they
//! had not joined.

use std::sync::Arc;

use tokio::sync::watch;

/// A handle that stops the coordinator loops it is given (`ServeOptions::abort`,
/// [`crate::Switchboard::open`]) at their next wait, with [`crate::NetError::Stopped`] and the
/// reason. Any thread may call [`Abort::abort`]; clones share one state.
#[derive(Clone, Debug)]
pub struct Abort(Arc<watch::Sender<Option<String>>>);

impl Default for Abort {
    fn default() -> Self {
        Abort(Arc::new(watch::channel(None).0))
    }
}

impl Abort {
    pub fn new() -> Abort {
        Abort::default()
    }

    /// Stop, saying why (the first reason given is kept).
    pub fn abort(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.0.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
    }

    /// The reason, once aborted (at once if that happened before this call).
    pub(crate) async fn aborted(&self) -> String {
        let mut receiver = self.0.subscribe();
        let reason = receiver
            .wait_for(Option::is_some)
            .await
            .map(|reason| reason.clone().unwrap_or_default());
        // The sender lives as long as `self`: waiting cannot end without a reason.
        reason.unwrap_or_default()
    }
}

/// Wait for `abort` if there is one, forever otherwise (a `select!` branch that never fires).
pub(crate) async fn aborted(abort: Option<&Abort>) -> String {
    match abort {
        Some(abort) => abort.aborted().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_from_another_thread_ends_the_wait_with_its_first_reason() {
        let runtime = crate::runtime(2, "abort-test").unwrap();
        let abort = Abort::new();
        let other = abort.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            other.abort("every site process died");
            other.abort("a later reason");
        });
        let reason = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), aborted(Some(&abort))).await
        });
        thread.join().unwrap();
        assert_eq!(reason.unwrap(), "every site process died");
        // Already aborted: at once.
        let again = runtime.block_on(aborted(Some(&abort)));
        assert_eq!(again, "every site process died");
        // No abort: never.
        let never = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(20), aborted(None)).await
        });
        assert!(never.is_err());
    }
}
