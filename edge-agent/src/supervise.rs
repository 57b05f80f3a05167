//! Background tasks that must not die quietly: the sync loop and the report loop.
//! A panic in one (a bug, or an answer no one thought of) is logged and the task
//! starts again, so an agent never keeps serving old versions with green probes
//! while it has silently stopped following its assignment.

use std::future::Future;
use std::time::Duration;

/// How long to wait before starting a task again after it panicked.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Runs the task `start` makes until it returns; whenever it panics, logs the panic
/// and starts a new one after `delay`.
pub async fn restart_on_panic<F, T>(what: &'static str, delay: Duration, start: F)
where
    F: Fn() -> T,
    T: Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(start()).await {
            Ok(()) => return,
            Err(error) if error.is_panic() => {
                tracing::error!(task = what, %error, retry_in = ?delay, "background task panicked; starting it again");
                tokio::time::sleep(delay).await;
            }
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_panicking_task_is_started_again_until_it_returns() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        restart_on_panic("test", Duration::from_millis(1), move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("a bug in the loop");
                }
            }
        })
        .await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two panics, then a run that returned"
        );
    }
}
